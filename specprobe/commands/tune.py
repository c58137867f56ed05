"""`specprobe tune`: measure ESP's settings on this model and machine and save the best (tune.py)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import InvalidOptionError
from ..tune import PROMPTS, Trial, candidates, save, to_markdown, tune
from .args import resolve_backend


def run_command(args) -> int:
    from ..models import load

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
    if args.budget != "auto":  # a fixed tree size: the masks' hit rates compared alone
        try:
            budget = int(args.budget)
        except ValueError:
            budget = 0
        if budget < 1:
            raise InvalidOptionError(f"--budget must be auto or an integer >= 1, got {args.budget!r}")
        for g in grid:
            g["budget"] = budget
    resolve_backend(args, "esp")  # the masks tuned are ESP's
    lm = load(args.model, dtype=args.dtype, device=args.device, backend=args.backend)
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
    p.add_argument("--budget", default="auto", help="tree nodes per step for every setting (default auto: each setting's size from the cost curve; N: hit rates compared at one size)")
    p.set_defaults(func=run_command)
