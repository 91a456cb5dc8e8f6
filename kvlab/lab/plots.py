"""Figures of a run folder, from its rows only (``kvlab plot DIR``): PNG at 300 dpi and PDF.

=====================  ==========================================================================
main_comparison        2x2 bars per setting group: perplexity, runtime, speed-up and KV-memory
                       reduction of each method (rows of the ``ppl`` evaluation)
ablation_window_size   perplexity and memory reduction (twin axes) vs ``window``, runtime below
ablation_n_sink        the same vs ``sinks``
results_summary        the summary table as an image
memory_vs_length       peak KV memory vs context length, one line per method (and the process's peak
                       memory beside it, where measured): :mod:`kvlab.lab.eval_figures`, as ``kvlab memory``
quality_vs_budget      quality vs ``budget``, one line per method, the full cache dashed
needle_heatmap         needle accuracy over context length x depth, one panel per method
                       (:mod:`kvlab.lab.eval_figures`, as ``kvlab needle``)
translation_vs_length  long-document translation: BLEU (and the last quarter's, dashed) and peak KV MiB vs the
                       document's length, one line per method (rows of ``translate_document``)
ruler_heatmap          RULER score per task x method (rows of ``ruler``, as ``kvlab ruler`` draws it:
                       :mod:`kvlab.lab.eval_figures`)
head_class_map         the head classes of a profile named by a row's method spec (``profile=FILE``)
implementation_        kvlab vs kvpress at the same kept tokens (rows of ``kvlab compare kvpress``):
comparison             quality, prefill, decode speed, cache held, peak RSS (:mod:`kvlab.lab.kvpress_figure`)
=====================  ==========================================================================

A figure whose data the rows do not hold is skipped with the reason; nothing is invented.
Figures are built on :class:`matplotlib.figure.Figure` objects (no pyplot state) in one palette
(Okabe-Ito, the full cache in grey), derived from the run's method names so that each method keeps its
colour in every figure (:func:`kvlab.lab.plotting.method_palette`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from kvlab.lab.eval_figures import memory_figure, needle_heatmap, ruler_heatmap
from kvlab.lab.frame import rows_frame, short, varying
from kvlab.lab.kvpress_figure import implementation_comparison
from kvlab.lab.plotting import (DPI, OKABE_ITO, REFERENCE_COLOR, STYLE, NoData, group_label, method_palette, ok_rows,
                                save, series, series_name, spec_colors, specs_of)


@dataclass
class PlotResult:
    written: dict[str, list[Path]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _main_specs(part: pd.DataFrame, limit: int = 8) -> list[str]:
    """The specs of the main comparison: those run in at least half as many groups as the most common one."""
    counts = part.groupby("method")["group"].nunique()
    common = counts[counts >= counts.max() / 2].index
    return [s for s in specs_of(part) if s in common][:limit]


def main_comparison(df: pd.DataFrame) -> Figure:
    part = ok_rows(df, "ppl")
    part = part.drop(columns=[c for c in part.columns if c.startswith("param.") and part[c].isna().all()])
    if part.empty:
        raise NoData("no ok rows of the 'ppl' evaluation")
    settings = [c for c in part.columns if c.startswith("param.") and c not in ("param.seed", "param.chunk_size")]
    groups = varying(part, ["model", *settings]) or ["model"]
    part = part.assign(group=[group_label(r, groups) for _, r in part.iterrows()])
    specs = _main_specs(part)
    part = part[part["method"].isin(specs)]
    labels = list(dict.fromkeys(part.sort_values(groups)["group"]))
    colors = spec_colors(specs, method_palette(df["method_name"]))
    panels = [("quality", "perplexity (lower is better)"), ("runtime_s", "runtime (s)"),
              ("speedup", "speed-up vs full cache (x)"), ("mem_reduction_pct", "KV-memory reduction (%)")]
    fig = Figure(figsize=(max(8.0, 2.0 + 1.1 * len(labels)), 7.5), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    for ax, (col, title) in zip(axes, panels):
        table = part.pivot_table(index="group", columns="method", values=col, aggfunc="mean").reindex(labels)
        for x, label in enumerate(labels):
            present = [s for s in specs if s in table and pd.notna(table.at[label, s])]
            width = 0.8 / max(1, len(present))
            for i, spec in enumerate(present):
                ax.bar(x + (i - (len(present) - 1) / 2) * width, table.at[label, spec], width, color=colors[spec],
                       edgecolor="white", linewidth=0.5)
        ax.set_title(title, loc="left")
        ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 4 else 0,
                      ha="right" if len(labels) > 4 else "center")
        if col == "speedup":
            ax.axhline(1.0, color="#333333", linewidth=0.8)
        if table.isna().all().all():
            ax.text(0.5, 0.5, "no full-cache reference in these groups", transform=ax.transAxes, ha="center",
                    color="#666666")
    handles = [Patch(color=colors[s], label=s) for s in specs]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(3, len(specs)), frameon=False)
    left_out = df[(df["status"] == "ok") & (df["eval"] == "ppl")]["method"].nunique() - len(specs)
    fig.suptitle("Methods vs the full cache (perplexity)" + (f"; {left_out} ablation-only spec(s) in their own figures"
                                                              if left_out > 0 else ""), fontsize=11)
    return fig


def _ablation(df: pd.DataFrame, column: str, label: str) -> Figure:
    part = ok_rows(df)
    if column not in part.columns:
        raise NoData(f"no method has a '{short(column)}' setting")
    part = part[part[column].notna()]
    if (part["eval"] == "ppl").any():
        part = part[part["eval"] == "ppl"]
    part, fixed = series(part, column, ["model", "eval", "method_name"])
    if part.empty:
        raise NoData(f"no method swept over '{short(column)}' with everything else fixed (need 2+ values)")
    fig = Figure(figsize=(7, 6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    twin = top.twinx()
    for i, (_, line) in enumerate(part.groupby("series", sort=True)):
        name = series_name(line.iloc[0], fixed, str(line.iloc[0]["method_name"]))
        line = line.groupby(column)[["quality", "mem_reduction_pct", "runtime_s"]].mean().sort_index()
        tint = OKABE_ITO[i % len(OKABE_ITO)]
        xs = line.index.to_numpy(dtype=float)
        top.plot(xs, line["quality"], "o-", color=tint, label=name)
        twin.plot(xs, line["mem_reduction_pct"], "s--", color=tint, alpha=0.6)
        bottom.plot(xs, line["runtime_s"], "o-", color=tint)
    top.set_ylabel(f"{', '.join(part['quality_metric'].dropna().unique())} (solid)")
    twin.set_ylabel("KV-memory reduction % (dashed)")
    twin.grid(False)
    twin.spines["right"].set_visible(True)
    bottom.set_ylabel("runtime (s)")
    bottom.set_xlabel(label)
    if part[column].dropna().max() / max(part[column].dropna().min(), 1) >= 16:
        bottom.set_xscale("log", base=2)
    top.legend(loc="best", frameon=False)
    top.set_title(f"Ablation: {label}", loc="left")
    return fig


def ablation_window_size(df: pd.DataFrame) -> Figure:
    return _ablation(df, "method.window", "window (recent tokens kept)")


def ablation_n_sink(df: pd.DataFrame) -> Figure:
    return _ablation(df, "method.sinks", "attention sinks kept")


def results_summary(df: pd.DataFrame, max_rows: int = 30) -> Figure:
    from kvlab.lab.report import build_tables

    tables = sorted((t for t in build_tables(df) if t.name.endswith("_summary")), key=lambda t: t.name != "ppl_summary")
    if not tables:
        raise NoData("no ok rows")
    table = tables[0]
    shown = table.data.head(max_rows)
    data = shown.astype(object).where(shown.notna(), "-").astype(str)
    widths = [max(len(str(c)), *(len(v) for v in data[c])) for c in data.columns]
    fig = Figure(figsize=(min(18.0, 0.5 + 0.085 * sum(widths) + 0.15 * len(widths)), 0.7 + 0.24 * (len(data) + 1)),
                 layout="constrained")
    ax = fig.subplots()
    ax.axis("off")
    cells = ax.table(cellText=data.to_numpy(), colLabels=list(data.columns), bbox=[0, 0, 1, 1], cellLoc="center",
                     colWidths=[w / sum(widths) for w in widths])
    cells.auto_set_font_size(False)
    cells.set_fontsize(7.5)
    for (r, _), c in cells.get_celld().items():
        c.set_edgecolor("#cccccc")
        if r == 0:
            c.set_facecolor("#e8eef4")
            c.set_text_props(weight="bold")
    more = f"first {max_rows} of {len(table.data)} rows" if len(table.data) > max_rows else ""
    note = ", ".join(x for x in (table.caption, more) if x)
    ax.set_title(table.title + (f" ({note})" if note else ""), loc="left")
    return fig


def quality_vs_budget(df: pd.DataFrame) -> Figure:
    part = ok_rows(df)
    if "method.budget" not in part:
        raise NoData("no method has a 'budget' setting")
    part, fixed = series(part[part["method.budget"].notna()], "method.budget", ["model", "eval", "method_name"])
    if part.empty:
        raise NoData("no method swept over 'budget' with everything else fixed (need 2+ values)")
    palette = method_palette(df["method_name"])
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    for i, (_, line) in enumerate(part.groupby("series", sort=True)):
        first = line.iloc[0]
        name = series_name(first, fixed, str(first["method_name"]))
        tint = palette[first["method_name"]] if "method_name" not in fixed else OKABE_ITO[i % len(OKABE_ITO)]
        ref = line["ref_quality"].dropna()
        line = line.groupby("method.budget")["quality"].mean().sort_index()
        ax.plot(line.index.to_numpy(dtype=float), line.to_numpy(), "o-", color=tint, label=name)
        if not ref.empty:
            ax.axhline(ref.mean(), color=tint if fixed else REFERENCE_COLOR, linestyle="--", linewidth=1,
                       label="full cache" + (f" ({name})" if fixed else ""))
    ax.set_xlabel("budget (tokens kept per KV head)")
    ax.set_ylabel(", ".join(sorted(part["quality_metric"].dropna().unique())) or "quality")
    ax.set_title("Quality vs cache budget (dashed: full cache)", loc="left")
    ax.legend(frameon=False)
    return fig


def translation_vs_length(df: pd.DataFrame, *, min_lengths: int = 2) -> Figure:
    """BLEU of the whole document (solid) and of its last quarter (dashed) vs the document's length, and the
    peak KV MiB beside it (the full cache computed, dotted), one line per spec with everything else fixed."""
    part = ok_rows(df, "translate_document")
    if part.empty or "param.tokens" not in part:
        raise NoData("no ok rows of the 'translate_document' evaluation (kvlab translate --document)")
    part = part.drop(columns=[c for c in part.columns if c.startswith("method.")])
    part, fixed = series(part, "param.tokens", ["model", "spec"], limit=12, min_points=min_lengths)
    if part.empty:
        raise NoData(f"no method translated documents of {min_lengths}+ lengths with everything else fixed")
    colors = spec_colors(specs_of(part, "spec"), method_palette(df["method_name"].dropna()))
    fig = Figure(figsize=(10, 4.0), layout="constrained")
    bleu_ax, kv_ax = fig.subplots(1, 2)
    for _, line in part.groupby("series", sort=True):
        first, line = line.iloc[0], line.sort_values("param.tokens")
        name, tint = series_name(first, fixed, str(first["spec"])), colors[first["spec"]]
        ran = line[line["quality"].notna()]
        xs = ran["param.tokens"].to_numpy(dtype=float)
        bleu_ax.plot(xs, ran["quality"], "o-", color=tint, label=name)
        if "metric.bleu_last_quarter" in ran:
            bleu_ax.plot(xs, ran["metric.bleu_last_quarter"], "s--", color=tint, alpha=0.7)
        kv_ax.plot(xs, ran["kv_bytes"] / 2**20, "o-", color=tint, label=name)
        na = line[line["quality"].isna()]
        if not na.empty:
            kv_ax.plot(na["param.tokens"].to_numpy(dtype=float), na["kv_bytes_full"] / 2**20, "x", color=tint,
                       markersize=9, label=f"{name}: not applicable (past max positions)")
    full = part.groupby("param.tokens")["kv_bytes_full"].max().dropna().sort_index()
    if not full.empty:
        kv_ax.plot(full.index.to_numpy(dtype=float), full.to_numpy() / 2**20, ":", color=REFERENCE_COLOR,
                   label="full cache (computed)")
    bleu_ax.set(xlabel="document length (tokens)", ylabel="BLEU",
                title="Document translation: BLEU (dashed: last quarter)")
    kv_ax.set(xlabel="document length (tokens)", ylabel="peak KV cache (MiB)", title="KV cache bytes")
    bleu_ax.legend(frameon=False, fontsize=8)
    kv_ax.legend(frameon=False, fontsize=8)
    return fig


def head_class_map(df: pd.DataFrame) -> Figure:
    from kvlab.errors import KvlabError
    from kvlab.heads.scores import CLASSES
    from kvlab.heads.store import HeadProfile

    paths = [p for p in df.get("method.profile", pd.Series(dtype=object)).dropna().unique()]
    if not paths:
        raise NoData("no row's method names a head profile (profile=FILE)")
    try:
        profile = next(HeadProfile.load(p) for p in paths if Path(str(p)).is_file())
    except (StopIteration, KvlabError):
        raise NoData(f"head profile {paths[0]} named by the rows is missing or unreadable") from None
    codes = np.array([[CLASSES.index(c) for c in row] for row in profile.classes]).T  # (kv heads, layers)
    palette = [OKABE_ITO[4], OKABE_ITO[1], OKABE_ITO[5], OKABE_ITO[2]][: len(CLASSES)]
    size = (max(6.0, 0.28 * profile.num_layers + 2), 1.4 + 0.35 * profile.num_kv_heads)
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.subplots()
    ax.imshow(codes, cmap=ListedColormap(palette), vmin=-0.5, vmax=len(CLASSES) - 0.5, aspect="auto")
    ax.set_xlabel("layer")
    ax.set_ylabel("KV head")
    ax.grid(False)
    counts = profile.counts()
    ax.legend(handles=[Patch(color=palette[i], label=f"{c} ({counts[c]})") for i, c in enumerate(CLASSES)],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.set_title(f"Head classes: {profile.model}", loc="left")
    return fig


FIGURES: dict[str, Callable[[pd.DataFrame], Figure]] = {
    "main_comparison": main_comparison, "ablation_window_size": ablation_window_size,
    "ablation_n_sink": ablation_n_sink, "results_summary": results_summary, "memory_vs_length": memory_figure,
    "quality_vs_budget": quality_vs_budget, "translation_vs_length": translation_vs_length,
    "needle_heatmap": needle_heatmap, "ruler_heatmap": ruler_heatmap, "head_class_map": head_class_map,
    "implementation_comparison": implementation_comparison,
}


def plot_all(rows: list[dict[str, Any]], out_dir: str | Path, *, echo: Callable[[str], None] = print,
             only: list[str] | None = None, dpi: int = DPI, formats: tuple[str, ...] = ("png", "pdf")) -> PlotResult:
    """Draw every figure the rows support into ``out_dir``; report the skipped ones through ``echo``.
    ``only`` limits the figures drawn; ``dpi``/``formats`` are for quick previews and tests."""
    df = rows_frame(rows)
    result = PlotResult()
    with matplotlib.rc_context(STYLE):
        for name, draw in FIGURES.items():
            if only is not None and name not in only:
                continue
            try:
                fig = draw(df)
            except NoData as exc:
                result.skipped[name] = str(exc)
                echo(f"skipped {name}: {exc}")
                continue
            result.written[name] = save(fig, Path(out_dir) / name, dpi=dpi, formats=formats)
    return result
