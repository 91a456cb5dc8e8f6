"""``kvlab demo``: the main job on a fresh machine — full vs StreamingLLM vs H2O at one budget."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvlab.cli.bars import ppl_bars
from kvlab.cli.common import add_method_arg, add_model_args, add_progress_arg, load_model, methods_of, progress_on
from kvlab.cli.tables import MIB, Col, method, metric, table
from kvlab.errors import KvlabError
from kvlab.results import make_row, write_json_atomic


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="full vs streaming vs h2o on real text: table + figure")
    add_model_args(p)
    p.add_argument("--data", default="pydoc")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--budget", type=int, default=1024, help="tokens kept per KV head per layer")
    add_method_arg(p, None, extra="; default: full, streaming and h2o at --budget")
    p.add_argument("--chunk-size", type=int, default=16)
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="folder for demo.png and the result rows")
    add_progress_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvlab.evals import ppl

    if args.budget < 8:
        raise KvlabError(f"--budget must be at least 8, got {args.budget}")
    args.default_method = (f"full;streaming:sinks=4,window={args.budget - 4};"
                           f"h2o:budget={args.budget},recent={args.budget // 4}")
    methods = methods_of(args)
    params = ppl.Params(data=args.data, tokens=args.tokens, chunk_size=args.chunk_size)
    model, tok = load_model(args)
    from kvlab.models import model_id

    out = Path(args.out)
    rows = []
    for i, spec in enumerate(methods, 1):
        print(f"[{i}/{len(methods)}] {spec}: {args.tokens} tokens of {args.data}", file=sys.stderr)
        metrics = ppl.evaluate(model, tok, spec, params, progress=progress_on(args))
        config = {"model": model_id(model), "method": spec, "data": args.data, "tokens": args.tokens,
                  "chunk_size": args.chunk_size}
        row = make_row("ppl", config, metrics, higher_is_better=ppl.HIGHER_IS_BETTER,
                       runtime_s=metrics["runtime_s"], device=str(model.device))
        rows.append(row)
        write_json_atomic(out / "rows" / f"{row['id']}.json", row)
    base = rows[0]["metrics"]
    budget = "" if args.method else f", budget {args.budget} tokens/head/layer"
    print(f"\n{model_id(model)} on {args.data}, {args.tokens} tokens{budget}")
    versus = "vs " + methods[0].split(":")[0]
    table(rows, [method(34), Col("ppl", 8, metric("ppl", ".3f")),
                 Col(versus, 8, lambda r: f"{100 * (r['metrics']['ppl'] / base['ppl'] - 1):+.2f}%"),
                 Col("KV peak MiB", 12, metric("kv_bytes_peak", ".2f", MIB)),
                 Col("saved", 7, lambda r: f"{100 * (1 - r['metrics']['kv_bytes_peak'] / base['kv_bytes_peak']):.1f}%"),
                 Col("tok/s", 7, metric("tokens_per_s", ".1f"))])
    r0 = rows[0]["config"]
    figure = ppl_bars(methods, [r["metrics"] for r in rows], f"{r0['model']} · {r0['data']} · {r0['tokens']} tokens",
                      out / "demo.png")
    print(f"\nfigure: {figure}\nrows:   {out / 'rows'}")
    return 0
