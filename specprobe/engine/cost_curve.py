"""Measuring the cost curve T(q): seconds per verification forward of q rows, on any backend.

The hardware-aware budget (budget.py) prices a tree of n nodes at T(rows(n)). T is measured once
per model and machine by timing forwards through the `Backend` protocol alone (so every backend
is measured the same way) over a KV cache of `context` random tokens: q = 1 is a decoding step,
q > 1 a star of q - 1 draft nodes under the root (the tree path runs; a chain of q - 1 nodes on a
backend that verifies chains only). Each backend stores its
curve where it knows how to key it (the torch backend: profile.py).
"""

from __future__ import annotations

import statistics
import time

import torch

from .tree import ROOT, DraftTree

CURVE_Q = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def star(q: int) -> DraftTree:
    """q - 1 nodes, all children of the root: q rows with the pending token.

    >>> star(3).parents
    [-1, -1]
    """
    tree = DraftTree()
    for i in range(q - 1):
        tree.add(1000 + i, ROOT)
    return tree


@torch.inference_mode()
def prefilled(target, context: int):
    """(a cache of `context - 1` random tokens, the token to put after them), seed 0."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 1000, (context,), generator=gen).tolist()
    cache = target.new_cache()
    out = target.forward(cache, ids[:-1], DraftTree())
    target.commit(cache, 0, out.layout.kept_rows([]))
    return cache, ids[-1]


@torch.inference_mode()
def forward_times(target, qs, context: int = 300, repeats: int = 7) -> dict[int, float]:
    """Seconds per engine step (forward, then the cache cut back) for each q, over a `context`-token
    cache. The q values are interleaved round by round, so a slow moment of the machine hits them
    alike; the median of the rounds is kept."""
    cache, last = prefilled(target, context)
    prefix = target.cache_length(cache)
    sync = torch.cuda.synchronize if target.device.type == "cuda" else (lambda: None)
    # a backend that verifies chains only runs a star's first node alone: time chains there
    trees = {q: star(q) if getattr(target, "verifies_trees", True) else DraftTree.chain(list(range(1000, 999 + q))) for q in qs}
    samples: dict[int, list[float]] = {q: [] for q in qs}
    try:
        for round_ in range(repeats + 1):  # round 0 warms up
            for q in qs:
                sync()
                t0 = time.perf_counter()
                target.forward(cache, [last], trees[q])
                sync()
                if round_:
                    samples[q].append(time.perf_counter() - t0)
                target.commit(cache, prefix, [])
    finally:
        target.release(cache)
    return {q: statistics.median(v) for q, v in samples.items()}
