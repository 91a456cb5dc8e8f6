"""``kvlab ppl``: streaming perplexity of one method, optionally against the full cache."""

from __future__ import annotations

import argparse
import sys

from kvlab.cli.common import add_model_args, check_methods, load_model
from kvlab.results import git_hash, versions, write_json_atomic


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ppl", help="streaming perplexity of a method (optionally vs the full cache)")
    add_model_args(p)
    p.add_argument("--method", default="streaming:sinks=4,window=1020", help="method spec, e.g. h2o:budget=512,recent=128")
    p.add_argument("--data", default="pydoc", help="pydoc | wikitext-2 | wikitext-103 | pg19 | PATH (.txt/.jsonl)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens to score (default 2048)")
    p.add_argument("--chunk-size", type=int, default=16, help="tokens per forward pass; 1 = exact token-by-token")
    p.add_argument("--compare", choices=["full"], help="also run the full cache and add the comparison block")
    p.add_argument("--output", help="write the result as JSON to this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvlab.evals import ppl

    params = ppl.Params(data=args.data, tokens=args.tokens, chunk_size=args.chunk_size)
    check_methods([args.method])
    from kvlab.data import load_text

    load_text(args.data)  # a missing file fails before the model loads
    model, tok = load_model(args)
    from kvlab.models import model_id

    def one(spec: str) -> dict:
        metrics = ppl.evaluate(model, tok, spec, params, progress=sys.stderr.isatty())
        return {"model": model_id(model), "method": spec, "data": args.data, "chunk_size": args.chunk_size, **metrics}

    result = one(args.method)
    rows = [result]
    if args.compare:
        base = one("full")
        rows.insert(0, base)
        result = {**result, "baseline": base, "streaming": dict(result), "metrics": {
            "speedup": result["tokens_per_s"] / base["tokens_per_s"],
            "compression_ratio": 1.0 - result["kv_bytes_peak"] / base["kv_bytes_peak"],
            "ppl_increase_percent": 100.0 * (result["ppl"] / base["ppl"] - 1.0),
        }}
    _print_table(rows)
    if args.compare:
        m = result["metrics"]
        print(f"ppl change {m['ppl_increase_percent']:+.2f}%   KV memory saved {100 * m['compression_ratio']:.1f}%   "
              f"speed-up x{m['speedup']:.2f}")
    if args.output:
        result.update(versions=versions(), git_hash=git_hash())
        write_json_atomic(args.output, result)
        print(f"wrote {args.output}")
    return 0


def _print_table(rows: list[dict]) -> None:
    print(f"{'method':<40} {'ppl':>9} {'KV peak MiB':>12} {'KV full MiB':>12} {'saved':>7} {'tok/s':>8}")
    for r in rows:
        print(f"{r['method']:<40} {r['ppl']:>9.3f} {r['kv_bytes_peak'] / 2**20:>12.2f} {r['kv_bytes_full'] / 2**20:>12.2f} "
              f"{100 * r['compression_ratio']:>6.1f}% {r['tokens_per_s']:>8.1f}")
