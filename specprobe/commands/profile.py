"""`specprobe profile`: the cost curve T(q) of the target on this machine, its parts, the roofline.

Writes profile.md, profile.json and cost_curve.png to --out (when given) and saves the curve of
the planned kernels where `--budget auto` reads it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import InvalidOptionError
from ..store import atomic_write, save_figure


def run_command(args) -> int:
    import torch

    from ..backends.torch import KERNEL_MODES, TorchBackend
    from ..backends.torch.profile import profile, save_cost_curve
    from ..engine.cost_curve import measure_cost_curve
    from ..models import load

    qs = sorted(set(args.q))
    if not qs or qs[0] < 1 or qs[-1] > 512:
        raise InvalidOptionError("--q values must lie in 1..512")
    if 1 not in qs:
        qs = [1, *qs]
    if args.backend == "llamacpp":
        return _profile_llamacpp(args, qs)
    modes = list(KERNEL_MODES) if args.kernels == "both" else [args.kernels]
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load(args.model, dtype=args.dtype, device=args.device, backend=args.backend)
    profiles = {}
    for mode in modes:
        target = TorchBackend(lm.model, kernels=mode)
        print(f"specprobe: profiling {args.model} with {mode} kernels ...", file=sys.stderr)
        prof = profile(target, args.model, qs, args.context, args.repeats)
        profiles[mode] = prof
        print(f"\n## {mode} kernels\n\n{prof.to_markdown()}\n")
        if mode == "planned":
            times, is_steady = measure_cost_curve(target, args.context)
            if is_steady:  # an unsteady curve is not saved (measure_cost_curve says so)
                save_cost_curve(target, times)
            TorchBackend.of(lm.model).set_cost_curve(times)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "profile.json", json.dumps({m: p.to_dict() for m, p in profiles.items()}, indent=1))
        atomic_write(out / "profile.md", "\n\n".join(f"## {m} kernels\n\n{p.to_markdown()}" for m, p in profiles.items()) + "\n")
        plot_profiles(profiles, out / "cost_curve.png")
        print(f"specprobe: wrote {out / 'profile.md'}, profile.json, cost_curve.png", file=sys.stderr)
    return 0


def plot_profiles(profiles: dict, path) -> None:
    """T(q)/T(1) per kernel mode beside the roofline bound (relative to the first mode's T(1))."""
    from ..bench.plots import _figure

    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot()
    first = next(iter(profiles.values()))
    t1 = first.rows[0].total_ms
    for label, prof in profiles.items():
        ax.plot([r.q for r in prof.rows], [r.total_ms / t1 for r in prof.rows], marker="o", label=f"T(q), {label} kernels")
    ax.plot([r.q for r in first.rows], [r.bound_ms / t1 for r in first.rows], linestyle="--", color="gray", label="roofline bound")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rows per forward q")
    ax.set_ylabel(f"time / T(1) of {next(iter(profiles))} kernels")
    ax.set_title(f"{first.model}: cost of one verification forward ({first.context}-token cache)")
    ax.axhline(1.0, color="black", linewidth=0.5)
    ax.legend()
    save_figure(fig, path)


def _profile_llamacpp(args, qs) -> int:
    """The llama.cpp backend's cost curve (its parts are llama.cpp's own) and its batch-invariance
    limit; saves the curve `--budget auto` reads."""
    from ..backends import backend_for
    from ..engine.cost_curve import forward_times, measure_cost_curve
    from ..models import load

    lm = load(args.model, backend="llamacpp", threads=args.threads)
    backend = backend_for(lm.model)
    print(f"specprobe: profiling {args.model} on llama.cpp ({lm.model.threads} threads) ...", file=sys.stderr)
    rows = backend.max_rows()
    times = forward_times(backend, qs, args.context, args.repeats)
    lines = [f"{args.model} on llama.cpp ({lm.model.threads} threads), KV cache {args.context} tokens; "
             f"batches of up to {rows} rows give one-row decoding's logits bit for bit", "", "| q | T(q) ms | T(q)/T(1) |", "|---|---|---|"]
    lines += [f"| {q} | {1e3 * t:.2f} | {t / times[qs[0]]:.2f} |" for q, t in times.items()]
    print("\n".join(lines))
    curve, is_steady = measure_cost_curve(backend, args.context)
    if is_steady:  # an unsteady curve is not saved (measure_cost_curve says so)
        backend.set_cost_curve(curve)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "profile.md", "\n".join(lines) + "\n")
        atomic_write(out / "profile.json", json.dumps({"llamacpp": {"seconds": times, "max_rows": rows}}, indent=1))
        print(f"specprobe: wrote {out / 'profile.md'}, profile.json", file=sys.stderr)
    return 0


def add_parser(sub, add_model_args) -> None:
    p = sub.add_parser(
        "profile",
        help="measure the cost curve T(q) of one verification forward, its parts and the roofline bound",
        description="Time one engine forward with q new rows over a KV cache, split into embedding, layers, LM head and "
        "overhead, beside the roofline bound from this machine's measured bandwidth and matmul peak. Saves the curve "
        "that --budget auto reads.",
    )
    add_model_args(p, auto=False)  # it measures the backend it is given
    p.add_argument("--q", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64], help="rows per forward (default 1 2 4 8 16 32 64)")
    p.add_argument("--context", type=int, default=300, help="tokens in the KV cache (default 300)")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds; the median is reported (default 7)")
    p.add_argument("--kernels", choices=["planned", "linear", "both"], default="both", help="planned (specprobe's), linear (transformers') or both (default)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--out", help="folder for profile.md, profile.json and cost_curve.png")
    p.set_defaults(func=run_command)
