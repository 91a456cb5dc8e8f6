"""The console tables of ``kvlab needle | memory | latency | translate``: one function per evaluation, taking its rows."""

from __future__ import annotations

from typing import Any


def fmt(value: Any, spec: str = ".2f", scale: float = 1.0) -> str:
    return "n/a" if value is None else format(value / scale, spec)


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
    print(f"{'method':<36} {'tokens':>7} {'KV MiB':>9} {'KV peak':>9} {'full MiB':>9} {'saved':>7} {'peak mem+':>10}")
    for r in rows:
        m = r["metrics"]
        saved = "n/a" if m["mem_reduction_pct"] is None else f"{m['mem_reduction_pct']:.1f}%"
        print(f"{r['config']['method']:<36} {r['config']['params']['tokens']:>7} {fmt(m['kv_bytes'], '.1f', 2**20):>9} "
              f"{fmt(m['kv_bytes_peak'], '.1f', 2**20):>9} {fmt(m['kv_bytes_full'], '.1f', 2**20):>9} {saved:>7} "
              f"{fmt(m['peak_mem_delta_bytes'], '.1f', 2**20):>10}" + (f"  {m['note']}" if m.get("note") else ""))


def latency(rows: list[dict]) -> None:
    print(f"{'method':<36} {'median ms':>10} {'p90 ms':>8} {'tok/s':>7} {'first ms':>9} {'last ms':>8} "
          f"{'growth':>7} {'prefill s':>10}")
    for r in rows:
        m = r["metrics"]
        if m.get("decode_ms_median") is None:
            print(f"{r['config']['method']:<36} {m.get('note', 'n/a')}")
            continue
        print(f"{r['config']['method']:<36} {m['decode_ms_median']:>10.2f} {m['decode_ms_p90']:>8.2f} "
              f"{m['decode_tok_s']:>7.1f} {m['decode_ms'][0]:>9.2f} {m['decode_ms'][-1]:>8.2f} "
              f"{m['latency_growth']:>7.2f} {m['prefill_s']:>10.2f}")


def translate(rows: list[dict]) -> None:
    print(f"{'method':<28} {'mode':<8} {'positions':<10} {'k':>3} {'phi':>4} {'BLEU':>6} {'chrF':>6} {'AL':>6} "
          f"{'LAAL':>6} {'words':>6} {'KV KiB':>8}")
    for r in rows:
        p, m = r["config"]["params"], r["metrics"]
        k = "-" if p["mode"] == "offline" else p["k"]
        print(f"{r['config']['method']:<28} {p['mode']:<8} {p['positions']:<10} {k:>3} {p['phi']:>4} {m['bleu']:>6.2f} "
              f"{m['chrf']:>6.2f} {fmt(m['al']):>6} {fmt(m['laal']):>6} {m['target_words']:>6.1f} "
              f"{m['kv_bytes_peak'] / 1024:>8.1f}")


def document(rows: list[dict]) -> None:
    print(f"{'method':<36} {'pos':<5} {'k':>2} {'tokens':>6} {'sent':>4} {'BLEU':>6} {'Q4':>6} {'chrF':>6} "
          f"{'AL':>6} {'LAAL':>6} {'KV peak MiB':>11} {'full MiB':>9} {'tok/s':>6}")
    for r in rows:
        p, m = r["config"]["params"], r["metrics"]
        print(f"{r['config']['method']:<36} {p['positions']:<5} {p['k']:>2} {p['tokens']:>6} {m['sentences']:>4} "
              f"{fmt(m['bleu']):>6} {fmt(m['bleu_last_quarter']):>6} {fmt(m['chrf']):>6} {fmt(m['al']):>6} "
              f"{fmt(m['laal']):>6} {fmt(m['kv_bytes_peak'], '.1f', 2**20):>11} "
              f"{fmt(m['kv_bytes_full'], '.1f', 2**20):>9} {fmt(m['tokens_per_s'], '.1f'):>6}"
              + (f"  {m['note']}" if m.get("note") else ""))
