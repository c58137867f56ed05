"""`specprobe bench`: from parsed command-line arguments to `run_bench` (or `write_summary`).

Every check that needs no model runs before the model loads, so bad input fails in a second.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..bench.questions import DEFAULT_QUESTIONS, load_questions
from ..bench.report import write_summary
from ..bench.runner import backends_needed, check_methods, check_out_dir, run_bench, split_method
from ..drafters import DEFAULT_METHOD, DRAFT_MODEL_METHODS, METHODS, make_drafter
from ..errors import InvalidOptionError
from ..models import load, load_draft
from .args import add_method_args, add_model_args, add_sampling_args, method_options, sampling_options


def default_methods(backend: str = "torch") -> list[str]:
    """ar, the backend's reference row (hf; on llama.cpp, llamacpp and llamacpp-lookup) and every
    method that needs no draft model or trained head."""
    reference = ["llamacpp", "llamacpp-lookup"] if backend == "llamacpp" else ["hf"]
    return ["ar", *reference, *[m for m in METHODS if m not in ("ar", *NEEDS_MODEL)]]


NEEDS_MODEL = (*DRAFT_MODEL_METHODS, "eagle", "confu")  # methods whose drafter needs a draft model or a trained head


def split_list(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def auto_backends(args: argparse.Namespace, named: list[str]) -> dict[str, dict]:
    """Resolve `auto` in place: `--backend auto` becomes the backend chosen for the default method,
    each `M@auto` in `named` becomes `M@<the backend chosen for M>`. Returns what was chosen, by
    what was asked, for the summary."""
    from ..backend_choice import choose_backend

    choices = {}
    if args.backend == "auto":
        choice = choose_backend(args.model, DEFAULT_METHOD, method_options(args, DEFAULT_METHOD), dtype=args.dtype, device=args.device)
        args.backend = choice.backend
        choices["--backend auto"] = {"backend": choice.backend, "chosen_for": DEFAULT_METHOD, "reason": choice.reason}
    for i, m in enumerate(named):
        base, backend = split_method(m)
        if backend == "auto":
            choice = choose_backend(args.model, base, method_options(args, base), dtype=args.dtype, device=args.device)
            named[i] = f"{base}@{choice.backend}"
            choices[m] = {"backend": choice.backend, "chosen_for": base, "reason": choice.reason}
    return choices


def run_command(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.summarize_only:
        summary = write_summary(out)
    else:
        if args.per_category is not None and args.per_category < 1:
            raise InvalidOptionError(f"--per-category must be at least 1, got {args.per_category}")
        if args.repeats < 1:
            raise InvalidOptionError(f"--repeats must be at least 1, got {args.repeats}")
        if args.turns not in (1, 2):
            raise InvalidOptionError(f"--turns must be 1 or 2, got {args.turns}")
        named = split_list(args.methods)
        check_methods([m.replace("@auto", "@torch") for m in named or ["ar"]], args.draft_model is not None)  # bad names fail before any timing
        choices = auto_backends(args, named)
        methods = check_methods(named or default_methods(args.backend), args.draft_model is not None)
        options = {m: method_options(args, split_method(m)[0]) for m in methods if split_method(m)[0] in METHODS}
        for m, head in (("eagle", args.eagle_head), ("confu", args.confu_head)):
            if m in options and head:
                options[m]["head"] = head
        sampling = sampling_options(args)
        for m, o in options.items():
            if split_method(m)[0] not in DRAFT_MODEL_METHODS:  # their draft model is not loaded yet
                make_drafter(split_method(m)[0], **o)
        categories = split_list(args.categories) or None
        questions = load_questions(args.questions, categories, args.per_category)
        check_out_dir(out, args.resume)
        lm = load(args.model, dtype=args.dtype, device=args.device, backend=args.backend)
        others = {b: load(args.model, dtype=args.dtype, device=args.device, backend=b) for b in sorted(backends_needed(methods, args.backend))}
        draft = load_draft(args.draft_model, lm, args.dtype, args.device) if args.draft_model else None
        settings = {"backend_choices": choices or None, "questions": args.questions, "categories": categories, "per_category": args.per_category, "dtype": args.dtype, "device": args.device}
        summary = run_bench(
            lm, questions, methods, out, max_new_tokens=args.max_new_tokens, turns=args.turns, method_options=options,
            draft_model=draft, resume=args.resume, progress=False if args.quiet else None, settings=settings, sampling=sampling,
            repeats=args.repeats, models=others,
        )
    print((out / "summary.md").read_text(), end="")
    print(f"specprobe bench: {summary['questions']} questions; wrote {out}/summary.json, summary.md, speedup.png, accept_lengths.png, acceptance_stream.png", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    b = sub.add_parser(
        "bench", help="run Spec-Bench: methods x questions -> answer files, summary, plots",
        description="Run methods over Spec-Bench questions (interleaved, after a warm-up); write answer files, summary.json, summary.md and plots to --out.",
    )
    add_model_args(b)
    b.add_argument("--questions", default=DEFAULT_QUESTIONS, help="spec-bench (default: Spec-Bench's 480 questions, shipped with specprobe), or a question JSONL file or URL")
    b.add_argument("--methods", help="comma-separated: specprobe methods (method@torch, method@llamacpp: on that backend; method@auto: on the faster, timed once), "
                   "and the reference rows hf, hf-pld, hf-assisted, hf-uag (transformers), llamacpp, llamacpp-lookup (llama-cpp-python) "
                   "(default: ar, hf and every method needing no draft model)")
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
    b.set_defaults(func=run_command)


