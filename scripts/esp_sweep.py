"""Measure ESP settings on one model: tau, tokens/s and tree size per setting, against `ar`.

A development script (the measurements behind the README's choice of ESP defaults):

    python3 scripts/esp_sweep.py --model smollm2-135m --prompts 8 --max-new-tokens 64 \
        --configs "mask_init=context-mean" "mask_init=vocab-mean" "masks=2,budget=4"

Prompts: the first question of each Spec-Bench category in turn (from --questions). Every
setting runs on every prompt, interleaved with `ar`, and must give ar's tokens. Output: one
markdown table on stdout, one JSON line per setting in --out if given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import specprobe
from specprobe.bench.questions import load_questions


def parse_config(text: str) -> dict:
    options = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=", 1)
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                pass
        options[key] = value
    return options


def pick_prompts(questions, n: int) -> list[str]:
    by_category: dict[str, list] = {}
    for q in questions:
        by_category.setdefault(q["category"], []).append(q)
    picked, i = [], 0
    while len(picked) < n and any(len(v) > i for v in by_category.values()):
        picked += [v[i]["turns"][0] for v in by_category.values() if len(v) > i]
        i += 1
    return picked[:n]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--questions", default="spec-bench", help="spec-bench (the packaged set), or a question JSONL file or URL")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--configs", nargs="+", default=["masks=3,branching=4,budget=8"])
    p.add_argument("--out")
    args = p.parse_args()

    lm = specprobe.load(args.model)
    prompts = pick_prompts(load_questions(args.questions), args.prompts)
    configs = [parse_config(c) for c in args.configs]
    specprobe.generate(lm.model, lm.tokenizer, prompts[0], method="ar", max_new_tokens=8)  # warm-up
    rows = {i: {"tokens": 0, "forwards": 0, "wall": 0.0, "nodes": [], "identical": 0} for i in range(len(configs))}
    ar_tokens, ar_wall = 0, 0.0
    for k, prompt in enumerate(prompts):
        ar = specprobe.generate(lm.model, lm.tokenizer, prompt, method="ar", max_new_tokens=args.max_new_tokens)
        ar_tokens += ar.stats.new_tokens
        ar_wall += ar.stats.wall_time
        for i, options in enumerate(configs):
            out = specprobe.generate(lm.model, lm.tokenizer, prompt, method="esp", max_new_tokens=args.max_new_tokens, **options)
            r = rows[i]
            r["tokens"] += out.stats.new_tokens
            r["forwards"] += out.stats.target_forwards
            r["wall"] += out.stats.wall_time
            r["nodes"] += out.stats.draft_sizes
            r["identical"] += out.token_ids == ar.token_ids
        print(f"prompt {k + 1}/{len(prompts)} done ({time.strftime('%H:%M:%S')})", file=sys.stderr, flush=True)

    ar_speed = ar_tokens / ar_wall
    print(f"\n{args.model}: {len(prompts)} prompts x {args.max_new_tokens} new tokens; ar {ar_speed:.2f} tok/s\n")
    print("| setting | tau | tok/s | speedup | mean tree nodes | identical to ar |")
    print("|---|---|---|---|---|---|")
    for i, options in enumerate(configs):
        r = rows[i]
        record = {
            "model": args.model,
            "options": options,
            "tau": r["tokens"] / r["forwards"],
            "tokens_per_s": r["tokens"] / r["wall"],
            "speedup": r["tokens"] / r["wall"] / ar_speed,
            "mean_nodes": statistics.mean(r["nodes"]) if r["nodes"] else 0.0,
            "identical": f"{r['identical']}/{len(prompts)}",
            "ar_tokens_per_s": ar_speed,
        }
        label = ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"
        print(f"| {label} | {record['tau']:.3f} | {record['tokens_per_s']:.2f} | {record['speedup']:.2f} | {record['mean_nodes']:.1f} | {record['identical']} |")
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
