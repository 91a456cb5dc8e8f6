"""A method's decode steps with and without its layers' sets (ring and slot sets), on a real model, in one run.

    python bench/bench_sets.py [--model smollm2-135m] [--context 4096] [--methods "adakv:budget=1024"]
                               [--dtypes float32,bfloat16] [--steps 36] [--threads 1] [--padded]

For each method and dtype, two caches are prefilled with the same ``--context`` tokens of real text (pydoc), 512 at
a time; then one takes its decode steps as sets where it can (``KVCache.use_sets``, the default) and the other
with every segment stepping alone. Both are fed the same next tokens of the text (teacher forcing, so they do the
same work), one step each in turn (interleaved, after 4 warm-up steps). The figures: the median step of each, the
ratio (alone / sets), the layers that stepped as sets, the largest gap between the two caches' logits, whether
their greedy tokens agree at every step, and the torch calls of a step (Python level). Prints a table; writes
bench/results/sets.{json,md} (``--out`` another stem). ``--padded``: a batch of three left-padded prompts (the
context's tokens, its first three quarters and its first half), as ``model.generate`` decodes prompts of different
lengths; every row then reads the same next tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from timing import CountCalls, left_padded, run_meta, run_script, write

import kvlab
from kvlab.data import load_text, tokenize
from kvlab.errors import KvlabError
from kvlab.methods import build
from kvlab.spec import without_profile

OUT = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
WARMUP = 4


@torch.no_grad()
def compare(model, ids: torch.Tensor, spec: str, context: int, steps: int, mask: torch.Tensor | None = None) -> dict:
    """``ids (B, context + WARMUP + steps + 1)``: one method's two caches, sets on and off; ``mask (B, context)``:
    the context's padding (None: none; the next tokens are real)."""
    caches = {}
    for sets in (True, False):
        cache = kvlab.make_cache(model, spec)
        for start in range(0, context, 512):
            stop = min(start + 512, context)
            model(input_ids=ids[:, start:stop], attention_mask=None if mask is None else mask[:, :stop],
                  past_key_values=cache, logits_to_keep=1)
        cache.use_sets(sets)
        caches[sets] = cache
    times, logits, calls = {True: [], False: []}, {True: [], False: []}, {}
    for t in range(context, ids.shape[1]):
        grown = None if mask is None else torch.cat((mask, mask.new_ones(mask.shape[0], t + 1 - context)), dim=1)
        for sets, cache in caches.items():
            if t == ids.shape[1] - 1:  # the last step: its torch calls
                with CountCalls() as counter:
                    model(input_ids=ids[:, t:t + 1], attention_mask=grown, past_key_values=cache)
                calls[sets] = counter.calls
                continue
            start = time.perf_counter()
            out = model(input_ids=ids[:, t:t + 1], attention_mask=grown, past_key_values=cache).logits[:, -1].float()
            if t >= context + WARMUP:
                times[sets].append(time.perf_counter() - start)
                logits[sets].append(out)
    # the reported figures, and their ratio computed from them as reported (a reader's division gives the same)
    on, off = round(1000 * statistics.median(times[True]), 2), round(1000 * statistics.median(times[False]), 2)
    a, b = torch.cat(logits[True]), torch.cat(logits[False])
    layers = caches[True].layers
    as_sets = sum(layer.stepped_as_set for layer in layers)
    return {"impl": spec, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "context": context,
            "batch": ids.shape[0], "padded": mask is not None, "steps": steps, "sets_ms": on,
            "alone_ms": off, "alone_over_sets": round(off / on, 3), "set_layers": as_sets,
            "layers": len(layers), "max_logit_gap": float((a - b).abs().max()),
            "same_greedy": bool((a.argmax(-1) == b.argmax(-1)).all()), "calls_sets": calls[True],
            "calls_alone": calls[False]}


def table(rows: list[dict]) -> str:
    lines = ["| method | dtype | context | sets: step ms | alone: step ms | alone / sets | layers as sets | "
             "largest logit gap | same greedy tokens | torch calls: sets / alone |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        context = f"{r['context']}{' x 3, padded' if r.get('padded') else ''}"
        lines.append(f"| `{without_profile(r['impl'])}` | {r['dtype']} | {context} | {r['sets_ms']} | "
                     f"{r['alone_ms']} | "
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
    p.add_argument("--padded", action="store_true",
                   help="a batch of three left-padded prompts (the context, 3/4 and 1/2 of it) instead of one")
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
    mask = None
    if args.padded:  # the rows' contexts left-padded; each row then reads the text's next tokens
        rows, mask = left_padded(ids[0, :args.context])
        ids = torch.cat((rows, ids[:, args.context:].expand(3, -1)), dim=1)
    rows = []
    for dtype in dtypes:
        model = model.to(DTYPES[dtype])
        for spec in specs:
            rows.append(compare(model, ids, spec, args.context, args.steps, mask))
            print(json.dumps(rows[-1]), flush=True)
    text = table(rows)
    print(text)
    write(args.out, rows, text, meta)


if __name__ == "__main__":
    run_script(main, __file__)
