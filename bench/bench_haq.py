"""Decode speed and KV bytes of head-aware budgets and HAQ-KV vs the full cache and StreamingLLM,
and the share of a HAQ decode step spent dequantizing and rotating the kept keys.

    python bench/bench_haq.py --profile p.json [--model smollm2-135m] [--contexts 4096,8192,16384]
    python bench/bench_haq.py --profile p.json --quick        # 4096 only, 16 steps

For each context and method: real text (pydoc) is prefilled ``--chunk`` tokens at a time through the
method's cache, then ``--steps`` greedy decode steps are timed one by one after ``--warmup`` steps.
"dequant share" = time inside ``QuantSegment.dense`` (unpack the codes, apply scales and zero points, and
with ``rope=pre`` rotate every kept key to its position) / step time; it is measured by wrapping that method.
"KV" is ``cache.nbytes()`` after the last step (codes + scales + zero points + full-precision residual
for HAQ); "% of full" divides by what a full cache holds for the same tokens. SmolLM2 has 8192
positions: the full cache past them is timed but its outputs are meaningless (the others re-index).
A context is skipped (and reported as skipped) when the 1-minute load average per core exceeds
``--max-load``. Prints a table; writes bench/results/haq_decode.json and bench/results/haq_decode.md.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from timing import Inside, decode, run_meta, write

import kvlab
from kvlab.data import load_text, tokenize
from kvlab.spec import without_profile
from kvlab.storage.quantized import QuantSegment

OUT = Path(__file__).resolve().parent / "results"
METHODS = ("full;streaming:sinks=4,window=1020;head-aware:budget=1024,profile={p};haq:budget=1024,profile={p},bits=8/4/2;"
           "haq:budget=1024,profile={p},bits=8/4/2,rope=post")


def measure(model, ids: torch.Tensor, spec: str, steps: int, warmup: int, chunk: int) -> dict:
    cache, row = decode(model, ids, spec, steps, warmup, chunk, Inside(QuantSegment, "dense"))
    dequant = {"dequant_ms": row.pop("inside_ms"), "dequant_share": row.pop("inside_share")}
    return {**row, **dequant, "kv_bytes": cache.nbytes(), "kv_bytes_peak": cache.peak_nbytes,
            "kv_bytes_full": cache.full_nbytes()}


def table(rows: list[dict]) -> str:
    by = {(r["method"].split(":")[0], r["context"]): r for r in rows if "step_ms" in r}
    lines = ["| context | method | step ms | tokens/s | vs full | dequant ms | dequant share | KV MiB | % of full KV |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = without_profile(r["method"])  # the profile path is in the JSON
        if "skipped" in r:
            lines.append(f"| {r['context']} | `{name}` | skipped: {r['skipped']} | | | | | | |")
            continue
        full = by.get(("full", r["context"]))
        speed = f"{full['step_ms'] / r['step_ms']:.2f}x" if full else "n/a"
        lines.append(f"| {r['context']} | `{name}` | {r['step_ms']} | {r['tokens_per_s']} | {speed} | "
                     f"{r['dequant_ms']} | {100 * r['dequant_share']:.1f}% | {r['kv_bytes'] / 2**20:.2f} | "
                     f"{100 * r['kv_bytes'] / r['kv_bytes_full']:.1f}% |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--profile", required=True,
                   help="head profile of the model (kvlab heads profile --model M --output FILE)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--contexts", default="4096,8192,16384")
    p.add_argument("--methods", default=METHODS, help="';'-separated specs; {p} is replaced by --profile")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--chunk", type=int, default=256, help="prefill chunk size")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--max-load", type=float, default=None,
                   help="skip a context when the load average per core exceeds this")
    p.add_argument("--quick", action="store_true", help="4096 tokens only, 16 steps")
    p.add_argument("--output", default=str(OUT / "haq_decode"), help="path stem of the .json and .md written")
    args = p.parse_args()
    if not Path(args.profile).is_file():
        p.error(f"profile '{args.profile}' does not exist (make one with: kvlab heads profile --model {args.model} "
                f"--output {args.profile})")
    if args.quick:
        args.contexts, args.steps = "4096", 16
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = kvlab.load(args.model)
    meta = run_meta(model, args)
    contexts = [int(c) for c in args.contexts.split(",")]
    specs = [s.replace("{p}", args.profile) for s in args.methods.split(";")]
    ids_all = tokenize(tok, load_text("pydoc"), max(contexts)).to(model.device)
    rows = []
    for ctx in contexts:
        load = os.getloadavg()[0] / (os.cpu_count() or 1)
        for spec in specs:
            if args.max_load is not None and load > args.max_load:
                row = {"method": spec, "context": ctx, "skipped": f"load {load:.1f} per core > {args.max_load}"}
            else:
                row = measure(model, ids_all[:, :ctx], spec, args.steps, args.warmup, args.chunk)
            rows.append(row)
            print(json.dumps(row), flush=True)
    text = table(rows)
    print(text)
    write(Path(args.output), rows, text, meta)


if __name__ == "__main__":
    main()
