"""EAGLE / ConFu draft heads: the head's shapes, training, persistence, the contemplate rows'
losslessness, and greedy parity of `eagle` and `confu` with plain decoding (SmolLM2-135M).

The heads here are trained in seconds on the answers to the test prompts themselves (the plain
greedy outputs), so that drafts are often accepted and both the acceptance and the rejection paths
of the tree run; the real heads (`specprobe train-head` on ShareGPT) are measured by the bench.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

import specprobe
from specprobe.backends.torch import TorchBackend
from specprobe.backends.torch.kv_cache import new_cache
from specprobe.drafters import make_drafter
from specprobe.engine.tree import ROOT, AuxRows, DraftTree
from specprobe.errors import InvalidOptionError
from specprobe.heads.draft_head import DraftHead, HeadConfig
from specprobe.heads.train import TrainOptions, compute_examples, read_chats, train, unrolled_loss
from specprobe.models import format_prompt

PROMPTS = [
    "Write a haiku about autumn leaves.",
    "List three uses of a paperclip.",
    "What is the capital of Japan? Answer in one sentence.",
]
NEW_TOKENS = 40


def tiny_config(contemplate: int = 0) -> HeadConfig:
    return HeadConfig(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64, vocab_size=100,
                      feature_layers=(1, 2, 3), contemplate=contemplate)


def test_head_shapes():
    head = DraftHead(tiny_config(contemplate=2))
    n, past = 5, 7
    feats = head.fuse_features(torch.randn(n, 32), torch.randn(n, 32), torch.randn(n, 32))
    assert feats.shape == (n, 32)
    visible = torch.ones(n, past + n, dtype=torch.bool)
    cache = (torch.randn(2, past, 8), torch.randn(2, past, 8))
    out, normed, (k, v) = head.step(feats, torch.randn(n, 32), torch.arange(past, past + n), visible, cache, torch.randn(n, 32))
    assert out.shape == normed.shape == (n, 32) and k.shape == v.shape == (2, n, 8)
    assert head.contemplate_embeds(torch.randn(3, 32)).shape == (3, 2, 32)
    assert head.plan_vectors(torch.randn(3, 2, 96)).shape == (3, 2, 32)
    # an untrained plan is zero: a fresh ConFu head drafts exactly like its EAGLE head
    assert torch.equal(head.plan_vectors(torch.randn(4, 96)), torch.zeros(4, 32))


def test_head_attention_follows_the_mask():
    """A row that cannot see a key is unaffected by it; one that can, is."""
    torch.manual_seed(0)
    head = DraftHead(tiny_config())
    x, e, pos = torch.randn(3, 32), torch.randn(3, 32), torch.arange(3)
    causal = torch.tril(torch.ones(3, 3, dtype=torch.bool))
    a, _, _ = head.step(x, e, pos, causal)
    x2 = x.clone()
    x2[2] += 1.0  # change the last row's input
    b, _, _ = head.step(x2, e, pos, causal)
    assert torch.allclose(a[:2], b[:2], atol=1e-6) and not torch.allclose(a[2], b[2])


def test_read_chats_parses_a_cut_off_json_list(tmp_path):
    records = [{"id": str(i), "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]} for i in range(3)]
    text = json.dumps(records, indent=1)
    cut = text[: text.index('"a2"') + 2]  # the third record is cut off
    path = tmp_path / "cut.json"
    path.write_text(cut)
    chats = read_chats(str(path), 10)
    assert chats == [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(2)]
    jsonl = tmp_path / "chats.jsonl"
    jsonl.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"turns": ["x", "y"]}\n')
    assert read_chats(str(jsonl), 10, skip=1) == [[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]]
    with pytest.raises(InvalidOptionError):
        read_chats(str(tmp_path / "missing.jsonl"), 10)


@pytest.fixture(scope="module")
def answers(smollm2):
    """The plain greedy answers to PROMPTS (the parity reference, and the tiny heads' training data)."""
    return [specprobe.generate(smollm2.model, smollm2.tokenizer, p, method="ar", max_new_tokens=NEW_TOKENS).token_ids for p in PROMPTS]


@pytest.fixture(scope="module")
def heads(smollm2, answers, tmp_path_factory):
    """(eagle head, confu head, training history) trained on the test prompts' own answers."""
    root = tmp_path_factory.mktemp("heads")
    data = root / "chats.jsonl"
    with data.open("w") as f:
        for p, ids in zip(PROMPTS, answers):
            f.write(json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": smollm2.tokenizer.decode(ids, skip_special_tokens=True)}]}) + "\n")
    common = dict(data=str(data), conversations=3, max_len=128, lr=2e-3, validation=1, checkpoint_every=100, draft_vocab=2048, features=str(root / "f.pt"))
    # validation=1 holds out one chat: train on all three by listing them twice
    with data.open("a") as f:
        f.write(data.read_text())
    common["conversations"] = 6
    train(smollm2, TrainOptions(epochs=12, **common), root / "eagle")
    history = json.loads((root / "eagle" / "training.json").read_text())
    train(smollm2, TrainOptions(epochs=2, contemplate=2, anchors=8, init=str(root / "eagle"), **common), root / "confu")
    return root / "eagle", root / "confu", history


def test_training_lowers_the_loss_and_writes_a_loadable_head(heads):
    eagle_dir, confu_dir, history = heads
    loss = history["loss"]
    assert sum(loss[-5:]) / 5 < 0.5 * sum(loss[:5]) / 5
    assert (eagle_dir / "training.png").is_file() and (eagle_dir / "checkpoint.pt").is_file()
    for d in (eagle_dir, confu_dir):
        head = DraftHead.load(d)
        again = DraftHead.load(d)
        for (name, a), (_, b) in zip(head.state_dict().items(), again.state_dict().items()):
            assert torch.equal(a, b), name
    eagle = DraftHead.load(eagle_dir)
    assert DraftHead.load(confu_dir).config.contemplate == 2 and 0 < eagle.config.draft_vocab == len(eagle.vocab_ids) <= 2048


def test_save_load_round_trip_gives_the_same_outputs(tmp_path):
    torch.manual_seed(1)
    head = DraftHead(tiny_config(contemplate=1))
    head.set_vocabulary([3, 1, 7])
    head.save(tmp_path / "h")
    loaded = DraftHead.load(tmp_path / "h")
    x, pos, vis = torch.randn(2, 32), torch.arange(2), torch.ones(2, 2, dtype=torch.bool)
    assert torch.equal(head.step(x, x, pos, vis)[1], loaded.step(x, x, pos, vis)[1])
    assert loaded.vocab_ids.tolist() == [1, 3, 7]
    with pytest.raises(InvalidOptionError):
        DraftHead.load(tmp_path / "nothing-here")


def test_contemplate_rows_leave_the_real_logits_unchanged(smollm2, heads):
    target = TorchBackend.of(smollm2.model)
    head = DraftHead.load(heads[1])
    ids = format_prompt(smollm2.tokenizer, PROMPTS[0])
    tree = DraftTree([100, 200, 300], [ROOT, 0, ROOT])
    embeds = head.contemplate_embeds(torch.randn(1, target.config.hidden_size))[0]  # [k, h]
    aux = AuxRows(torch.cat([embeds, embeds]).detach(), [ROOT, ROOT, 0, 0], [1, 2, 1, 2], [(), (0,), (), (2,)])
    plain = target.forward(new_cache(), ids, tree)
    with_rows = target.forward(new_cache(), ids, tree, aux, output_hidden_states=True)
    assert with_rows.aux_logits.shape[0] == 4
    assert torch.allclose(plain.logits, with_rows.logits, atol=1e-3, rtol=0)
    assert torch.equal(plain.logits.argmax(-1), with_rows.logits.argmax(-1))


@pytest.mark.parametrize("method", ["eagle", "confu"])
@pytest.mark.parametrize("budget", [6, "auto"])
def test_greedy_parity(smollm2, answers, heads, method, budget):
    head = heads[0] if method == "eagle" else heads[1]
    taus = []
    for prompt, expected in zip(PROMPTS, answers):
        r = specprobe.generate(smollm2.model, smollm2.tokenizer, prompt, method=method, max_new_tokens=NEW_TOKENS, head=str(head), budget=budget)
        assert r.token_ids == expected, prompt
        taus.append(r.stats.tau)
    if budget == 6:  # a head trained on these answers drafts them: the acceptance path runs
        assert sum(taus) / len(taus) > 1.5, taus


def test_parity_on_unseen_prompts(smollm2, spec_bench_questions, heads):
    """Prompts the head never saw (mostly rejected drafts), with a deeper, wider tree."""
    prompt = random.Random(0).choice(spec_bench_questions)["turns"][0]
    ar = specprobe.generate(smollm2.model, smollm2.tokenizer, prompt, method="ar", max_new_tokens=20)
    r = specprobe.generate(smollm2.model, smollm2.tokenizer, prompt, method="confu", max_new_tokens=20, head=str(heads[1]), budget=8, depth=4, branching=3, contemplate_after="all")
    assert r.token_ids == ar.token_ids


def test_bad_heads_are_clear_errors(smollm2, heads, tmp_path):
    with pytest.raises(InvalidOptionError, match="need a trained head"):
        make_drafter("eagle")
    with pytest.raises(InvalidOptionError, match="contemplate"):
        make_drafter("confu", head=str(heads[0]))
    with pytest.raises(InvalidOptionError, match="min_path_prob"):
        make_drafter("eagle", head=str(heads[0]), min_path_prob=1.5)
    with pytest.raises(InvalidOptionError, match="depth"):
        make_drafter("eagle", head=str(heads[0]), depth=0)
    with pytest.raises(InvalidOptionError, match="draft-head directory"):
        make_drafter("eagle", head=str(tmp_path))
    wrong = DraftHead(tiny_config())
    wrong.save(tmp_path / "tiny")
    with pytest.raises(InvalidOptionError, match="trained for"):
        specprobe.generate(smollm2.model, smollm2.tokenizer, "hi", method="eagle", max_new_tokens=4, head=str(tmp_path / "tiny"))


def test_unrolled_loss_reports_one_agreement_per_depth(smollm2):
    target = TorchBackend.of(smollm2.model)
    head = DraftHead(HeadConfig.for_target(target))
    head.init_from_target(target)
    ex = compute_examples(smollm2, [[{"role": "user", "content": "Count from one to ten."}]], head.config.feature_layers, 32)[0]
    loss, agreement = unrolled_loss(head, target, ex, unroll=3)
    assert loss.requires_grad and len(agreement) == 3 and all(0.0 <= a <= 1.0 for a in agreement)


def test_interrupted_training_resumes_from_its_checkpoint(smollm2, answers, tmp_path, monkeypatch):
    import specprobe.heads.train as th

    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"turns": [p, smollm2.tokenizer.decode(a, skip_special_tokens=True)]}) + "\n" for p, a in zip(PROMPTS, answers)))
    opts = TrainOptions(data=str(data), conversations=3, max_len=64, epochs=2, validation=1, checkpoint_every=1, draft_vocab=512)
    real, calls = th.unrolled_loss, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(th, "unrolled_loss", failing)
    with pytest.raises(KeyboardInterrupt):
        train(smollm2, opts, tmp_path / "run")
    assert not (tmp_path / "run" / "head.pt").exists()
    monkeypatch.setattr(th, "unrolled_loss", real)
    train(smollm2, opts, tmp_path / "run", resume=True)
    history = json.loads((tmp_path / "run" / "training.json").read_text())
    assert history["step"] == [1, 2, 3, 4]  # 2 epochs x 2 training chats, continued after the interruption
