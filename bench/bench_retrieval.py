"""Passkey accuracy vs the share of the KV cache kept: head-aware budgets against StreamingLLM and H2O.

    python bench/bench_retrieval.py --profile q.json [--model qwen2.5-0.5b] [--length 3000]
        [--depths 10,30,50,70,90] [--fractions 0.1,0.25,0.5,0.75]

The question-agnostic needle task of ``kvlab needle`` (:mod:`kvlab.evals.needle`): a passkey hidden at a
depth of natural text (pydoc), the context streamed through the cache ``--chunk-size`` tokens at a time and
compressed before the question is seen. At each fraction ``f`` of the context kept (``budget = round(f *
length)`` tokens per KV head), every method runs at that budget:

    streaming            streaming:sinks=4,window=budget-4
    h2o                  h2o:budget=budget,recent=budget//4
    head-aware           head-aware:budget=budget,profile=P                 (the mean over KV heads is budget)
    head-aware shuffled  head-aware:...,assign=shuffled,seed=0               (ablation: labels permuted)
    head-aware even      head-aware:...,spread=even                          (ablation: one window for local heads)
    head-aware per-layer head-aware:...,scope=layer                          (ablation: a pool per layer)

and the full cache once. "KV kept" is what the cache holds between forward passes (the budget: ``f`` of the
context); "KV peak" is its measured peak over the full cache's bytes, which adds the chunk being fed on top
of the budget. One JSON line per (method, depth) is appended to ``--out`` as it finishes; a rerun
skips the lines already there (so an interrupted run resumes). Prints the accuracy-vs-KV table and writes
``retrieval.md`` and ``retrieval.png`` beside the JSONL.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import kvlab
from kvlab.evals import needle
from kvlab.results import git_hash, versions, write_text_atomic

OUT = Path(__file__).resolve().parent / "results" / "retrieval.jsonl"
METHODS = {
    "streaming": "streaming:sinks=4,window={w}",
    "h2o": "h2o:budget={b},recent={r}",
    "head-aware": "head-aware:budget={b},profile={p}",
    "head-aware shuffled": "head-aware:budget={b},profile={p},assign=shuffled,seed=0",
    "head-aware even": "head-aware:budget={b},profile={p},spread=even",
    "head-aware per-layer": "head-aware:budget={b},profile={p},scope=layer",
}
ABLATIONS = ("head-aware shuffled", "head-aware even", "head-aware per-layer")
ABLATION_STYLE = (("s--", "#CC79A7"), ("^:", "#999999"), ("v-.", "#56B4E9"))


def grid(fractions: list[float], length: int, profile: str, names: list[str]) -> list[tuple[str, float, str]]:
    """(method name, fraction, spec) for every method at every fraction, then the full cache (fraction 1)."""
    out = []
    for f in fractions:
        b = round(f * length)
        for name in names:
            out.append((name, f, METHODS[name].format(w=b - 4, b=b, r=b // 4, p=profile)))
    return [("full", 1.0, "full"), *out]


def table(rows: list[dict]) -> str:
    """Accuracy (correct / samples) and measured KV share per method and fraction, markdown."""
    by: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        by.setdefault((r["name"], r["fraction"]), []).append(r)
    full = [r["correct"] for r in by.get(("full", 1.0), [])]
    full_acc = sum(full) / len(full) if full else None
    lines = ["| method | KV kept | KV peak (measured) | accuracy | of full's accuracy | samples |",
             "|---|---:|---:|---:|---:|---:|"]
    for (name, f), part in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        acc = sum(r["correct"] for r in part) / len(part)
        kv = 100 * sum(r["kv_bytes_peak"] / r["kv_bytes_full"] for r in part) / len(part)
        rel = f"{acc / full_acc:.2f}" if full_acc else "n/a"
        lines.append(f"| {name} | {100 * f:.0f}% | {kv:.1f}% | {acc:.2f} | {rel} | {len(part)} |")
    return "\n".join(lines)


def figure(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    from kvlab.lab.plotting import color

    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    names = sorted({r["name"] for r in rows} - {"full"})
    for name in names:
        pts: dict[float, list[dict]] = {}
        for r in rows:
            if r["name"] == name:
                pts.setdefault(r["fraction"], []).append(r)
        xs = sorted(pts)
        acc = [sum(r["correct"] for r in pts[x]) / len(pts[x]) for x in xs]
        ablation = name in ABLATIONS  # own colours and dashes, drawn on top: they can coincide with another line
        style = ABLATION_STYLE[ABLATIONS.index(name)] if ablation else ("o-", color(name))
        ax.plot([100 * x for x in xs], acc, style[0], color=style[1], label=name, zorder=3 if ablation else 2,
                markersize=8 if ablation else 6, alpha=0.85)
    full = [r["correct"] for r in rows if r["name"] == "full"]
    if full:
        ax.axhline(sum(full) / len(full), color=color("full"), linestyle=":", label="full cache")
    ax.set_xlabel("KV cache kept between forward passes (% of the context)")
    ax.set_ylabel("passkey accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Question-agnostic passkey retrieval vs KV kept", loc="left")
    ax.legend(frameon=False)
    fig.savefig(path, dpi=150)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--profile", required=True, help="head profile of the model (kvlab heads profile)")
    p.add_argument("--model", default="qwen2.5-0.5b")
    p.add_argument("--length", type=int, default=3000, help="context tokens")
    p.add_argument("--depths", default="10,30,50,70,90", help="needle depths, percent")
    p.add_argument("--fractions", default="0.1,0.25,0.5,0.75", help="shares of the context kept")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of: {', '.join(METHODS)}")
    p.add_argument("--ablation-fractions", default="0.25,0.5",
                   help=f"fractions the ablations ({', '.join(ABLATIONS)}) run at")
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT, help="JSONL of per-sample results (appended; resumes)")
    args = p.parse_args()
    names = [n.strip() for n in args.methods.split(",")]
    bad = [n for n in names if n not in METHODS]
    if bad or not Path(args.profile).is_file():
        print(f"error: unknown method {bad}" if bad else f"error: profile '{args.profile}' not found", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    depths = [float(d) for d in args.depths.split(",")]
    ablation_at = {float(f) for f in args.ablation_fractions.split(",")}
    cells = [c for c in grid([float(f) for f in args.fractions.split(",")], args.length, args.profile, names)
             if c[0] not in ABLATIONS or c[1] in ablation_at]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in args.out.read_text().splitlines()] if args.out.exists() else []
    have = {(r["spec"], r["depth"], r["length"]) for r in done}
    model, tok = kvlab.load(args.model)
    meta = {"model": args.model, "git_hash": git_hash(), "transformers": versions().get("transformers")}
    for name, fraction, spec in cells:
        for depth in depths:
            if (spec, depth, args.length) in have:
                continue
            t = time.perf_counter()
            params = needle.Params(length=args.length, depth=depth, chunk_size=args.chunk_size)
            m = needle.evaluate(model, tok, spec, params)
            row = {"name": name, "fraction": fraction, "spec": spec, "depth": depth, "length": args.length,
                   "correct": m["correct"], "answer": m["answers"][0], "expected": m["expected"][0],
                   "kv_bytes_peak": m["kv_bytes_peak"], "kv_bytes_full": m["kv_bytes_full"],
                   "seconds": round(time.perf_counter() - t, 1), **meta}
            with args.out.open("a") as fh:  # one whole line per finished sample
                fh.write(json.dumps(row) + "\n")
            done.append(row)
            print(f"{name} {fraction:g} depth {depth:g}: {'ok' if row['correct'] else 'miss'} "
                  f"({row['answer']!r}, expected {row['expected']}) {row['seconds']}s", flush=True)
    md = table([r for r in done if r["length"] == args.length])
    print(md)
    write_text_atomic(args.out.with_suffix(".md"), md + "\n")
    figure([r for r in done if r["length"] == args.length], args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
