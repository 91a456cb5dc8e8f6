"""One self-contained HTML page of a run: every table and figure, figures inlined as base64 PNG.

The page needs no network and no other file. A small inline script marks a figure that failed to
render (``naturalWidth == 0``) with a visible note and records the count on ``<body data-figures-ok>``,
so a reader sees a broken figure and a headless browser test can check for one.
"""

from __future__ import annotations

import base64
import html
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from kvlab.lab.criteria import Criterion
from kvlab.lab.report import Table, write_text_atomic

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #1d1d1d; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: 12px; }
th, td { border: 1px solid #d6d6d6; padding: 3px 7px; text-align: left; }
th { background: #e8eef4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.caption { color: #555; font-style: italic; } .scroll { overflow-x: auto; }
figure { margin: 1rem 0 2rem; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
.PASS { color: #0a7d32; font-weight: bold; } .FAIL { color: #b3261e; font-weight: bold; }
.nodata { color: #777; font-weight: bold; } .broken { color: #b3261e; }
.meta { color: #555; font-size: 12px; }
"""

SCRIPT = """
window.addEventListener("load", function () {
  var imgs = document.querySelectorAll("figure img"), ok = 0;
  imgs.forEach(function (img) {
    if (img.complete && img.naturalWidth > 0) { ok += 1; return; }
    var note = document.createElement("p");
    note.className = "broken";
    note.textContent = "this figure failed to render";
    img.parentNode.appendChild(note);
  });
  document.body.setAttribute("data-figures-ok", ok + "/" + imgs.length);
});
"""


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _table_html(table: Table) -> str:
    index = not table.name.endswith(("summary", "failed"))
    numeric = [pd.api.types.is_numeric_dtype(table.data[c]) for c in table.data.columns]
    body = table.data.to_html(na_rep="-", border=0, escape=True, index=index)
    # right-align the numeric columns: the n-th <td> of each body row is column n
    rows = body.split("<tr>")
    for i, row in enumerate(rows):
        cells = row.split("<td>")
        rows[i] = cells[0] + "".join(("<td class=\"num\">" if k < len(numeric) and numeric[k] else "<td>") + c
                                     for k, c in enumerate(cells[1:]))
    body = "<tr>".join(rows)
    caption = f'<p class="caption">{_esc(table.caption)}</p>' if table.caption else ""
    return f'<h3 id="{_esc(table.name)}">{_esc(table.title)}</h3>{caption}<div class="scroll">{body}</div>'


def _figure_html(name: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure id="fig-{_esc(name)}"><img alt="{_esc(name)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_esc(name.replace('_', ' '))}</figcaption></figure>")


def _run_meta(rows: list[dict[str, Any]]) -> str:
    ok = sum(r.get("status") == "ok" for r in rows)
    first = rows[0] if rows else {}
    versions = ", ".join(f"{k} {v}" for k, v in sorted((first.get("versions") or {}).items()))
    machine = first.get("machine") or {}
    return (f'<p class="meta">{len(rows)} rows ({ok} ok, {len(rows) - ok} failed); git {_esc(first.get("git_hash"))}; '
            f'{_esc(versions)}; {_esc(machine.get("platform", ""))}, device {_esc(machine.get("device", "?"))}</p>')


def render_html(rows: list[dict[str, Any]], tables: list[Table], figures: dict[str, bytes], *,
                criteria: list[Criterion] | None = None, skipped: dict[str, str] | None = None,
                title: str = "kvlab report") -> str:
    """The page as a string (figures: name -> PNG bytes)."""
    parts = [f"<h1>{_esc(title)}</h1>", _run_meta(rows)]
    if criteria:
        items = "".join(f'<li><span class="{"nodata" if c.status == "no data" else c.status}">{_esc(c.status)}</span> '
                        f"{_esc(c.name)}: {_esc(c.detail)}</li>" for c in criteria)
        parts.append(f"<h2>Success criteria</h2><ul>{items}</ul>")
    parts.append("<h2>Tables</h2>" + "".join(_table_html(t) for t in tables))
    parts.append("<h2>Figures</h2>" + "".join(_figure_html(n, png) for n, png in figures.items()))
    if skipped:
        items = "".join(f"<li>{_esc(n)}: {_esc(why)}</li>" for n, why in skipped.items())
        parts.append(f'<p class="meta">Figures without data in this run:</p><ul class="meta">{items}</ul>')
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style>'
            f"<script>{SCRIPT}</script></head><body>{''.join(parts)}</body></html>\n")


def write_html(rows: list[dict[str, Any]], tables: list[Table], path: str | Path, *,
               criteria: list[Criterion] | None = None, title: str = "kvlab report", dpi: int = 110) -> Path:
    """Draw every figure the rows support (PNG at ``dpi``, screen size) and write the page atomically."""
    from kvlab.lab.plots import plot_all

    with tempfile.TemporaryDirectory(prefix="kvlab-html-") as tmp:
        result = plot_all(rows, tmp, echo=lambda _msg: None, dpi=dpi, formats=("png",))
        figures = {name: paths[0].read_bytes() for name, paths in result.written.items()}
    page = render_html(rows, tables, figures, criteria=criteria, skipped=result.skipped, title=title)
    return write_text_atomic(Path(path), page)
