"""`specprobe bench`: from parsed command-line arguments to `run_bench` (or `write_summary`).

Every check that needs no model runs before the model loads, so bad input fails in a second.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..drafters import DRAFT_MODEL_METHODS, METHODS, make_drafter
from ..errors import InvalidOptionError
from ..models import load, load_draft
from .questions import load_questions
from .report import write_summary
from .runner import check_methods, check_out_dir, run_bench


def default_methods() -> list[str]:
    """ar, hf and every method that needs no draft model or trained head."""
    return ["ar", "hf", *[m for m in METHODS if m not in ("ar", *NEEDS_MODEL)]]


NEEDS_MODEL = (*DRAFT_MODEL_METHODS, "eagle", "confu")  # methods whose drafter needs a draft model or a trained head


def split_list(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def run_command(args: argparse.Namespace) -> int:
    from ..cli import method_options, sampling_options

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
        methods = check_methods(split_list(args.methods) if args.methods else default_methods(), args.draft_model is not None)
        options = {m: method_options(args, m) for m in methods if m in METHODS}
        for m, head in (("eagle", args.eagle_head), ("confu", args.confu_head)):
            if m in options and head:
                options[m]["head"] = head
        sampling = sampling_options(args)
        for m, o in options.items():
            if m not in DRAFT_MODEL_METHODS:  # their draft model is not loaded yet
                make_drafter(m, **o)
        categories = split_list(args.categories) or None
        questions = load_questions(args.questions, categories, args.per_category)
        check_out_dir(out, args.resume)
        lm = load(args.model, dtype=args.dtype, device=args.device)
        draft = load_draft(args.draft_model, lm, args.dtype, args.device) if args.draft_model else None
        settings = {"questions": args.questions, "categories": categories, "per_category": args.per_category, "dtype": args.dtype, "device": args.device}
        summary = run_bench(
            lm, questions, methods, out, max_new_tokens=args.max_new_tokens, turns=args.turns, method_options=options,
            draft_model=draft, resume=args.resume, progress=False if args.quiet else None, settings=settings, sampling=sampling,
            repeats=args.repeats,
        )
    print((out / "summary.md").read_text(), end="")
    print(f"specprobe bench: {summary['questions']} questions; wrote {out}/summary.json, summary.md, speedup.png, accept_lengths.png, acceptance_stream.png", file=sys.stderr)
    return 0
