"""Losslessness of the n-gram drafters (pld, lookahead): token-identical to `ar` on SmolLM2-135M,
to transformers' `generate` on Gemma3-270M.

Each generation runs once per (method, prompt) and is shared by the tests (the machine is slow).
"""

from __future__ import annotations

from functools import lru_cache

import pytest

import specprobe
from conftest import hf_greedy
from specprobe.models import format_prompt

NEW_TOKENS = 64
REPEAT = "Repeat this list exactly: apples, bananas, cherries, dates, elderberries, figs, grapes, honeydew, kiwis, lemons."
PROMPTS = [
    "Write a SQL query that selects all rows of the table users whose age is over 30.",  # code, runs to the limit
    "Translate to French: The cat sleeps on the warm windowsill every afternoon.",  # ends early at EOS
    REPEAT,  # copies its context
]


@pytest.fixture(scope="module")
def run(smollm2):
    @lru_cache(maxsize=None)
    def generate(method: str, prompt: str):
        return specprobe.generate(smollm2.model, smollm2.tokenizer, prompt, method=method, max_new_tokens=NEW_TOKENS)

    return generate


@pytest.mark.parametrize("prompt", PROMPTS, ids=["code", "translate", "repeat"])
@pytest.mark.parametrize("method", ["pld", "lookahead"])
def test_identical_to_ar(run, method, prompt):
    ref, out = run("ar", prompt), run(method, prompt)
    assert out.token_ids == ref.token_ids
    assert out.stop_reason == ref.stop_reason
    s = out.stats
    assert s.new_tokens == len(out.token_ids) and sum(s.accept_lengths) == s.new_tokens
    assert len(s.accept_lengths) == s.target_forwards


@pytest.mark.parametrize("method", ["pld", "lookahead"])
def test_tau_above_one_when_the_output_repeats_the_prompt(run, method):
    assert run(method, REPEAT).stats.tau > 1.0


@pytest.mark.parametrize("method", ["pld", "lookahead"])
def test_identical_to_hf_generate_on_gemma3(gemma3, method):
    """The other built-in model (sliding-window layers, 262k vocabulary), against transformers itself."""
    ids = format_prompt(gemma3.tokenizer, PROMPTS[0])
    out = specprobe.generate(gemma3.model, gemma3.tokenizer, ids, method=method, max_new_tokens=48)
    assert out.token_ids == hf_greedy(gemma3, ids, 48)
