"""A method's decode steps with and without its layers' sets (ring and slot sets), on a real model, in one run.

    python bench/bench_sets.py [--model smollm2-135m] [--context 4096] [--methods "adakv:budget=1024"]
                               [--dtypes float32,bfloat16] [--steps 36] [--threads 1]

For each method and dtype, two caches are prefilled with the same ``--context`` tokens of real text (pydoc), 512 at
a time; then one takes its decode steps as sets where it can (``KVCache.use_sets``, the default) and the other
with every segment stepping alone. Both are fed the same next tokens of the text (teacher forcing, so they do the
same work), one step each in turn (interleaved, after 4 warm-up steps). The figures: the median step of each, the
ratio (alone / sets), the layers that stepped as sets, the largest gap between the two caches' logits, whether
their greedy tokens agree at every step, and the torch calls of a step (Python level). Prints a table; writes
bench/results/sets.{json,md} (``--out`` another stem).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from timing import CountCalls, run_meta, write

import kvlab
from kvlab.data import load_text, tokenize
from kvlab.errors import KvlabError
from kvlab.methods import build

OUT = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
WARMUP = 4


@torch.no_grad()
def compare(model, ids: torch.Tensor, spec: str, context: int, steps: int) -> dict:
    """``ids (1, context + WARMUP + steps + 1)``: one method's two caches, sets on and off."""
    caches = {}
    for sets in (True, False):
        cache = kvlab.make_cache(model, spec)
        for start in range(0, context, 512):
            model(input_ids=ids[:, start:min(start + 512, context)], past_key_values=cache, logits_to_keep=1)
        cache.use_sets(sets)
        caches[sets] = cache
    times, logits = {True: [], False: []}, {True: [], False: []}
    for t in range(context, context + WARMUP + steps):
        for sets, cache in caches.items():
            start = time.perf_counter()
            out = model(input_ids=ids[:, t:t + 1], past_key_values=cache).logits[:, -1].float()
            if t >= context + WARMUP:
                times[sets].append(time.perf_counter() - start)
                logits[sets].append(out)
    calls = {}
    for sets, cache in caches.items():
        with CountCalls() as counter:
            model(input_ids=ids[:, -1:], past_key_values=cache)
        calls[sets] = counter.calls
    on, off = statistics.median(times[True]), statistics.median(times[False])
    a, b = torch.cat(logits[True]), torch.cat(logits[False])
    layers = caches[True].layers
    return {"impl": spec, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "context": context,
            "steps": steps, "sets_ms": round(1000 * on, 2), "alone_ms": round(1000 * off, 2),
            "alone_over_sets": round(off / on, 3), "set_layers": sum(x._slots is not None or x._rings is not None
                                                                     for x in layers),
            "layers": len(layers), "max_logit_gap": float((a - b).abs().max()),
            "same_greedy": bool((a.argmax(-1) == b.argmax(-1)).all()), "calls_sets": calls[True],
            "calls_alone": calls[False]}


def table(rows: list[dict]) -> str:
    lines = ["| method | dtype | context | sets: step ms | alone: step ms | alone / sets | layers as sets | "
             "largest logit gap | same greedy tokens | torch calls: sets / alone |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| `{r['impl']}` | {r['dtype']} | {r['context']} | {r['sets_ms']} | {r['alone_ms']} | "
                     f"{r['alone_over_sets']:.3f} | {r['set_layers']} / {r['layers']} | {r['max_logit_gap']:.2e} | "
                     f"{'yes' if r['same_greedy'] else 'no'} | {r['calls_sets']} / {r['calls_alone']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--methods", default="adakv:budget=1024", help="';'-separated kvlab specs")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    p.add_argument("--steps", type=int, default=36)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=OUT / "sets", help="output stem (.json and .md are added)")
    args = p.parse_args()
    dtypes = args.dtypes.split(",")
    if args.steps < 1 or args.context < 2 or args.threads < 0 or any(d not in DTYPES for d in dtypes):
        p.error("--steps must be positive, --context 2 or more, --threads not negative, --dtypes among "
                + ", ".join(DTYPES))
    specs = args.methods.split(";")
    try:
        for spec in specs:
            build(spec)
    except KvlabError as exc:
        p.error(str(exc))
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = kvlab.load(args.model)
    meta = run_meta(model, args)
    ids = tokenize(tok, load_text("pydoc"), args.context + WARMUP + args.steps + 1).to(model.device)
    rows = []
    for dtype in dtypes:
        model = model.to(DTYPES[dtype])
        for spec in specs:
            rows.append(compare(model, ids, spec, args.context, args.steps))
            print(json.dumps(rows[-1]), flush=True)
    text = table(rows)
    print(text)
    write(args.out, rows, text, meta)


if __name__ == "__main__":
    main()
