"""A prefill chunk's attention over a long cache: sdpa blocks sized by the mask against blocks sized like logits.

    python bench/bench_chunk_attention.py [--contexts 4096,16384,65536] [--chunk 512] [--rounds 3] [--batch 4]

A chunked prefill (``--chunk-size``) or a translation source read chunk by chunk makes ``q`` queries attend to
``n`` stored keys (the last ``q`` their own, causally). kvlab's attention (:func:`kvlab.storage.attention.attend`)
hands such a chunk to sdpa a block of queries at a time. The blocks used to be sized so that float32 logits of
every head fit 8 MiB, as the eager path needs; sdpa keeps no logits, only the ``(block, n)`` mask every head
shares, so they are now sized by that mask (``MASK_BYTES`` in the query's dtype). Both ways are timed here on the
same tensors, interleaved, for the attention shapes of SmolLM2-135M (9 query heads, 3 KV heads, head_dim 64)
and of Llama-3-8B (32 and 8, head_dim 128; up to 16k, where the old blocks already take seconds), float32, batch
1, and the same outputs are checked. With ``--batch`` > 1, also a left-padded batch of SmolLM2's shapes (up to
16k): its masks were per query head, logit-sized, and are now one per row, sized by that mask. The figure is
the median time per chunk and layer, and the ratio (logit-sized / mask-sized), computed here. Prints a table;
writes bench/results/chunk_attention.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from timing import positive_ints, run_meta, write

from kvlab.storage.attention import MASK_BYTES, attend, block_rows

OUT = Path(__file__).resolve().parent / "results"
SHAPES = {"SmolLM2-135M": (9, 3, 64, None), "Llama-3-8B": (32, 8, 128, 16384)}  # query heads, KV heads, dim, max n


def measure(model: str, n: int, chunk: int, rounds: int, batch: int = 1) -> dict:
    """One chunk both ways. ``batch`` > 1: a left-padded batch (row ``i`` padded by ``64 i`` tokens), whose masks
    were per head (the former path of every padded batch) against one per row."""
    hq, h, d, _ = SHAPES[model]
    g = torch.Generator().manual_seed(0)
    query = torch.randn(batch, hq, chunk, d, generator=g)
    keys, values = torch.randn(batch, h, n, d, generator=g), torch.randn(batch, h, n, d, generator=g)
    old = block_rows(batch * hq, n)  # the former sizing: float32 logits of every query head under 8 MiB
    if batch == 1:
        before, after = {"block": old}, {}
    else:
        valid = torch.arange(n)[None, None, :] >= 64 * torch.arange(batch)[:, None, None]  # (B, 1, n)
        before, after = {"valid": valid.expand(batch, h, n)}, {"valid": valid}
    ref = attend(query, keys, values, scaling=d ** -0.5, **before)[0]
    new = attend(query, keys, values, scaling=d ** -0.5, **after)[0]
    assert torch.allclose(ref, new, atol=1e-5), f"{model} n={n}: the two block sizes disagree"
    by_logits, by_mask = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        attend(query, keys, values, scaling=d ** -0.5, **before)
        by_logits.append(time.perf_counter() - t)
        t = time.perf_counter()
        attend(query, keys, values, scaling=d ** -0.5, **after)
        by_mask.append(time.perf_counter() - t)
    a, b = statistics.median(by_logits), statistics.median(by_mask)
    rows = min(chunk, block_rows(batch, n, MASK_BYTES, query.element_size()))
    return {"model": model, "batch": batch, "context": n, "chunk": chunk, "rows_by_logits": old, "rows_by_mask": rows,
            "by_logits_ms": round(1e3 * a, 1), "by_mask_ms": round(1e3 * b, 1), "speedup": round(a / b, 2)}


def table(rows: list[dict]) -> str:
    head = ("| attention shape | batch | cached keys | queries per sdpa call (logit-sized / mask-sized) "
            "| ms, logit-sized | ms, mask-sized | speed-up |")
    lines = [head, "|---|---:|---:|---|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['batch']} | {r['context']} | {r['rows_by_logits']} / {r['rows_by_mask']} | "
              f"{r['by_logits_ms']} | {r['by_mask_ms']} | {r['speedup']:.2f}x |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", default="4096,16384,65536", type=positive_ints, help="cached keys n, e.g. 4096,16384")
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=4, help="rows of the padded batch (SmolLM2's shapes; 1: none)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=OUT / "chunk_attention", help="output stem (.json and .md are added)")
    args = p.parse_args()
    if args.chunk < 1 or args.rounds < 1 or args.batch < 1 or min(args.contexts) < max(args.chunk, 64 * args.batch):
        p.error("--chunk, --rounds and --batch must be positive, and every context at least the chunk and 64 x batch")
    torch.set_num_threads(args.threads)
    meta = run_meta(None, args)
    with torch.no_grad():
        rows = [measure(m, n, args.chunk, args.rounds) for m, (*_, top) in SHAPES.items()
                for n in args.contexts if top is None or n <= top]
        if args.batch > 1:
            rows += [measure("SmolLM2-135M", n, args.chunk, args.rounds, args.batch)
                     for n in args.contexts if n <= 16384]
    print(table(rows))
    write(args.out, rows, table(rows), meta)


if __name__ == "__main__":
    main()
