"""Spec-Bench harness: run methods over Spec-Bench questions, write answer files, summary and plots.

    import specprobe
    from specprobe.bench import load_questions, run_bench
    lm = specprobe.load("smollm2-135m")
    questions = load_questions("question.jsonl", per_category=1)
    summary = run_bench(lm, questions, ["ar", "hf", "esp"], "out/", max_new_tokens=64)

`write_summary(dir)` recomputes summary.json, summary.md and the plots from a folder's answer
files (`specprobe bench --summarize-only --out DIR`).
"""

from .answers import read_answers, safe_name
from .questions import DEFAULT_QUESTIONS, load_questions, parse_questions, select_questions
from .report import summarize, to_markdown, write_summary
from .runner import HF_METHODS, all_methods, check_methods, run_bench

__all__ = [
    "DEFAULT_QUESTIONS",
    "HF_METHODS",
    "all_methods",
    "check_methods",
    "load_questions",
    "parse_questions",
    "read_answers",
    "run_bench",
    "safe_name",
    "select_questions",
    "summarize",
    "to_markdown",
    "write_summary",
]
