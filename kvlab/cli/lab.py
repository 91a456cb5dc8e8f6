"""``kvlab run CONFIG``, ``kvlab report DIR``, ``kvlab plot DIR``: the lab on the command line."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from kvlab.cli.common import add_progress_arg, progress_on
from kvlab.errors import KvlabError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run an experiment config (a grid of cells); rerun to resume",
                       description="Run every cell of a YAML experiment config that has no ok row in the output "
                                   "folder yet. Interrupted runs resume; failed cells are retried by a rerun.")
    p.add_argument("config", help="YAML experiment config (see configs/)")
    p.add_argument("--out", help="output folder (default: the config's 'out', else runs/<name>)")
    p.add_argument("--executor", choices=("local", "ray"), default="local", help="where cells run (default: local)")
    p.add_argument("--ray-address", help="join this Ray cluster (default: start a local Ray)")
    p.add_argument("--gpus-per-cell", type=float, default=0.0, help="GPUs each Ray worker reserves (default: 0)")
    p.add_argument("--cpus-per-cell", type=float, help="CPU cores each Ray worker reserves (and its torch threads; "
                                                        "default: 1)")
    p.add_argument("--workers", type=int, help="Ray workers (default: as many as the resources allow)")
    p.add_argument("--dry-run", action="store_true", help="list the cells and which are done, run nothing")
    add_progress_arg(p)
    p.set_defaults(func=cmd_run)

    r = sub.add_parser("report", help="tables (csv, json, latex, md), success criteria and an HTML page of a run",
                       description="Build the tables of a run folder from its rows only; write them into DIR/report/.")
    r.add_argument("dir", help="run folder (written by 'kvlab run')")
    r.add_argument("--format", default="csv,json,latex,md", help="comma-separated: csv, json, latex, md (default: all)")
    r.add_argument("--criteria", action="store_true", help="check the research plan's success criteria")
    r.add_argument("--html", action="store_true",
                   help="also write one self-contained HTML page with every table and figure")
    r.add_argument("--out", help="folder for the report files (default: DIR/report)")
    r.add_argument("--quiet", action="store_true", help="do not print the tables")
    r.set_defaults(func=cmd_report)

    q = sub.add_parser("plot", help="figures of a run (PNG at 300 dpi and PDF)",
                       description="Draw every figure the rows of a run folder support; skip the others with a reason.")
    q.add_argument("dir", help="run folder (written by 'kvlab run')")
    q.add_argument("--out", help="folder for the figures (default: DIR/figures)")
    q.set_defaults(func=cmd_plot)


def cmd_run(args: argparse.Namespace) -> int:
    from kvlab.lab import worker
    from kvlab.lab.config import load_config, validate_config
    from kvlab.lab.executors import make_executor
    from kvlab.lab.runner import label, run
    from kvlab.lab.store import Store

    cfg = load_config(args.config)  # every name and setting checked before anything loads
    executor = make_executor(args.executor, address=args.ray_address, gpus_per_cell=args.gpus_per_cell,
                             cpus_per_cell=args.cpus_per_cell, workers=args.workers)
    out = Path(args.out or cfg.out or Path("runs") / cfg.name)
    if args.dry_run:
        done = Store(out).done_ids()
        cells = validate_config(cfg)
        for cell in cells:
            print(f"{'done' if cell.id in done else 'todo'}  {cell.id}  {label(cell)}")
        print(f"{len(cells)} cells, {sum(c.id in done for c in cells)} done, in {out}")
        return 0
    # `kill` stops like Ctrl-C (workers and Ray shut down); Ctrl-C / SIGINT stops it even when the shell that
    # started it in the background left SIGINT ignored, as bash does for background jobs
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        summary = run(cfg, out, executor=executor, loader=worker.default_loader, progress=progress_on(args))
    except KeyboardInterrupt:
        done = len(Store(out).done_ids() & {c.id for c in cfg.cells()})
        print(f"kvlab: interrupted with {done} cell(s) done in {out}; run the same command again to resume",
              file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(summary)
    return 1 if summary.failed else 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def cmd_report(args: argparse.Namespace) -> int:
    from kvlab.lab.criteria import check
    from kvlab.lab.frame import rows_frame
    from kvlab.lab.report import build_tables, parse_formats, write_report
    from kvlab.lab.store import load_rows

    formats = parse_formats(args.format)
    rows = load_rows(args.dir)
    if not rows:
        raise KvlabError(f"{args.dir} has no rows yet; run 'kvlab run CONFIG --out {args.dir}' first")
    df = rows_frame(rows)
    tables = build_tables(df)
    criteria = check(df) if args.criteria else None
    out_dir = Path(args.out) if args.out else Path(args.dir) / "report"
    title = f"kvlab report: {Path(args.dir).resolve().name}"
    if not args.quiet:
        for table in tables:
            print(f"\n== {table.title}" + (f"  [{table.caption}]" if table.caption else ""))
            print(table.data.to_string(na_rep="-"))
    written = write_report(df, tables, formats, out_dir, criteria=criteria, title=title)
    if args.html:
        from kvlab.lab.html import write_html

        written.append(write_html(rows, tables, out_dir / "report.html", criteria=criteria, title=title))
    print()
    for path in written:
        print(f"wrote {path}")
    if criteria is not None:
        print("\nsuccess criteria:")
        for criterion in criteria:
            print(f"  {criterion}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from kvlab.lab.plots import plot_all
    from kvlab.lab.store import load_rows

    rows = load_rows(args.dir)
    if not rows:
        raise KvlabError(f"{args.dir} has no rows yet; run 'kvlab run CONFIG --out {args.dir}' first")
    out_dir = Path(args.out) if args.out else Path(args.dir) / "figures"
    result = plot_all(rows, out_dir, echo=lambda msg: print(msg, file=sys.stderr))
    for name, paths in result.written.items():
        print(f"wrote {name}: " + ", ".join(str(p) for p in paths))
    print(f"{len(result.written)} figure(s) written, {len(result.skipped)} skipped (no data) in {out_dir}")
    return 0
