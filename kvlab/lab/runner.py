"""The resumable runner behind ``kvlab run``: expand the grid, skip finished cells, run the rest, store rows.

Resuming: a cell is done when ``DIR/rows/<cell id>.json`` exists with status "ok". Rows are written
atomically by the driver as each cell finishes, so after Ctrl-C, a killed process or a crash, running
the same command again runs only the cells without an ok row: nothing is lost and nothing duplicated.
Failed cells (the evaluation raised) are stored with their error and retried by the next run.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from kvlab.evals import EVALS
from kvlab.lab.config import Cell, LabConfig, check_files
from kvlab.lab.executors import Executor, Group, LocalExecutor
from kvlab.lab.store import Store
from kvlab.lab.worker import Loader, WorkerSpec, default_loader


@dataclass
class RunSummary:
    """What a run did: cells in the grid, already done before, and finished now (ok / failed)."""

    out: Path
    total: int
    skipped: int
    ok: int = 0
    failed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (cell label, error)

    def __str__(self) -> str:
        text = (f"{self.total} cells: {self.skipped} already done, {self.ok} ok, {self.failed} failed; "
                f"rows in {self.out / 'rows'}")
        if self.failed:
            text += "\nfailed cells are retried by running the same command again"
        return text


def group_by_model(cells: list[Cell]) -> list[Group]:
    """Cells grouped by (model, device, dtype), in first-seen order, so each model loads once."""
    groups: dict[tuple[str, str, str], list[Cell]] = {}
    for cell in cells:
        groups.setdefault((cell.model, cell.device, cell.dtype), []).append(cell)
    return [(*key, group) for key, group in groups.items()]


def label(cell: Cell) -> str:
    """A short human name for a cell, for progress messages."""
    params = ",".join(f"{k}={v}" for k, v in cell.params.items() if k in ("data", "tokens", "length", "depth"))
    return f"{cell.model} | {cell.method} | {cell.eval}({params})"


def run(cfg: LabConfig, out: str | Path | None = None, *, executor: Executor | None = None,
        loader: Loader = default_loader, progress: bool = True,
        echo: Callable[[str], None] | None = None) -> RunSummary:
    """Run every cell of ``cfg`` that has no ok row in ``out`` (default: the config's ``out``).

    ``loader(name, device, dtype) -> (model, tokenizer)`` loads models (a parameter so tests can inject
    a fake one); ``executor`` is :class:`LocalExecutor` unless given.
    """
    echo = echo or (lambda msg: tqdm.write(msg, file=sys.stderr))
    out = Path(out or cfg.out or Path("runs") / cfg.name)
    cells = cfg.cells()
    check_files(cells)
    store = Store(out)
    with store:
        store.clean_temporaries()
        store.save_config({**cfg.to_dict(), "out": str(out)})
        done = store.done_ids()
        todo = [c for c in cells if c.id not in done]
        summary = RunSummary(out=out, total=len(cells), skipped=len(cells) - len(todo))
        if not todo:
            return summary
        spec = WorkerSpec(loader=loader, eval_paths={c.eval: EVALS[c.eval] for c in todo if c.eval in EVALS})
        bar = tqdm(total=len(cells), initial=summary.skipped, desc=cfg.name, unit="cell",
                   disable=not progress, file=sys.stderr, dynamic_ncols=True)
        by_id = {c.id: c for c in todo}
        try:
            for row in (executor or LocalExecutor()).run(group_by_model(todo), spec):
                store.put(row)
                if row["status"] == "ok":
                    summary.ok += 1
                else:
                    summary.failed += 1
                    cell = by_id.get(row["id"])
                    summary.failures.append((label(cell) if cell else row["id"], str(row["error"])))
                    echo(f"cell failed: {summary.failures[-1][0]}: {row['error']}")
                bar.update(1)
                bar.set_postfix(failed=summary.failed, refresh=False)
        finally:
            bar.close()
    return summary
