"""`specprobe tune`: choose ESP's settings for one model on this machine, from measurements.

The best mask initialisation differs between models (README, "Measured on this machine"), and the
best tree shape depends on the hardware. `tune` runs every candidate setting (mask init x masks k x
top-K, with the hardware-aware budget) on a few prompts, checks each output against plain greedy
decoding, and ranks the candidates by their MODELLED speedup,

    new tokens x T(1) / sum over forwards of T(rows)          (T: the measured cost curve)

which is free of timing noise (wall-clock speedups are recorded beside it). The winner is saved
for this model, dtype and device (tuned.py); `generate` and `bench` use it for `esp` and `hybrid`
wherever the caller gives no option of their own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from .api import generate, target_of
from .engine.budget import CostCurve
from .models import format_prompt
from .tuned import TUNED_KEYS, save_choice

# A few kinds of text: free writing, code, reasoning, a copy-heavy task, translation, a question.
PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Write a Python function that checks whether a string is a palindrome, with a docstring and two tests.",
    "A train leaves at 3 pm at 60 km/h and another at 4 pm at 80 km/h on the same track. When does the second catch up? Explain step by step.",
    "Summarize the following text in two sentences: The city council met on Tuesday to discuss the new park. "
    "The park will have a playground, a pond and a garden. Construction starts in May and ends in October. "
    "The council approved a budget of two million dollars for the park.",
    "Translate to German: The weather is lovely today, so we will walk to the market and buy fresh bread.",
    "What are the main differences between a virus and a bacterium?",
]


@dataclass
class Trial:
    mask_init: str
    masks: int
    branching: int
    tau: float
    modelled_speedup: float
    wall_speedup: float
    identical: bool


def candidates(mask_inits: list[str], masks: list[int], branchings: list[int]) -> list[dict]:
    return [dict(mask_init=i, masks=k, branching=t) for i in mask_inits for k in masks for t in branchings]


def tune(lm, prompts: list[str], grid: list[dict], max_new_tokens: int, progress=None) -> tuple[dict, list[Trial]]:
    """Run every setting of `grid` with ESP on `prompts`; return the best setting and all trials."""
    curve = CostCurve.from_dict(target_of(lm.model).cost_curve())
    ids = [format_prompt(lm.tokenizer, p) for p in prompts]
    generate(lm.model, lm.tokenizer, ids[0], method="ar", max_new_tokens=4)  # warm-up
    refs = [generate(lm.model, lm.tokenizer, x, method="ar", max_new_tokens=max_new_tokens) for x in ids]
    ar_wall = sum(r.stats.wall_time for r in refs)
    trials = []
    for setting in grid:
        outs = [generate(lm.model, lm.tokenizer, x, method="esp", max_new_tokens=max_new_tokens, **setting) for x in ids]
        new = sum(o.stats.new_tokens for o in outs)
        forwards = sum(o.stats.target_forwards for o in outs)
        modelled = new * curve(1) / sum(curve(q) for o in outs for q in o.stats.step_rows)
        wall = (new / sum(o.stats.wall_time for o in outs)) / (sum(r.stats.new_tokens for r in refs) / ar_wall)
        identical = all(o.token_ids == r.token_ids for o, r in zip(outs, refs))
        trials.append(Trial(setting["mask_init"], setting["masks"], setting["branching"], new / forwards, modelled, wall, identical))
        if progress:
            progress(trials[-1])
    ok = [t for t in trials if t.identical] or trials
    best = max(ok, key=lambda t: (round(t.modelled_speedup, 3), t.tau))
    return {k: getattr(best, k) for k in TUNED_KEYS}, trials


def save(model, chosen: dict, trials: list[Trial], meta: dict) -> Path:
    return save_choice(model, {"chosen": chosen, "trials": [asdict(t) for t in trials], **meta})


def to_markdown(trials: list[Trial], chosen: dict) -> str:
    lines = [
        "| mask init | masks k | top-K | tau | modelled speedup | wall speedup | identical to ar |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for t in sorted(trials, key=lambda t: -t.modelled_speedup):
        mark = " **(chosen)**" if {k: getattr(t, k) for k in TUNED_KEYS} == chosen else ""
        lines.append(
            f"| {t.mask_init}{mark} | {t.masks} | {t.branching} | {t.tau:.3f} | {t.modelled_speedup:.2f}x | {t.wall_speedup:.2f}x | {'yes' if t.identical else 'NO'} |"
        )
    return "\n".join(lines)
