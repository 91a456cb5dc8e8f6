"""When a slot set's heads should attend in one call: ``SlotSet.attend`` one call for all heads against head by head.

    python bench/bench_set_attention.py [--heads 2,3,4,8] [--dims 64,128] [--groups 2,4] [--rounds 30] [--threads 1]

For each count of KV heads, head size and count of query heads per KV head (``--groups``: one call computes that many
times the KV heads' products), a layer's one-head Ada-KV segments (window 32, kernel 7, float32, batch 1, budgets of
700 to 1,300 tokens) are filled and taken as one ``SlotSet``; then ``--rounds``
rounds (after one to warm up) each time 50 calls of its attention both ways, interleaved: one call over every head's
keys (the other heads' masked out) and one call per head (``FLAT_HEADS`` set at and below the count). The figure is
the median time per call and the ratio (one call / head by head), computed here.
``kvlab.storage.slotsets.FLAT_HEADS`` is the most heads for which one call pays on a CPU. Prints a table; writes
bench/results/set_attention.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from timing import positive_ints, run_meta, write

from kvlab.methods.adakv import AdaKV
from kvlab.storage import Group, SlotSet
from kvlab.storage import slotsets as slotsets_module
from kvlab.storage.dense import Segment

OUT = Path(__file__).resolve().parent / "results"


def slot_set(heads: int, d: int) -> SlotSet:
    """A set of ``heads`` one-head segments of 700 to 1,300 kept tokens, ready for its first step."""
    g = torch.Generator().manual_seed(heads * 1000 + d)
    scorer = AdaKV(budget=1024, window=32, kernel=7)
    keys, values = torch.randn(2, 1, heads, 1301, d, generator=g)  # every head sees the same 1,301 tokens
    segments = []
    for h, n in enumerate(torch.randint(700, 1300, (heads,), generator=g).tolist()):
        seg = Segment(Group(heads=(h,), budget=n, scorer=scorer), None)
        seg.push(keys[:, h:h + 1, :-1], values[:, h:h + 1, :-1])
        seg.push(keys[:, h:h + 1, -1:], values[:, h:h + 1, -1:])  # evicted down to its budget, plus the newest
        segments.append(seg)
    found = SlotSet.of(segments)
    assert found is not None, "the segments did not form a set"
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--heads", default="2,3,4,8", type=positive_ints, help="KV heads of a layer, e.g. 2,3,4,8")
    p.add_argument("--dims", default="64,128", type=positive_ints, help="head sizes, e.g. 64,128")
    p.add_argument("--groups", default="2,4", type=positive_ints, help="query heads per KV head, e.g. 2,4")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=OUT / "set_attention", help="output stem (.json and .md are added)")
    args = p.parse_args()
    if args.rounds < 1 or args.threads < 0 or min(args.heads) < 2:
        p.error("--rounds must be positive, --threads not negative, every --heads 2 or more (a set has two heads)")
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = run_meta(None, args)
    rows, chosen = [], slotsets_module.FLAT_HEADS
    for d, group, heads in ((d, g, h) for d in args.dims for g in args.groups for h in args.heads):
        s = slot_set(heads, d)
        query = torch.randn(1, heads * group, 1, d, generator=torch.Generator().manual_seed(1))
        times = {"one call": [], "head by head": []}
        for r in range(args.rounds + 1):  # the first round warms up, untimed
            for way, flat in (("one call", heads), ("head by head", heads - 1)):
                slotsets_module.FLAT_HEADS = flat
                t = time.perf_counter()
                for _ in range(50):
                    s.attend(query, 0.125)
                if r:
                    times[way].append((time.perf_counter() - t) / 50)
        one, each = (statistics.median(times[w]) for w in ("one call", "head by head"))
        rows.append({"kv_heads": heads, "head_dim": d, "query_heads": heads * group,
                     "keys": s.k.shape[1], "one_call_us": round(1e6 * one, 1),
                     "head_by_head_us": round(1e6 * each, 1), "one_over_each": round(one / each, 3)})
        print(rows[-1], flush=True)
    slotsets_module.FLAT_HEADS = chosen
    lines = ["| KV heads | head size | query heads | keys in all | one call µs | head by head µs | "
             "one call / head by head |", "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['kv_heads']} | {r['head_dim']} | {r['query_heads']} | {r['keys']} | {r['one_call_us']} | "
              f"{r['head_by_head_us']} | {r['one_over_each']:.2f} |" for r in rows]
    text = "\n".join(lines)
    print(text)
    write(args.out, rows, text, meta)


if __name__ == "__main__":
    main()
