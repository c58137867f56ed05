"""OmniDraft's first slice: the vocabulary bridge (SmolLM2's byte-level BPE <-> Gemma 3's
SentencePiece) and the cross-tokenizer drafter (SmolLM2-135M drafting for Gemma3-270M), whose
greedy output must equal plain decoding token for token."""

from __future__ import annotations

import doctest
import json

import pytest

import specprobe
from specprobe.backends.torch import TorchBackend
from specprobe.drafters import make_drafter
from specprobe.drafters.omnidraft import drafter as omnidraft
from specprobe.drafters.omnidraft.vocab_bridge import NGramCache, VocabularyBridge
from specprobe.errors import InvalidOptionError

TEXT = " the snowflake melted, 3.14\n\nNext, über-fast"


def test_ngram_cache_is_bounded_least_recently_used_and_persists(tmp_path):
    cache = NGramCache(max_entries=2, max_n=3)
    cache.add((1,), 9)  # a single token is the direct map's job
    cache.add((1, 2, 3, 4), 9)  # longer than max_n
    assert len(cache) == 0
    cache.add((1, 2), 10)
    cache.add((3, 4), 11)
    assert cache.get((1, 2)) == 10  # used: (3, 4) is now the least recently used
    cache.add((5, 6, 7), 12)
    assert cache.get((3, 4)) is None and cache.get((1, 2)) == 10 and cache.get((5, 6, 7)) == 12
    cache.save(tmp_path / "c.json")
    again = NGramCache.load(tmp_path / "c.json")
    assert again.entries == cache.entries and again.max_n == 3


@pytest.fixture(scope="module")
def bridge(smollm2, gemma3):
    return VocabularyBridge(smollm2.tokenizer, gemma3.tokenizer)


def test_direct_map_uses_the_targets_own_token(bridge, smollm2, gemma3):
    the_draft = smollm2.tokenizer(" the", add_special_tokens=False).input_ids
    the_target = gemma3.tokenizer(" the", add_special_tokens=False).input_ids
    assert len(the_draft) == len(the_target) == 1 and bridge.direct[the_draft[0]] == the_target[0]
    comma = smollm2.tokenizer(",", add_special_tokens=False).input_ids[0]
    assert bridge.direct[comma] == gemma3.tokenizer(",", add_special_tokens=False).input_ids[0]
    draft_ids, target_ids = bridge.shared_vocabulary()  # the vocabulary online distillation compares on
    assert len(set(target_ids.tolist())) == len(target_ids) > 20_000
    assert all(bridge.direct[d] == t for d, t in zip(draft_ids.tolist(), target_ids.tolist()))


def test_the_cache_learns_merges_and_the_bridge_then_reproduces_the_target_tokens(smollm2, gemma3):
    bridge = VocabularyBridge(smollm2.tokenizer, gemma3.tokenizer)
    draft = smollm2.tokenizer(TEXT, add_special_tokens=False).input_ids
    target = gemma3.tokenizer(TEXT, add_special_tokens=False).input_ids
    before = bridge.to_target(draft, [0.5] * len(draft))
    assert before.draft_used[1] == 0  # ' snowfl' maps neither way: the rest of the text was re-tokenised
    assert bridge.learn(draft, target) >= 2  # ' snowfl' + 'ake' -> ' snowflake', '\n' + '\n' -> '\n\n'
    after = bridge.to_target(draft, [0.5] * len(draft))
    assert after.target_ids == target
    merged = after.draft_used.index(2)
    assert after.probs[merged] == pytest.approx(0.25)  # the product of its two parts


def test_text_outside_both_maps_is_retokenised(bridge, gemma3, smollm2):
    draft = smollm2.tokenizer(" ü", add_special_tokens=False).input_ids  # bytes of one character, split
    out = bridge.to_target(draft, [0.9] * len(draft))
    assert out.target_ids == gemma3.tokenizer(" ü", add_special_tokens=False).input_ids


def test_omnidraft_greedy_parity_gemma3_target_smollm2_drafter(gemma3, smollm2, tmp_path):
    cache_file = tmp_path / "ngrams.json"
    prompts = ["The history of the printing press", "Question: What is the boiling point of water at sea level?\nAnswer:"]
    taus = []
    for prompt in prompts:
        ar = specprobe.generate(gemma3.model, gemma3.tokenizer, prompt, method="ar", max_new_tokens=32)
        r = specprobe.generate(gemma3.model, gemma3.tokenizer, prompt, method="omnidraft", max_new_tokens=32, draft_model=smollm2, ngram_cache=str(cache_file))
        assert r.token_ids == ar.token_ids, prompt
        taus.append(r.stats.tau)
    assert sum(taus) / len(taus) > 1.3, taus  # the drafts are accepted, not only rejected
    assert isinstance(json.loads(cache_file.read_text())["entries"], list)


def test_omnidraft_truncated_drafter_is_lossless(gemma3, smollm2):
    prompt = "The history of the printing press"
    ar = specprobe.generate(gemma3.model, gemma3.tokenizer, prompt, method="ar", max_new_tokens=16)
    r = specprobe.generate(gemma3.model, gemma3.tokenizer, prompt, method="omnidraft", max_new_tokens=16, draft_model=smollm2, draft_layers=8)
    assert r.token_ids == ar.token_ids


def test_omnidraft_bad_options(smollm2):
    with pytest.raises(InvalidOptionError, match="draft_layers"):
        make_drafter("omnidraft", draft_model=smollm2, draft_layers=99)
    with pytest.raises(InvalidOptionError, match="draft_model"):
        make_drafter("omnidraft")
    with pytest.raises(InvalidOptionError, match="draft_model"):
        make_drafter("omnidraft", draft_model="smollm2-135m")


def test_doctests():
    failed, attempted = doctest.testmod(omnidraft)
    assert failed == 0 and attempted > 0


def test_acceptance_predictor_learns_from_the_verdicts():
    m = omnidraft.AcceptancePredictor()
    before = m(0.5, 2)
    for _ in range(100):
        m.update(0.5, 2, False)
    assert m(0.5, 2) < before and m(0.5, 2) < 0.2


def test_online_distillation_is_lossless_saves_and_reloads_its_state(gemma3, smollm2, tmp_path):
    import torch

    path = str(tmp_path / "adapt.pt")
    prompts = ["The history of the printing press", "Question: How many legs does a spider have?\nAnswer:"]
    refs = [specprobe.generate(gemma3.model, gemma3.tokenizer, p, method="ar", max_new_tokens=24).token_ids for p in prompts]
    for prompt, ref in zip(prompts, refs):
        r = specprobe.generate(gemma3.model, gemma3.tokenizer, prompt, method="omnidraft", max_new_tokens=24, draft_model=smollm2, adapt_state=path)
        assert r.token_ids == ref, prompt
        assert r.stats.adapt_time > 0
    saved = torch.load(path, weights_only=True)
    assert saved["distiller"]["updates"] == 2 and len(saved["ngram"]["entries"]) > 0
    adapter = saved["distiller"]["adapter"]
    assert any(float(t.abs().max()) > 0 for n, t in adapter.items() if "lora_B" in n)  # B starts at zero: it moved
    # a frozen drafter with that state drafts with the adapter, and stays lossless
    r = specprobe.generate(gemma3.model, gemma3.tokenizer, prompts[0], method="omnidraft-frozen", max_new_tokens=24, draft_model=smollm2, adapt_state=path)
    assert r.token_ids == refs[0]
    store = TorchBackend.of(smollm2.model).drafter_state()  # what the pair learned lives with the loaded drafter
    frozen = store[("omnidraft", "omnidraft-frozen", omnidraft.tokenizer_signature(gemma3.tokenizer), None, path, 8, 2e-3)]
    assert all(torch.equal(p, adapter[n]) for n, p in frozen.distiller.params.items())
    assert torch.load(path, weights_only=True)["distiller"]["updates"] == 2  # frozen: not updated, not saved
    with pytest.raises(InvalidOptionError, match="another drafter or setting"):
        specprobe.generate(gemma3.model, gemma3.tokenizer, prompts[0], method="omnidraft-frozen", max_new_tokens=4, draft_model=smollm2, adapt_state=path, adapt_rank=4)
    bad = tmp_path / "bad.pt"
    bad.write_text("not a state")
    with pytest.raises(InvalidOptionError, match="cannot read the adapt state"):
        specprobe.generate(gemma3.model, gemma3.tokenizer, prompts[0], method="omnidraft", max_new_tokens=4, draft_model=smollm2, adapt_state=str(bad))


def test_omnidraft_sampling_follows_the_seed_like_plain_decoding(gemma3, smollm2):
    prompt = "Write one sentence about the sea."
    run = lambda method, **kw: specprobe.generate(gemma3.model, gemma3.tokenizer, prompt, method=method, max_new_tokens=24, temperature=1.0, seed=7, **kw).token_ids
    assert run("omnidraft", draft_model=smollm2) == run("ar")
