"""The summary of a benchmark folder, recomputed from its answer files (so a resumed run gets a full one).

Per method and per category (and overall), a cell holds, as Spec-Bench defines them:

    tau             total new tokens / total decoding steps (target forwards); null where unobserved
    tokens_per_s    mean over answers of (new tokens / wall time), turns summed per answer
    speedup         tokens_per_s of the method / tokens_per_s of `ar` in the same category
    identical_to_ar fraction of answers whose token ids equal ar's for the same question (for
                    `method@backend`, that backend's `ar@backend` where it ran)
    differs_at_near_tie  fraction of answers that differ from ar where ar's own top-2 logit gap was
                    under divergence.NEAR_TIE (a rounding tie of a low-precision dtype, not a bug);
                    1 - identical_to_ar - differs_at_near_tie differ elsewhere (or were not checked:
                    answers written before the check, or whose ar ran in an earlier --resume run)
    acceptance      accepted draft tokens / proposed draft tokens ((new tokens - steps) / draft tokens:
                    every step commits one token of the target's own); null where unobserved
    adapt_share     share of the wall time spent adapting the drafter between requests (omnidraft)
    spread          with --repeats: the median over answers of (slowest - fastest) / median wall time
    bound           the speedup the cost curve allows for what the method did: new tokens x T(1) /
                    the sum over its forwards of T(rows), i.e. tau x T(1) / mean T(q), with T the
                    target's measured cost curve (`specprobe profile`); null for transformers' rows
    n               answers

Only questions answered by every method count, so each ratio compares the same prompts.
`disturbed` lists the questions whose `ar` time per target forward is more than DISTURBED times
(or less than 1 / DISTURBED of) the run's median: a slow moment of the machine, not of a method.
Writes summary.json, summary.md and the plots (see plots.py).
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path

from ..errors import BenchError
from ..store import atomic_write
from .answers import OVERALL, SETTINGS_FILE, read_answers, turn_accept_lengths
from .divergence import NEAR_TIE

DISTURBED = 1.5  # ar's time per forward this far off the run's median flags a question


def tokens_per_s(record: dict) -> float:
    c = record["choices"][0]
    wall = sum(c["wall_time"])
    return sum(c["new_tokens"]) / wall if wall > 0 else 0.0


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def cell(records: list[dict], ar: dict | None = None) -> dict:
    """The cell of `records` (one method); `ar` maps question_id -> ar's record, for identical_to_ar."""
    new = sum(sum(r["choices"][0]["new_tokens"]) for r in records)
    steps = [s for r in records for s in r["choices"][0]["decoding_steps"]]
    tau = new / sum(steps) if steps and None not in steps and sum(steps) > 0 else None
    identical = near_tie = None
    if ar is not None:
        same = [r["choices"][0]["token_ids"] == ar[r["question_id"]]["choices"][0]["token_ids"] for r in records]
        identical = _mean([float(x) for x in same])
        near_tie = _mean([float(not x and bool((r["choices"][0].get("first_difference") or {}).get("near_tie"))) for r, x in zip(records, same)])
    bound = None
    turns = [(n, b, t1) for r in records for n, b, t1 in zip(r["choices"][0]["new_tokens"], r["choices"][0].get("bound_time") or [None], r["choices"][0].get("t1") or [None])]
    if turns and all(b and t1 for _, b, t1 in turns):
        bound = sum(n * t1 for n, _, t1 in turns) / sum(b for _, b, _ in turns)
    draft = [d for r in records for d in r["choices"][0].get("draft_tokens") or [None]]
    acceptance = (new - sum(steps)) / sum(draft) if tau is not None and draft and None not in draft and sum(draft) > 0 else None
    adapt = [a for r in records for a in r["choices"][0].get("adapt_time") or [None]]
    wall = sum(sum(r["choices"][0]["wall_time"]) for r in records)
    adapt_share = sum(adapt) / wall if adapt and None not in adapt and wall > 0 and sum(adapt) >= 1e-3 * wall else None  # < 0.1%: not adapting
    spreads = [s for r in records if (s := _spread(r["choices"][0])) is not None]
    return {"tau": tau, "acceptance": acceptance, "adapt_share": adapt_share, "tokens_per_s": _mean([tokens_per_s(r) for r in records]), "speedup": None,
            "identical_to_ar": identical, "differs_at_near_tie": near_tie, "bound": bound, "spread": statistics.median(spreads) if spreads else None, "n": len(records)}


def _spread(choice: dict) -> float | None:
    """(slowest - fastest) / median of an answer's repeated wall times (turns summed); None without repeats."""
    per_turn = choice.get("wall_times")
    if not per_turn or any(len(w) < 2 for w in per_turn):
        return None
    totals = [sum(ws) for ws in zip(*per_turn)]
    middle = statistics.median(totals)
    return (max(totals) - min(totals)) / middle if middle > 0 else None


def disturbed_questions(ar_records: list[dict]) -> list[dict]:
    """Questions whose ar time per target forward is DISTURBED times off the run's median."""
    per_step = {}
    for r in ar_records:
        c = r["choices"][0]
        steps = sum(s or 0 for s in c["decoding_steps"])
        if steps:
            per_step[r["question_id"]] = sum(c["wall_time"]) / steps
    if len(per_step) < 3:
        return []
    middle = statistics.median(per_step.values())
    return [
        {"question_id": q, "ar_ms_per_step": round(1e3 * t, 2), "times_median": round(t / middle, 2)}
        for q, t in per_step.items()
        if t > DISTURBED * middle or t < middle / DISTURBED
    ]


def identical_reference(method: str, methods, default_backend: str = "torch") -> str | None:
    """The method whose tokens `method` must equal: the `ar` of the backend it ran on (`ar` for the
    run's own backend, `ar@B` for another), or None when that `ar` did not run.

    >>> identical_reference("hybrid@llamacpp", ["ar", "ar@llamacpp"]), identical_reference("pld", ["ar"])
    ('ar@llamacpp', 'ar')
    >>> identical_reference("hybrid@torch", ["ar"], "llamacpp"), identical_reference("llamacpp", ["ar"], "llamacpp")
    (None, 'ar')
    """
    if method in ("llamacpp", "llamacpp-lookup"):  # llama-cpp-python's own rows
        backend = "llamacpp"
    elif method.startswith("hf"):  # transformers' own rows
        backend = "torch"
    else:
        backend = method.partition("@")[2] or default_backend
    if backend == default_backend:
        return "ar"
    return f"ar@{backend}" if f"ar@{backend}" in methods else None


def acceptance_stream(by_method: dict, order: list[str], qids: list) -> dict[str, list[float | None]]:
    """Per method that proposed drafts, each question's acceptance in run order (None: nothing
    proposed for that question)."""
    stream = {m: [cell([by_method[m][q]])["acceptance"] for q in qids] for m in order}
    return {m: s for m, s in stream.items() if any(v is not None for v in s)}


def summarize(records: list[dict], methods: list[str] | None = None, settings: dict | None = None) -> dict:
    """The summary of answer records (see the module docstring); `methods` fixes the row order."""
    models = {r.get("model_id") for r in records} - {None}
    if len(models) > 1:
        raise BenchError(f"the answers mix models {', '.join(sorted(map(str, models)))}; summarize one model per folder")
    by_method: dict[str, dict] = {}
    for r in records:
        by_method.setdefault(r["method"], {}).setdefault(r["question_id"], r)  # a repeated answer: the first counts
    order = [m for m in (methods or []) if m in by_method] + [m for m in by_method if m not in (methods or [])]
    qids = [q for q in dict.fromkeys(r["question_id"] for r in records) if all(q in by_method[m] for m in order)]
    category_of = {r["question_id"]: r["category"] for r in records}
    categories = list(dict.fromkeys(category_of[q] for q in qids))
    ar = by_method.get("ar")
    cells: dict[str, dict] = {}
    histogram: dict[str, dict[int, int]] = {}
    for m in order:
        recs = [by_method[m][q] for q in qids]
        reference = identical_reference(m, by_method, (settings or {}).get("backend", "torch"))
        own = by_method.get(reference) if reference else None  # a method on another backend is compared with that backend's ar
        cells[m] = {OVERALL: cell(recs, own)}
        for c in categories:
            cells[m][c] = cell([r for r in recs if r["category"] == c], own)
        lengths = [n for r in recs for turn in turn_accept_lengths(r["choices"][0]) if turn is not None for n in turn]
        if lengths:
            histogram[m] = dict(sorted(Counter(lengths).items()))
    if ar is not None:
        for m in order:
            for key, c in cells[m].items():
                base = cells["ar"][key]["tokens_per_s"]
                c["speedup"] = c["tokens_per_s"] / base if base else None
    return {
        "model": (settings or {}).get("model") or next(iter(models), None),
        "settings": settings or {},
        "methods": cells,
        "categories": categories,
        "questions": len(qids),
        "left_out_questions": len(category_of) - len(qids),
        "accept_length_histogram": histogram,
        "disturbed": disturbed_questions([ar[q] for q in qids]) if ar is not None else [],
        # per method with observed drafts, each question's acceptance rate in run order (None: no draft
        # proposed for that question) (plots.acceptance_stream_plot)
        "acceptance_stream": acceptance_stream(by_method, order, qids),
    }


def _fmt(value, kind: str) -> str:
    if value is None:
        return "–"
    return {"tau": f"{value:.2f}", "tps": f"{value:.1f}", "x": f"{value:.2f}x", "pct": f"{100 * value:.0f}%"}[kind]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def to_markdown(summary: dict) -> str:
    cells, s = summary["methods"], summary["settings"]
    methods = list(cells)
    lines = [f"# Spec-Bench: {summary['model']}", ""]
    lines.append(
        f"{summary['questions']} questions in {len(summary['categories'])} categories; max_new_tokens {s.get('max_new_tokens')}, "
        f"turns {s.get('turns')}, greedy; torch {s.get('torch')} ({s.get('torch_threads')} thread{'' if s.get('torch_threads') == 1 else 's'}), "
        f"transformers {s.get('transformers')}."
    )
    options = {m: o for m, o in s.get("method_options", {}).items() if o and m in cells}
    if options or s.get("draft_model"):
        lines.append("Options: " + "; ".join([f"{m} {o}" for m, o in options.items()] + ([f"draft model {s['draft_model']}"] if s.get("draft_model") else [])) + ".")
    for asked, c in (s.get("backend_choices") or {}).items():
        lines.append(f"{asked}: {c['backend']}, chosen for {c['chosen_for']} by `specprobe.choose_backend`: {c['reason']}.")
    lines += ["", "## Overall", ""]
    rows = []
    for m in methods:
        c = cells[m][OVERALL]
        share = c["speedup"] / c["bound"] if c.get("bound") and c["speedup"] is not None else None
        rows.append([
            m, _fmt(c["tau"], "tau"), _fmt(c.get("acceptance"), "pct"), _fmt(c["tokens_per_s"], "tps"), _fmt(c["speedup"], "x"),
            _fmt(c.get("bound"), "x"), _fmt(share, "pct"), _fmt(c["identical_to_ar"], "pct"),
            _fmt(c.get("differs_at_near_tie"), "pct"), str(c["n"]),
        ])
    lines += _table(["method", "tau", "acceptance", "tokens/s", "speedup", "bound", "speedup / bound", "identical to ar", "differs at a tie", "n"], rows)
    for title, key, kind in (("Speedup over ar per category", "speedup", "x"), ("tau (new tokens per target forward) per category", "tau", "tau")):
        rows = [[c] + [_fmt(cells[m][c][key], kind) for m in methods] for c in [*summary["categories"], OVERALL]]
        lines += ["", f"## {title}", ""] + _table(["category", *methods], rows)
    lines += ["", "## Notes", ""]
    lines.append("- tau = new tokens / target forwards (plain decoding: 1.00); tokens/s = mean over answers of new tokens / wall time; "
                 "speedup = mean tokens/s of the method / mean tokens/s of ar in the same category (Spec-Bench's definitions).")
    lines.append("- bound = new tokens x T(1) / sum over forwards of T(rows): the speedup the target's measured cost curve allows for the trees "
                 "the method verified (tau x T(1) / T(q)); it leaves out drafting time and attention over contexts longer than the curve's 300 tokens.")
    lines.append("- acceptance = accepted draft tokens / proposed draft tokens, i.e. (new tokens - forwards) / draft tokens; acceptance_stream.png plots it per question in run order.")
    adapting = {m: c[OVERALL]["adapt_share"] for m, c in cells.items() if c[OVERALL].get("adapt_share")}
    if adapting:
        lines.append("- time spent adapting the drafter between requests (online distillation, inside the wall time): " + ", ".join(f"{m} {_fmt(v, 'pct')}" for m, v in adapting.items()) + ".")
    lines.append("- identical to ar: compared with the `ar` of the backend the method ran on (`ar@B` for a method `M@B` on another backend than the run's; – where that `ar` did not run).")
    lines.append("- differs at a tie: answers that differ from that ar where ar's own top-2 logit gap, recomputed at the first differing token, "
                 f"was under {NEAR_TIE} (a rounding tie of bfloat16/float16, not a bug); identical + tie short of 100% is what to look into.")
    if "ar" not in cells:
        lines.append("- ar was not run: no speedup and no identical_to_ar.")
    if "hf" in cells:
        lines.append("- hf: transformers' `model.generate` (greedy), one forward per token, so tau is 1.00 by definition.")
    unobserved = [m for m in methods if cells[m][OVERALL]["tau"] is None]
    if unobserved:
        lines.append(f"- {', '.join(unobserved)}: transformers does not report how many forwards its assisted decoding ran, so tau is not measured (–).")
    spreads = {m: c[OVERALL]["spread"] for m, c in cells.items() if c[OVERALL].get("spread") is not None}
    if spreads:
        lines.append(f"- {s.get('repeats')} runs of every (question, method), the order rotated per question and round; wall time = their median. "
                     "Spread (median over answers of (slowest - fastest) / median): " + ", ".join(f"{m} {_fmt(v, 'pct')}" for m, v in spreads.items()) + ".")
    elif s.get("order"):
        lines.append("- the methods ran in an order rotated from one question to the next (no method always first).")
    if summary.get("disturbed"):
        flagged = ", ".join(f"{d['question_id']} ({d['times_median']:.2f}x)" for d in summary["disturbed"])
        lines.append(f"- disturbed: questions whose ar time per forward is over {DISTURBED}x (or under 1/{DISTURBED} of) the run's median, "
                     f"a slow moment of the machine that hit every method running then: {flagged}.")
    if summary["left_out_questions"]:
        lines.append(f"- {summary['left_out_questions']} question(s) without an answer from every method (an interrupted run) are left out.")
    return "\n".join(lines) + "\n"


def write_summary(out_dir) -> dict:
    """(Re)compute the summary of `out_dir` from its answer files; write summary.json, summary.md and plots."""
    from .plots import write_plots

    out = Path(out_dir)
    settings = {}
    if (out / SETTINGS_FILE).is_file():
        try:
            settings = json.loads((out / SETTINGS_FILE).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise BenchError(f"cannot read {out / SETTINGS_FILE}: {e}") from None
    records = read_answers(out) if out.is_dir() else []
    if not records:
        raise BenchError(f"no answer files in {out}")
    summary = summarize(records, settings.get("methods"), settings)
    atomic_write(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write(out / "summary.md", to_markdown(summary))
    write_plots(summary, out)
    return summary
