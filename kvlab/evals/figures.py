"""The figure of each evaluation command, drawn from its rows only (PNG).

* :func:`needle_heatmap` — accuracy over context length x depth, one panel per method and setting;
* :func:`memory_figure` — peak KV bytes and peak process memory vs sequence length, one line per method;
* :func:`latency_figure` — decode milliseconds per token vs position, one line per method;
* :func:`translate_figure` — BLEU vs AL, one line over k per position scheme (offline dashed).

Not-applicable cells (metrics None) are drawn as such ("n/a" on grey, or a cross on the computed full
line), never invented. Figures are matplotlib ``Figure`` objects: no pyplot state, no backend switch.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

COLORS = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
FULL = "#777777"


def _color(method: str, order: list[str]) -> str:
    return FULL if method == "full" else COLORS[order.index(method) % len(COLORS)]


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    return path


def _ok(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("status") == "ok"]


def needle_heatmap(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """One panel per (method, setting): rows = lengths, columns = depths, colour = accuracy."""
    panels: dict[str, dict[tuple[int, float], float | None]] = defaultdict(dict)
    for r in _ok(rows):
        p = r["config"]["params"]
        name = r["config"]["method"] + (" (question-aware)" if p.get("question_aware") else "")
        if p.get("variant", "passkey") != "passkey":
            name += f" [{p['variant']}]"
        panels[name][(p["length"], p["depth"])] = r["metrics"].get("accuracy")
    fig = Figure(figsize=(4.2 * max(len(panels), 1), 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, max(len(panels), 1), sharey=True))
    image = None
    for ax, (name, cells) in zip(axes, panels.items()):
        lengths = sorted({k[0] for k in cells})
        depths = sorted({k[1] for k in cells})
        grid = np.full((len(lengths), len(depths)), np.nan)
        for (length, depth), acc in cells.items():
            if acc is not None:
                grid[lengths.index(length), depths.index(depth)] = acc
        ax.set_facecolor("#dddddd")  # not applicable: grey
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        for i, length in enumerate(lengths):
            for j, depth in enumerate(depths):
                v = grid[i, j]
                if (length, depth) not in cells:
                    continue
                label = "n/a" if cells[(length, depth)] is None else f"{v:.2f}"
                ax.text(j, i, label, ha="center", va="center", fontsize=8, color="white" if not v >= 0.5 else "black")
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_xlabel("needle depth (%)")
        ax.set_title(name, fontsize=8, loc="left")
    axes[0].set_ylabel("context length (tokens)")
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="accuracy", shrink=0.9)
    return _save(fig, path)


def memory_figure(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Left: peak KV MiB vs tokens (full cache computed where it cannot run, dotted). Right: peak process memory."""
    rows = _ok(rows)
    methods = list(dict.fromkeys(r["config"]["method"] for r in rows))
    fig = Figure(figsize=(10, 4), layout="constrained")
    kv_ax, mem_ax = fig.subplots(1, 2)
    full_line: dict[int, float] = {}
    for method in methods:
        mine = sorted((r for r in rows if r["config"]["method"] == method), key=lambda r: r["config"]["params"]["tokens"])
        for r in mine:
            full_line[r["config"]["params"]["tokens"]] = r["metrics"]["kv_bytes_full"] / 2**20
        pts = [(r["config"]["params"]["tokens"], r["metrics"]) for r in mine if r["metrics"].get("kv_bytes_peak") is not None]
        if pts:
            xs = [x for x, _ in pts]
            kv_ax.plot(xs, [m["kv_bytes_peak"] / 2**20 for _, m in pts], "o-", color=_color(method, methods), label=method)
            mem_ax.plot(xs, [m["peak_mem_delta_bytes"] / 2**20 for _, m in pts], "o-", color=_color(method, methods),
                        label=method)
        na = [r["config"]["params"]["tokens"] for r in mine if r["metrics"].get("kv_bytes_peak") is None]
        if na:
            kv_ax.plot(na, [full_line[x] for x in na], "x", color=_color(method, methods), markersize=9,
                       label=f"{method}: not applicable (past max positions)")
    if full_line:
        xs = sorted(full_line)
        kv_ax.plot(xs, [full_line[x] for x in xs], ":", color=FULL, label="full cache (computed)")
    kv_ax.set(xlabel="sequence length (tokens)", ylabel="peak KV cache (MiB)", title="KV cache bytes")
    mem_ax.set(xlabel="sequence length (tokens)", ylabel="peak memory added (MiB)", title="process peak memory")
    kv_ax.legend(frameon=False, fontsize=8)
    mem_ax.legend(frameon=False, fontsize=8)
    return _save(fig, path)


def latency_figure(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Median decode milliseconds per token at each probed position, one line per method."""
    rows = [r for r in _ok(rows) if r["metrics"].get("decode_ms")]
    methods = list(dict.fromkeys(r["config"]["method"] for r in rows))
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    for r in rows:
        m = r["metrics"]
        ax.plot(m["positions"], m["decode_ms"], "o-", markersize=3, color=_color(r["config"]["method"], methods),
                label=f"{r['config']['method']} (median {m['decode_ms_median']:.1f} ms)")
    ax.set(xlabel="position (tokens in the sequence)", ylabel="decode latency (ms / token)",
           title="per-token decode latency")
    ax.set_ylim(bottom=0)
    ax.legend(frameon=False, fontsize=8)
    return _save(fig, path)


def translate_figure(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """BLEU (left) and chrF (right) against AL; one line over k per (positions, phi, method)."""
    rows = _ok(rows)
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    lines: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        p = r["config"]["params"]
        if p["mode"] == "offline":
            continue
        phi = f", phi={p['phi']}" if p["positions"] == "group" else ""
        lines[f"{p['positions']}{phi} | {r['config']['method']}"].append(r)
    for i, (name, line) in enumerate(sorted(lines.items())):
        line = sorted((r for r in line if r["metrics"].get("al") is not None), key=lambda r: r["config"]["params"]["k"])
        for ax, metric in zip(axes, ("bleu", "chrf")):
            ax.plot([r["metrics"]["al"] for r in line], [r["metrics"][metric] for r in line], "o-",
                    color=COLORS[i % len(COLORS)], label=name)
            for r in line:
                ax.annotate(f"k={r['config']['params']['k']}", (r["metrics"]["al"], r["metrics"][metric]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
    for r in (r for r in rows if r["config"]["params"]["mode"] == "offline"):
        for ax, metric in zip(axes, ("bleu", "chrf")):
            ax.axhline(r["metrics"][metric], linestyle="--", color=FULL, label=f"offline | {r['config']['method']}")
    for ax, metric in zip(axes, ("BLEU", "chrF")):
        ax.set(xlabel="AL (source words)", ylabel=metric, title=f"{metric} vs latency")
        ax.legend(frameon=False, fontsize=7)
    return _save(fig, path)
