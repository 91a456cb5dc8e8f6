"""``kvlab needle | memory | latency | translate``: one evaluation grid each, rows + a table + a figure.

Every command runs its grid of cells (one row each, the same rows the lab writes), prints a table,
writes the rows to ``--out DIR/rows/<id>.json`` (default ``runs/<command>``) and the figure to
``DIR/<command>.png``. Methods: repeated ``--method`` flags or one ``;``-separated list.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvlab.cli import tables
from kvlab.cli.common import (add_method_arg, add_model_args, add_out_arg, add_progress_arg, check_methods, load_model,
                              methods_of, progress_on, split_list, split_specs)
from kvlab.errors import KvlabError

__all__ = ["register", "split_specs"]  # split_specs lives in kvlab.cli.common; kept importable from here


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("needle", help="needle-in-a-haystack accuracy over lengths x depths")
    _common(p, "qwen2.5-0.5b", "full")
    p.add_argument("--lengths", default="2000,5000,10000,20000", help="context lengths in tokens")
    p.add_argument("--depths", default="0,25,50,75,100", help="needle depths in percent of the filler")
    p.add_argument("--samples", type=int, default=1, help="haystacks per (length, depth) (default 1)")
    p.add_argument("--variant", default="passkey", help="passkey | multikey (RULER-style, distractor keys)")
    p.add_argument("--keys", type=int, default=4, help="needles in the multikey variant (one asked)")
    p.add_argument("--question-aware", action="store_true",
                   help="also run with the question in the prefill the method scores")
    p.add_argument("--filler", "--data", dest="data", default="pydoc",
                   help="filler text(s), comma-separated: pydoc | pg19 | wikitext-2 | PATH (each is a cell)")
    p.add_argument("--chunk-size", type=int, default=512, help="context tokens per forward pass")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.set_defaults(func=run_needle)

    p = sub.add_parser("memory", help="KV bytes and peak process memory vs sequence length")
    _common(p, "smollm2-135m", "full;streaming:sinks=4,window=1020")
    p.add_argument("--lengths", default="2000,5000,10000,20000", help="sequence lengths in tokens")
    p.add_argument("--data", default="pydoc", help="pydoc | pg19 | wikitext-2 | PATH")
    p.add_argument("--chunk-size", type=int, default=256, help="tokens per forward pass")
    p.set_defaults(func=run_memory)

    p = sub.add_parser("latency", help="per-token decode latency vs position, and prefill time")
    _common(p, "smollm2-135m", "full")
    p.add_argument("--cache-sizes", default="512,1024,2048,4096",
                   help="also run streaming caches of these sizes (tokens, sinks included); 'none' for none")
    p.add_argument("--sinks", default="4", help="sink counts of those streaming caches, e.g. 0,4,16")
    p.add_argument("--tokens", type=int, default=5000, help="sequence length (default 5000)")
    p.add_argument("--prefill", type=int, default=512, help="prompt tokens prefilled (timed separately)")
    p.add_argument("--warmup", type=int, default=200, help="untimed decode steps after the prefill")
    p.add_argument("--runs", type=int, default=3, help="runs per method, interleaved across methods (default 3)")
    p.add_argument("--probe-every", type=int, default=500, help="positions between timed probes")
    p.add_argument("--probe-steps", type=int, default=8, help="timed decode steps per probe")
    p.add_argument("--dense", action="store_true", help="time every token (slow on a CPU)")
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--data", default="pydoc")
    p.set_defaults(func=run_latency)

    p = sub.add_parser("translate", help="simultaneous translation: wait-k, batch/group positions, BLEU/chrF/AL/LAAL")
    _common(p, "qwen2.5-0.5b", "full")
    p.add_argument("--k", default=None, help="wait-k values (default 3,5,7; with --document 0: each sentence whole)")
    p.add_argument("--positions", default=None, help="batch and/or group (GPE) (default batch,group; --document: batch)")
    p.add_argument("--phi", default="0", help="first target position(s) in group mode, e.g. 0,100")
    p.add_argument("--src", default="en", help="source language code (default en)")
    p.add_argument("--tgt", default="fr", help="target language code (default fr)")
    p.add_argument("--data", default="newstest2014", help="newstest2014 | SRC_FILE,TGT_FILE | PATH.json")
    p.add_argument("--max-samples", type=int, default=50)
    p.add_argument("--max-word-tokens", type=int, default=12)
    p.add_argument("--no-offline", action="store_true", help="skip the offline (full-sentence) upper bound")
    p.add_argument("--document", action="store_true",
                   help="stream consecutive pairs as one long document through one cache (--stream-tokens long)")
    p.add_argument("--stream-tokens", default=None,
                   help="document lengths in tokens, source + reference (with --document; default 2000)")
    p.set_defaults(func=run_translate)


def _common(p: argparse.ArgumentParser, model: str, method: str) -> None:
    add_model_args(p, default=model)
    add_method_arg(p, method, extra=" or ','")
    add_out_arg(p, "runs/<command>")
    p.add_argument("--seed", type=int, default=0)
    add_progress_arg(p)


def run_needle(args: argparse.Namespace) -> int:
    from kvlab.evals import needle
    from kvlab.evals.haystack import make_samples

    lengths = split_list(args.lengths, int, "--lengths")
    depths = split_list(args.depths, float, "--depths")
    settings = [False, True] if args.question_aware else [False]
    fillers = split_list(args.data, str, "--filler")
    cells = [(m, needle.Params(length=n, depth=d, samples=args.samples, variant=args.variant, keys=args.keys,
                               question_aware=qa, data=f, chunk_size=args.chunk_size,
                               max_new_tokens=args.max_new_tokens, seed=args.seed))
             for m in methods_of(args) for f in fillers for qa in settings for n in lengths for d in depths]

    def check(tok: Any) -> None:  # each text is long enough for every length, before any cell runs
        for f in fillers:
            for n in sorted({min(lengths), max(lengths)}):
                make_samples(tok, n, [0.0], args.seed, data=f, variant=args.variant, keys=args.keys)

    return _run(args, "needle", cells, check, tables.needle)


def run_memory(args: argparse.Namespace) -> int:
    from kvlab.evals import memory

    lengths = split_list(args.lengths, int, "--lengths")
    cells = [(m, memory.Params(tokens=n, data=args.data, chunk_size=args.chunk_size, seed=args.seed))
             for m in methods_of(args) for n in lengths]
    return _run(args, "memory", cells, lambda tok: memory.load_ids(tok, args.data, max(lengths)), tables.memory)


def latency_specs(cache_sizes: str, sinks: str) -> list[str]:
    """Streaming specs for each (cache size, sink count): ``streaming:sinks=S,window=SIZE-S``."""
    if cache_sizes.strip().lower() in ("", "none"):
        return []
    specs = []
    for size in split_list(cache_sizes, int, "--cache-sizes"):
        for s in split_list(sinks, int, "--sinks"):
            if not 0 <= s < size:
                raise KvlabError(f"--sinks {s} must be at least 0 and below the cache size {size}")
            specs.append(f"streaming:sinks={s},window={size - s}")
    return specs


def run_latency(args: argparse.Namespace) -> int:
    from kvlab.evals import latency, memory

    every = args.probe_steps if args.dense else args.probe_every
    params = latency.Params(tokens=args.tokens, prefill=args.prefill, warmup=args.warmup, runs=args.runs,
                            probe_every=every, probe_steps=args.probe_steps, chunk_size=args.chunk_size,
                            data=args.data, seed=args.seed)
    specs = list(dict.fromkeys(methods_of(args) + check_methods(latency_specs(args.cache_sizes, args.sinks))))

    def interleaved(model: Any, tok: Any, cells: list[tuple[str, Any]]):
        results = latency.evaluate_many(model, tok, specs, params, progress=progress_on(args))
        for method, _ in cells:
            yield results[method], results[method].get("runtime_s")

    return _run(args, "latency", [(m, params) for m in specs], lambda tok: memory.load_ids(tok, args.data, args.tokens),
                tables.latency, interleaved)


def run_translate(args: argparse.Namespace) -> int:
    from kvlab.evals import translate
    from kvlab.evals.pairs import load_pairs

    if args.document:
        return run_document(args)
    if args.stream_tokens is not None:
        raise KvlabError("--stream-tokens is the length of a document: add --document")
    ks = split_list(args.k or "3,5,7", int, "--k")
    positions = split_list(args.positions or "batch,group", str, "--positions")
    phis = split_list(args.phi, int, "--phi")
    base = dict(src_lang=args.src, tgt_lang=args.tgt, data=args.data, max_samples=args.max_samples,
                max_word_tokens=args.max_word_tokens, seed=args.seed)
    cells = []
    for m in methods_of(args):
        if not args.no_offline:
            cells.append((m, translate.Params(mode="offline", **base)))
        for pos in positions:
            for k in ks:
                for phi in (phis if pos == "group" else [0]):
                    cells.append((m, translate.Params(mode="waitk", k=k, positions=pos, phi=phi, **base)))
    if not cells:
        raise KvlabError("nothing to run: --no-offline and no wait-k cell")
    load_pairs(args.data, args.src, args.tgt, args.max_samples)  # bad data fails before the model loads
    return _run(args, "translate", cells, None, tables.translate)


def run_document(args: argparse.Namespace) -> int:
    """``kvlab translate --document``: one cell per method x document length x positions x k x phi."""
    from kvlab.evals import document
    from kvlab.evals.pairs import load_pairs

    lengths = split_list(args.stream_tokens or "2000", int, "--stream-tokens")
    ks = split_list(args.k or "0", int, "--k")
    positions = split_list(args.positions or "batch", str, "--positions")
    phis = split_list(args.phi, int, "--phi")
    base = dict(src_lang=args.src, tgt_lang=args.tgt, data=args.data, max_word_tokens=args.max_word_tokens,
                seed=args.seed)
    cells = [(m, document.Params(tokens=n, k=k, positions=pos, phi=phi, **base))
             for m in methods_of(args) for pos in positions for k in ks
             for phi in (phis if pos == "group" else [0]) for n in lengths]
    load_pairs(args.data, args.src, args.tgt)  # bad data fails before the model loads

    def check(tok: Any) -> None:  # the data holds the longest document, before any cell runs
        document.build_document(tok, dataclasses.replace(cells[0][1], tokens=max(lengths)))

    return _run(args, "translate_document", cells, check, tables.document)


def _run(args: argparse.Namespace, name: str, cells: list[tuple[str, Any]], check: Callable[[Any], Any] | None,
         table: Callable[[list[dict]], None], evaluate_all: Callable | None = None) -> int:
    """Load the model, run ``cells`` (one after another, or all at once through ``evaluate_all(model, tok,
    cells)`` yielding ``(metrics, runtime_s)`` per cell), write a row per cell, print the table, draw the figure."""
    from kvlab.evals import get_eval
    from kvlab.evals.common import cell_config
    from kvlab.results import make_row, write_json_atomic

    module = get_eval(name)
    out = Path(args.out or Path("runs") / name)
    model, tok = load_model(args)
    if check is not None:
        check(tok)

    def one_by_one(model: Any, tok: Any, cells: list[tuple[str, Any]]):
        for method, params in cells:
            start = time.perf_counter()
            metrics = module.evaluate(model, tok, method, params, progress=progress_on(args))
            yield metrics, time.perf_counter() - start

    rows = []
    results = (evaluate_all or one_by_one)(model, tok, cells)
    for i, ((method, params), (metrics, runtime)) in enumerate(zip(cells, results), 1):
        config = cell_config(args.model, method, name, params, device=args.device, dtype=args.dtype)
        row = make_row(name, config, metrics, higher_is_better=module.HIGHER_IS_BETTER, device=str(model.device),
                       runtime_s=runtime, notes=metrics.get("note"))
        write_json_atomic(out / "rows" / f"{row['id']}.json", row)
        rows.append(row)
        took = "" if row["runtime_s"] is None else f" in {row['runtime_s']:.1f}s"
        print(f"[{i}/{len(cells)}] {name} {method} {_point(params)} done{took}", file=sys.stderr)
    table(rows)
    figure = _figure(name, rows, out)
    print(f"wrote {len(rows)} rows to {out / 'rows'}" + (f" and the figure {figure}" if figure else ""))
    return 0


def _figure(name: str, rows: list[dict], out: Path) -> Path | None:
    """``out/<name>.png`` at 150 dpi: the lab's needle and memory figures, the evaluation's own otherwise."""
    from kvlab.evals import figures
    from kvlab.lab import eval_figures
    from kvlab.lab.frame import rows_frame
    from kvlab.lab.plots import translation_vs_length
    from kvlab.lab.plotting import NoData, save

    if name in ("latency", "translate"):
        own = {"latency": figures.latency_figure, "translate": figures.translate_figure}[name]
        return own(rows, out / f"{name}.png")
    draw = {"needle": eval_figures.needle_heatmap, "memory": lambda df: eval_figures.memory_figure(df, min_lengths=1),
            "translate_document": lambda df: translation_vs_length(df, min_lengths=1)}
    try:
        fig = draw[name](rows_frame(rows))
    except NoData as exc:
        print(f"no figure: {exc}", file=sys.stderr)
        return None
    return save(fig, out / name, dpi=150, formats=("png",))[0]


def _point(params: Any) -> str:
    keys = ("length", "depth", "question_aware", "tokens", "mode", "positions", "k", "phi")
    return " ".join(f"{k}={getattr(params, k)}" for k in keys if hasattr(params, k))
