"""Measure T(q): the cost of one verification forward with q new rows, relative to q = 1.

    python3 scripts/cost_curve.py --model smollm2-135m --context 300 --q 1 2 4 8 16 32 64

The forward is the engine's own (`verify.Target.forward`) over a KV cache of --context tokens:
q = 1 is a plain decoding step; q > 1 is a tree of q - 1 draft nodes (a star under the root, so
the 4-D tree-mask path is taken). The cache is cut back after each forward. Median of --repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import specprobe
from specprobe.kv_cache import cache_length, keep_rows, new_cache
from specprobe.tree import ROOT, DraftTree
from specprobe.verify import Target


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--context", type=int, default=300)
    p.add_argument("--q", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()

    lm = specprobe.load(args.model, dtype=args.dtype, device=args.device)
    target = Target(lm.model)
    gen = torch.Generator().manual_seed(0)
    context = torch.randint(100, 1000, (args.context,), generator=gen).tolist()
    cache = new_cache()
    with torch.inference_mode():
        target.forward(cache, context[:-1], DraftTree())
    prefix = cache_length(cache)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def once(q: int) -> float:
        tree = DraftTree()
        for i in range(q - 1):
            tree.add(1000 + i, ROOT)
        sync()
        t0 = time.perf_counter()
        target.forward(cache, [context[-1]], tree)
        sync()
        elapsed = time.perf_counter() - t0
        keep_rows(cache, prefix, [])
        return elapsed

    for q in args.q:  # warm-up
        once(q)
    times = {q: statistics.median(once(q) for _ in range(args.repeats)) for q in args.q}
    print(f"{args.model} on {args.device} ({torch.get_num_threads()} threads), KV cache {args.context} tokens")
    print("| q | " + " | ".join(str(q) for q in args.q) + " |")
    print("|---" * (len(args.q) + 1) + "|")
    print("| ms | " + " | ".join(f"{times[q] * 1e3:.0f}" for q in args.q) + " |")
    print("| T(q)/T(1) | " + " | ".join(f"{times[q] / times[args.q[0]]:.2f}" for q in args.q) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
