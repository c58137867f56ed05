"""Measuring the cost curve T(q): seconds per verification forward of q rows, on any backend.

The hardware-aware budget (budget.py) prices a tree of n nodes at T(rows(n)). T is measured once
per model and machine by timing forwards through the `Backend` protocol alone (so every backend
is measured the same way) over a KV cache of `context` random tokens: q = 1 is a decoding step,
q > 1 a star of q - 1 draft nodes under the root (the tree path runs; a chain of q - 1 nodes on a
backend that verifies chains only). Each backend stores its
curve where it knows how to key it (the torch backend: profile.py).

A curve measured while something else loads the machine (a build, an install) has its points
taken at different loads; saved, it would price every tree wrongly on every later run. So a
measurement is kept only when its shape is plausible (`steady`), measured again otherwise, and not
saved if it never is (`measure_cost_curve`).
"""

from __future__ import annotations

import statistics
import sys
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


DROP = 0.7  # more rows never cost less than this fraction of fewer rows' time in a steady measurement


def steady(times: dict[int, float]) -> bool:
    """Whether a measured curve is plausible: no point below DROP x the time of a smaller q (fewer
    rows can always run padded to more, so a large drop means the machine's load changed mid-measurement).

    >>> steady({1: 0.034, 2: 0.035, 4: 0.046, 8: 0.053, 32: 0.097})
    True
    >>> steady({1: 0.31, 2: 0.51, 6: 1.27, 8: 1.21, 32: 0.65, 64: 1.86})  # measured during a build
    False
    """
    qs = sorted(times)
    return all(times[b] >= DROP * times[a] for i, a in enumerate(qs) for b in qs[i + 1 :])


def measure_cost_curve(target, context: int = 300, repeats: int = 3, attempts: int = 3) -> tuple[dict[int, float], bool]:
    """(T(q) for q in CURVE_Q, whether it is steady): measured up to `attempts` times until it is.
    An unsteady result is still the best estimate there is for this process; the caller saves
    only a steady one."""
    for _ in range(attempts):
        times = forward_times(target, CURVE_Q, context, repeats)
        if steady(times):
            return times, True
    print("specprobe: the machine was busy while the cost curve was measured (its points disagree); "
          "using it for this run without saving it, so the next run measures it again", file=sys.stderr, flush=True)
    return times, False
