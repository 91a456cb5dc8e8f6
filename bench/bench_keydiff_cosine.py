"""KeyDiff's cosine in three reads of the keys, against KeyDiff's own: the time it saves and the tokens it changes.

    python bench/bench_keydiff_cosine.py [--model smollm2-135m] [--tokens 2048] [--chunk 16] [--budget 512]

KeyDiff scores each kept key by minus its cosine to the mean of the head's unit keys, in five passes over the keys
with each key's two norms kept since its arrival, as dense storage runs it, or seven computing them too (keys that
move: ``kvlab.methods.keydiff``). ``ThreeReads`` computes the same cosine from the keys' norms, the anchor as one
matmul (the norms' inverses times the keys) and the dots as another: the same formula, rounded otherwise. Not landed
(docs/BENCHMARKS.md, "Every method at 4k and 16k, alone"): this script says why, in two figures:

1. the scoring alone, on random keys (``--heads`` heads of ``--kept`` tokens, head_dim 64, float32, one thread):
   ``--rounds`` rounds of 200 calls of each (KeyDiff with its norms kept, KeyDiff computing them, three reads),
   interleaved; the median µs per call and the ratios, computed here;
2. streaming perplexity on real text (``pydoc``, ``--tokens`` tokens fed ``--chunk`` at a time, batch 1, float32)
   through a ``keydiff:budget=B`` cache of each, side by side: after how many forward passes their kept tokens
   (true positions, per layer and head) differ, the largest difference of their logits, and each perplexity.

Prints a table; writes bench/results/keydiff_cosine.{json,md} (``--out`` another stem).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from timing import run_meta, run_script, write

import kvlab
from kvlab.data import load_text, tokenize
from kvlab.methods.keydiff import COSINE_EPS, NORMALIZE_EPS, KeyDiff

OUT = Path(__file__).resolve().parent / "results"


@dataclass
class ThreeReads(KeyDiff):
    """KeyDiff, its cosine from the keys' norms and two matmuls (registered nowhere: this script builds it)."""

    fixed_scores = False  # it reads the keys alone: no norms kept

    def key_scores(self, seg) -> torch.Tensor:
        keys, _, valid = seg.stored()
        k = keys.float()  # (B, h, n, D)
        inv = torch.linalg.vector_norm(k, dim=-1).clamp_min_(NORMALIZE_EPS).reciprocal_()  # (B, h, n)
        weights = inv if valid is None else inv * valid
        anchor = torch.matmul(weights.unsqueeze(-2), k)  # (B, h, 1, D): the sum of the unit keys
        anchor = anchor.div_(torch.linalg.vector_norm(anchor, dim=-1, keepdim=True).clamp_min_(COSINE_EPS))
        return torch.matmul(k, anchor.mT).squeeze(-1).mul_(inv).neg_()  # (B, h, n)


def scoring(heads: int, kept: int, rounds: int) -> dict:
    keys = torch.randn(1, heads, kept, 64, generator=torch.Generator().manual_seed(0))
    own, three = KeyDiff(budget=kept), ThreeReads(budget=kept)
    kept_norms = SimpleNamespace(stored=lambda: (keys, keys, None), scores=own.arrival_scores(keys))
    from_keys = SimpleNamespace(stored=lambda: (keys, keys, None), scores=None)
    runs = {"keydiff_us": (own, kept_norms), "from_keys_us": (own, from_keys), "three_reads_us": (three, from_keys)}
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (method, seg) in runs.items():
            t = time.perf_counter()
            for _ in range(200):
                method.key_scores(seg)
            times[name].append(1e6 * (time.perf_counter() - t) / 200)
    row = {"heads": heads, "kept": kept, **{k: round(statistics.median(v), 1) for k, v in times.items()}}
    row["kept_norms_same_bits"] = torch.equal(own.key_scores(kept_norms), own.key_scores(from_keys))
    row["max_score_diff"] = (own.key_scores(kept_norms) - three.key_scores(from_keys)).abs().max().item()
    return row


def _kept(cache) -> list[torch.Tensor]:
    """Each segment's kept true positions ``(B, h, n)``, sorted (slot steps store them in any order)."""
    return [seg.stored_state()[2].sort(-1).values for layer in cache.layers for seg in layer.segments]


@torch.no_grad()
def side_by_side(model, ids: torch.Tensor, chunk: int, budget: int) -> dict:
    caches = {"keydiff": kvlab.make_cache(model, KeyDiff(budget=budget)),
              "three_reads": kvlab.make_cache(model, ThreeReads(budget=budget))}
    nll, passes, differ, first, gap = dict.fromkeys(caches, 0.0), 0, 0, None, 0.0
    n = ids.shape[1]
    for start in range(0, n, chunk):
        logits = {name: model(input_ids=ids[:, start:start + chunk], past_key_values=cache, use_cache=True).logits[0]
                  for name, cache in caches.items()}
        target = ids[0, start + 1:start + chunk + 1]
        for name, lg in logits.items():
            nll[name] -= lg[:len(target)].float().log_softmax(-1).gather(1, target[:, None]).sum().item()
        gap = max(gap, (logits["keydiff"] - logits["three_reads"]).abs().max().item())
        passes += 1
        same = all(torch.equal(a, b) for a, b in zip(*(_kept(c) for c in caches.values())))
        if not same:
            differ += 1
            first = passes if first is None else first
    return {"passes": passes, "passes_kept_differ": differ, "first_pass_kept_differ": first,
            "max_logit_diff": round(gap, 4),
            **{f"ppl_{name}": round(math.exp(v / (n - 1)), 4) for name, v in nll.items()}}


def table(score: dict, stream: dict, budget: int) -> str:
    return "\n".join([
        "| figure | KeyDiff | three reads |", "|---|---:|---:|",
        f"| scoring µs per call ({score['heads']} heads, {score['kept']} tokens), norms kept since arrival | "
        f"{score['keydiff_us']} | {score['three_reads_us']} ({score['keydiff_us'] / score['three_reads_us']:.2f}x "
        f"faster) |",
        f"| the same, every norm computed (keys that move) | {score['from_keys_us']} "
        f"({'the same bits' if score['kept_norms_same_bits'] else 'OTHER BITS'}) | |",
        f"| largest score difference | | {score['max_score_diff']:.2g} |",
        f"| perplexity, budget {budget} | {stream['ppl_keydiff']} | {stream['ppl_three_reads']} |",
        f"| forward passes whose kept tokens differ | | {stream['passes_kept_differ']} of {stream['passes']} "
        f"(first: {stream['first_pass_kept_differ']}) |",
        f"| largest logit difference | | {stream['max_logit_diff']} |"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--budget", type=int, default=512)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--kept", type=int, default=1025)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=OUT / "keydiff_cosine", help="output stem (.json and .md are added)")
    args = p.parse_args()
    if min(args.chunk, args.budget, args.heads, args.kept, args.rounds, args.threads) < 1 or args.tokens < 2:
        p.error("--tokens must be 2 or more; --chunk, --budget, --heads, --kept, --rounds and --threads positive")
    torch.set_num_threads(args.threads)
    model, tok = kvlab.load(args.model)
    ids = tokenize(tok, load_text("pydoc"), args.tokens)
    meta = run_meta(model, args)
    with torch.no_grad():
        score = scoring(args.heads, args.kept, args.rounds)
    stream = side_by_side(model, ids, args.chunk, args.budget)
    text = table(score, stream, args.budget)
    print(text)
    write(args.out, [{"scoring": score, "stream": stream}], text, meta)


if __name__ == "__main__":
    run_script(main, __file__)
