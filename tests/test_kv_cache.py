"""The preallocated, position-indexed KV cache: the commit gather on a worked example, growth,
logits after several commits equal a fresh forward, greedy drafters on it equal `ar`, and the
low-precision dtypes: a drafter in bfloat16 equals bfloat16 `ar` (or differs at a near-tie)."""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest
import torch

import specprobe
from conftest import varied_prompts
from specprobe.backends.torch import TorchBackend
from specprobe.backends.torch.kv_cache import BLOCK, PositionCache, PositionLayer, cache_length, keep_rows, new_cache, prefix_copy
from specprobe.bench.answers import TurnOutput
from specprobe.bench.divergence import NEAR_TIE, explain
from specprobe.engine.tree import ROOT, DraftTree
from specprobe.models import format_prompt

ATOL = 2e-3  # fp32 logits of a q-row forward and a one-row forward differ by kernel rounding only


def rows_tensor(positions: list[float]) -> torch.Tensor:
    """Keys for one head of width 2 whose rows hold their own position: [1, 1, len, 2]."""
    return torch.tensor(positions, dtype=torch.float32)[None, None, :, None].repeat(1, 1, 1, 2)


def test_commit_gathers_the_accepted_rows_into_place():
    """Worked example: a prefix of 2 positions, a forward of 5 rows (pending + 4 tree nodes), the
    rows 0, 2 and 3 accepted: they become positions 2, 3 and 4; the rest is dropped."""
    layer = PositionLayer()
    layer.update(rows_tensor([0, 1]), -rows_tensor([0, 1]))
    keys, values = layer.update(rows_tensor([10, 11, 12, 13, 14]), -rows_tensor([10, 11, 12, 13, 14]))
    assert keys[0, 0, :, 0].tolist() == [0, 1, 10, 11, 12, 13, 14]  # the forward attends to all 7 rows
    buffer = layer.buffers[0]
    cache = PositionCache()
    cache.layers.append(layer)
    keep_rows(cache, 2, [0, 2, 3])
    assert layer.buffers[0] is buffer  # moved in place, nothing reallocated
    assert cache_length(cache) == 5
    assert layer.keys[0, 0, :, 0].tolist() == [0, 1, 10, 12, 13]
    assert layer.values[0, 0, :, 1].tolist() == [0, -1, -10, -12, -13]
    keep_rows(cache, 5, [])  # a step that keeps nothing new: only the length
    assert layer.keys.shape[2] == 5


def test_a_generation_that_outgrows_the_buffer_doubles_it_and_keeps_its_rows():
    layer = PositionLayer(capacity=BLOCK)
    layer.update(rows_tensor(list(range(BLOCK - 1))), rows_tensor(list(range(BLOCK - 1))))
    assert layer.capacity == BLOCK
    keys, _ = layer.update(rows_tensor([1000.0, 1001.0]), rows_tensor([1000.0, 1001.0]))
    assert layer.capacity == 2 * BLOCK
    assert keys[0, 0, :, 0].tolist() == [*range(BLOCK - 1), 1000.0, 1001.0]


def test_logits_after_several_commits_equal_a_fresh_forward(smollm2, spec_bench_questions):
    """Steps with trees whose random paths are accepted, committed one after another: the cache
    then gives the logits of one plain forward over the committed tokens; a prefix copy too."""
    target = TorchBackend.of(smollm2.model)
    ids = format_prompt(smollm2.tokenizer, varied_prompts(spec_bench_questions, 1)[0])[:200]
    rng = random.Random(0)
    cache = new_cache()
    target.forward(cache, ids[:-1], DraftTree())
    committed, pending = list(ids[:-1]), [ids[-1]]
    for _ in range(4):
        tokens = [rng.randrange(100, 5000) for _ in range(6)]
        tree = DraftTree(tokens, [ROOT, ROOT, 0, 0, 2, 1])
        past = cache_length(cache)
        out = target.forward(cache, pending, tree)
        path = tree.path_to(rng.choice([1, 3, 4, 5]))
        target.commit(cache, past, out.layout.kept_rows(path))
        committed += pending + [tokens[i] for i in path]
        pending = [rng.randrange(100, 5000)]  # the next step's token (a bonus token in a real step)
        assert cache_length(cache) == len(committed)
    with torch.inference_mode():
        want = target.model(input_ids=torch.tensor([committed + pending]), use_cache=False).logits[0, -1].float()
    got = target.forward(cache, pending, DraftTree()).logits[0]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    copy = prefix_copy(cache, len(committed))  # omnidraft's distillation reads such copies
    assert copy.get_seq_length() == len(committed) and not copy.layers[0].keys.is_inference()


@pytest.mark.parametrize("method", ["esp", "hybrid"])
def test_greedy_drafters_on_the_static_cache_equal_ar(smollm2, spec_bench_questions, method):
    assert isinstance(TorchBackend.of(smollm2.model).new_cache(), PositionCache)
    new = forwards = 0
    for prompt in varied_prompts(spec_bench_questions, 2):
        ar = specprobe.generate(smollm2.model, smollm2.tokenizer, prompt, method="ar", max_new_tokens=32)
        out = specprobe.generate(smollm2.model, smollm2.tokenizer, prompt, method=method, max_new_tokens=32, budget=4)
        assert out.token_ids == ar.token_ids
        new, forwards = new + out.stats.new_tokens, forwards + out.stats.target_forwards
    assert new / forwards > 1.1  # drafts were accepted: the commit moved accepted tree rows


@pytest.fixture(scope="module")
def smollm2_bf16(smollm2):
    """The session's SmolLM2 weights in bfloat16 (a copy: no second load from disk)."""
    return dataclasses.replace(smollm2, model=copy.deepcopy(smollm2.model).to(torch.bfloat16))


def test_bfloat16_drafter_equals_bfloat16_ar_or_differs_at_a_near_tie(smollm2_bf16, spec_bench_questions):
    lm = smollm2_bf16
    question = {"turns": [varied_prompts(spec_bench_questions, 3)[2]]}
    ar = specprobe.generate(lm.model, lm.tokenizer, question["turns"][0], method="ar", max_new_tokens=24)
    out = specprobe.generate(lm.model, lm.tokenizer, question["turns"][0], method="esp", max_new_tokens=24, budget=4)
    assert TorchBackend.of(lm.model).dtype == torch.bfloat16
    assert out.stats.target_forwards < out.stats.new_tokens  # drafts accepted in bfloat16 too
    as_turn = lambda r: TurnOutput(r.text, r.token_ids, None, 0.0, None)  # noqa: E731
    difference = explain(lm, question, [as_turn(ar)], [as_turn(out)])
    assert difference is None or difference.near_tie, f"differs from bf16 ar at {difference} (not a tie: gap >= {NEAR_TIE})"
