"""Tables of a run folder, from its rows only (``kvlab report DIR``).

For each evaluation: a summary (one line per cell), then one pivot per swept axis — method x length
when ``tokens`` varies, method x budget / window / sinks when a method setting varies — each showing
the quality metric, the KV-memory reduction in percent, the quality change in percent and the speed-up
against the full cache of the same group (see :mod:`kvlab.lab.frame`). Settings that are the same in
every line of a table move into its caption. Failed cells get a table of their own.

Formats: ``csv`` (every row with the derived columns, full precision), ``json`` (every table),
``latex`` (pandas ``to_latex``, booktabs rules) and ``md``; each written atomically into ``DIR/report/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from kvlab.errors import KvlabError
from kvlab.lab.criteria import Criterion
from kvlab.lab.frame import short, varying
from kvlab.methods import is_reference
from kvlab.results import write_text_atomic

FORMATS = {"csv": "report.csv", "json": "report.json", "latex": "report.tex", "md": "report.md"}
VALUES = {"quality": None, "mem_reduction_pct": "memory reduction %", "quality_change_pct": "quality change %",
          "speedup": "speed-up"}
AXIS_EXCLUDE = {"param.seed", "param.chunk_size", "param.sleep_s"}


@dataclass
class Table:
    """A display-ready table; ``data`` may have a two-level column index (value, axis value)."""

    name: str
    title: str
    data: pd.DataFrame
    caption: str = ""

    def flat(self) -> pd.DataFrame:
        """Index reset and two-level columns joined (``ppl @ tokens=1024``), for csv/json/md."""
        df = self.data.reset_index()
        if isinstance(df.columns, pd.MultiIndex):
            df.columns = [" @ ".join(str(p) for p in col if str(p)) for col in df.columns]
        return df


def _quality_name(part: pd.DataFrame) -> str:
    names = part["quality_metric"].dropna().unique()
    return str(names[0]) if len(names) == 1 else "quality"


def _constants(part: pd.DataFrame, columns: list[str]) -> tuple[list[str], str]:
    """Split columns into those that vary and a caption naming the constant ones."""
    keep = [c for c in columns if c in varying(part, [c])]
    fixed = [f"{short(c)}={part[c].dropna().iloc[0]}" for c in columns if c not in keep and part[c].notna().any()]
    return keep, ", ".join(fixed)


def _round(df: pd.DataFrame) -> pd.DataFrame:
    return df.apply(lambda s: s.round(1 if "%" in str(s.name) else 3) if pd.api.types.is_float_dtype(s) else s)


def summary_table(ev: str, part: pd.DataFrame) -> Table:
    qname = _quality_name(part)
    settings = [c for c in part.columns if c.startswith("param.") and c not in AXIS_EXCLUDE]
    keep, caption = _constants(part, ["model", *settings])
    df = part.assign(kv_mib=part["kv_bytes"] / 2**20)
    cols = {**{c: short(c) for c in keep}, "method": "method", "quality": qname, "kv_mib": "KV MiB",
            "runtime_s": "runtime s", **{k: v for k, v in VALUES.items() if v}}
    cols = {k: v for k, v in cols.items() if k in keep or k == "method" or df[k].notna().any()}
    df = df.sort_values([*keep, "method_name", "method"], key=lambda s: s.map(_order) if s.name == "method_name" else s)
    df = _round(df[list(cols)].rename(columns=cols)).reset_index(drop=True)
    return Table(f"{ev}_summary", f"{ev}: every cell vs the full cache", df, caption)


def _order(name: Any) -> str:
    return " " if is_reference(str(name)) else str(name)  # the full cache first


def pivot(ev: str, part: pd.DataFrame, axis: str, index: list[str], name: str, title: str) -> Table:
    qname = _quality_name(part)
    keep, caption = _constants(part, index)
    keep = keep or ["method"]
    values = [v for v in VALUES if part[v].notna().any()] or ["quality"]
    table = part.pivot_table(index=keep, columns=axis, values=values, aggfunc="mean", sort=True)
    table = table.reindex(columns=values, level=0)
    table = table.rename(columns={**{k: v for k, v in VALUES.items() if v}, "quality": qname}, level=0)
    table.columns = table.columns.set_names(["", short(axis)])
    table.index = table.index.set_names([short(c) for c in keep])
    table = table.apply(lambda s: s.round(1 if "%" in str(s.name[0]) else 3))
    return Table(name, title, table, caption)


def _trim(part: pd.DataFrame) -> pd.DataFrame:
    """Drop the settings and metrics no row of ``part`` has (other evaluations' columns)."""
    empty = [c for c in part.columns if c.startswith(("param.", "method.", "metric.")) and part[c].isna().all()]
    return part.drop(columns=empty)


def build_tables(df: pd.DataFrame) -> list[Table]:
    """Every table the rows support (see the module docstring)."""
    tables: list[Table] = []
    ok = df[df["status"] == "ok"]
    for ev, part in ok.groupby("eval", sort=True):
        part = _trim(part)
        tables.append(summary_table(str(ev), part))
        settings = [c for c in part.columns if c.startswith("param.") and c not in AXIS_EXCLUDE]
        for axis in [c for c in varying(part, settings) if pd.api.types.is_numeric_dtype(part[c])]:
            others = [c for c in settings if c != axis]
            tables.append(pivot(str(ev), part, axis, ["model", *others, "method"], f"{ev}_method_x_{short(axis)}",
                                f"{ev}: method x {short(axis)}"))
        for method_name, mpart in part.groupby("method_name", sort=True):
            mpart = _trim(mpart)
            msettings = [c for c in mpart.columns if c.startswith("method.")]
            for axis in [c for c in varying(mpart, msettings) if pd.api.types.is_numeric_dtype(mpart[c])]:
                index = ["model", *settings, *[c for c in msettings if c != axis]]
                tables.append(pivot(str(ev), mpart, axis, index, f"{ev}_{method_name}_x_{short(axis)}",
                                    f"{ev}: {method_name} x {short(axis)}"))
    failed = df[df["status"] != "ok"]
    if not failed.empty:
        cols = ["model", "method", "eval", "id", "error"]
        tables.append(Table("failed", "failed cells (rerun 'kvlab run' to retry them)",
                            failed[cols].reset_index(drop=True)))
    return tables


# -- writers --------------------------------------------------------------------------------
def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table (no extra dependency)."""
    body = [["" if pd.isna(v) else str(v) for v in row] for row in df.itertuples(index=False)]
    cells = [[str(c) for c in df.columns], *body]
    lines = ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("---" for _ in df.columns) + "|")
    return "\n".join(lines)


def to_latex(table: Table) -> str:
    caption = table.title + (f" ({table.caption})" if table.caption else "")
    return table.data.to_latex(caption=caption, label=f"tab:{table.name}", escape=True, na_rep="--",
                         multicolumn_format="c", float_format="{:g}".format,
                         index=not table.name.endswith(("summary", "failed")))


def render(fmt: str, df: pd.DataFrame, tables: list[Table], criteria: list[Criterion] | None, title: str) -> str:
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "json":
        return json.dumps({"title": title, "rows": int(len(df)), "failed": int((df["status"] != "ok").sum()),
                           "tables": [{"name": t.name, "title": t.title, "caption": t.caption,
                                       "records": json.loads(t.flat().to_json(orient="records"))} for t in tables],
                           "criteria": [c.__dict__ for c in criteria or []]}, indent=2) + "\n"
    if fmt == "latex":
        return "% kvlab report: needs \\usepackage{booktabs}\n" + "\n".join(to_latex(t) for t in tables)
    if fmt == "md":
        parts = [f"# {title}"]
        for t in tables:
            parts += [f"## {t.title}", *([f"_{t.caption}_"] if t.caption else []), to_markdown(t.flat())]
        if criteria:
            parts += ["## success criteria", "\n".join(f"- **{c.status}** {c.name}: {c.detail}" for c in criteria)]
        return "\n\n".join(parts) + "\n"
    raise KvlabError(f"unknown report format '{fmt}'; choose from: {', '.join(FORMATS)}")


def parse_formats(text: str) -> list[str]:
    formats = [f.strip().lower() for f in text.split(",") if f.strip()]
    for fmt in formats:
        if fmt not in FORMATS:
            from kvlab.errors import unknown

            raise unknown("report format", fmt, FORMATS)
    return formats


def write_report(df: pd.DataFrame, tables: list[Table], formats: list[str], out_dir: Path, *,
                 criteria: list[Criterion] | None = None, title: str = "kvlab report") -> list[Path]:
    """Render every format first (so a failure writes nothing), then write them."""
    texts = {fmt: render(fmt, df, tables, criteria, title) for fmt in formats}
    return [write_text_atomic(out_dir / FORMATS[fmt], text) for fmt, text in texts.items()]
