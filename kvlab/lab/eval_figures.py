"""The needle heatmap, the memory figure and the RULER heatmap: one piece of code for ``kvlab plot`` and for the
``kvlab needle``, ``kvlab memory`` and ``kvlab ruler`` commands, drawn from the lab's frame of the rows
(:func:`kvlab.lab.frame.rows_frame`).

* :func:`needle_heatmap` — accuracy over context length x depth, one panel per method and setting
  (question-aware, multikey variant); a cell that ran but is not applicable is "n/a" on grey;
* :func:`memory_figure` — peak KV MiB vs context length, one line per method (the full cache computed from
  ``kv_bytes_full`` dotted, where it could not run a cross), and beside it the process's peak memory when the
  rows measured it; one pair of panels per model;
* :func:`ruler_heatmap` — RULER score per task x method (:func:`kvlab.evals.ruler_report.heatmap_figure`).

A figure whose data the rows do not hold raises :class:`~kvlab.lab.plotting.NoData` with the reason.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from kvlab.methods import is_reference
from kvlab.lab.plotting import REFERENCE_COLOR, NoData, first_column, method_palette, ok_rows, series, series_name, \
    spec_colors, specs_of

MAX_PANELS = 8
MiB = 2**20


def _panel_name(row: pd.Series) -> str:
    name = str(row["spec"])
    if str(row.get("param.question_aware", False)) == "True":
        name += " (question-aware)"
    variant = row.get("param.variant")
    if isinstance(variant, str) and variant != "passkey":
        name += f" [{variant}]"
    return name


def needle_heatmap(df: pd.DataFrame) -> Figure:
    """Rows = context lengths, columns = depths, colour = accuracy; one panel per (method, setting)."""
    part = ok_rows(df, "needle")
    length = first_column(part, ("param.length", "param.tokens", "param.context_length"))
    depth = first_column(part, ("param.depth", "param.depth_pct", "param.depths"))
    if part.empty or length is None or depth is None or "metric.accuracy" not in part:
        raise NoData("no ok 'needle' rows with length, depth and accuracy")
    part = part.assign(panel=[_panel_name(r) for _, r in part.iterrows()])
    panels = sorted(set(part["panel"]), key=_reference_first)[:MAX_PANELS]
    fig = Figure(figsize=(4.2 * len(panels), 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True))
    image = None
    for ax, name in zip(axes, panels):
        cells = part[part["panel"] == name]
        lengths, depths = sorted(cells[length].unique()), sorted(cells[depth].unique())
        grid = cells.pivot_table(index=length, columns=depth, values="metric.accuracy", aggfunc="mean", dropna=False)
        grid = grid.reindex(index=lengths, columns=depths).to_numpy(dtype=float)
        ran = {(r[length], r[depth]) for _, r in cells.iterrows()}
        ax.set_facecolor("#dddddd")  # not applicable: grey
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        for (i, j), v in np.ndenumerate(grid):
            if (lengths[i], depths[j]) in ran:
                ax.text(j, i, "n/a" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if not v >= 0.5 else "black")
        ax.set_xticks(range(len(depths)), [f"{float(d):g}" for d in depths])
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_xlabel(f"needle depth ({'%' if depth == 'param.depth' else depth.split('.', 1)[1]})")
        ax.set_title(name, fontsize=8, loc="left")
        ax.grid(False)
    axes[0].set_ylabel("context length (tokens)")
    fig.colorbar(image, ax=list(axes), label="accuracy", shrink=0.9)
    return fig


def _reference_first(name: str) -> tuple[bool, str]:
    """A sort key: the full cache's panels first, then by name."""
    return not is_reference(name.split(" ", 1)[0].split(":", 1)[0]), name


def memory_figure(df: pd.DataFrame, *, min_lengths: int = 2) -> Figure:
    """Peak KV MiB vs context length (and peak process memory, where measured), one line per spec with
    everything else fixed, measured at ``min_lengths`` lengths or more; one panel (pair) per model, up to 3."""
    part = ok_rows(df)
    if "param.tokens" not in part:
        raise NoData("no rows with a 'tokens' setting")
    part = part[part["param.tokens"].notna() & (part["kv_bytes"].notna() | part["kv_bytes_full"].notna())]
    part = part.drop(columns=[c for c in part.columns if c.startswith("method.")])  # the spec says it all
    part, fixed = series(part, "param.tokens", ["model", "eval", "spec"], limit=24, min_points=min_lengths)
    if part.empty:
        raise NoData(f"no method with KV memory measured at {min_lengths}+ context lengths, everything else fixed")
    models = sorted(part["model"].unique())[:3]
    fixed = [c for c in fixed if c != "model"]
    process = "metric.peak_mem_delta_bytes" in part and part["metric.peak_mem_delta_bytes"].notna().any()
    colors = spec_colors(specs_of(part, "spec"), method_palette(df["method_name"].dropna()))
    panels = [(m, kind) for m in models for kind in (("kv", "process") if process else ("kv",))]
    fig = Figure(figsize=(5.0 * len(panels), 4.0), layout="constrained")
    axes = dict(zip(panels, np.atleast_1d(fig.subplots(1, len(panels)))))
    for model in models:
        kv_ax, mine = axes[(model, "kv")], part[part["model"] == model]
        for _, line in mine.groupby("series", sort=True):
            first, line = line.iloc[0], line.sort_values("param.tokens")
            name, tint = series_name(first, fixed, str(first["spec"])), colors[first["spec"]]
            ran = line[line["kv_bytes"].notna()]
            if not ran.empty:
                kv_ax.plot(_x(ran), ran["kv_bytes"] / MiB, "o-", color=tint, label=name)
                if process:
                    axes[(model, "process")].plot(_x(ran), ran["metric.peak_mem_delta_bytes"] / MiB, "o-",
                                                  color=tint, label=name)
            na = line[line["kv_bytes"].isna()]
            if not na.empty:
                kv_ax.plot(_x(na), na["kv_bytes_full"] / MiB, "x", color=tint, markersize=9,
                           label=f"{name}: not applicable (past max positions)")
        full = mine.groupby("param.tokens")["kv_bytes_full"].max().dropna().sort_index()
        if not full.empty:
            kv_ax.plot(full.index.to_numpy(dtype=float), full.to_numpy() / MiB, ":", color=REFERENCE_COLOR,
                       label="full cache (computed)")
        suffix = f": {model}" if len(models) > 1 else ""
        kv_ax.set(xlabel="sequence length (tokens)", ylabel="peak KV cache (MiB)", title=f"KV cache bytes{suffix}")
        kv_ax.legend(frameon=False, fontsize=8)
        if process:
            axes[(model, "process")].set(xlabel="sequence length (tokens)", ylabel="peak memory added (MiB)",
                                         title=f"process peak memory{suffix}")
            axes[(model, "process")].legend(frameon=False, fontsize=8)
    return fig


def _x(part: pd.DataFrame) -> np.ndarray:
    return part["param.tokens"].to_numpy(dtype=float)


def ruler_heatmap(df: pd.DataFrame) -> Figure:
    """``kvlab ruler``'s task x method heatmap, from the rows of the ``ruler`` evaluation in the frame."""
    from kvlab.evals.ruler_report import heatmap_figure

    part = ok_rows(df, "ruler")
    if part.empty or "param.task" not in part:
        raise NoData("no ok rows of the 'ruler' evaluation (kvlab ruler)")
    params = [c for c in part.columns if c.startswith("param.")]
    rows = [{"eval": "ruler", "config": {"method": r["spec"], "params": {c[6:]: r[c] for c in params if pd.notna(r[c])}},
             "metrics": {"score": None if pd.isna(r["quality"]) else float(r["quality"])}} for _, r in part.iterrows()]
    return heatmap_figure(rows)
