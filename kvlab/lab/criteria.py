"""The research plan's success criteria, checked on stored rows only (``kvlab report --criteria``).

Each criterion reports PASS or FAIL with the numbers behind it, or "no data" when the rows cannot
decide it (a criterion is never passed by default):

1. KV memory reduced by >= 40% at 10000+ tokens (best compressed cell at that length);
2. quality loss < 5% (per compressed method: its worst loss over the cells where it saved >= 40% of
   the memory, compared with the full cache of the same group; the best method decides);
3. 20000+ tokens supported (a cell at 20000+ tokens finished ok);
4. three model families run (families of the models with ok rows);
5. an ablation present (one method setting swept over >= 3 values, everything else fixed);
6. (when a head-aware method ran) head-aware beats the strongest baseline present: its worst loss (as
   in 2) is no higher than that of the best method outside :data:`PROPOSED` (h2o, streaming, snapkv, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from kvlab.lab.frame import group_columns, short
from kvlab.methods import is_reference

PASS, FAIL, NO_DATA = "PASS", "FAIL", "no data"
MEMORY_MIN_PCT, QUALITY_MAX_LOSS_PCT = 40.0, 5.0
LONG_TOKENS, LONGEST_TOKENS, FAMILIES = 10_000, 20_000, 3
PROPOSED = ("head-aware", "haq")  # the methods under test; every other compressed method is a baseline
TOKEN_COLUMNS = ("param.tokens", "param.length", "param.context_length", "metric.tokens")


@dataclass(frozen=True)
class Criterion:
    name: str
    status: str  # PASS, FAIL or "no data"
    detail: str

    def __str__(self) -> str:
        return f"[{self.status}] {self.name}: {self.detail}"


def tokens(df: pd.DataFrame) -> pd.Series:
    """Context length of each row: the first of its token-count settings that is present."""
    out = pd.Series(float("nan"), index=df.index)
    for col in TOKEN_COLUMNS:
        if col in df.columns:
            out = out.fillna(pd.to_numeric(df[col], errors="coerce").astype(float))
    return out


def _where(row: pd.Series, length: float) -> str:
    return f"{row['method']}, {row['model']}, {row['eval']}, {length:.0f} tokens"


def _compressed(df: pd.DataFrame) -> pd.Series:
    """Ok rows of a method other than the full cache."""
    return (df["status"] == "ok") & ~df["method_name"].map(is_reference).astype(bool)


def memory(df: pd.DataFrame) -> Criterion:
    name = f"KV memory reduced >= {MEMORY_MIN_PCT:.0f}% at {LONG_TOKENS}+ tokens"
    length = tokens(df)
    cand = df[_compressed(df) & (length >= LONG_TOKENS)
              & df["mem_reduction_pct"].notna()]
    if cand.empty:
        return Criterion(name, NO_DATA, f"no compressed cell at {LONG_TOKENS}+ tokens with memory measured")
    best = cand.loc[cand["mem_reduction_pct"].idxmax()]
    status = PASS if best["mem_reduction_pct"] >= MEMORY_MIN_PCT else FAIL
    return Criterion(name, status, f"best {best['mem_reduction_pct']:.1f}% ({_where(best, length[best.name])}); "
                                   f"{len(cand)} compressed cells at {LONG_TOKENS}+ tokens")


def quality(df: pd.DataFrame) -> Criterion:
    name = f"quality loss < {QUALITY_MAX_LOSS_PCT:.0f}% (where memory is reduced >= {MEMORY_MIN_PCT:.0f}%)"
    cand = df[_compressed(df) & df["quality_loss_pct"].notna()
              & (df["mem_reduction_pct"] >= MEMORY_MIN_PCT)]
    if cand.empty:
        return Criterion(name, NO_DATA, f"no compressed cell with >= {MEMORY_MIN_PCT:.0f}% memory reduction "
                                        "and a full-cache row in its group")
    worst = cand.groupby("method")["quality_loss_pct"].agg(["max", "size"]).sort_values("max")
    best_method, (best_loss, n) = worst.index[0], worst.iloc[0]
    metrics = ", ".join(sorted(cand["quality_metric"].dropna().unique()))
    others = "; ".join(f"{m}: {v:+.2f}%" for m, v in worst["max"].iloc[1:4].items())
    detail = f"best {best_method}: worst loss {best_loss:+.2f}% over {int(n)} cell(s) ({metrics})"
    status = PASS if best_loss < QUALITY_MAX_LOSS_PCT else FAIL
    return Criterion(name, status, detail + (f"; {others}" if others else ""))


def long_context(df: pd.DataFrame) -> Criterion:
    name = f"{LONGEST_TOKENS}+ tokens supported"
    length = tokens(df)
    ok = df[(df["status"] == "ok") & (length >= LONGEST_TOKENS)]
    if not ok.empty:
        methods = ", ".join(sorted(ok["method"].unique())[:4])
        return Criterion(name, PASS, f"{len(ok)} ok cell(s) at up to {length[ok.index].max():.0f} tokens ({methods})")
    failed = df[(df["status"] != "ok") & (length >= LONGEST_TOKENS)]
    if not failed.empty:
        first = failed.iloc[0]
        return Criterion(name, FAIL, f"{len(failed)} cell(s) at {LONGEST_TOKENS}+ tokens failed, e.g. "
                                     f"{first['method']}: {first['error']}")
    longest = length[df["status"] == "ok"].max()
    seen = f"longest ok cell: {longest:.0f} tokens" if pd.notna(longest) else "no cell with a token count"
    return Criterion(name, NO_DATA, f"no cell at {LONGEST_TOKENS}+ tokens ({seen})")


def families(df: pd.DataFrame) -> Criterion:
    name = f"{FAMILIES} model families run"
    ok = df[df["status"] == "ok"]
    if ok.empty:
        return Criterion(name, NO_DATA, "no ok rows")
    fams = sorted(ok["family"].dropna().unique())
    models = ", ".join(sorted(ok["model"].unique()))
    return Criterion(name, PASS if len(fams) >= FAMILIES else FAIL,
                     f"{len(fams)} famil{'y' if len(fams) == 1 else 'ies'} ({', '.join(fams)}) from models {models}")


def ablations(df: pd.DataFrame) -> list[str]:
    """Sweeps found in ok rows: ``method.setting: v1, v2, v3`` with everything else fixed."""
    ok = df[df["status"] == "ok"]
    found = []
    for method_name, part in ok.groupby("method_name"):
        settings = [c for c in part.columns if c.startswith("method.") and part[c].notna().all()]
        for col in settings:
            keys = group_columns(part) + [c for c in settings if c != col]
            rest = pd.Series([" | ".join(map(str, r)) for r in part[keys].itertuples(index=False)], index=part.index)
            counts = part[col].groupby(rest).nunique()
            if not counts.empty and counts.max() >= 3:
                sweep = part.loc[rest == counts.idxmax()]
                values = sorted(sweep[col].unique())
                found.append(f"{method_name} {short(col)} ({sweep['eval'].iloc[0]}): {', '.join(map(str, values))}")
    return found


def ablation(df: pd.DataFrame) -> Criterion:
    name = "an ablation present"
    if (df["status"] == "ok").sum() == 0:
        return Criterion(name, NO_DATA, "no ok rows")
    found = ablations(df)
    if not found:
        return Criterion(name, FAIL, "no method setting swept over 3+ values with everything else fixed")
    return Criterion(name, PASS, "; ".join(found[:4]))


def versus_baseline(df: pd.DataFrame) -> Criterion:
    name = "head-aware vs the strongest baseline (worst quality loss where memory is reduced >= " \
           f"{MEMORY_MIN_PCT:.0f}%)"
    cand = df[_compressed(df) & df["quality_loss_pct"].notna() & (df["mem_reduction_pct"] >= MEMORY_MIN_PCT)]
    worst = cand.groupby("method_name")["quality_loss_pct"].max()
    mine, base = worst[worst.index.isin(PROPOSED)], worst[~worst.index.isin(PROPOSED)]
    if mine.empty or base.empty:
        return Criterion(name, NO_DATA, "needs a head-aware method and a baseline, each with a full-cache row in "
                                        f"its group and >= {MEMORY_MIN_PCT:.0f}% memory reduction")
    m, b = mine.idxmin(), base.idxmin()
    status = PASS if mine[m] <= base[b] else FAIL
    return Criterion(name, status, f"{m} {mine[m]:+.2f}% vs strongest baseline {b} {base[b]:+.2f}% "
                                   f"(of {', '.join(sorted(base.index))})")


def check(df: pd.DataFrame) -> list[Criterion]:
    """Every criterion, in the research plan's order."""
    mine = [versus_baseline(df)] if df["method_name"].isin(PROPOSED).any() else []
    return [memory(df), quality(df), long_context(df), families(df), ablation(df), *mine]
