"""The bar figure of ``kvlab demo`` and ``kvlab ppl --out``: perplexity, peak KV MiB and tokens/s per method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvlab.spec import without_profile

COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]


def ppl_bars(specs: list[str], metrics: list[dict[str, Any]], title: str, path: str | Path) -> Path:
    """Three panels of bars, one bar per method (:func:`labels`), in the order given; vertical bars for up to
    four methods, horizontal ones (a row per method, named once) for more; written to ``path`` (PNG, 150 dpi)."""
    from matplotlib.figure import Figure

    from kvlab.results import atomic_path

    names = labels(specs)
    panels = [("perplexity", [m["ppl"] for m in metrics]),
              ("KV cache peak (MiB)", [m["kv_bytes_peak"] / 2**20 for m in metrics]),
              ("tokens / s", [m["tokens_per_s"] for m in metrics])]
    wide = len(names) > 4
    fig = Figure(figsize=(13, 1.2 + 0.32 * len(names)) if wide else (11, 3.4), layout="constrained")
    axes = fig.subplots(1, 3, sharey=wide)
    colors = [COLORS[i % len(COLORS)] for i in range(len(names))]
    for ax, (name, values) in zip(axes, panels):
        fmt = "%.2f" if max(values) < 100 else "%.0f"
        if wide:
            bars = ax.barh(names, values, color=colors)
            ax.set_xlim(0, max(values) * 1.18 or 1.0)  # room for the value labels
        else:
            bars = ax.bar(names, values, color=colors)
        ax.bar_label(bars, fmt=fmt, fontsize=8 if wide else 9, padding=2)
        ax.set_title(name)
        ax.spines[["top", "right"]].set_visible(False)
    if wide:
        axes[0].invert_yaxis()  # the first method on top (the axis is shared)
    fig.suptitle(title)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=150, format="png")
    return path


def labels(specs: list[str]) -> list[str]:
    """One label per method: its name where names differ, else its spec without ``profile=PATH`` (a file the
    methods share, which would make every label a path)."""
    short = [s.split(":", 1)[0] for s in specs]
    return short if len(set(short)) == len(short) else [without_profile(s) for s in specs]
