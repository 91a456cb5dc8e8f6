"""``kvlab demo``: the main job on a fresh machine — full vs StreamingLLM vs H2O at one budget."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvlab.cli.common import add_model_args, check_methods, load_model
from kvlab.errors import KvlabError
from kvlab.results import make_row, write_json_atomic


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="full vs streaming vs h2o on real text: table + figure")
    add_model_args(p)
    p.add_argument("--data", default="pydoc")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--budget", type=int, default=1024, help="tokens kept per KV head per layer")
    p.add_argument("--chunk-size", type=int, default=16)
    p.add_argument("--out", default="runs/demo", help="folder for demo.png and the result rows")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvlab.evals import ppl

    if args.budget < 8:
        raise KvlabError(f"--budget must be at least 8, got {args.budget}")
    methods = ["full", f"streaming:sinks=4,window={args.budget - 4}",
               f"h2o:budget={args.budget},recent={args.budget // 4}"]
    check_methods(methods)
    params = ppl.Params(data=args.data, tokens=args.tokens, chunk_size=args.chunk_size)
    model, tok = load_model(args)
    from kvlab.models import model_id

    out = Path(args.out)
    rows = []
    for i, spec in enumerate(methods, 1):
        print(f"[{i}/{len(methods)}] {spec}: {args.tokens} tokens of {args.data}", file=sys.stderr)
        metrics = ppl.evaluate(model, tok, spec, params, progress=True)
        config = {"model": model_id(model), "method": spec, "data": args.data, "tokens": args.tokens,
                  "chunk_size": args.chunk_size}
        row = make_row("ppl", config, metrics, higher_is_better=ppl.HIGHER_IS_BETTER,
                       runtime_s=metrics["runtime_s"], device=str(model.device))
        rows.append(row)
        write_json_atomic(out / "rows" / f"{row['id']}.json", row)
    base = rows[0]["metrics"]
    print(f"\n{model_id(model)} on {args.data}, {args.tokens} tokens, budget {args.budget} tokens/head/layer")
    print(f"{'method':<34} {'ppl':>8} {'vs full':>8} {'KV peak MiB':>12} {'saved':>7} {'tok/s':>7}")
    for row in rows:
        m = row["metrics"]
        print(f"{row['config']['method']:<34} {m['ppl']:>8.3f} {100 * (m['ppl'] / base['ppl'] - 1):>+7.2f}% "
              f"{m['kv_bytes_peak'] / 2**20:>12.2f} {100 * (1 - m['kv_bytes_peak'] / base['kv_bytes_peak']):>6.1f}% "
              f"{m['tokens_per_s']:>7.1f}")
    figure = _figure(rows, out / "demo.png")
    print(f"\nfigure: {figure}\nrows:   {out / 'rows'}")
    return 0


def _figure(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["config"]["method"].split(":")[0] for r in rows]
    panels = [("perplexity", [r["metrics"]["ppl"] for r in rows]),
              ("KV cache peak (MiB)", [r["metrics"]["kv_bytes_peak"] / 2**20 for r in rows]),
              ("tokens / s", [r["metrics"]["tokens_per_s"] for r in rows])]
    colors = ["#4C72B0", "#DD8452", "#55A868"]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    for ax, (title, values) in zip(axes, panels):
        bars = ax.bar(names, values, color=colors[: len(names)])
        ax.bar_label(bars, fmt="%.2f" if max(values) < 100 else "%.0f", fontsize=9)
        ax.set_title(title)
        ax.spines[["top", "right"]].set_visible(False)
    r0 = rows[0]["config"]
    fig.suptitle(f"{r0['model']} · {r0['data']} · {r0['tokens']} tokens")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path
