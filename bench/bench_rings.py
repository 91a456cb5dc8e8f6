"""When a layer's ring segments should step as one: a RingSet's step against each segment's own ring step.

    python bench/bench_rings.py [--segments 2,3,4,8] [--rounds 30] [--threads 1]

For each count of segments (one KV head each, windows of different lengths as head-aware gives its local
heads, 4 sinks, head_dim 64, float32, batch 1), two identical sets of segments are filled and settled; then
``--rounds`` rounds each time 100 layer steps of both ways, interleaved: every segment's own ``push`` (the
ring step), and one ``RingSet.step`` for all. The figure is the median time per layer step and the ratio
(own steps / set), computed here. ``kvlab.storage.rings.LEAST`` is the count from which the set pays.
Prints a table; writes bench/results/rings.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from timing import positive_ints, run_meta, write

from kvlab.methods.streaming_llm import StreamingLLM
from kvlab.storage import Group, RingSet, Rotary
from kvlab.storage.dense import Segment

OUT = Path(__file__).resolve().parent / "results"
D = 64


def _segments(windows: list[int], rotary: Rotary) -> list[Segment]:
    segs = [Segment(Group(heads=(i,), budget=4 + w, scorer=StreamingLLM(sinks=4, window=w)), rotary)
            for i, w in enumerate(windows)]
    for seg in segs:  # a prefill, the eviction down to the budget, the first ring turns: settled
        seg.push(torch.randn(1, 1, 2000, D), torch.randn(1, 1, 2000, D))
        for _ in range(3):
            x = torch.randn(1, 1, 1, D)
            seg.push(x, x)
    return segs


def measure(count: int, rounds: int) -> dict:
    rotary = Rotary(1.0 / (10000 ** (torch.arange(0, D, 2).float() / D)))
    windows = [100 + 150 * i for i in range(count)]
    alone, together = _segments(windows, rotary), _segments(windows, rotary)
    rings = RingSet.of(together, least=1)
    key = torch.randn(1, count, 1, D)
    own, setwise = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(100):
            for i, seg in enumerate(alone):
                seg.push(key[:, i:i + 1], key[:, i:i + 1])
        own.append((time.perf_counter() - t) / 100)
        t = time.perf_counter()
        for _ in range(100):
            rings.step(key, key)
        setwise.append((time.perf_counter() - t) / 100)
    assert rings.intact()
    a, b = statistics.median(own), statistics.median(setwise)
    return {"segments": count, "windows": windows, "own_us": round(1e6 * a, 1), "set_us": round(1e6 * b, 1),
            "speedup": round(a / b, 2)}


def table(rows: list[dict]) -> str:
    lines = ["| segments per layer | own ring steps µs | one set step µs | set speed-up |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['segments']} | {r['own_us']} | {r['set_us']} | {r['speedup']:.2f}x |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--segments", default="2,3,4,8", type=positive_ints, help="segments per layer, e.g. 2,3,4,8")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=OUT / "rings", help="output stem (.json and .md are added)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    meta = run_meta(None, args)
    with torch.no_grad():
        rows = [measure(c, args.rounds) for c in args.segments]
    print(table(rows))
    write(args.out, rows, table(rows), meta)


if __name__ == "__main__":
    main()
