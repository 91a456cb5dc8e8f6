"""``kvlab compare kvpress``: kvlab's methods and kvpress's presses on the same samples, side by side.

kvpress runs in its own venv (``make kvpress-env``), once for every press x ratio; kvlab's methods then run at
the same kept tokens on the same token ids (:mod:`kvlab.compare.side_by_side`). Writes one row per
(implementation, method or press, ratio) to ``--out DIR/rows/``, prints the table and the issue's targets, and
writes ``DIR/implementation_comparison.png`` and ``.md``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from kvlab.cli.common import add_model_args, add_progress_arg, load_model, split_list
from kvlab.errors import KvlabError

PRESSES = "StreamingLLMPress,SnapKVPress,ObservedAttentionPress,ExpectedAttentionPress,AdaKVPress(SnapKVPress)"
OPTIONS = ("model", "task", "ratios", "presses", "methods", "profile", "samples", "context_tokens",
           "continuation_tokens", "data", "chunk_size", "max_new_tokens", "threads", "seed", "out")
ONLY_FOR = {"continuation_tokens": "ppl", "data": "ppl", "chunk_size": "passkey", "max_new_tokens": "passkey"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="side by side with another KV-cache library (kvpress)")
    libs = p.add_subparsers(dest="library", metavar="LIBRARY", parser_class=type(p))
    libs.required = True
    k = libs.add_parser("kvpress", help="kvlab's methods and kvpress's presses on the same samples",
                        description="Run kvpress (in .kvpress-venv; `make kvpress-env` builds it) and kvlab on the "
                                    "same model and token ids, kvlab at the tokens kvpress keeps at each ratio.")
    add_model_args(k)
    k.add_argument("--task", choices=("passkey", "ppl"), default="passkey",
                   help="passkey QA (accuracy) or perplexity of a continuation after a compressed context")
    k.add_argument("--ratios", default="0.25,0.5,0.75",
                   help="kvpress compression ratios: the fraction of the context evicted")
    k.add_argument("--presses", default=PRESSES, help=f"kvpress presses, comma-separated (default {PRESSES})")
    k.add_argument("--method", "--methods", dest="methods", action="append", metavar="NAME",
                   help="kvlab methods: streaming, h2o, head-aware, haq (head-aware and haq need --profile); repeat "
                        "the flag or separate with ';' or ',' (default 'streaming,h2o')")
    k.add_argument("--profile", help="head profile (kvlab heads profile) for head-aware and haq")
    k.add_argument("--full", action="store_true", help="also run both full caches (kvpress 'none', kvlab 'full')")
    k.add_argument("--samples", type=int, default=3, help="samples (default 3)")
    k.add_argument("--context-tokens", type=int, default=1024, help="context tokens per sample (default 1024)")
    k.add_argument("--continuation-tokens", type=int, default=256, help="ppl: tokens scored after the context")
    k.add_argument("--data", default="pydoc", help="ppl: pydoc | wikitext-2 | pg19 | PATH")
    k.add_argument("--chunk-size", type=int, default=512, help="passkey: kvlab's context tokens per forward pass")
    k.add_argument("--max-new-tokens", type=int, default=16)
    k.add_argument("--threads", type=int, help="torch threads for both libraries (default: torch's)")
    k.add_argument("--timeout", type=float, default=1800.0, help="seconds the kvpress worker may run (default 1800)")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--venv", help="the kvpress venv (default $KVLAB_KVPRESS_VENV or .kvpress-venv)")
    k.add_argument("--out", default="runs/compare_kvpress", metavar="DIR",
                   help="output folder: rows, table and figure (default runs/compare_kvpress)")
    add_progress_arg(k)
    k.set_defaults(func=run_kvpress)


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run, every setting spelled out."""
    parts = ["kvlab", "compare", "kvpress"]
    for name in OPTIONS:
        value = ",".join(method_names(args)) if name == "methods" else getattr(args, name)
        if value is not None and ONLY_FOR.get(name, args.task) == args.task:
            parts += [f"--{name.replace('_', '-')}", str(value)]
    return shlex.join(parts + (["--full"] if args.full else []))


def method_names(args: argparse.Namespace) -> list[str]:
    """The kvlab methods asked for, from repeated flags, ';' or ',' (default streaming and h2o)."""
    parts = [part for value in (args.methods or ["streaming,h2o"]) for part in value.split(";") if part.strip()]
    return [name for part in parts for name in split_list(part, str, "--method")]


def run_kvpress(args: argparse.Namespace) -> int:
    import torch

    from kvlab.compare import kvpress as kp
    from kvlab.compare import side_by_side as sbs

    cmp = sbs.Comparison(task=args.task, ratios=tuple(split_list(args.ratios, float, "--ratios")),
                         presses=tuple(split_list(args.presses, str, "--presses")),
                         methods=tuple(method_names(args)), profile=args.profile,
                         full=args.full, samples=args.samples, context_tokens=args.context_tokens,
                         continuation_tokens=args.continuation_tokens, data=args.data, chunk_size=args.chunk_size,
                         max_new_tokens=args.max_new_tokens, seed=args.seed, timeout_s=args.timeout)
    if args.threads is not None and args.threads < 1:
        raise KvlabError(f"--threads must be at least 1, got {args.threads}")
    kp.kvpress_python(args.venv)  # a missing environment: one line naming the make target, before the model loads
    if cmp.task == "ppl":
        from kvlab.data import load_text

        load_text(cmp.data)  # a missing file fails before the model loads
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args)

    def echo(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    rows = sbs.run_comparison(model, tok, cmp, model_name=args.model, device=args.device, dtype=args.dtype,
                              venv=args.venv, echo=echo, progress=not args.no_progress)
    from kvlab.results import write_json_atomic

    out = Path(args.out)
    for row in rows:  # the measurements first: nothing below can lose them
        write_json_atomic(out / "rows" / f"{row['id']}.json", row)
    # pandas and matplotlib only now: they are not in the peak RSS measured
    from kvlab.lab import kvpress_figure as figure
    from kvlab.lab.frame import rows_frame

    df = rows_frame(rows)
    table, found = figure.text_table(df), figure.targets_text(figure.targets(df))
    print(table)
    print("\ntargets:")
    print("\n".join(f"  {line}" for line in found))
    paths = figure.write_outputs(rows, out, command=command_line(args), echo=echo)
    print(f"wrote {len(rows)} rows to {out / 'rows'}" + "".join(f", {p}" for p in paths))
    return 0
