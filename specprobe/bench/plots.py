"""The plots of a benchmark summary (matplotlib, Agg canvas: no display, no pyplot state).

speedup.png         speedup over ar per category and overall, bars grouped by method, 1.0 dashed
accept_lengths.png  per speculative method, the share of target forwards that committed k tokens
acceptance_stream.png  per method with drafts, the rolling acceptance rate against question index
                    (run order): shows a drafter that adapts online improving over the stream
"""

from __future__ import annotations

from pathlib import Path

from ..store import save_figure
from .answers import OVERALL

TRIVIAL = ("ar", "hf")  # one token per forward by construction: nothing to show in a histogram


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _grouped_bars(ax, groups: list[str], series: dict[str, list[float]], labels: bool = False) -> None:
    n = max(1, len(series))
    width = 0.8 / n
    for i, ((name, values), color) in enumerate(zip(series.items(), _colors(n))):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width, label=name, color=color)
        if labels:
            ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(range(len(groups)), groups, rotation=30 if len(groups) > 5 else 0, ha="right" if len(groups) > 5 else "center")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def speedup_plot(summary: dict, path: Path) -> None:
    groups = [*summary["categories"], OVERALL]
    methods = [m for m in summary["methods"] if m != "ar"]
    fig = _figure(max(6.0, 1.0 + 0.55 * len(groups) * max(1, len(methods)) ** 0.5), 4.2)
    ax = fig.add_subplot()
    if "ar" not in summary["methods"] or not methods:
        _empty(ax, "no speedup: the run needs ar and at least one other method")
    else:
        series = {m: [summary["methods"][m][g]["speedup"] or 0.0 for g in groups] for m in methods}
        _grouped_bars(ax, groups, series, labels=len(groups) * len(methods) <= 30)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ax.axvline(len(groups) - 1.5, color="grey", linewidth=0.8)  # categories | overall
        ax.set_ylabel("speedup over ar (mean tokens/s ratio)")
        ax.legend(ncols=min(len(methods), 6), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.suptitle(f"Spec-Bench speedup: {summary['model']}", fontsize=11)
    save_figure(fig, path)


def accept_length_plot(summary: dict, path: Path) -> None:
    hist = {m: {int(k): v for k, v in h.items()} for m, h in summary["accept_length_histogram"].items() if m not in TRIVIAL}
    fig = _figure(7.0, 4.2)
    ax = fig.add_subplot()
    if not hist:
        _empty(ax, "no speculative method with per-step accept lengths")
    else:
        ks = list(range(1, max(k for h in hist.values() for k in h) + 1))
        series = {}
        for m, h in hist.items():
            total = sum(h.values())
            tau = summary["methods"][m][OVERALL]["tau"]
            series[f"{m} (tau {tau:.2f})"] = [h.get(k, 0) / total for k in ks]
        _grouped_bars(ax, [str(k) for k in ks], series)
        ax.set_xlabel("tokens committed per target forward")
        ax.set_ylabel("share of target forwards")
        ax.legend(frameon=False)
    fig.suptitle(f"Accepted lengths per step: {summary['model']} (ar/hf: always 1)", fontsize=11)
    save_figure(fig, path)


def rolling_mean(values: list[float | None], window: int) -> list[float]:
    """The mean of each value and the (up to) window - 1 values before it, leaving out None (a
    question where nothing was proposed); NaN where the window holds no value.

    >>> rolling_mean([1.0, 0.0, 1.0, 0.0], 2)
    [1.0, 0.5, 0.5, 0.5]
    >>> rolling_mean([None, 1.0, None, 0.0], 2)
    [nan, 1.0, 1.0, 0.0]
    """
    out = []
    for i in range(len(values)):
        seen = [v for v in values[max(0, i - window + 1) : i + 1] if v is not None]
        out.append(sum(seen) / len(seen) if seen else float("nan"))
    return out


def acceptance_stream_plot(summary: dict, path: Path) -> None:
    """Rolling acceptance rate against question index (run order): does a drafter that adapts
    online get better over the stream?"""
    stream = {m: s for m, s in summary.get("acceptance_stream", {}).items() if m not in TRIVIAL}
    fig = _figure(7.5, 4.2)
    ax = fig.add_subplot()
    if not stream:
        _empty(ax, "no method with observed draft tokens")
    else:
        n = max(len(s) for s in stream.values())
        window = max(1, min(20, n // 5))
        for (m, s), color in zip(stream.items(), _colors(len(stream))):
            seen = [v for v in s if v is not None]
            ax.plot(range(1, len(s) + 1), rolling_mean(s, window), label=f"{m} (mean per question {sum(seen) / len(seen):.0%})", color=color)
        ax.set_xlabel("question, in run order")
        ax.set_ylabel(f"acceptance rate, rolling mean of {window}")
        ax.grid(alpha=0.3)
        ax.legend(frameon=False)
    fig.suptitle(f"Acceptance over the run: {summary['model']}", fontsize=11)
    save_figure(fig, path)


def write_plots(summary: dict, out_dir) -> None:
    out = Path(out_dir)
    acceptance_stream_plot(summary, out / "acceptance_stream.png")
    speedup_plot(summary, out / "speedup.png")
    accept_length_plot(summary, out / "accept_lengths.png")
