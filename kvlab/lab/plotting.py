"""Shared pieces of the lab's figures: one palette and style, row selection helpers, atomic saving.

Every figure uses the Okabe-Ito palette (readable with colour-blindness) and the full cache (the
registry's reference method, :func:`kvlab.methods.is_reference`) in grey. Colours are derived from the
methods present, never looked up by name: :func:`method_palette` gives the sorted method names of a run
the palette's colours in turn, so a method keeps its colour in every figure of the run; several settings
of one method get lighter shades of it (:func:`spec_colors`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

from kvlab.lab.frame import short, varying
from kvlab.methods import is_reference
from kvlab.results import atomic_path

OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#F0E442", "#000000"]
REFERENCE_COLOR = "#777777"  # the full cache
STYLE = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8, "xtick.labelsize": 8,
         "ytick.labelsize": 8, "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
         "grid.alpha": 0.3, "savefig.bbox": "tight", "pdf.fonttype": 42}
DPI = 300


class NoData(Exception):
    """The rows hold no data for this figure; the message says what is missing."""


def method_palette(names: Iterable[str]) -> dict[str, str]:
    """A colour per method name: the reference grey, the others the palette's colours in sorted-name order
    (the reference takes its turn too, so ``full`` and one other method give that one the second colour)."""
    unique = sorted({str(n).split(":", 1)[0] for n in names})
    return {n: REFERENCE_COLOR if is_reference(n) else OKABE_ITO[i % len(OKABE_ITO)] for i, n in enumerate(unique)}


def color(method: str, names: Iterable[str] | None = None) -> str:
    """The colour of a method (name or spec) among ``names`` (the methods present, see :func:`method_palette`);
    without ``names``, the reference grey and any other method a stable colour of its name."""
    name = method.split(":", 1)[0]
    if names is not None:
        return method_palette([*names, name])[name]
    return REFERENCE_COLOR if is_reference(name) else OKABE_ITO[sum(map(ord, name)) % len(OKABE_ITO)]


def ok_rows(df: pd.DataFrame, eval_name: str | None = None) -> pd.DataFrame:
    part = df[df["status"] == "ok"]
    return part if eval_name is None else part[part["eval"] == eval_name]


def group_label(row: pd.Series, cols: list[str]) -> str:
    parts = [f"{row[c]} tok" if c == "param.tokens" else f"{short(c)}={row[c]}" if c.startswith("param.") and
             c != "param.data" else str(row[c]) for c in cols]
    return ", ".join(parts)


def specs_of(part: pd.DataFrame, column: str = "method") -> list[str]:
    """The specs (or labels) of ``column``, the reference method's first, then sorted."""
    return sorted(part[column].unique(), key=lambda m: (not is_reference(m.split(":")[0]), m))


def spec_colors(specs: list[str], palette: dict[str, str] | None = None) -> dict[str, tuple[float, float, float]]:
    """A colour per spec: its method's colour in ``palette`` (default: the palette of these specs' methods),
    lighter for each further spec of the same method."""
    palette = palette or method_palette(specs)
    out, seen = {}, {}
    for spec in specs:
        name = spec.split(":", 1)[0]
        same = [s for s in specs if s.split(":", 1)[0] == name]
        k = seen[name] = seen.get(name, -1) + 1
        mix = 0.6 * k / max(1, len(same) - 1) if len(same) > 1 else 0.0
        base = np.array(to_rgb(palette.get(name) or color(name)))
        out[spec] = tuple(base + (1.0 - base) * mix)
    return out


def series(part: pd.DataFrame, x: str, keys: list[str], limit: int = 8,
           min_points: int = 2) -> tuple[pd.DataFrame, list[str]]:
    """Rows that form lines over ``x`` with everything else fixed (``min_points``+ points each), with a
    ``series`` column; also the key columns that tell the kept lines apart (for their labels)."""
    keys = [*keys, *[c for c in part.columns if c.startswith(("param.", "method.")) and c not in (x, "param.seed")]]
    keys = [c for c in dict.fromkeys(keys) if c in part.columns]
    part = part.assign(series=[" | ".join(map(str, r)) for r in part[keys].itertuples(index=False)])
    counts = part.groupby("series")[x].nunique()
    part = part[part["series"].isin(counts[counts >= min_points].index[:limit])]
    return part, varying(part, keys)


def series_name(first: pd.Series, fixed: list[str], default: str) -> str:
    return ", ".join(f"{short(c)}={first[c]}" if c.startswith(("param.", "method.")) else str(first[c])
                     for c in fixed) or default


def first_column(part: pd.DataFrame, names: tuple[str, ...]) -> str | None:
    return next((c for c in names if c in part and part[c].notna().any()), None)


def save(fig: Figure, stem: Path, *, dpi: int = DPI, formats: tuple[str, ...] = ("png", "pdf")) -> list[Path]:
    """Write ``stem.png`` (300 dpi) and ``stem.pdf``, each atomically."""
    paths = []
    for fmt in formats:
        target = stem.with_suffix(f".{fmt}")
        with atomic_path(target) as tmp:
            fig.savefig(tmp, dpi=dpi, format=fmt)
        paths.append(target)
    return paths
