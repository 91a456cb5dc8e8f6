"""The table, the targets and the ``implementation_comparison`` figure of ``kvlab compare kvpress``, from rows only.

Everything here reads the lab's frame of the rows (:func:`kvlab.lab.frame.rows_frame`, eval ``compare_kvpress``),
so ``implementation_comparison`` can join the lab's figures as it is.

The targets, each a ratio measured in one run:

* **speed** — kvlab ``streaming`` vs kvpress ``StreamingLLMPress`` and kvlab ``h2o`` vs ``ObservedAttentionPress``
  at each compression ratio: kvpress's seconds per sample over kvlab's, for the whole workload (prefill + question
  + decode, or prefill + scoring); at least :data:`SPEED_TARGET` (1.1x) is met. The prefill and decode ratios are
  shown beside.
* **memory** — kvlab ``head-aware`` (and ``haq``) at AdaKV's accuracy holds at most half of AdaKV's bytes: for each
  AdaKV row, the cheapest kvlab row of that method (any ratio) whose accuracy is at least AdaKV's (perplexity at
  most), its bytes over the bytes AdaKV really holds (AdaKV keeps the full tensors and masks); <= 0.5 is met.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from kvlab.lab.plotting import NoData, method_palette
from kvlab.methods import is_reference

EVAL = "compare_kvpress"
#: the kvlab methods a kvpress press sits beside, by preference: the first one the run has is its family
ANALOGUE = {"StreamingLLMPress": ("streaming",), "ObservedAttentionPress": ("h2o",),
            "AdaKVPress": ("adakv", "head-aware"), "SnapKVPress": ("snapkv",), "PyramidKVPress": ("pyramidkv",),
            "TOVAPress": ("tova",), "KnormPress": ("knorm",), "KeyDiffPress": ("keydiff",), "none": ("full",)}
SPEED_PAIRS = (("streaming", "StreamingLLMPress"), ("h2o", "ObservedAttentionPress"))
SPEED_TARGET = 1.1  # kvpress's seconds per sample over kvlab's
MEMORY_METHODS = ("head-aware", "haq")
MiB = 2**20


def analogue(method: str, have: Collection[str] = ()) -> str:
    """The kvlab method a kvpress press is compared with: the first of its counterparts among ``have`` (the kvlab
    methods of the run), else its first one; a name with no counterpart (a kvlab method's) is its own."""
    options = ANALOGUE.get(method.split("(", 1)[0])
    if not options:
        return method
    return next((m for m in options if m in have), options[0])


def comparison_frame(df: pd.DataFrame) -> pd.DataFrame:
    """The comparison rows of a lab frame, with short columns: implementation, method, ratio, the metrics."""
    part = df[df["eval"] == EVAL] if "eval" in df else df.iloc[0:0]
    if part.empty:
        raise NoData(f"no rows of the '{EVAL}' evaluation")

    def col(name: str) -> pd.Series:
        return pd.to_numeric(part[name], errors="coerce") if name in part else pd.Series(math.nan, index=part.index)

    out = pd.DataFrame({
        "implementation": part["param.implementation"], "method": part["spec"], "ratio": col("param.ratio"),
        "status": part["status"], "error": part.get("error"), "quality": col("quality"),
        "quality_metric": part["quality_metric"], "higher_is_better": part["higher_is_better"],
        "kept_tokens": col("metric.kept_tokens"), "exact_match": col("metric.exact_match"),
        "prefill_s": col("metric.prefill_s"), "decode_tok_s": col("metric.decode_tok_s"),
        "workload_s": col("metric.workload_s"), "cache_bytes": col("metric.cache_bytes"),
        "effective_cache_bytes": col("metric.effective_cache_bytes"), "peak_rss_bytes": col("metric.peak_rss_bytes"),
    })
    have = set(out.loc[out["implementation"] == "kvlab", "method"])
    out["family"] = [analogue(m, have) for m in out["method"]]
    order = _family_order(out)
    out["_order"] = [(r, order[f], impl != "kvlab") for r, f, impl in
                     zip(out["ratio"], out["family"], out["implementation"])]
    return out.sort_values("_order").drop(columns="_order").reset_index(drop=True)


def _family_order(cmp: pd.DataFrame) -> dict[str, int]:
    """The rank of each method family: the full cache first, then kvlab's methods in the order they ran, then the
    presses without a kvlab counterpart by name."""
    mine = list(dict.fromkeys(cmp.loc[cmp["implementation"] == "kvlab", "family"]))
    rest = sorted(set(cmp["family"]) - set(mine))
    ranked = sorted(mine, key=lambda f: not is_reference(f)) + rest
    return {f: i for i, f in enumerate(ranked)}


def _better_or_equal(a: float, b: float, higher: bool) -> bool:
    return a >= b - 1e-9 if higher else a <= b + 1e-9


def targets(df: pd.DataFrame) -> list[dict[str, Any]]:
    """The issue's targets (see the module docstring), one dict each: target, ratio, value, threshold, met, detail."""
    cmp = comparison_frame(df)
    ok = cmp[cmp["status"] == "ok"]
    out = []
    for mine, theirs in SPEED_PAIRS:
        for ratio in sorted(set(ok["ratio"])):
            a = ok[(ok["implementation"] == "kvlab") & (ok["method"] == mine) & (ok["ratio"] == ratio)]
            b = ok[(ok["implementation"] == "kvpress") & (ok["method"] == theirs) & (ok["ratio"] == ratio)]
            if a.empty or b.empty:
                continue
            a, b = a.iloc[0], b.iloc[0]
            value = b["workload_s"] / a["workload_s"]
            parts = [f"prefill x{b['prefill_s'] / a['prefill_s']:.2f}"]
            if pd.notna(a["decode_tok_s"]) and pd.notna(b["decode_tok_s"]):
                parts.append(f"decode x{a['decode_tok_s'] / b['decode_tok_s']:.2f}")
            out.append({"target": f"kvlab {mine} at least {SPEED_TARGET}x kvpress {theirs}", "ratio": ratio,
                        "value": value, "threshold": f">= {SPEED_TARGET}", "met": bool(value >= SPEED_TARGET),
                        "detail": f"{b['workload_s']:.2f}s / {a['workload_s']:.2f}s per sample ({', '.join(parts)})"})
    adakv = ok["method"].str.split("(").str[0] == "AdaKVPress"
    for ada in ok[(ok["implementation"] == "kvpress") & adakv].itertuples():
        for mine in MEMORY_METHODS:
            rows = ok[(ok["implementation"] == "kvlab") & (ok["method"] == mine)]
            if rows.empty:
                continue
            higher = bool(ada.higher_is_better)
            good = rows[[_better_or_equal(q, ada.quality, higher) for q in rows["quality"]]]
            name = f"kvlab {mine} at {ada.method}'s {ada.quality_metric} holds <= 1/2 of its bytes"
            if good.empty:
                best = rows["quality"].max() if higher else rows["quality"].min()
                out.append({"target": name, "ratio": ada.ratio, "value": None, "threshold": "<= 0.5", "met": False,
                            "detail": f"no {mine} row reaches {ada.quality_metric} {ada.quality:.3g} "
                                      f"(best {best:.3g})"})
                continue
            best = good.loc[good["cache_bytes"].idxmin()]
            value = best["cache_bytes"] / ada.cache_bytes
            out.append({"target": name, "ratio": ada.ratio, "value": value, "threshold": "<= 0.5",
                        "met": bool(value <= 0.5),
                        "detail": f"{mine} at ratio {best['ratio']:g}: {best['cache_bytes'] / MiB:.2f} MiB, "
                                  f"{ada.quality_metric} {best['quality']:.3g}; {ada.method}: "
                                  f"{ada.cache_bytes / MiB:.2f} MiB held ({ada.effective_cache_bytes / MiB:.2f} "
                                  f"MiB unmasked), {ada.quality_metric} {ada.quality:.3g}"})
    return out


def _fmt(value: Any, spec: str = ".2f", scale: float = 1.0) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value / scale, spec)


def table_rows(df: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the side-by-side table."""
    cmp = comparison_frame(df)
    qname = next((q for q in cmp["quality_metric"].dropna()), "quality")
    head = ["ratio", "implementation", "method", "kept", qname, "exact", "prefill s", "decode tok/s", "s/sample",
            "cache MiB", "unmasked MiB", "peak RSS MiB"]
    cells = []
    for r in cmp.itertuples():
        if r.status != "ok":
            cells.append([f"{r.ratio:g}", r.implementation, r.method, "", f"failed: {r.error}"] + [""] * 7)
            continue
        cells.append([f"{r.ratio:g}", r.implementation, r.method, _fmt(r.kept_tokens, ".0f"),
                      _fmt(r.quality, ".3f"), _fmt(r.exact_match), _fmt(r.prefill_s), _fmt(r.decode_tok_s, ".1f"),
                      _fmt(r.workload_s), _fmt(r.cache_bytes, ".2f", MiB), _fmt(r.effective_cache_bytes, ".2f", MiB),
                      _fmt(r.peak_rss_bytes, ".0f", MiB)])
    return head, cells


def text_table(df: pd.DataFrame) -> str:
    head, cells = table_rows(df)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *cells)]
    return "\n".join("  ".join(str(x).ljust(w) if i < 3 else str(x).rjust(w) for i, (x, w) in
                               enumerate(zip(line, widths))) for line in [head, *cells])


def targets_text(found: list[dict[str, Any]]) -> list[str]:
    lines = []
    for t in found:
        verdict = "met" if t["met"] else "MISSED"
        lines.append(f"{t['target']} (ratio {t['ratio']:g}): {_fmt(t['value'], '.3f')} {t['threshold']} "
                     f"{verdict} — {t['detail']}")
    return lines or ["no target computable: the run has none of the pairs (streaming/StreamingLLMPress, "
                     "h2o/ObservedAttentionPress, head-aware/AdaKVPress)"]


def markdown(df: pd.DataFrame, *, command: str | None = None, title: str = "kvlab vs kvpress") -> str:
    """The table and the targets as markdown (with the command that made them)."""
    head, cells = table_rows(df)
    lines = [f"# {title}", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    lines += ["", "## Targets", ""] + [f"- {t}" for t in targets_text(targets(df))]
    return "\n".join(lines) + "\n"


def _style(method: str, impl: str, color: str) -> dict[str, Any]:
    """A press in the colour of its kvlab counterpart; solid and round for kvlab, dashed and square for kvpress."""
    return {"color": color, "linestyle": "-" if impl == "kvlab" else "--",
            "marker": "o" if impl == "kvlab" else "s", "label": f"{impl} {method}"}


def implementation_comparison(df: pd.DataFrame) -> Figure:
    """Quality, prefill time, decode speed (or s/sample), held cache and peak RSS: lines over the compression
    ratio (bars when the run has one ratio); kvlab solid, kvpress dashed (hatched), a kvpress press in the colour
    of its kvlab counterpart."""
    cmp = comparison_frame(df)
    ok = cmp[cmp["status"] == "ok"]
    if ok.empty:
        raise NoData(f"no ok rows of the '{EVAL}' evaluation")
    qname = str(ok["quality_metric"].iloc[0])
    speed = ("decode_tok_s", "decode tokens/s") if ok["decode_tok_s"].notna().any() else ("workload_s", "s / sample")
    panels = [("quality", qname), ("prefill_s", "prefill s"), speed, ("cache_bytes", "KV cache held (MiB)"),
              ("peak_rss_bytes", "peak RSS (MiB)")]
    compressed = ~ok["family"].map(is_reference).astype(bool)
    bars = ok["ratio"].nunique() == 1 or ok.loc[compressed, "ratio"].nunique() == 1
    fig = Figure(figsize=(12, 6.5), layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    palette = method_palette(ok["family"])
    series = list(ok.groupby(["implementation", "method"], sort=False))
    for i, ((impl, method), part) in enumerate(series):
        part = part.sort_values("ratio")
        style = _style(str(method), str(impl), palette[part["family"].iloc[0]])
        for ax, (col, _) in zip(axes, panels):
            values = part[col] / (MiB if col.endswith("bytes") else 1.0)
            if bars:
                ax.bar(i, values.iloc[-1], color=style["color"], label=style["label"], edgecolor="white",
                       hatch="//" if impl == "kvpress" else None)
            else:
                ax.plot(part["ratio"], values, linewidth=1.4, markersize=5, **style)
    ratio = ", ".join(f"{r:g}" for r in sorted(set(ok.loc[compressed, "ratio"])))
    for ax, (_, title) in zip(axes, panels):
        ax.set_title(title, loc="left")
        if bars:
            ax.set_xticks(range(len(series)), [f"{impl}\n{m}" for (impl, m), _ in series], rotation=45, ha="right",
                          fontsize=7)
        else:
            ax.set_xlabel("compression ratio (fraction of the context evicted)")
    axes[-1].axis("off")
    handles, labels = axes[0].get_legend_handles_labels()
    axes[-1].legend(handles, labels, loc="upper left", frameon=False,
                    title="kvlab solid, kvpress hatched" if bars else "kvlab solid, kvpress dashed")
    title = "kvlab vs kvpress on the same samples" + (f" (compression ratio {ratio})" if bars else "")
    fig.suptitle(title, x=0.01, ha="left")
    return fig


def write_outputs(rows: list[dict[str, Any]], out_dir: str | Path, *, command: str | None = None,
                  echo: Callable[[str], None] = print) -> list[Path]:
    """``implementation_comparison.md`` and ``.png`` in ``out_dir``, each written atomically; the figure is
    skipped (with the reason, through ``echo``) when no row is ok."""
    import matplotlib

    from kvlab.lab.frame import rows_frame
    from kvlab.lab.plotting import STYLE, save
    from kvlab.lab.report import write_text_atomic

    df = rows_frame(rows)
    paths = [write_text_atomic(Path(out_dir) / "implementation_comparison.md", markdown(df, command=command))]
    with matplotlib.rc_context(STYLE):
        try:
            fig = implementation_comparison(df)
        except NoData as exc:
            echo(f"skipped implementation_comparison: {exc}")
            return paths
        return [*save(fig, Path(out_dir) / "implementation_comparison", dpi=150, formats=("png",)), *paths]
