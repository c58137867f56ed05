"""The bench's vLLM rows: vLLM's offline `LLM.generate`, greedy, without and with speculation.

    vllm                      no speculation
    vllm-ngram                vLLM's own prompt lookup (`ngram`, 4 tokens, n-grams of 1 to 3)
    vllm-suffix               vLLM's SuffixDecoding (needs the arctic-inference package)
    vllm-specprobe-<method>   specprobe's proposer `method` (hybrid, pld, pool, suffix) through
                              vLLM's `custom_class` plug-in (integrations/vllm.py), 8 tokens

Run with the Python of the environment vLLM is installed in (`scripts/install_vllm.sh` makes
`.venv-vllm`, since vLLM pins transformers below the version specprobe's own environment has):

    .venv-vllm/bin/python -m specprobe.bench.vllm_rows --model smollm2-135m --per-category 1

Each row runs in a process of its own (one `LLM`, started once, warmed up on one short prompt),
at batch 1 (one question at a time: tokens/s per request) and at each larger batch given (that
many questions at once: aggregate tokens/s), each batch size on its own share of the questions
`specprobe bench` would run (the k-th question of every category goes to the k-th batch size). The
table gives every row's ratio to `vllm` from the same run, vLLM's own acceptance counters, and
how many outputs equal the `vllm` row's token for token (float32: they all must).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

SPECPROBE_PREFIX = "vllm-specprobe-"
ROW_NAMES = ("vllm", "vllm-ngram", "vllm-suffix")


def speculative_config_of(row: str) -> dict | None:
    from ..integrations.vllm import PROPOSERS, speculative_config

    if row == "vllm":
        return None
    if row == "vllm-ngram":
        return {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    if row == "vllm-suffix":
        return {"method": "suffix", "num_speculative_tokens": 8}
    if row.startswith(SPECPROBE_PREFIX) and row[len(SPECPROBE_PREFIX) :] in PROPOSERS:
        return speculative_config(row[len(SPECPROBE_PREFIX) :], 8)
    raise ValueError(f"unknown vLLM row {row!r}; choose from {', '.join(ROW_NAMES)} or {SPECPROBE_PREFIX}<{'|'.join(PROPOSERS)}>")


def spec_counters(llm) -> dict[str, float]:
    """vLLM's speculative-decoding counters (drafts, draft tokens, accepted tokens) so far."""
    out = {}
    for m in llm.get_metrics():
        for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
            if m.name == f"vllm:spec_decode_{name}":
                out[name] = float(getattr(m, "value", 0))
    return out


def run_row(row: str, model_dir: str, shares: list[tuple[int, list[list[int]]]], max_new_tokens: int, eager: bool) -> dict:
    """One row in this process: outputs, seconds and counters of each (batch size, prompts) share."""
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{max(0, (os.cpu_count() or 1) - 1)}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    spec = speculative_config_of(row)
    llm = LLM(model=model_dir, dtype="float32", max_model_len=4096, enforce_eager=eager, disable_log_stats=False, seed=0,
              **({"speculative_config": spec} if spec else {}))
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=False)
    llm.generate([{"prompt_token_ids": [1, 2, 3, 4]}], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)  # warm-up
    result = {"row": row, "startup_s": time.perf_counter() - started, "runs": []}
    for batch, prompts in shares:
        before = spec_counters(llm) if spec else {}
        outputs, seconds = [], []
        for start in range(0, len(prompts), batch):
            chunk = prompts[start : start + batch]
            t0 = time.perf_counter()
            done = llm.generate([{"prompt_token_ids": p} for p in chunk], params, use_tqdm=False)
            seconds.append(time.perf_counter() - t0)
            outputs += [list(d.outputs[0].token_ids) for d in done]
        after = spec_counters(llm) if spec else {}
        counters = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        result["runs"].append({"batch": min(batch, len(prompts)), "outputs": outputs, "seconds": seconds, "counters": counters})  # the concurrency run
    return result


def table(results: list[dict]) -> str:
    """The markdown table: per row and batch, tokens/s, ratio to `vllm`, acceptance, identical outputs."""
    base = {r["batch"]: r for res in results if res["row"] == "vllm" for r in res["runs"]}
    lines = ["| row | batch | tokens/s | vs vllm | accepted / drafted | accepted per draft | identical to vllm |", "|---|---:|---:|---:|---:|---:|---:|"]
    for res in results:
        for run in res["runs"]:
            tokens = sum(len(o) for o in run["outputs"])
            speed = tokens / sum(run["seconds"])
            ref = base.get(run["batch"])
            ratio = speed / (sum(len(o) for o in ref["outputs"]) / sum(ref["seconds"])) if ref else float("nan")
            same = f"{sum(a == b for a, b in zip(run['outputs'], ref['outputs']))}/{len(run['outputs'])}" if ref else "-"
            c = run["counters"]
            rate = f"{c['num_accepted_tokens'] / c['num_draft_tokens']:.2f}" if c.get("num_draft_tokens") else "-"
            per = f"{c['num_accepted_tokens'] / c['num_drafts']:.2f}" if c.get("num_drafts") else "-"
            lines.append(f"| {res['row']} | {run['batch']} | {speed:.1f} | {ratio:.2f}x | {rate} | {per} | {same} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m specprobe.bench.vllm_rows", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="a built-in alias, .gguf file, HF directory or hub id")
    ap.add_argument("--rows", default="vllm,vllm-ngram,vllm-specprobe-hybrid")
    ap.add_argument("--per-category", type=int, default=2, help="questions per category, shared out among the batch sizes")
    ap.add_argument("--categories", default=None, help="comma-separated Spec-Bench categories")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch", default="13", help="comma-separated batch sizes beside batch 1")
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no torch.compile: starts in ~30 s instead of ~150 s)")
    ap.add_argument("--out", default=None, help="write every row's outputs and timings to this JSON file")
    ap.add_argument("--one-row", default=None, help=argparse.SUPPRESS)  # internal: the child process of one row
    args = ap.parse_args(argv)
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("vllm is not installed in this Python; run `bash scripts/install_vllm.sh` and use .venv-vllm/bin/python", file=sys.stderr)
        return 2
    if args.one_row:
        spec = json.load(open(args.one_row))
        json.dump(run_row(spec["row"], spec["model_dir"], spec["shares"], args.max_new_tokens, args.eager), open(spec["out"], "w"))
        return 0
    from ..models import format_prompt, hf_directory
    from .questions import load_questions

    rows = [r for r in args.rows.split(",") if r]
    for row in rows:
        try:
            speculative_config_of(row)
        except ValueError as e:
            print(f"specprobe: {e}", file=sys.stderr)
            return 2
    from ..errors import SpecProbeError

    try:
        questions = load_questions(categories=args.categories.split(",") if args.categories else None, per_category=args.per_category)
        model_dir = hf_directory(args.model)
    except SpecProbeError as e:
        print(f"specprobe: {e}", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [format_prompt(tokenizer, [{"role": "user", "content": q["turns"][0]}]) for q in questions]
    # each batch size on its own share of the questions (the k-th of each category to the k-th
    # size): no question twice in one vLLM process, where a cross-request cache (SuffixDecoding's,
    # specprobe's suffix source) would find its own earlier answer
    batches = [int(b) for b in args.batch.split(",") if b]
    sizes = [1, *[b for b in batches if b > 1]]
    rank, seen = [], {}
    for q in questions:  # the question's place within its category
        rank.append(seen.get(q["category"], 0))
        seen[q["category"]] = rank[-1] + 1
    shares = [(size, [p for p, r in zip(prompts, rank) if r % len(sizes) == k]) for k, size in enumerate(sizes)]
    if any(not share for _, share in shares):
        print(f"specprobe: {len(prompts)} questions cannot give each of {len(sizes)} batch sizes its own; raise --per-category", file=sys.stderr)
        return 2
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, row in enumerate(rows):
            out = os.path.join(tmp, f"{i}.json")
            spec = os.path.join(tmp, f"{i}-row.json")
            json.dump({"row": row, "model_dir": model_dir, "shares": shares, "out": out}, open(spec, "w"))
            cmd = [sys.executable, "-m", "specprobe.bench.vllm_rows", "--one-row", spec, "--max-new-tokens", str(args.max_new_tokens)]
            print(f"[{i + 1}/{len(rows)}] {row}: starting vLLM ...", file=sys.stderr, flush=True)
            done = subprocess.run(cmd + (["--eager"] if args.eager else []), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if done.returncode != 0 or not os.path.exists(out):
                tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
                print(f"specprobe: row {row} failed: {tail[0]}", file=sys.stderr)
                continue
            results.append(json.load(open(out)))
            print(f"[{i + 1}/{len(rows)}] {row}: started in {results[-1]['startup_s']:.0f} s, done", file=sys.stderr, flush=True)
    print(table(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "questions": [q.get("question_id") for q in questions], "max_new_tokens": args.max_new_tokens, "results": results}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
