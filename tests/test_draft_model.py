"""Draft-model speculation (method "draft") and `truncated_model`, on SmolLM2-135M (and Gemma 3 once).

The draft models are the target's own first layers (`truncated_model`): no second model with the
same tokenizer ships here. An 8-layer draft almost never agrees with the target (tau ~1.05), so it
exercises the rejection path; the full-depth "truncation" agrees always and exercises acceptance.
Each generation runs once per (prompt, options) and is shared by the tests (the machine is slow).
"""

from __future__ import annotations

from functools import lru_cache
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import specprobe
import specprobe.api
from specprobe.backends.torch import TorchBackend
from specprobe.backends.torch.kv_cache import cache_length, new_cache, snapshot
from specprobe.backends.torch.truncate import truncated_model
from specprobe.drafters import make_drafter
from specprobe.drafters.draft_model import DraftModelConfig
from specprobe.engine.protocol import Acceptance, StepResult
from specprobe.engine.tree import DraftTree
from specprobe.errors import InvalidOptionError
from specprobe.models import format_prompt

NEW_TOKENS = 64
PROMPTS = [
    "Translate to French: The cat sleeps on the warm windowsill every afternoon.",  # ends at EOS (~27 tokens)
    "Summarize in one sentence: The meeting was moved from Monday to Wednesday because the manager was travelling.",  # ~15
    "What is the capital of Japan? Answer in one sentence.",  # a short fact (~8 tokens)
]


def generate_keeping_drafter(lm, prompt, method: str, **options):
    """`specprobe.generate`, also returning the drafter it built (to inspect its cache)."""
    made = []

    def capture(name, **opts):
        made.append(make_drafter(name, **opts))
        return made[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(specprobe.api, "make_drafter", capture)
        out = specprobe.generate(lm.model, lm.tokenizer, prompt, method=method, **options)
    return out, made[0]


def assert_draft_cache_is_the_committed_prefix(drafter, committed: list[int]) -> None:
    """The draft cache holds exactly the committed tokens it was fed, as a fresh prefill computes them."""
    n = cache_length(drafter.cache)
    assert n + len(drafter.pending) == len(committed)
    assert drafter.pending == committed[n:]
    fresh = new_cache()
    drafter.draft.forward(fresh, committed[:n], DraftTree())
    for (k, v), (k0, v0) in zip(snapshot(drafter.cache), snapshot(fresh)):
        assert k.shape == k0.shape and v.shape == v0.shape
        torch.testing.assert_close(k, k0, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(v, v0, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def run(smollm2):
    draft8 = truncated_model(smollm2.model, 8)

    @lru_cache(maxsize=None)
    def generate(prompt: str, method: str = "draft", **options):
        extra = {"draft_model": draft8} if method == "draft" else {}
        return generate_keeping_drafter(smollm2, prompt, method, max_new_tokens=NEW_TOKENS, **extra, **options)

    return generate


# -- losslessness ----------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS, ids=["translate", "summarize", "capital"])
@pytest.mark.parametrize("top_k", [1, 2], ids=["chain", "tree"])
def test_identical_to_ar(run, prompt, top_k):
    (ref, _), (out, drafter) = run(prompt, "ar"), run(prompt, tree_top_k=top_k)
    assert out.token_ids == ref.token_ids
    assert out.stop_reason == ref.stop_reason
    s = out.stats
    assert sum(s.accept_lengths) == s.new_tokens and len(s.accept_lengths) == s.target_forwards
    assert max(s.draft_sizes) == 5 * top_k  # num_tokens chain tokens, each with top_k - 1 runners-up
    assert_draft_cache_is_the_committed_prefix(drafter, out.prompt_ids + out.token_ids)


def test_full_depth_draft_is_always_accepted(smollm2, run):
    # 13 tokens: two steps of 5 drafts + 1 bonus, then one step without drafts (1 token left)
    full = truncated_model(smollm2.model, smollm2.model.config.num_hidden_layers)
    out, drafter = generate_keeping_drafter(smollm2, PROMPTS[0], "draft", draft_model=full, max_new_tokens=13)
    ref, _ = run(PROMPTS[0], "ar")
    assert out.token_ids == ref.token_ids[:13]
    assert out.stats.accept_lengths == [6, 6, 1]
    assert_draft_cache_is_the_committed_prefix(drafter, out.prompt_ids + out.token_ids)


# -- propose / observe on one step, without the loop -----------------------------------------


def one_step(lm, draft_model, **options):
    """A drafter started on a prompt and its first proposal."""
    drafter = make_drafter("draft", draft_model=draft_model, **options)
    session = SimpleNamespace(target=TorchBackend(lm.model), ids=format_prompt(lm.tokenizer, PROMPTS[0]))
    drafter.start(session)
    return drafter, session, drafter.propose(session)


def test_tree_shape_and_early_stop(smollm2):
    draft = truncated_model(smollm2.model, 2)
    _, _, p = one_step(smollm2, draft, num_tokens=3, tree_top_k=3)
    assert p.tree.parents == [-1, -1, -1, 0, 0, 0, 3, 3, 3]  # chain nodes 0, 3, 6; runners-up beside them
    assert len(set(p.tree.tokens[:3])) == 3
    _, _, p = one_step(smollm2, draft, num_tokens=4, min_confidence=1.0)  # no token is that sure
    assert len(p.tree) == 1


@pytest.mark.parametrize(
    "top_k, path, kept",
    [
        (1, [], 0),  # all rejected: only the prompt stays
        (1, [0, 1], 2),  # t1 t2 accepted, both were fed
        (1, [0, 1, 2], 2),  # all accepted; t3 was never fed: it becomes pending
        (2, [0, 3], 1),  # t1, then the runner-up beside t2 (tree: t1 r1 | t2 r2 | t3 r3)
        (2, [1], 0),  # the runner-up beside t1
    ],
)
def test_observe_cuts_the_draft_cache_back(smollm2, top_k, path, kept):
    # 3 chain tokens proposed (t1, t2 fed to the draft); the target accepts `path`
    drafter, session, p = one_step(smollm2, truncated_model(smollm2.model, 2), num_tokens=3, tree_top_k=top_k)
    prompt_len = len(session.ids)
    assert cache_length(drafter.cache) == prompt_len + 2
    tokens = [p.tree.tokens[i] for i in path] + [7]  # + a bonus token
    session.ids = session.ids + tokens
    drafter.observe(session, StepResult(p, None, Acceptance(path, tokens), tokens))
    assert cache_length(drafter.cache) == prompt_len + kept
    assert_draft_cache_is_the_committed_prefix(drafter, session.ids)


# -- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"draft_model": None},  # no draft model (make_drafter drops None options: the default None)
        {"draft_model": "smollm2-135m"},  # a name, not a model
        {"num_tokens": 0},
        {"tree_top_k": 0},
        {"tree_top_k": 1.5},
        {"min_confidence": 1.5},
    ],
)
def test_bad_options(smollm2, options):
    with pytest.raises(InvalidOptionError):
        make_drafter("draft", **{"draft_model": smollm2.model, **options})


def test_draft_model_with_another_vocabulary(smollm2):
    cfg = LlamaConfig(vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    tiny = LlamaForCausalLM(cfg).eval()
    with pytest.raises(InvalidOptionError, match="vocabulary"):
        specprobe.generate(smollm2.model, smollm2.tokenizer, "Hi", method="draft", draft_model=tiny, max_new_tokens=4)


def test_defaults_and_loaded_model_accepted(smollm2):
    cfg = DraftModelConfig(draft_model=smollm2)  # a LoadedModel is unwrapped
    assert cfg.draft_model is smollm2.model
    assert (cfg.num_tokens, cfg.tree_top_k, cfg.min_confidence) == (5, 1, 0.0)


# -- truncated_model -------------------------------------------------------------------------


@pytest.mark.parametrize("n_layers", [1, 8, 29])
def test_truncated_llama_equals_the_first_layers(smollm2, n_layers):
    model = smollm2.model
    ids = torch.tensor([smollm2.tokenizer("The quick brown fox jumps over the lazy dog.").input_ids])
    t = ids.shape[1]
    small = truncated_model(model, n_layers)
    with torch.inference_mode():
        got = small(ids).logits  # [1, t, vocab]
        # by hand: embedding, the first n layers (causal mask, RoPE), final norm, LM head
        h = model.model.embed_tokens(ids)  # [1, t, hidden]
        pos = torch.arange(t)[None]  # [1, t]
        rope = model.model.rotary_emb(h, pos)
        causal = torch.full((t, t), torch.finfo(h.dtype).min).triu(1)[None, None]  # [1, 1, t, t]
        for layer in model.model.layers[:n_layers]:
            h = layer(h, attention_mask=causal, position_embeddings=rope, position_ids=pos)
        want = model.lm_head(model.model.norm(h))  # [1, t, vocab]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert small.config.num_hidden_layers == n_layers and len(small.model.layers) == n_layers
    assert model.config.num_hidden_layers == 30 and len(model.model.layers) == 30  # the original is untouched
    shared = {p.data_ptr() for p in model.parameters()}
    assert all(p.data_ptr() in shared for p in small.parameters())  # no copies


def test_truncated_gemma3_keeps_its_layer_types(gemma3):
    model = gemma3.model
    ids = torch.tensor([gemma3.tokenizer("The quick brown fox jumps over the lazy dog.").input_ids])
    small = truncated_model(model, 6)
    assert small.config.layer_types == model.config.layer_types[:6]
    assert model.config.num_hidden_layers == 18 and len(model.config.layer_types) == 18
    with torch.inference_mode():
        got = small(ids).logits
        h = model(ids, output_hidden_states=True).hidden_states[6]  # after layer 6, before the final norm
        want = model.lm_head(model.model.norm(h))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    out = specprobe.generate(model, gemma3.tokenizer, PROMPTS[2], method="draft", draft_model=small, num_tokens=2, max_new_tokens=8)
    ref = specprobe.generate(model, gemma3.tokenizer, PROMPTS[2], method="ar", max_new_tokens=8)
    assert out.token_ids == ref.token_ids


@pytest.mark.parametrize("n_layers", [0, 31, "8"])
def test_truncated_bad_layer_count(smollm2, n_layers):
    with pytest.raises(InvalidOptionError):
        truncated_model(smollm2.model, n_layers)


def test_cli_generate_with_a_truncated_draft_model():
    import json
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "specprobe", "generate", "--method", "draft", "--draft-model", "truncated:6",
         "--num-tokens", "3", "--max-new-tokens", "12", "--json", "--compare", PROMPTS[2]],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # the workers' thread count: their measured kernel plans apply
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["identical_to_ar"] is True
    assert record["options"] == {"num_tokens": 3, "draft_model": "truncated:6"}
