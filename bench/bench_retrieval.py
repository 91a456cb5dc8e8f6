"""Passkey accuracy vs the share of the KV cache kept, on several filler texts: head-aware budgets against
StreamingLLM and H2O.

    python bench/bench_retrieval.py --profile q.json [--model qwen2.5-0.5b] [--lengths 2000,4000]
        [--fillers pydoc,pg19,wikitext-2] [--depths 10,30,50,70,90] [--samples 2] [--fractions 0.1,0.25,0.5,0.75]

The question-agnostic needle task of ``kvlab needle`` (:mod:`kvlab.evals.needle`): a passkey hidden at a
depth of a filler text, the context streamed through the cache ``--chunk-size`` tokens at a time and
compressed before the question is seen; ``--samples`` haystacks per (filler, length, depth). Without
``--profile`` only the methods that need none run (streaming, h2o).

At each fraction ``f`` of the context kept (``budget = round(f * length)`` tokens per KV head), every method
runs at that budget:

    streaming            streaming:sinks=4,window=budget-4
    h2o                  h2o:budget=budget,recent=budget//4
    head-aware           head-aware:budget=budget,profile=P                 (the mean over KV heads is budget)
    head-aware shuffled  head-aware:...,assign=shuffled,seed=0               (ablation: labels permuted)
    head-aware even      head-aware:...,spread=even                          (ablation: one window for local heads)
    head-aware per-layer head-aware:...,scope=layer                          (ablation: a pool per layer)
    head-aware keydiff   head-aware:...,retrieve=keydiff                     (variant, only when named: retrieval heads by KeyDiff)
    head-aware pooled    head-aware:...,pool=5                               (variant, only when named: scored heads rank
                                                                              each token by its 5 neighbours' best, SnapKV)

and the full cache once. "KV kept" is what the cache holds between forward passes (the budget: ``f`` of the
context); "KV peak" is its measured peak over the full cache's bytes, which adds the chunk being fed on top
of the budget. One JSON line per (method, length, filler, depth) is appended to ``--out`` as it finishes; a
rerun skips the lines already there (so an interrupted run resumes). Prints one table per length: accuracy
on each filler, their mean and the worst filler (a method tuned to one haystack shows as a low worst beside
its mean); writes ``retrieval.md`` and ``retrieval.png`` (the mean over fillers) beside the JSONL.
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
    "head-aware keydiff": "head-aware:budget={b},profile={p},retrieve=keydiff",
    "head-aware pooled": "head-aware:budget={b},profile={p},pool=5",
}
ABLATIONS = ("head-aware shuffled", "head-aware even", "head-aware per-layer")
VARIANTS = ("head-aware keydiff", "head-aware pooled")  # run only when named in --methods
# own markers and colours, drawn on top: these lines can coincide with another, or share a method's colour
STYLE = dict(zip(ABLATIONS + VARIANTS, (("s--", "#CC79A7"), ("^:", "#999999"), ("v-.", "#56B4E9"),
                                        ("P--", "#0072B2"), ("D--", "#D55E00"))))


def grid(fractions: list[float], length: int, profile: str, names: list[str]) -> list[tuple[str, float, str]]:
    """(method name, fraction, spec) for every method at every fraction, then the full cache (fraction 1)."""
    out = []
    for f in fractions:
        b = round(f * length)
        for name in names:
            out.append((name, f, METHODS[name].format(w=b - 4, b=b, r=b // 4, p=profile)))
    return [("full", 1.0, "full"), *out]


def _acc(part: list[dict]) -> float:
    return sum(r["correct"] for r in part) / sum(r.get("samples", 1) for r in part)


def table(rows: list[dict]) -> str:
    """Per method and fraction (rows of one length): accuracy on each filler, the mean over fillers, the worst
    filler, the mean against the full cache's, and the measured KV share; markdown."""
    fillers = list(dict.fromkeys(r.get("filler", "pydoc") for r in rows))
    by: dict[tuple[str, float], dict[str, list[dict]]] = {}
    for r in rows:
        by.setdefault((r["name"], r["fraction"]), {}).setdefault(r.get("filler", "pydoc"), []).append(r)

    def mean(cell: dict[str, list[dict]]) -> float:
        return sum(_acc(p) for p in cell.values()) / len(cell)

    full = mean(by[("full", 1.0)]) if ("full", 1.0) in by else None
    lines = ["| method | KV kept | KV peak (measured) | " + " | ".join(fillers) + " | mean | worst | of full's mean "
             "| samples |", "|---|---:|---:|" + "---:|" * (len(fillers) + 4)]
    for (name, f), cell in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        acc = {k: _acc(p) for k, p in cell.items()}
        worst = min(acc, key=lambda k: (acc[k], k))
        part = [r for p in cell.values() for r in p]
        kv = 100 * sum(r["kv_bytes_peak"] / r["kv_bytes_full"] for r in part) / len(part)
        rel = f"{mean(cell) / full:.2f}" if full else "n/a"
        per = " | ".join(f"{acc[k]:.2f}" if k in acc else "n/a" for k in fillers)
        lines.append(f"| {name} | {100 * f:.0f}% | {kv:.1f}% | {per} | {mean(cell):.2f} | {acc[worst]:.2f} ({worst}) "
                     f"| {rel} | {sum(r.get('samples', 1) for r in part)} |")
    return "\n".join(lines)


def figure(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    from kvlab.lab.plotting import color

    fig = Figure(figsize=(8.0, 4.2), layout="constrained")
    ax = fig.subplots()
    names = sorted({r["name"] for r in rows} - {"full"})
    for name in names:
        pts: dict[float, list[dict]] = {}
        for r in rows:
            if r["name"] == name:
                pts.setdefault(r["fraction"], []).append(r)
        xs = sorted(pts)
        acc = [_acc(pts[x]) for x in xs]
        own = name in STYLE
        style = STYLE[name] if own else ("o-", color(name))
        ax.plot([100 * x for x in xs], acc, style[0], color=style[1], label=name, zorder=3 if own else 2,
                markersize=8 if own else 6, alpha=0.85)
    full = [r for r in rows if r["name"] == "full"]
    if full:
        ax.axhline(_acc(full), color=color("full"), linestyle=":", label="full cache")
    ax.set_xlabel("KV cache kept between forward passes (% of the context)")
    ax.set_ylabel("passkey accuracy (all fillers)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Question-agnostic passkey retrieval vs KV kept", loc="left")
    ax.legend(frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))  # beside the axes: the lines cross mid-plot
    fig.savefig(path, dpi=150)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--profile", help="head profile of the model (kvlab heads profile); needed by head-aware")
    p.add_argument("--model", default="qwen2.5-0.5b")
    p.add_argument("--lengths", "--length", default="2000,4000", help="context tokens, comma-separated")
    p.add_argument("--fillers", default="pydoc,pg19,wikitext-2", help="filler texts (pydoc | pg19 | wikitext-2 | PATH)")
    p.add_argument("--samples", type=int, default=2, help="haystacks per (length, filler, depth)")
    p.add_argument("--depths", default="10,30,50,70,90", help="needle depths, percent")
    p.add_argument("--fractions", default="0.1,0.25,0.5,0.75", help="shares of the context kept")
    p.add_argument("--methods", help=f"comma-separated, of: {', '.join(METHODS)} (default: all; streaming,h2o "
                                      "without --profile)")
    p.add_argument("--ablation-fractions", default="0.25,0.5",
                   help=f"fractions the ablations ({', '.join(ABLATIONS)}) run at")
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT, help="JSONL of per-sample results (appended; resumes)")
    args = p.parse_args()
    default = [n for n in METHODS if n not in VARIANTS] if args.profile else ("streaming", "h2o")
    names = [n.strip() for n in (args.methods or ",".join(default)).split(",")]
    bad = [n for n in names if n not in METHODS]
    error = f"unknown method {bad}" if bad else None
    has_profile = bool(args.profile) and Path(args.profile).is_file()
    if not error and any(n.startswith("head-aware") for n in names) and not has_profile:
        error = f"profile '{args.profile}' not found (head-aware needs one: kvlab heads profile)"
    lengths = [int(n) for n in args.lengths.split(",")]
    fillers = [f.strip() for f in args.fillers.split(",") if f.strip()]
    if not error and args.samples < 1:
        error = f"--samples must be at least 1, got {args.samples}"
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    depths = [float(d) for d in args.depths.split(",")]
    ablation_at = {float(f) for f in args.ablation_fractions.split(",")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in args.out.read_text().splitlines()] if args.out.exists() else []
    have = {(r["spec"], r["depth"], r["length"], r.get("filler", "pydoc"), r.get("samples", 1)) for r in done}
    model, tok = kvlab.load(args.model)
    meta = {"model": args.model, "git_hash": git_hash(), "transformers": versions().get("transformers")}
    for length in lengths:
        cells = [c for c in grid([float(f) for f in args.fractions.split(",")], length, args.profile, names)
                 if c[0] not in ABLATIONS or c[1] in ablation_at]
        for filler in fillers:
            for name, fraction, spec in cells:
                for depth in depths:
                    if (spec, depth, length, filler, args.samples) in have:
                        continue
                    t = time.perf_counter()
                    params = needle.Params(length=length, depth=depth, samples=args.samples, data=filler,
                                           chunk_size=args.chunk_size)
                    m = needle.evaluate(model, tok, spec, params)
                    row = {"name": name, "fraction": fraction, "spec": spec, "depth": depth, "length": length,
                           "filler": filler, "samples": args.samples, "correct": m["correct"], "answers": m["answers"],
                           "expected": m["expected"], "kv_bytes_peak": m["kv_bytes_peak"],
                           "kv_bytes_full": m["kv_bytes_full"], "seconds": round(time.perf_counter() - t, 1), **meta}
                    with args.out.open("a") as fh:  # one whole line per finished cell
                        fh.write(json.dumps(row) + "\n")
                    done.append(row)
                    print(f"{name} {fraction:g} {filler} {length} depth {depth:g}: {row['correct']}/{args.samples} "
                          f"({row['answers']!r}, expected {row['expected']}) {row['seconds']}s", flush=True)
    mine = [r for r in done if r.get("samples", 1) == args.samples and r.get("filler", "pydoc") in fillers]
    md = "\n\n".join(f"length {n}\n\n{table([r for r in mine if r['length'] == n])}" for n in lengths
                     if any(r["length"] == n for r in mine))
    print(md)
    write_text_atomic(args.out.with_suffix(".md"), md + "\n")
    figure([r for r in mine if r["length"] == lengths[-1]], args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
