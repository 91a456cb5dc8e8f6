"""Rows -> one pandas DataFrame, with each cell compared to the full cache of its group.

Columns: ``id status error model family eval method method_name device dtype``, the evaluation's
settings as ``param.<name>``, the method's settings as ``method.<name>``, every scalar metric as
``metric.<name>``, and the derived columns

* ``quality`` — the evaluation's quality metric (``quality_metric`` names it: ppl, accuracy, bleu…);
* ``kv_bytes`` (peak KV-cache bytes) and ``runtime_s``;
* ``mem_reduction_pct`` — ``100 * (1 - kv_bytes / kv_bytes of the full cache)``;
* ``quality_change_pct`` — relative change of ``quality`` vs the full cache (signed, in its own units);
* ``quality_loss_pct`` — the same, positive when quality got worse (uses ``higher_is_better``);
* ``speedup`` — time of the full cache / time of this cell (``runtime_s``, or the evaluation's own
  timing in :data:`TIME_METRIC`, e.g. the median decode step of ``latency``).

The *group* of a cell is everything but the method: same model, evaluation, device, dtype and
settings (data, tokens, seed…). Its reference is the group's full-cache row (:func:`kvlab.methods.is_reference`);
without one, memory reduction falls back to the cell's own ``kv_bytes_full`` metric and the other
comparisons stay empty.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd

from kvlab.errors import KvlabError
from kvlab.methods import is_reference
from kvlab.spec import parse_spec

#: the quality metric of each evaluation (others: the first of FALLBACK_QUALITY present in the row)
QUALITY_METRIC = {"ppl": "ppl", "needle": "accuracy", "translate": "bleu", "translate_document": "bleu",
                  "kvpress": "ppl"}
FALLBACK_QUALITY = ("ppl", "accuracy", "bleu", "chrf", "score", "exact_match")
LOWER_IS_BETTER = {"ppl", "nll", "loss", "ter"}
MEMORY_METRICS = ("kv_bytes_peak", "kv_bytes", "kv_bytes_total")
#: the time a speed-up is computed from, when an evaluation measures something better than its runtime
TIME_METRIC = {"latency": "decode_ms_median"}
BASE = ["model", "eval", "device", "dtype"]
DERIVED = ["quality", "kv_bytes", "runtime_s", "mem_reduction_pct", "quality_change_pct", "quality_loss_pct", "speedup"]


def family(row: dict[str, Any]) -> str:
    """The model family of a row: its recorded ``model_type`` (``qwen2`` -> ``qwen``) or a guess from the name."""
    model_type = (row.get("model_info") or {}).get("model_type") or ""
    name = str(row.get("config", {}).get("model", "")).lower()
    match = re.match(r"[a-z]+", str(model_type).lower())
    if match:
        return {"smollm": "llama"}.get(match.group(0), match.group(0))
    for key, fam in (("smollm", "llama"), ("llama", "llama"), ("qwen", "qwen"), ("gemma", "gemma"),
                     ("mistral", "mistral"), ("phi", "phi")):
        if key in name:
            return fam
    return name.split("/")[-1].split("-")[0] or "unknown"


def _scalar(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _number(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            continue
    return value


def quality_metric(eval_name: str, metrics: dict[str, Any]) -> str | None:
    name = QUALITY_METRIC.get(eval_name)
    if name in metrics:
        return name
    return next((m for m in FALLBACK_QUALITY if m in metrics), None)


def row_record(row: dict[str, Any]) -> dict[str, Any]:
    """One row flattened into a record (see the module docstring for the columns)."""
    config = row.get("config") or {}
    metrics = row.get("metrics") or {}
    try:
        method_name, method_params = parse_spec(str(config.get("method", "")))
    except KvlabError:
        method_name, method_params = str(config.get("method", "?")), {}
    rec: dict[str, Any] = {
        "id": row.get("id"), "status": row.get("status"), "error": row.get("error"),
        "model": config.get("model"), "family": family(row), "eval": row.get("eval") or config.get("eval"),
        "method": config.get("method"), "spec": config.get("method"), "method_name": method_name,
        "device": config.get("device", "auto"), "dtype": config.get("dtype", "auto"),
    }
    rec.update({f"param.{k}": _scalar(v) for k, v in (config.get("params") or {}).items()})
    rec.update({f"method.{k}": _number(v) for k, v in method_params.items()})
    rec.update({f"metric.{k}": v for k, v in metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)})
    qname = quality_metric(rec["eval"], metrics)
    hib = row.get("higher_is_better") or {}
    rec["quality_metric"] = qname
    rec["quality"] = metrics.get(qname) if qname else None
    rec["higher_is_better"] = bool(hib.get(qname, qname not in LOWER_IS_BETTER)) if qname else None
    rec["kv_bytes"] = next((metrics[m] for m in MEMORY_METRICS if metrics.get(m) is not None), None)
    rec["kv_bytes_full"] = metrics.get("kv_bytes_full")
    rec["runtime_s"] = metrics.get("runtime_s", row.get("runtime_s"))
    rec["time"] = metrics.get(TIME_METRIC.get(rec["eval"], "runtime_s"), rec["runtime_s"])
    return rec


def rows_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """All rows as a DataFrame with the comparisons to the full cache (empty frame for no rows)."""
    if not rows:
        return pd.DataFrame(columns=["id", "status", "model", "eval", "method", "method_name", *DERIVED])
    df = pd.DataFrame([row_record(r) for r in rows])
    for col in ("quality", "kv_bytes", "kv_bytes_full", "runtime_s", "time"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    for col in [c for c in df.columns if c.startswith(("param.", "method."))]:
        values = df[col].dropna()
        if len(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer()
                               for v in values):
            df[col] = df[col].astype("Int64")  # 128, not 128.0, when other rows lack the setting
    df["method"] = method_labels(df)
    return add_comparisons(df)


def _defaults(method_name: str) -> dict[str, Any]:
    """The default settings of a registered method ({} for a name this kvlab does not know)."""
    import dataclasses

    from kvlab.methods import get

    try:
        cls = get(method_name)
    except KvlabError:
        return {}
    return {f.name: f.default for f in dataclasses.fields(cls) if f.init and f.default is not dataclasses.MISSING}


def _same(a: Any, b: Any) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def method_labels(df: pd.DataFrame) -> pd.Series:
    """Short method names for tables and figures (the full spec stays in ``spec``): the method name plus
    the settings that differ from its defaults or between its rows; a file path (``profile=``) only when
    it differs between rows of one model."""
    labels = pd.Series(df["spec"], index=df.index, dtype=object)
    for name, part in df.groupby("method_name"):
        defaults, keep = _defaults(str(name)), []
        for col in [c for c in part.columns if c.startswith("method.") and part[c].notna().any()]:
            values = part[col].dropna()
            if values.astype(str).str.contains("/|\\.json$", regex=True).any():
                if part.groupby("model")[col].nunique().max() > 1:
                    keep.append(col)
            elif values.astype(str).nunique() > 1 or short(col) not in defaults \
                    or not all(_same(v, defaults[short(col)]) for v in values):
                keep.append(col)
        for idx, row in part.iterrows():
            settings = ",".join(f"{short(c)}={row[c]}" for c in keep if pd.notna(row[c]))
            labels[idx] = f"{name}:{settings}" if settings else str(name)
    return labels


def group_columns(df: pd.DataFrame) -> list[str]:
    """Columns that define a cell's group (everything but the method)."""
    return BASE + sorted(c for c in df.columns if c.startswith("param."))


def add_comparisons(df: pd.DataFrame) -> pd.DataFrame:
    keys = group_columns(df)
    ok = df["status"] == "ok"
    ref = df[ok & df["method_name"].map(is_reference).astype(bool)].drop_duplicates(keys)
    ref = ref[keys + ["quality", "kv_bytes", "time"]].rename(
        columns={"quality": "ref_quality", "kv_bytes": "ref_kv_bytes", "time": "ref_time"})
    out = df.merge(ref, on=keys, how="left")  # pandas matches NaN settings (other evals' params) to NaN
    kv_ref = out["ref_kv_bytes"].fillna(out["kv_bytes_full"])
    with np.errstate(divide="ignore", invalid="ignore"):
        out["mem_reduction_pct"] = 100.0 * (1.0 - out["kv_bytes"] / kv_ref)
        change = 100.0 * (out["quality"] - out["ref_quality"]) / out["ref_quality"].abs()
        out["quality_change_pct"] = change
        out["quality_loss_pct"] = np.where(out["higher_is_better"].astype(bool), -change, change)
        out["speedup"] = out["ref_time"] / out["time"]
    out = out.replace([np.inf, -np.inf], np.nan)
    out.loc[out["status"] != "ok", DERIVED] = np.nan
    return out[[c for c in df.columns] + [c for c in out.columns if c not in df.columns]]


def varying(df: pd.DataFrame, columns: list[str]) -> list[str]:
    """The columns among ``columns`` that take more than one value in ``df``."""
    return [c for c in columns if c in df.columns and df[c].dropna().astype(str).nunique() > 1]


def short(column: str) -> str:
    """A display name: ``param.tokens`` -> ``tokens``, ``metric.ppl`` -> ``ppl``."""
    return column.split(".", 1)[1] if "." in column else column
