"""The console tables of kvlab's commands: one column list per table, printed by :func:`table`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MIB = 2 ** 20


def fmt(value: Any, spec: str = ".2f", scale: float = 1.0) -> str:
    return "n/a" if value is None else format(value / scale, spec)


@dataclass(frozen=True)
class Col:
    """A column: its title, its width, and the text of its cell for a row (``left``: aligned left)."""

    title: str
    width: int
    cell: Callable[[dict], str]
    left: bool = False

    def text(self, value: str) -> str:
        return f"{value:<{self.width}}" if self.left else f"{value:>{self.width}}"


def table(rows: list[dict], cols: list[Col], note: Callable[[dict], str | None] | None = None) -> None:
    """Print a header and one line per row (with ``note(row)`` after the cells, where it says something)."""
    print(" ".join(c.text(c.title) for c in cols))
    for r in rows:
        extra = note(r) if note else None
        print(" ".join(c.text(c.cell(r)) for c in cols) + (f"  {extra}" if extra else ""))


def metric(key: str, spec: str = ".2f", scale: float = 1.0) -> Callable[[dict], str]:
    """The cell of ``row['metrics'][key]`` (n/a where absent)."""
    return lambda r: fmt(r["metrics"].get(key), spec, scale)


def param(key: str) -> Callable[[dict], str]:
    return lambda r: str(r["config"]["params"][key])


def percent(key: str) -> Callable[[dict], str]:
    """The cell of a percentage ``row['metrics'][key]`` (n/a where absent)."""
    return lambda r: "n/a" if r["metrics"].get(key) is None else f"{r['metrics'][key]:.1f}%"


def method(width: int) -> Col:
    return Col("method", width, lambda r: r["config"]["method"], left=True)


def _note(r: dict) -> str | None:
    return r["metrics"].get("note")


def needle(rows: list[dict]) -> None:
    from kvlab.evals.needle import filler_table

    fillers = list(dict.fromkeys(r["config"]["params"]["data"] for r in rows))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        p = r["config"]["params"]
        key = f"{r['config']['method']}{' (question-aware)' if p['question_aware'] else ''} [{p['variant']}]"
        groups.setdefault(key + (f" on {p['data']}" if len(fillers) > 1 else ""), []).append(r)
    for key, part in groups.items():
        depths = sorted({r["config"]["params"]["depth"] for r in part})
        lengths = sorted({r["config"]["params"]["length"] for r in part})
        acc = {(r["config"]["params"]["length"], r["config"]["params"]["depth"]): r["metrics"]["accuracy"] for r in part}
        print(f"\nneedle accuracy: {key}")
        print(f"{'length':>8} " + " ".join(f"{f'{d:g}%':>6}" for d in depths) + f" {'mean':>6}")
        for n in lengths:
            vals = [acc.get((n, d)) for d in depths]
            ok = [v for v in vals if v is not None]
            mean = sum(ok) / len(ok) if ok else None
            print(f"{n:>8} " + " ".join(f"{fmt(v):>6}" for v in vals) + f" {fmt(mean):>6}")
    if len(fillers) > 1:
        print(f"\nneedle accuracy by filler (mean over depths and samples; worst filler)\n{filler_table(rows)}")


def memory(rows: list[dict]) -> None:
    table(rows, [method(36), Col("tokens", 7, param("tokens")), Col("KV MiB", 9, metric("kv_bytes", ".1f", MIB)),
                 Col("KV peak", 9, metric("kv_bytes_peak", ".1f", MIB)),
                 Col("full MiB", 9, metric("kv_bytes_full", ".1f", MIB)),
                 Col("saved", 7, percent("mem_reduction_pct")),
                 Col("peak mem+", 10, metric("peak_mem_delta_bytes", ".1f", MIB))], _note)


def latency(rows: list[dict]) -> None:
    def ends(i: int) -> Callable[[dict], str]:
        return lambda r: fmt(r["metrics"]["decode_ms"][i] if r["metrics"].get("decode_ms") else None)

    table(rows, [method(36), Col("median ms", 10, metric("decode_ms_median")),
                 Col("p90 ms", 8, metric("decode_ms_p90")), Col("tok/s", 7, metric("decode_tok_s", ".1f")),
                 Col("first ms", 9, ends(0)), Col("last ms", 8, ends(-1)),
                 Col("growth", 7, metric("latency_growth")), Col("prefill s", 10, metric("prefill_s"))], _note)


def translate(rows: list[dict]) -> None:
    def k(r: dict) -> str:
        return "-" if r["config"]["params"]["mode"] == "offline" else str(r["config"]["params"]["k"])

    table(rows, [method(28), Col("mode", 8, param("mode"), left=True),
                 Col("positions", 10, param("positions"), left=True), Col("k", 3, k), Col("phi", 4, param("phi")),
                 Col("BLEU", 6, metric("bleu")), Col("chrF", 6, metric("chrf")), Col("AL", 6, metric("al")),
                 Col("LAAL", 6, metric("laal")), Col("words", 6, metric("target_words", ".1f")),
                 Col("KV KiB", 8, metric("kv_bytes_peak", ".1f", 1024))])


def document(rows: list[dict]) -> None:
    table(rows, [method(36), Col("pos", 5, param("positions"), left=True), Col("k", 2, param("k")),
                 Col("tokens", 6, param("tokens")), Col("sent", 4, lambda r: str(r["metrics"]["sentences"])),
                 Col("BLEU", 6, metric("bleu")), Col("Q4", 6, metric("bleu_last_quarter")),
                 Col("chrF", 6, metric("chrf")), Col("AL", 6, metric("al")), Col("LAAL", 6, metric("laal")),
                 Col("KV peak MiB", 11, metric("kv_bytes_peak", ".1f", MIB)),
                 Col("full MiB", 9, metric("kv_bytes_full", ".1f", MIB)),
                 Col("tok/s", 6, metric("tokens_per_s", ".1f"))], _note)
