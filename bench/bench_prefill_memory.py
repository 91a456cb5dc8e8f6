"""Peak memory added by a one-pass prefill: plain transformers (sdpa, DynamicCache) against kvlab's caches.

Each implementation runs in its own process (a fresh heap): a one-layer random model with SmolLM2-135M's
attention shapes (hidden 576, 9 query / 3 KV heads, head_dim 64) and a small vocabulary (so the logits do
not dominate; only the last position's logits are computed) prefills ``--tokens`` tokens in one forward
pass. The figure is the peak resident memory during that pass minus the resident memory just before it.
Ratios are against plain transformers, computed here, in one run.

    python bench/bench_prefill_memory.py                  # 16,384 tokens: sdpa, kvlab full, kvlab h2o
    python bench/bench_prefill_memory.py --tokens 4096 --methods "full;h2o:budget=1024,recent=256"

Targets (issue 11): kvlab ``full`` at most 1.25x transformers' sdpa, ``h2o`` at most 1.5x.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results"
TARGETS = {"full": 1.25, "h2o": 1.5}


def child(impl: str, tokens: int) -> dict:
    import psutil
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

    import kvlab

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, num_hidden_layers=1, num_attention_heads=9, num_key_value_heads=3,
                      intermediate_size=1536, vocab_size=1024, max_position_embeddings=max(8192, tokens))
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32).eval()
    ids = torch.randint(0, 1024, (1, tokens))

    def run(n: int) -> None:
        cache = DynamicCache(config=model.config) if impl == "sdpa" else kvlab.make_cache(model, impl)
        with torch.no_grad():
            model(ids[:, :n], past_key_values=cache, logits_to_keep=1)

    run(64)  # warm-up: kernels and allocator, not the long pass
    before = psutil.Process().memory_info().rss
    run(tokens)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"impl": impl, "tokens": tokens, "peak_added_mib": round(max(0, peak - before) / 2**20, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--methods", default="full;h2o:budget=1024,recent=256", help="kvlab specs, ';'-separated")
    p.add_argument("--out", type=Path, default=OUT / "prefill_memory", help="output stem (.json and .md are added)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tokens)))
        return
    from kvlab.results import git_hash, machine, versions, write_json_atomic, write_text_atomic

    rows = []
    for impl in ["sdpa", *args.methods.split(";")]:
        out = subprocess.run([sys.executable, __file__, "--child", impl, "--tokens", str(args.tokens)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]["peak_added_mib"]
    lines = [f"Peak RSS added by a one-pass prefill of {args.tokens} tokens (one layer, SmolLM2 shapes)", "",
             "| implementation | peak added (MiB) | vs transformers sdpa | target |", "|---|---:|---:|---:|"]
    for r in rows:
        r["ratio_vs_sdpa"] = round(r["peak_added_mib"] / base, 2) if base else None
        target = TARGETS.get(r["impl"].split(":")[0]) if r["impl"] != "sdpa" else None
        r["target"] = target
        name = "transformers (sdpa, DynamicCache)" if r["impl"] == "sdpa" else f"kvlab `{r['impl']}`"
        lines.append(f"| {name} | {r['peak_added_mib']} | {r['ratio_vs_sdpa']}x | {f'<= {target}x' if target else ''} |")
    table = "\n".join(lines) + "\n"
    print(table)
    meta = {"git_hash": git_hash(), "versions": versions(), "machine": machine("cpu")}
    write_json_atomic(args.out.with_suffix(".json"), {"rows": rows, **meta})
    write_text_atomic(args.out.with_suffix(".md"), table)


if __name__ == "__main__":
    main()
