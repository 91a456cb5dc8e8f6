"""The result store of a run folder: one JSON file per finished cell, written atomically.

    DIR/
      config.yaml          the resolved config of the last ``kvlab run`` into DIR
      rows/<cell id>.json  one row per finished cell (see kvlab.results), "ok" or "failed"
      .lock                held while a run writes into DIR

A row file appears only through :func:`kvlab.results.write_json_atomic` (write to a temporary file,
fsync, rename), so a reader never sees half a row, whatever kills the writer. A cell is *done* when its
row exists with status "ok"; a rerun skips done cells and retries failed ones (their row is replaced).
Temporary files left by a killed writer start with "." and are ignored and cleaned up.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from kvlab.errors import KvlabError
from kvlab.results import write_json_atomic


class Store:
    """Rows of one run folder. Reading needs nothing but the folder."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.rows_dir = self.root / "rows"
        self._lock_fd: int | None = None

    # -- reading ---------------------------------------------------------------------------
    def row_path(self, cell_id: str) -> Path:
        return self.rows_dir / f"{cell_id}.json"

    def rows(self) -> list[dict[str, Any]]:
        """Every stored row (ok and failed), sorted by cell id. Unreadable files are a KvlabError."""
        return list(self._iter_rows())

    def _iter_rows(self) -> Iterator[dict[str, Any]]:
        if not self.rows_dir.is_dir():
            return
        for path in sorted(self.rows_dir.glob("*.json")):
            if path.name.startswith("."):
                continue
            try:
                row = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise KvlabError(f"row file {path} is not valid JSON ({exc}); "
                                 "delete it and rerun to redo that cell") from exc
            if not isinstance(row, dict) or "status" not in row:
                raise KvlabError(f"row file {path} is not a kvlab row; delete it and rerun to redo that cell")
            yield row

    def done_ids(self) -> set[str]:
        """Ids of the cells whose row is complete with status "ok"."""
        return {row["id"] for row in self._iter_rows() if row.get("status") == "ok"}

    # -- writing ---------------------------------------------------------------------------
    def put(self, row: dict[str, Any]) -> Path:
        """Write (or replace) one row atomically under ``rows/<id>.json``."""
        return write_json_atomic(self.row_path(row["id"]), row)

    def save_config(self, config: dict[str, Any]) -> Path:
        """Save the resolved config as ``DIR/config.yaml`` (atomically)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / ".config.yaml.tmp"
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
        os.replace(tmp, self.root / "config.yaml")
        return self.root / "config.yaml"

    def clean_temporaries(self) -> int:
        """Delete the temporary files a killed writer left behind; return how many."""
        if not self.rows_dir.is_dir():
            return 0
        stale = [p for p in self.rows_dir.glob(".*.tmp")]
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)

    # -- one writer at a time --------------------------------------------------------------
    def lock(self) -> None:
        """Take the folder's lock, so two runs never write the same folder at once (freed on exit)."""
        self.rows_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise KvlabError(f"another 'kvlab run' is writing into {self.root}; "
                                 "wait for it or use another --out") from exc
            raise
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Store:
        self.lock()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unlock()


def load_rows(root: str | os.PathLike, *, status: str | None = None) -> list[dict[str, Any]]:
    """Rows of a run folder (optionally only one status); a KvlabError if the folder has none."""
    store = Store(root)
    if not store.rows_dir.is_dir():
        raise KvlabError(f"{root} is not a run folder (no rows/ inside); make one with 'kvlab run CONFIG --out {root}'")
    rows = store.rows()
    return [r for r in rows if status is None or r.get("status") == status]
