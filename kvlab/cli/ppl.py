"""``kvlab ppl``: streaming perplexity of one or more methods (one table), optionally against the full cache.

``--output FILE`` writes the result as JSON (one method: its metrics, with the comparison block under
``--compare full``; several: ``{"methods": [...]}`` of those); ``--out DIR`` writes one row per method to
``DIR/rows/<id>.json`` (the rows ``kvlab run`` writes for eval ``ppl``) and the figure ``DIR/ppl.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kvlab.cli.common import add_method_arg, add_model_args, add_out_arg, add_progress_arg, load_model, methods_of, \
    progress_on
from kvlab.cli.tables import MIB, Col, fmt, table
from kvlab.results import git_hash, versions, write_json_atomic


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ppl", help="streaming perplexity of methods (optionally vs the full cache)")
    add_model_args(p)
    add_method_arg(p, "streaming:sinks=4,window=1020")
    p.add_argument("--data", default="pydoc", help="pydoc | wikitext-2 | wikitext-103 | pg19 | PATH (.txt/.jsonl)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens to score (default 2048)")
    p.add_argument("--chunk-size", type=int, default=16, help="tokens per forward pass; 1 = exact token-by-token")
    p.add_argument("--compare", choices=["full"], help="also run the full cache and add the comparison block")
    p.add_argument("--output", metavar="FILE", help="write the result as JSON to this file")
    add_out_arg(p, "none: write no rows")
    add_progress_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvlab.evals import ppl

    params = ppl.Params(data=args.data, tokens=args.tokens, chunk_size=args.chunk_size)
    specs = methods_of(args)
    from kvlab.data import load_text

    load_text(args.data)  # a missing file fails before the model loads
    model, tok = load_model(args)
    from kvlab.models import model_id

    def one(spec: str) -> dict:
        metrics = ppl.evaluate(model, tok, spec, params, progress=progress_on(args))
        return {"model": model_id(model), "method": spec, "data": args.data, "chunk_size": args.chunk_size, **metrics}

    results = [one(spec) for spec in specs]
    measured = list(results)
    if args.compare:
        base = one("full")
        measured.insert(0, base)
        results = [_compared(r, base) for r in results]
    _print_table(measured)
    for r in results if args.compare else []:
        m = r["metrics"]
        print(("" if len(results) == 1 else f"{r['method']}: ") +
              f"ppl change {m['ppl_increase_percent']:+.2f}%   KV memory saved {100 * m['compression_ratio']:.1f}%   "
              f"speed-up x{m['speedup']:.2f}")
    if args.out:
        _write_rows(args, measured, params, Path(args.out), device=str(model.device))
    if args.output:
        result = results[0] if len(results) == 1 else {"model": model_id(model), "data": args.data,
                                                        "tokens": args.tokens, "chunk_size": args.chunk_size,
                                                        "methods": results}
        result.update(versions=versions(), git_hash=git_hash())
        write_json_atomic(args.output, result)
        print(f"wrote {args.output}")
    return 0


def _compared(result: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """``result`` with the full cache's result and the comparison block (ppl change, memory saved, speed-up)."""
    return {**result, "baseline": base, "streaming": dict(result), "metrics": {
        "speedup": result["tokens_per_s"] / base["tokens_per_s"],
        "compression_ratio": 1.0 - result["kv_bytes_peak"] / base["kv_bytes_peak"],
        "ppl_increase_percent": 100.0 * (result["ppl"] / base["ppl"] - 1.0),
    }}


def _write_rows(args: argparse.Namespace, measured: list[dict], params: Any, out: Path, *, device: str) -> None:
    """One row per method (the lab's shape, eval ``ppl``) and the figure ``ppl.png``."""
    from kvlab.cli.bars import ppl_bars
    from kvlab.evals import ppl
    from kvlab.evals.common import cell_config
    from kvlab.results import make_row

    skip = ("model", "method", "data", "chunk_size")
    for r in measured:
        metrics = {k: v for k, v in r.items() if k not in skip}
        config = cell_config(args.model, r["method"], "ppl", params, device=args.device, dtype=args.dtype)
        row = make_row("ppl", config, metrics, higher_is_better=ppl.HIGHER_IS_BETTER, device=device,
                       runtime_s=metrics.get("runtime_s"))
        write_json_atomic(out / "rows" / f"{row['id']}.json", row)
    figure = ppl_bars([r["method"] for r in measured], measured,
                      f"{measured[0]['model']} · {args.data} · {args.tokens} tokens", out / "ppl.png")
    print(f"wrote {len(measured)} rows to {out / 'rows'} and the figure {figure}")


def _print_table(rows: list[dict]) -> None:
    """``rows``: the measured results (flat: ``method``, ``ppl``, bytes, ``compression_ratio``, ``tokens_per_s``)."""
    table(rows, [Col("method", 40, lambda r: r["method"], left=True), Col("ppl", 9, lambda r: f"{r['ppl']:.3f}"),
                 Col("KV peak MiB", 12, lambda r: fmt(r["kv_bytes_peak"], ".2f", MIB)),
                 Col("KV full MiB", 12, lambda r: fmt(r["kv_bytes_full"], ".2f", MIB)),
                 Col("saved", 7, lambda r: f"{100 * r['compression_ratio']:.1f}%"),
                 Col("tok/s", 8, lambda r: f"{r['tokens_per_s']:.1f}")])
