"""`specprobe tune`: choose ESP's settings for one model on this machine, from measurements.

The best mask initialisation differs between models (README, "Measured on this machine"), and the
best tree shape depends on the hardware. `tune` runs every candidate setting (mask init x masks k x
top-K, with the hardware-aware budget) on a few prompts, checks each output against plain greedy
decoding, and ranks the candidates by their MODELLED speedup,

    new tokens x T(1) / sum over forwards of T(rows)          (T: the measured cost curve)

which is free of timing noise (wall-clock speedups are recorded beside it). The winner is saved
under `settings_root()` (`$SPECPROBE_SETTINGS`, default `cache_root()/tuned/`) for this model,
dtype and device; `generate` and `bench` use it for `esp` and `hybrid` wherever the caller gives
no option of their own. Unlike the measured caches beside it (kernel plans, cost curves), which
only change speed, a saved choice changes the options a run uses; the test suite points
`$SPECPROBE_SETTINGS` at a folder of its own.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from .budget import CostCurve
from .errors import InvalidOptionError

TUNED_METHODS = ("esp", "hybrid")
TUNED_KEYS = ("mask_init", "masks", "branching")

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


def model_key(model) -> str:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head = model.get_output_embeddings().weight
    key = f"{cfg.model_type}-{cfg.num_hidden_layers}x{cfg.hidden_size}-v{head.shape[0]}-{head.dtype}-{head.device.type}"
    return "".join(ch if ch.isalnum() or ch in "-._" else "_" for ch in key)


def settings_root() -> Path:
    """Where tuned choices live: `$SPECPROBE_SETTINGS`, else `cache_root()/tuned`."""
    from .models import cache_root

    return Path(os.environ["SPECPROBE_SETTINGS"]) if os.environ.get("SPECPROBE_SETTINGS") else cache_root() / "tuned"


def settings_path(model) -> Path:
    return settings_root() / f"{model_key(model)}.json"


def tuned_options(model, method: str) -> dict:
    """The saved settings for `method` on this model ({} when none were saved, or unreadable)."""
    if method not in TUNED_METHODS:
        return {}
    path = settings_path(model)
    if not path.is_file():
        return {}
    try:
        chosen = json.loads(path.read_text())["chosen"]
        return {k: chosen[k] for k in TUNED_KEYS if k in chosen}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def candidates(mask_inits: list[str], masks: list[int], branchings: list[int]) -> list[dict]:
    return [dict(mask_init=i, masks=k, branching=t) for i in mask_inits for k in masks for t in branchings]


def tune(lm, prompts: list[str], grid: list[dict], max_new_tokens: int, progress=None) -> tuple[dict, list[Trial]]:
    """Run every setting of `grid` with ESP on `prompts`; return the best setting and all trials."""
    from .api import generate
    from .models import format_prompt
    from .profile import target_cost_curve
    from .verify import Target

    curve = CostCurve.from_dict(target_cost_curve(Target.of(lm.model)))
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
    path = settings_path(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"chosen": chosen, "trials": [asdict(t) for t in trials], **meta}, indent=1))
    os.replace(tmp, path)
    return path


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


def run_command(args) -> int:
    from .models import load

    if args.max_new_tokens < 1 or args.prompts < 1:
        raise InvalidOptionError("--max-new-tokens and --prompts must be >= 1")
    prompts = PROMPTS[: args.prompts]
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise InvalidOptionError(f"--prompt-file {path}: no such file")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()][: args.prompts]
        if not prompts:
            raise InvalidOptionError(f"--prompt-file {path} holds no prompt")
    grid = candidates(args.mask_inits.split(","), args.masks, args.branching)
    lm = load(args.model, dtype=args.dtype, device=args.device)
    if any(g["mask_init"] == "token:eos" for g in grid):
        eos = lm.tokenizer.eos_token_id
        for g in grid:
            if g["mask_init"] == "token:eos":
                g["mask_init"] = f"token:{eos}"
    print(f"specprobe tune: {len(grid)} settings x {len(prompts)} prompts x {args.max_new_tokens} tokens", file=sys.stderr)
    done = [0]

    def progress(t: Trial) -> None:
        done[0] += 1
        print(f"  [{done[0]}/{len(grid)}] {t.mask_init} k={t.masks} K={t.branching}: tau {t.tau:.3f}, modelled {t.modelled_speedup:.2f}x", file=sys.stderr)

    chosen, trials = tune(lm, prompts, grid, args.max_new_tokens, progress)
    path = save(lm.model, chosen, trials, {"model": args.model, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens})
    print(to_markdown(trials, chosen))
    print(f"specprobe tune: chose {chosen} for {args.model}; saved {path} (used by generate and bench for esp and hybrid)", file=sys.stderr)
    return 0


def add_parser(sub, add_model_args) -> None:
    p = sub.add_parser(
        "tune",
        help="measure ESP settings on this model and machine and save the best for generate and bench",
        description="Run ESP with every setting of the grid on a few prompts (checking each output against greedy decoding), "
        "rank by the speedup the measured cost curve gives for the trees used, and save the winner.",
    )
    add_model_args(p)
    p.add_argument("--prompts", type=int, default=4, help=f"how many prompts (default 4; {len(PROMPTS)} built in)")
    p.add_argument("--prompt-file", help="a text file, one prompt per line, instead of the built-in prompts")
    p.add_argument("--max-new-tokens", type=int, default=48, help="per prompt (default 48)")
    p.add_argument("--mask-inits", default="vocab-mean,context-mean,ema,gaussian,token:eos", help="comma-separated mask inits to try")
    p.add_argument("--masks", type=int, nargs="+", default=[1, 2], help="values of k to try (default 1 2)")
    p.add_argument("--branching", type=int, nargs="+", default=[2, 3], help="values of K to try (default 2 3)")
    p.set_defaults(func=run_command)
