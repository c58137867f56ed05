"""The `specprobe` command line: generate, bench (Spec-Bench; see specprobe/bench), profile (the cost
curve T(q), profile_command.py), tune (ESP settings per model, tune.py), serve (OpenAI-compatible
server, server.py), train-head (EAGLE / ConFu draft heads, train_head.py).

Errors a user can cause print one line on stderr and exit with status 2; no tracebacks.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .errors import InvalidOptionError, SpecProbeError
from .models import BUILTIN_MODELS, DEFAULT_MODEL

# CLI flag -> (drafter option name, type, help). Flags a method does not take are ignored for it.
METHOD_FLAGS = {
    "--masks": ("masks", int, "ESP, hybrid: mask rows after each tree node (k; drafts reach depth k)"),
    "--branching": ("branching", int, "ESP, hybrid: K, candidates per depth and children per node"),
    "--budget": ("budget", str, "ESP, PLD, hybrid: tree nodes verified per step, or auto (ESP, hybrid: the size that maximises tokens/s on this machine)"),
    "--mask-init": ("mask_init", str, "ESP, hybrid: context-mean | ema | vocab-mean | gaussian | token:ID"),
    "--ema-lambda": ("ema_lambda", float, "ESP: EMA rate for --mask-init ema"),
    "--max-budget": ("max_budget", int, "ESP, hybrid: the largest tree --budget auto considers"),
    "--max-ngram": ("max_ngram", int, "PLD, hybrid: longest suffix searched for"),
    "--min-ngram": ("min_ngram", int, "PLD: shortest suffix searched for"),
    "--num-pred-tokens": ("num_pred_tokens", int, "PLD, hybrid: tokens copied after a match"),
    "--max-candidates": ("max_candidates", int, "PLD, hybrid: continuations merged into the tree"),
    "--window": ("window", int, "lookahead: W, columns of the Jacobi window"),
    "--ngram": ("ngram", int, "lookahead, hybrid: N, n-gram length"),
    "--guess": ("guess", int, "lookahead: G, n-grams verified per step"),
    "--num-tokens": ("num_tokens", int, "draft: draft depth per step"),
    "--tree-top-k": ("tree_top_k", int, "draft: tokens proposed per depth (1 = chain)"),
    "--head": ("head", str, "eagle, confu: a trained head directory (specprobe train-head)"),
    "--depth": ("depth", int, "eagle, confu: head passes per step (the deepest draft)"),
    "--draft-layers": ("draft_layers", int, "omnidraft: draft with the draft model's first N layers"),
    "--ngram-cache": ("ngram_cache", str, "omnidraft: JSON file the vocabulary bridge's n-gram cache is loaded from and saved to"),
    "--adapt-state": ("adapt_state", str, "omnidraft: file the online-distilled adapter (and n-gram cache, acceptance model) is loaded from and saved to after each request"),
    "--adapt-lr": ("adapt_lr", float, "omnidraft: learning rate of the online distillation (default 2e-3)"),
    "--adapt-rank": ("adapt_rank", int, "omnidraft: LoRA rank of the online distillation (default 8)"),
}


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"built-in alias ({', '.join(BUILTIN_MODELS)}), hub id, model directory or .gguf file (default {DEFAULT_MODEL})",
    )
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")


def add_method_args(p: argparse.ArgumentParser) -> None:
    for flag, (dest, typ, help_) in METHOD_FLAGS.items():
        p.add_argument(flag, dest=dest, type=typ, default=None, help=help_)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample, losslessly")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0: off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (same seed, same machine: same output)")


def sampling_options(args: argparse.Namespace) -> dict:
    from .sampling import SamplingConfig

    SamplingConfig(args.temperature, args.top_p, args.top_k, args.seed)  # validate before any model loads
    return {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed}


def method_options(args: argparse.Namespace, method: str) -> dict:
    """The method options given on the command line that `method` takes."""
    from .drafters import METHODS

    import dataclasses

    _, config_cls = METHODS[method]
    if config_cls is None:
        return {}
    names = {f.name for f in dataclasses.fields(config_cls)}
    return {dest: getattr(args, dest) for dest, *_ in METHOD_FLAGS.values() if dest in names and getattr(args, dest) is not None}


class TextStream:
    """Prints generated text as tokens arrive (holding back incomplete UTF-8 sequences)."""

    def __init__(self, tokenizer, out=sys.stdout):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, new_ids: list[int]) -> None:
        self.ids.extend(new_ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed :])
        self.out.flush()
        self.printed = len(text)

    def close(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.out.write(text[self.printed :] + "\n")
        self.out.flush()


def compare_methods(args: argparse.Namespace) -> list[str] | None:
    """The methods `--compare` runs beside ar (None: no comparison). `--compare` alone compares
    --method; `--compare esp,hybrid` those methods. A value that is not a list of methods is the
    prompt (`--compare "Why is the sky blue?"`, the prompt given right after the flag)."""
    from .drafters import METHODS

    value = args.compare
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    if value and names and all(n in METHODS for n in names):
        return list(dict.fromkeys(names))
    if value and args.prompt is None:  # the prompt, taken by the flag
        args.prompt = value
    elif value:
        unknown = [n for n in names if n not in METHODS]
        raise InvalidOptionError(f"--compare: unknown method{'s' if len(unknown) > 1 else ''} {', '.join(unknown) or repr(value)}; choose from {', '.join(METHODS)}")
    return [args.method]


def cmd_generate(args: argparse.Namespace) -> int:
    from . import generate, load
    from .api import prepare
    from .drafters import DRAFT_MODEL_METHODS, make_drafter

    compared = compare_methods(args)
    if args.prompt is None:
        raise SpecProbeError("give a prompt (or '-' to read standard input)")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise SpecProbeError("the prompt is empty")
    methods = compared or [args.method]
    options = {m: method_options(args, m) for m in methods}
    sampling = sampling_options(args)
    for m in methods:
        if m in DRAFT_MODEL_METHODS:
            if not args.draft_model:
                raise SpecProbeError(f"--method {m} needs --draft-model (a model name, or truncated:N)")
        else:
            make_drafter(m, **options[m])  # validate the options before the slow model load
    lm = load(args.model, dtype=args.dtype, device=args.device)
    if any(m in DRAFT_MODEL_METHODS for m in methods):
        from .models import load_draft

        draft = load_draft(args.draft_model, lm, args.dtype, args.device)
        for m in methods:
            if m in DRAFT_MODEL_METHODS:
                options[m]["draft_model"] = draft
    chat = False if args.raw else None
    if compared:  # every one-time piece of work now, announced, so that no timed run pays for it
        prepare(lm.model, lm.tokenizer, ["ar", *methods], options)
    stream = None if args.json else TextStream(lm.tokenizer)
    results = {}
    for i, m in enumerate(methods):
        results[m] = generate(
            lm.model, lm.tokenizer, prompt, method=m, max_new_tokens=args.max_new_tokens, chat=chat,
            on_tokens=stream if i == 0 else None, **sampling, **options[m],
        )
        if i == 0 and stream is not None:
            stream.close()
    ar = generate(lm.model, lm.tokenizer, prompt, method="ar", max_new_tokens=args.max_new_tokens, chat=chat, **sampling) if compared else None

    def record_of(m: str, result) -> dict:
        record = result.to_dict()
        record.pop("token_ids")
        record.update(model=args.model, options={k: v for k, v in options[m].items() if k != "draft_model"}, sampling=sampling)
        if m in DRAFT_MODEL_METHODS:
            record["options"]["draft_model"] = args.draft_model
        if ar is not None:
            record["ar_tokens_per_s"] = ar.stats.tokens_per_s
            record["speedup"] = result.stats.tokens_per_s / ar.stats.tokens_per_s if ar.stats.tokens_per_s else 0.0
            record["identical_to_ar"] = ar.token_ids == result.token_ids
        return record

    records = {m: record_of(m, r) for m, r in results.items()}
    if args.json:
        first = dict(records[methods[0]])
        if len(methods) > 1:
            first["compare"] = {m: records[m] for m in methods}
        print(json.dumps(first))
        return 0
    width = max(len(m) for m in [*methods, "ar"])
    for m, result in results.items():
        s, r = result.stats, records[m]
        line = f"[{m}]{' ' * (width - len(m))} {s.new_tokens} tokens in {s.wall_time:.2f} s: {s.tokens_per_s:.1f} tok/s, tau {s.tau:.2f} ({s.target_forwards} target forwards)"
        if ar is not None:
            line += f" | speedup {r['speedup']:.2f}x over ar, identical to ar: {'yes' if r['identical_to_ar'] else 'NO'}"
        print(line, file=sys.stderr)
    if ar is not None:
        s = ar.stats
        print(f"[ar]{' ' * (width - 2)} {s.new_tokens} tokens in {s.wall_time:.2f} s: {s.tokens_per_s:.1f} tok/s", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench.command import run_command

    return run_command(args)


def add_bench_parser(sub) -> None:
    from .bench.questions import DEFAULT_QUESTIONS

    b = sub.add_parser("bench", help="run Spec-Bench: methods x questions -> answer files, summary, plots", description="Run methods over Spec-Bench questions (interleaved, after a warm-up); write answer files, summary.json, summary.md and plots to --out.")
    add_model_args(b)
    b.add_argument("--questions", default=DEFAULT_QUESTIONS, help="spec-bench (default: Spec-Bench's 480 questions, shipped with specprobe), or a question JSONL file or URL")
    b.add_argument("--methods", help="comma-separated: specprobe methods and hf, hf-pld, hf-assisted, hf-uag (default: ar, hf and every method needing no draft model)")
    b.add_argument("--categories", help="comma-separated categories to run (default: all)")
    b.add_argument("--per-category", type=int, help="the first N questions of each category (default: all)")
    b.add_argument("--max-new-tokens", type=int, default=128, help="per turn (default 128)")
    b.add_argument("--repeats", type=int, default=1, help="runs of every (question, method), the order rotated between them; the median wall time counts (default 1)")
    b.add_argument("--turns", type=int, default=1, help="1 (default) or 2: the second turn of MT-bench questions sees the first turn's answer")
    b.add_argument("--draft-model", help="draft model for draft, omnidraft, hf-assisted and hf-uag: a model name, or truncated:N (the target's first N layers)")
    b.add_argument("--eagle-head", help="the trained head for the eagle row (specprobe train-head)")
    b.add_argument("--confu-head", help="the trained head for the confu row (specprobe train-head --contemplate K)")
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--resume", action="store_true", help="continue a run in --out, skipping the answers it holds")
    b.add_argument("--summarize-only", action="store_true", help="only recompute the summary and plots of --out")
    b.add_argument("--quiet", action="store_true", help="a line per question instead of the progress bar")
    add_method_args(b)
    add_sampling_args(b)
    b.set_defaults(func=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    from .drafters import DEFAULT_METHOD, METHODS

    parser = argparse.ArgumentParser(prog="specprobe", description="Lossless speculative decoding for Hugging Face causal LMs.")
    parser.add_argument("--version", action="version", version=f"specprobe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt, streaming it", description="Generate greedily with a speculative method; the tokens equal plain greedy decoding.")
    add_model_args(g)
    g.add_argument("--method", default=DEFAULT_METHOD, choices=list(METHODS), help=f"decoding method (default {DEFAULT_METHOD})")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.add_argument(
        "--compare", nargs="?", const="", default=None, metavar="METHODS",
        help="also run ar on the same prompt (after an announced warm-up) and report each method's speedup and identical_to_ar; "
        "METHODS: comma-separated methods to compare (default: --method), e.g. --compare esp,hybrid",
    )
    g.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat/plain template")
    g.add_argument("--draft-model", help="for --method draft: a model name, or truncated:N (the target's first N layers)")
    add_method_args(g)
    add_sampling_args(g)
    g.add_argument("prompt", nargs="?", help="the prompt ('-' reads standard input)")
    g.set_defaults(func=cmd_generate)
    add_bench_parser(sub)
    from .profile_command import add_parser as add_profile_parser

    add_profile_parser(sub, add_model_args)
    from .tune import add_parser as add_tune_parser

    add_tune_parser(sub, add_model_args)
    from .server import add_parser as add_serve_parser

    add_serve_parser(sub, add_model_args, add_method_args)
    from .train_head import add_parser as add_train_head_parser

    add_train_head_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "max_new_tokens", 1) < 1:
        parser.error("--max-new-tokens must be >= 1")
    try:
        return args.func(args)
    except SpecProbeError as e:
        print(f"specprobe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("specprobe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
