"""Aggregate throughput of continuous batching (engine/batch.py), offline, as vLLM's `LLM.generate`
measures it: the same questions submitted all at once to a `Batcher` of `--max-batch` N, for each
N and method given, on one model.

For every (method, N) it reports the aggregate tokens per second (all tokens / wall time from the
first submission to the last result), the mean per-request tokens per second, tau, and how many
outputs equal the same request run alone with `ar` (must be all: batching is lossless). The
default questions are the first turn of the first `--per-category` question of each Spec-Bench
category (13 at 1), 128 new tokens, greedy; every run starts without what earlier runs' outputs
taught the drafters (`fresh_start`: the same questions are asked in every run); the order of the (method, N) runs is rotated over
`--repeats` so that a slow minute of the machine does not fall on one configuration.

    python scripts/batched.py --backend llamacpp --batch 1 4 8 13 --methods ar suffix hybrid

This is a benchmark, not a test: its figures depend on the machine (quote ratios within one run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import specprobe
from specprobe.api import generate, new_generation, target_of
from specprobe.bench.questions import load_questions
from specprobe.drafters import forget_outputs
from specprobe.engine.batch import Batcher


def fresh_start(target, scope: str) -> None:
    """Start a run as a fresh server would: without the suffix tries and Token Recycling matrices
    that an earlier run filled with the answers to these same questions (a greedy answer is the
    same each run: a method that learns from outputs would copy it whole), and with a learning
    scope of its own for the torch backend's reduced head."""
    forget_outputs(target.drafter_state())
    target.learning_scope(scope)


def run(batcher: Batcher, lm, prompts: list[list[dict]], method: str, max_batch: int, max_new_tokens: int, scope: str) -> dict:
    batcher.max_batch = max_batch
    batcher.call(lambda: fresh_start(batcher.target, scope)).result()
    rounds = batcher.rounds
    t0 = time.perf_counter()
    futures = [batcher.submit(lambda m=m: new_generation(lm.model, lm.tokenizer, m, method=method, max_new_tokens=max_new_tokens)) for m in prompts]
    results = [f.result() for f in futures]
    wall = time.perf_counter() - t0
    tokens = sum(len(ids) for ids, _, _ in results)
    forwards = sum(s.target_forwards for _, s, _ in results)
    return {
        "ids": [ids for ids, _, _ in results],
        "aggregate_tok_s": tokens / wall,
        "per_request_tok_s": statistics.mean(len(ids) / s.wall_time for ids, s, _ in results),
        "tau": tokens / forwards,
        "rounds": batcher.rounds - rounds,
        "wall_s": wall,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--backend", default="llamacpp")
    ap.add_argument("--methods", nargs="+", default=["ar", "suffix", "hybrid"])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 4, 8, 13])
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument("--skip", type=int, default=0, help="leave out the first SKIP questions of each category (--skip 1: "
                    "the questions `vllm_rows --per-category 2` runs at its larger batch)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    extra = {"streams": max(args.batch)} if args.backend == "llamacpp" else {}
    questions, seen = [], {}
    for q in load_questions(per_category=args.skip + args.per_category):
        seen[q["category"]] = seen.get(q["category"], 0) + 1
        if seen[q["category"]] > args.skip:
            questions.append(q)
    prompts = [[{"role": "user", "content": q["turns"][0]}] for q in questions]
    # one worker thread runs everything on the model, loading included, as the server does (engine/batch.py says why)
    batcher = Batcher(None, 1)
    lm = batcher.call(lambda: specprobe.load(args.model, backend=args.backend, **extra)).result()
    batcher.target = batcher.call(lambda: target_of(lm.model)).result()
    batcher.call(lambda: specprobe.prepare(lm.model, lm.tokenizer, args.methods)).result()
    alone = batcher.call(lambda: [generate(lm.model, lm.tokenizer, m, method="ar", max_new_tokens=args.max_new_tokens).token_ids for m in prompts]).result()
    runs = [(m, b) for m in args.methods for b in args.batch]
    rows: dict[tuple[str, int], list[dict]] = {}
    for r in range(args.repeats):
        for method, b in runs[r % len(runs):] + runs[: r % len(runs)]:
            out = run(batcher, lm, prompts, method, b, args.max_new_tokens, scope=f"{method}@{b}#{r}")
            out["identical"] = sum(x == y for x, y in zip(out.pop("ids"), alone))
            rows.setdefault((method, b), []).append(out)
            print(f"{method:8} batch {b:3}: {out['aggregate_tok_s']:6.1f} tok/s aggregate, {out['per_request_tok_s']:5.1f} per request, "
                  f"tau {out['tau']:.2f}, identical {out['identical']}/{len(prompts)}", flush=True)
    base = statistics.median(o["aggregate_tok_s"] for o in rows[(args.methods[0], args.batch[0])])
    table = [f"| method | max batch | aggregate tok/s | vs {args.methods[0]} at {args.batch[0]} | per request tok/s | tau | identical to ar alone |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    summary = []
    for (method, b), outs in rows.items():
        agg = statistics.median(o["aggregate_tok_s"] for o in outs)
        per = statistics.median(o["per_request_tok_s"] for o in outs)
        tau = statistics.median(o["tau"] for o in outs)
        same = min(o["identical"] for o in outs)
        table.append(f"| {method} | {b} | {agg:.1f} | {agg / base:.2f}x | {per:.1f} | {tau:.2f} | {same}/{len(prompts)} |")
        summary.append({"method": method, "max_batch": b, "aggregate_tok_s": agg, "per_request_tok_s": per, "tau": tau, "identical": same, "runs": outs})
    batcher.close()
    print("\n".join(table))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "backend": args.backend, "questions": len(prompts), "max_new_tokens": args.max_new_tokens, "rows": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
