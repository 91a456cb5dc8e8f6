"""The bar figure of ``kvlab demo`` and ``kvlab ppl --out``: perplexity, peak KV MiB and tokens/s per method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]


def ppl_bars(specs: list[str], metrics: list[dict[str, Any]], title: str, path: str | Path) -> Path:
    """Three panels of bars, one bar per method (named by its spec's name, or the whole spec when two share
    a name), in the order given; written to ``path`` (PNG, 150 dpi)."""
    from matplotlib.figure import Figure

    from kvlab.results import atomic_path

    short = [s.split(":", 1)[0] for s in specs]
    names = short if len(set(short)) == len(short) else specs
    panels = [("perplexity", [m["ppl"] for m in metrics]),
              ("KV cache peak (MiB)", [m["kv_bytes_peak"] / 2**20 for m in metrics]),
              ("tokens / s", [m["tokens_per_s"] for m in metrics])]
    fig = Figure(figsize=(11, 3.4))
    axes = fig.subplots(1, 3)
    for ax, (name, values) in zip(axes, panels):
        bars = ax.bar(names, values, color=[COLORS[i % len(COLORS)] for i in range(len(names))])
        ax.bar_label(bars, fmt="%.2f" if max(values) < 100 else "%.0f", fontsize=9)
        ax.set_title(name)
        ax.spines[["top", "right"]].set_visible(False)
        if len(names) > 3:
            ax.tick_params(axis="x", labelrotation=30)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=150, format="png")
    return path
