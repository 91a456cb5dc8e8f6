"""``kvlab ruler``: RULER's synthetic tasks (generated locally) over methods x tasks x lengths.

One row per (method, task, length) in ``--out DIR/rows/`` (the rows the lab writes for eval ``ruler``), the
task x method table printed and written to ``DIR/ruler.md``, and the heatmap ``DIR/ruler.png``. A rerun into
the same folder keeps the cells whose row is there (an interrupted run resumes). Every input is checked
(tasks, methods, lengths, filler, and each task generated once at each length) before anything is written.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from kvlab.cli.common import add_model_args, check_methods, load_model, split_list


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ruler", help="RULER's synthetic tasks (niah, vt, cwe, fwe), generated locally at any length",
                       description="RULER (Hsieh et al. 2024) generated with the model's own tokenizer, scored by "
                                   "recall of the expected strings. Question-agnostic by default: the context is "
                                   "compressed before the question is seen.")
    add_model_args(p, default="qwen2.5-0.5b")
    p.add_argument("--method", "--methods", dest="method", action="append",
                   help="method spec(s): repeat the flag or separate with ';' (default 'full')")
    p.add_argument("--tasks", default="all", help="comma-separated task names, 'niah' or 'all' (default all: "
                                                  "niah_single_1/2/3, niah_multikey_1/2/3, niah_multivalue, "
                                                  "niah_multiquery, vt, cwe, fwe)")
    p.add_argument("--lengths", default="4096", help="prompt lengths in tokens (default 4096)")
    p.add_argument("--samples", type=int, default=2, help="samples per (task, length) (default 2)")
    p.add_argument("--filler", "--data", dest="data", default="pydoc",
                   help="text of the essay haystacks: pydoc | pg19 | wikitext-2 | PATH (default pydoc)")
    p.add_argument("--question-aware", action="store_true",
                   help="put the question in the prefill the method compresses (as kvpress does)")
    p.add_argument("--chunk-size", type=int, default=512, help="context tokens per forward pass (default 512)")
    p.add_argument("--max-new-tokens", type=int, default=0, help="0: RULER's own per task (128 niah, 30 vt, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (default runs/ruler)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_ruler)


def run_ruler(args: argparse.Namespace) -> int:
    from kvlab.cli.evals import split_specs
    from kvlab.evals import ruler, ruler_report
    from kvlab.evals.common import cell_config
    from kvlab.results import config_hash, make_row, write_json_atomic, write_text_atomic

    tasks = ruler.expand_tasks(split_list(args.tasks, str, "--tasks"))
    lengths = split_list(args.lengths, int, "--lengths")
    methods = check_methods(split_specs(args.method or ["full"]))
    cells = [(m, ruler.Params(task=t, length=n, samples=args.samples, data=args.data,
                              question_aware=args.question_aware, chunk_size=args.chunk_size,
                              max_new_tokens=args.max_new_tokens, seed=args.seed))
             for m in methods for n in lengths for t in tasks]
    if any(ruler.TASKS[t].uses_filler for t in tasks):
        from kvlab.data import load_text

        load_text(args.data)  # a missing filler fails before the model loads
    model, tok = load_model(args)
    for n in lengths:  # every task fits every length, before any cell runs
        for t in tasks:
            ruler.make_samples(tok, t, n, 1, args.seed, data=args.data)
    out = Path(args.out or Path("runs") / "ruler")
    progress = sys.stderr.isatty() and not args.no_progress
    rows = []
    from tqdm.auto import tqdm

    for method, params in tqdm(cells, desc="ruler", disable=not progress):
        config = cell_config(args.model, method, "ruler", params, device=args.device, dtype=args.dtype)
        path = out / "rows" / f"{config_hash({'eval': 'ruler', **config})}.json"
        row = json.loads(path.read_text()) if path.is_file() else None  # a rerun keeps the cells already done
        if row is None or row.get("status") != "ok":
            start = time.perf_counter()
            metrics = ruler.evaluate(model, tok, method, params, progress=progress)
            row = make_row("ruler", config, metrics, higher_is_better=ruler.HIGHER_IS_BETTER,
                           device=str(model.device), runtime_s=time.perf_counter() - start, notes=metrics.get("note"))
            write_json_atomic(path, row)
        rows.append(row)
        score = "n/a" if row["metrics"]["score"] is None else f"{row['metrics']['score']:.2f}"
        print(f"[{len(rows)}/{len(cells)}] ruler {method} {params.task} length={params.length}: score {score} "
              f"in {row['runtime_s']:.1f}s", file=sys.stderr)
    md = ruler_report.table(rows)
    print(md)
    write_text_atomic(out / "ruler.md", md + "\n")
    figure = ruler_report.heatmap(rows, out / "ruler.png")
    print(f"wrote {len(rows)} rows to {out / 'rows'}, the table {out / 'ruler.md'} and the figure {figure}")
    return 0
