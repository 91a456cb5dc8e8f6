"""Decode speed of full vs StreamingLLM vs H2O at growing contexts, and the share of a step spent compressing.

    python bench/bench_decode.py [--model smollm2-135m] [--contexts 1024,4096,8192,16384] [--steps 64]

For each method and context: real text (pydoc) is prefilled a chunk at a time through the method's cache,
then ``--steps`` greedy decode steps are timed one by one after ``--warmup`` steps. The time spent inside
the cache's update (``Segment.push``: scoring, top-k, the one concatenation that drops evicted tokens and
appends the new one, re-rotation) is measured by wrapping it: "update share" = update time / step time.
The full cache's update share is its plain append, so a method's compression overhead is its update
share above the full cache's at the same cache size (the full cache at 1,024 tokens holds what the
bounded caches hold). H2O's extra cost of computing attention probabilities (its scores) is part of its
step time, not of its update share.
Prints a table and writes bench/results/decode.json and bench/results/decode.md (``--out`` another stem).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from timing import Inside, decode, run_meta, write

import kvlab
from kvlab.data import load_text, tokenize
from kvlab.storage.dense import Segment

OUT = Path(__file__).resolve().parent / "results"


def measure(model, ids: torch.Tensor, spec: str, steps: int, warmup: int, chunk: int) -> dict:
    cache, row = decode(model, ids, spec, steps, warmup, chunk, Inside(Segment, "push"))
    share = row.pop("inside_share")
    row.pop("inside_ms")
    return {**row, "update_share": share, "kv_mib": round(cache.nbytes() / 2**20, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--contexts", default="1024,4096,8192,16384")
    p.add_argument("--methods", default="full;streaming:sinks=4,window=1020;h2o:budget=1024,recent=256")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--chunk", type=int, default=256, help="prefill chunk size")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=OUT / "decode", help="output stem (.json and .md are added)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = kvlab.load(args.model)
    meta = run_meta(model, args)
    contexts = [int(c) for c in args.contexts.split(",")]
    ids_all = tokenize(tok, load_text("pydoc"), max(contexts)).to(model.device)
    rows = []
    for ctx in contexts:
        for spec in args.methods.split(";"):
            row = measure(model, ids_all[:, :ctx], spec, args.steps, args.warmup, args.chunk)
            rows.append(row)
            print(json.dumps(row), flush=True)
    by = {(r["method"].split(":")[0], r["context"]): r for r in rows}
    lines = ["| context | method | step ms | tokens/s | speed-up vs full | cache update share | KV MiB |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        full = by.get(("full", r["context"]))
        speed = f"{full['step_ms'] / r['step_ms']:.2f}x" if full else "n/a"
        lines.append(f"| {r['context']} | `{r['method']}` | {r['step_ms']} | {r['tokens_per_s']} | {speed} | "
                     f"{100 * r['update_share']:.1f}% | {r['kv_mib']} |")
    table = "\n".join(lines)
    print(table)
    write(args.out, rows, table, meta)


if __name__ == "__main__":
    main()
