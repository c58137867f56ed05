"""Shared fixtures: each built-in model is loaded once per test session."""

from __future__ import annotations

import json
import os
import tempfile
import weakref

import pytest
import torch

import specprobe
from specprobe.bench.questions import packaged_questions

SPEC_BENCH = packaged_questions()  # Spec-Bench's questions, shipped inside the package

# Hermetic: a user's `specprobe tune` choice (it changes the options every generate call uses)
# must not change what a test checks. Measured caches that only change speed (converted models,
# kernel plans, cost curves) stay shared under $SPECPROBE_CACHE.
os.environ["SPECPROBE_SETTINGS"] = tempfile.mkdtemp(prefix="specprobe-test-settings-")

if os.environ.get("PYTEST_XDIST_WORKER"):  # `-n 2` (pyproject): one thread per worker process
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2():
    return specprobe.load("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3():
    return specprobe.load("gemma3-270m")


@pytest.fixture(scope="session")
def smollm2_cpp():
    return specprobe.load("smollm2-135m", backend="llamacpp")


@pytest.fixture(scope="session")
def spec_bench_questions() -> list[dict]:
    if not SPEC_BENCH.is_file():
        pytest.fail(f"the packaged Spec-Bench questions are missing at {SPEC_BENCH}")
    return [json.loads(line) for line in SPEC_BENCH.read_text().splitlines() if line.strip()]


def varied_prompts(questions: list[dict], n: int) -> list[str]:
    """n first-turn prompts spread over Spec-Bench's categories (round robin, file order)."""
    by_cat: dict[str, list[str]] = {}
    for q in questions:
        by_cat.setdefault(q["category"], []).append(q["turns"][0])
    out, i = [], 0
    while len(out) < n:
        for prompts in by_cat.values():
            if i < len(prompts) and len(out) < n:
                out.append(prompts[i])
        i += 1
    return out


# model -> prompt ids -> (transformers' greedy tokens, whether they ended at EOS before the limit);
# weakly keyed: a reference leaves with its model, and no later model can inherit it
_GREEDY_REFERENCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def hf_greedy(lm, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Reference: transformers' own greedy decoding. Computed once per model and prompt in a test
    process, at the longest length asked for: greedy decoding's first n tokens do not depend on how
    many follow, so a shorter reference is the longer one's prefix."""
    references = _GREEDY_REFERENCES.setdefault(lm.model, {})
    known = references.get(tuple(prompt_ids))
    if known is not None and (len(known[0]) >= max_new_tokens or known[1]):
        return known[0][:max_new_tokens]
    ids = torch.tensor([prompt_ids])
    out = lm.model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=lm.tokenizer.eos_token_id
    )
    tokens = out[0, len(prompt_ids) :].tolist()
    references[tuple(prompt_ids)] = (tokens, len(tokens) < max_new_tokens)
    return tokens
