"""The figures of the latency and translation commands, drawn from their rows only (PNG).

(The needle heatmap and the memory figure are the lab's, :mod:`kvlab.lab.eval_figures`, shared with
``kvlab plot``.)

* :func:`latency_figure` — decode milliseconds per token vs position, one line per method;
* :func:`translate_figure` — BLEU vs AL, one line over k per position scheme (offline dashed).

Not-applicable cells (metrics None) are left out, never invented. Figures are matplotlib ``Figure`` objects:
no pyplot state, no backend switch.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from kvlab.methods import is_reference

COLORS = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
FULL = "#777777"


def _color(method: str, order: list[str]) -> str:
    """The full cache grey, the other specs the palette's colours in the order they ran."""
    return FULL if is_reference(method.split(":", 1)[0]) else COLORS[order.index(method) % len(COLORS)]


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    return path


def _ok(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("status") == "ok"]


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
