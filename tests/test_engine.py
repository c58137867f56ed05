"""The verifier on real models: tree-attention logits equal sequential forwards, auxiliary rows
change nothing for the real tokens, and the KV cache after a step equals a recomputation."""

from __future__ import annotations

import warnings

import pytest
import torch

from specprobe.backends.torch import TorchBackend
from specprobe.backends.torch.kv_cache import cache_kwargs, keep_rows, new_cache, snapshot
from specprobe.engine.tree import ROOT, AuxRows, DraftTree
from specprobe.models import format_prompt

# fp32 logits of a q-row forward and a one-row forward differ by kernel rounding only
ATOL = 2e-3


def context_ids(lm, questions, long: bool) -> list[int]:
    """A real prompt; `long` picks one past Gemma's 512-token sliding window."""
    for q in questions:
        ids = format_prompt(lm.tokenizer, q["turns"][0])
        if (len(ids) > 600) == long and len(ids) < 1500:
            return ids
    raise AssertionError("no prompt of the wanted length")


def tree_and_masks(target: TorchBackend, ids: list[int]):
    """A branching tree of real tokens (from the context) and a 2-mask chain after two nodes."""
    t = ids[-12:]
    tree = DraftTree([t[0], t[1], t[2], t[3], t[4], t[5]], [ROOT, ROOT, 0, 0, 2, 1])
    mask = target.embed(ids).float().mean(0).to(target.dtype)
    aux = AuxRows(mask.expand(4, -1), anchor=[ROOT, ROOT, 4, 4], offset=[1, 2, 1, 2], sees=[(), (0,), (), (2,)])
    return tree, aux


def fresh_logits(target: TorchBackend, ids: list[int], extra_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Last-row logits of one plain forward over ids (+ extra input embeddings) from an empty cache."""
    embeds = target.embed(ids)
    if extra_embeds is not None:
        embeds = torch.cat([embeds, extra_embeds])
    with torch.inference_mode():
        out = target.model(inputs_embeds=embeds[None], use_cache=False, logits_to_keep=1)
    return out.logits[0, -1].float()


def check_tree_logits(lm, questions, long):
    target = TorchBackend(lm.model)
    ids = context_ids(lm, questions, long)
    prefix, pending = ids[:-1], ids[-1:]
    cache = new_cache()
    target.forward(cache, prefix, DraftTree())  # prefill (the last pending row's logits unused)
    tree, aux = tree_and_masks(target, ids)
    with_aux = target.forward(cache, pending, tree, aux)
    keep_rows(cache, len(prefix), [])  # drop the whole step
    without_aux = target.forward(cache, pending, tree, None)
    # auxiliary rows leave every real row's logits unchanged
    torch.testing.assert_close(with_aux.logits, without_aux.logits, atol=ATOL, rtol=0)
    # each tree node's logits equal a sequential forward over its path
    for node in range(len(tree)):
        path = [tree.tokens[i] for i in tree.path_to(node)]
        torch.testing.assert_close(with_aux.logits[1 + node], fresh_logits(target, ids + path), atol=ATOL, rtol=0)
    torch.testing.assert_close(with_aux.logits[0], fresh_logits(target, ids), atol=ATOL, rtol=0)
    # each mask row's logits equal a forward over its anchor's path followed by its mask chain
    for j, (anchor, offset) in enumerate(zip(aux.anchor, aux.offset)):
        path = [] if anchor == ROOT else [tree.tokens[i] for i in tree.path_to(anchor)]
        got = with_aux.aux_logits[j]
        want = fresh_logits(target, ids + path, aux.embeds[:offset])
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_tree_logits_equal_sequential_smollm2(smollm2, spec_bench_questions):
    check_tree_logits(smollm2, spec_bench_questions, long=False)


@pytest.mark.parametrize("long", [False, True], ids=["short", "past-sliding-window"])
def test_tree_logits_equal_sequential_gemma3(gemma3, spec_bench_questions, long):
    check_tree_logits(gemma3, spec_bench_questions, long)


@pytest.mark.parametrize("model_name", ["smollm2", "gemma3"])
def test_cache_after_step_equals_recomputation(model_name, request, spec_bench_questions):
    lm = request.getfixturevalue(model_name)
    target = TorchBackend(lm.model)
    ids = context_ids(lm, spec_bench_questions, long=False)
    cache = new_cache()
    target.forward(cache, ids[:-1], DraftTree())
    tree, aux = tree_and_masks(target, ids)
    past = len(ids) - 1
    target.forward(cache, ids[-1:], tree, aux)
    path = tree.path_to(4)  # nodes 0 -> 2 -> 4, as if accepted
    keep_rows(cache, past, [0] + [1 + i for i in path])
    ref = new_cache()
    target.forward(ref, ids + [tree.tokens[i] for i in path], DraftTree())
    got, want = snapshot(cache), snapshot(ref)
    assert len(got) == len(want)
    for (gk, gv), (wk, wv) in zip(got, want):
        assert gk.shape == wk.shape
        torch.testing.assert_close(gk, wk, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(gv, wv, atol=1e-4, rtol=1e-4)


def test_cache_kwargs_follows_the_forwards_signature(smollm2):
    class Old(torch.nn.Module):  # transformers before the rename
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return past_key_values

    class Wrapper(torch.nn.Module):  # like PEFT: **kwargs passed on to the base model
        def __init__(self, base):
            super().__init__()
            self.base = base

        def get_base_model(self):
            return self.base

        def forward(self, *args, **kwargs):
            return self.base(*args, **kwargs)

    cache = new_cache()
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("error", FutureWarning)  # transformers 5.2x warns on the old name
        smollm2.model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True, **cache_kwargs(smollm2.model, cache))
    assert cache.get_seq_length() == 3
    assert cache_kwargs(Old(), cache) == {"past_key_values": cache}
    assert Wrapper(Old())(**cache_kwargs(Wrapper(Old()), cache)) is cache
