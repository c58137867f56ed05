"""Losslessness: every greedy path gives exactly the tokens of transformers' `generate`."""

from __future__ import annotations

import pytest
import torch

import specprobe
from conftest import hf_greedy, varied_prompts
from specprobe.api import eos_token_ids
from specprobe.backends.torch import TorchBackend
from specprobe.drafters import make_drafter
from specprobe.engine.decode import decode
from specprobe.models import format_prompt

N_PROMPTS = 13  # round robin over Spec-Bench's 13 categories: one prompt each
NEW_TOKENS = 64
# SmolLM2 (the default model) on every category, Gemma3 on every fourth one (its forwards cost
# about twice as much; ESP's rows on it are tested over deep trees below, past its sliding window
# in test_engine.py, and on every method by the llama.cpp backend's tests)
CASES = [("smollm2", i) for i in range(N_PROMPTS)] + [("gemma3", i) for i in range(0, N_PROMPTS, 4)]


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# One test per (model, prompt), so that `pytest -n 2` spreads them over both workers.
@pytest.mark.parametrize("model_name, index", CASES, ids=[f"{m}-{i}" for m, i in CASES])
def test_esp_identical_to_hf_generate(model_name, index, request, spec_bench_questions):
    lm = request.getfixturevalue(model_name)
    prompt = varied_prompts(spec_bench_questions, N_PROMPTS)[index]
    ids = format_prompt(lm.tokenizer, prompt)
    ref = hf_greedy(lm, ids, NEW_TOKENS)
    out = specprobe.generate(lm.model, lm.tokenizer, ids, method="esp", max_new_tokens=NEW_TOKENS)
    assert out.token_ids == ref, f"{prompt[:60]!r}: first difference at token {_first_difference(ref, out.token_ids)}"
    s = out.stats
    assert s.new_tokens == len(out.token_ids) == sum(s.accept_lengths)
    assert len(s.accept_lengths) == s.target_forwards == len(s.draft_sizes)


@pytest.mark.parametrize("model_name", ["smollm2", "gemma3"])
def test_esp_drafts_are_accepted(model_name, request, spec_bench_questions):
    """ESP is not `ar` in disguise: over a few prompts its drafts save target forwards."""
    lm = request.getfixturevalue(model_name)
    new, forwards = 0, 0
    for prompt in varied_prompts(spec_bench_questions, 3):
        # a fixed tree: this measures the drafts, not `--budget auto`, whose sizes follow the CPU's timings
        out = specprobe.generate(lm.model, lm.tokenizer, prompt, method="esp", max_new_tokens=32, budget=2)
        new, forwards = new + out.stats.new_tokens, forwards + out.stats.target_forwards
    assert new / forwards > 1.1


@pytest.mark.parametrize("model_name", ["smollm2", "gemma3"])
def test_ar_identical_to_hf_generate_and_tau_one(model_name, request, spec_bench_questions):
    lm = request.getfixturevalue(model_name)
    for prompt in varied_prompts(spec_bench_questions, 2):
        ids = format_prompt(lm.tokenizer, prompt)
        out = specprobe.generate(lm.model, lm.tokenizer, ids, method="ar", max_new_tokens=32)
        assert out.token_ids == hf_greedy(lm, ids, 32)
        assert out.stats.tau == 1.0


# The paper's tree size (deeper, wider trees than the CPU default), every mask initialisation.
PAPER_TREE = dict(masks=3, branching=4, budget=8)


@pytest.mark.parametrize("mask_init", ["context-mean", "ema", "vocab-mean", "token:0", "soft-prev", "slot-mix"])
def test_esp_deep_trees_and_mask_inits_are_lossless(smollm2, mask_init):
    ids = format_prompt(smollm2.tokenizer, "List the first ten prime numbers, separated by commas.")
    ref = hf_greedy(smollm2, ids, 32)
    out = specprobe.generate(smollm2.model, smollm2.tokenizer, ids, method="esp", max_new_tokens=32, mask_init=mask_init, **PAPER_TREE)
    assert out.token_ids == ref
    assert max(out.stats.draft_sizes) == PAPER_TREE["budget"]
    assert out.stats.tau > 1.0  # drafts were accepted


def test_soft_masks_are_built_from_the_last_step(smollm2):
    """soft-prev and slot-mix leave the vocabulary mean once a step has run (slot-mix: a vector per slot)."""
    backend = TorchBackend.of(smollm2.model)
    ids = format_prompt(smollm2.tokenizer, "Count from one to twenty in words.")
    mean = backend.embedding_stats()[0]
    for init in ("soft-prev", "slot-mix"):
        drafter, seen = make_drafter("esp", mask_init=init, masks=2, budget=4), []
        observe = drafter.observe

        def recording(session, step, observe=observe, drafter=drafter):
            observe(session, step)
            seen.append([drafter.mask] if init == "soft-prev" else list(drafter.slot_vectors))

        drafter.observe = recording
        decode(backend, ids, drafter, 16, eos_token_ids(smollm2.model, smollm2.tokenizer), tokenizer=smollm2.tokenizer)
        vectors = seen[0]  # after the first step
        assert len(vectors) == (1 if init == "soft-prev" else 2)
        assert all(not torch.allclose(v, mean, atol=1e-3) for v in vectors)


def test_esp_deep_trees_are_lossless_on_gemma3(gemma3, spec_bench_questions):
    for prompt in varied_prompts(spec_bench_questions, N_PROMPTS + 2)[N_PROMPTS:]:  # two more prompts
        ids = format_prompt(gemma3.tokenizer, prompt)
        out = specprobe.generate(gemma3.model, gemma3.tokenizer, ids, method="esp", max_new_tokens=48, **PAPER_TREE)
        assert out.token_ids == hf_greedy(gemma3, ids, 48)


def test_generation_stops_at_eos(smollm2):
    out = specprobe.generate(smollm2.model, smollm2.tokenizer, "Say just the word: yes", method="esp", max_new_tokens=64)
    assert out.stop_reason == "eos"
    assert out.token_ids[-1] == smollm2.tokenizer.eos_token_id
    assert out.token_ids.count(smollm2.tokenizer.eos_token_id) == 1
