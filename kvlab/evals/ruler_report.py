"""The table and the figure of ``kvlab ruler``, from its rows only: the mean score per task x method.

A column is a method spec, with its setting when the rows have several (``question-aware``, the length, the
filler); a row is a task, then ``mean`` and ``niah mean`` (over the tasks every column has). Cells with no
score (not applicable, failed) are ``n/a``, drawn grey.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kvlab.evals.ruler_tasks import TASKS

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _column(row: dict[str, Any], vary: set[str]) -> str:
    p = row["config"]["params"]
    label = row["config"]["method"]
    if "question_aware" in vary or p.get("question_aware"):
        label += " (question-aware)" if p.get("question_aware") else " (question-agnostic)"
    if "length" in vary:
        label += f" @{p['length']}"
    if "data" in vary:
        label += f" [{p['data']}]"
    return label


def scores(rows: list[dict[str, Any]]) -> tuple[list[str], list[str], dict[tuple[str, str], float | None]]:
    """``(tasks, columns, {(task, column): mean score or None})``, tasks in RULER's order then ``mean`` and
    ``niah mean``: means over the tasks that have a score in every column (their count in the label when
    some lack one)."""
    ok = [r for r in rows if r.get("status", "ok") == "ok" and r.get("eval", "ruler") == "ruler"]
    vary = {k for k in ("question_aware", "length", "data") if len({str(r["config"]["params"].get(k)) for r in ok}) > 1}
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    columns: list[str] = []
    for r in ok:
        col = _column(r, vary)
        columns += [] if col in columns else [col]
        value = r["metrics"].get("score")
        cells[(r["config"]["params"]["task"], col)] += [] if value is None else [float(value)]
    present = {t for t, _ in cells}
    tasks = [t for t in TASKS if t in present] + sorted(present - set(TASKS))
    out: dict[tuple[str, str], float | None] = {k: (sum(v) / len(v) if v else None) for k, v in cells.items()}
    niah = [t for t in tasks if t.startswith("niah")]
    for name, members in (("mean", list(tasks)), ("niah mean", niah if len(niah) < len(tasks) else [])):
        common = [t for t in members if all(out.get((t, c)) is not None for c in columns)]
        if len(common) < 2:
            continue
        label = name if len(common) == len(members) else f"{name} ({len(common)} tasks)"
        for col in columns:  # over the tasks every column has, so the columns compare
            out[(label, col)] = sum(out[(t, col)] for t in common) / len(common)
        tasks.append(label)
    return tasks, columns, out


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table: task x method, mean score (0-1)."""
    tasks, columns, out = scores(rows)
    lines = ["| task | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for t in tasks:
        vals = [out.get((t, c)) for c in columns]
        cells = ["n/a" if v is None else f"{v:.2f}" for v in vals]
        name = f"**{t}**" if t.startswith(("mean", "niah mean")) else t
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def heatmap(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """:func:`heatmap_figure` saved as a PNG at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    heatmap_figure(rows).savefig(path, dpi=150)
    return path


def heatmap_figure(rows: list[dict[str, Any]]) -> Figure:
    """Task x method heatmap of the mean score; ``n/a`` on grey (``kvlab ruler``'s figure and ``kvlab plot``'s
    ``ruler_heatmap``)."""
    from matplotlib.figure import Figure

    tasks, columns, out = scores(rows)
    grid = np.full((len(tasks), len(columns)), np.nan)  # (tasks, methods)
    for i, t in enumerate(tasks):
        for j, c in enumerate(columns):
            if out.get((t, c)) is not None:
                grid[i, j] = out[(t, c)]
    fig = Figure(figsize=(3.4 + 1.3 * max(len(columns), 1), 1.2 + 0.38 * max(len(tasks), 1)), layout="constrained")
    ax = fig.subplots()
    ax.set_facecolor("#dddddd")
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i in range(len(tasks)):
        for j in range(len(columns)):
            v = grid[i, j]
            ax.text(j, i, "n/a" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8,
                    color="black" if v >= 0.5 else "white")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right", fontsize=7)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
    ax.set_title("RULER score (recall)", loc="left", fontsize=9)
    fig.colorbar(image, ax=ax, label="score", shrink=0.9)
    return fig
