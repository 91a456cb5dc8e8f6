"""Result rows: the one format every evaluation, the CLI and the lab write and read.

A row is a flat JSON object (the lm-evaluation-harness idea of results you can trust later)::

    {
      "schema": 1,
      "id": "…",                 # cell id: hash of the resolved config (the lab) or of the CLI call
      "status": "ok" | "failed",
      "eval": "ppl",             # which evaluation produced it
      "config": {...},           # everything needed to rerun it: model, method spec, eval settings, seed
      "metrics": {...},          # numbers (or None where not applicable, with a reason in "notes")
      "higher_is_better": {...}, # for each metric where it has a direction
      "error": null | "message",
      "runtime_s": 12.3,
      "created": "2026-11-22T14:00:00Z",
      "kvlab_version": "0.1.0", "git_hash": "…", "versions": {...}, "machine": {...}
    }

Tables and figures read only rows.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterator
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
_LIBRARIES = ("torch", "transformers", "kvlab", "numpy", "accelerate", "gguf", "kvpress", "ray")


def config_hash(config: dict[str, Any]) -> str:
    """A short stable id for a resolved config (key order does not matter)."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


OUTPUTS = ("bench/results", "docs")  # what measurements write and describe: changes there leave the code clean


@lru_cache(maxsize=4)
def git_hash(root: Path | None = None) -> str | None:
    """The git commit of the kvlab checkout (or of ``root``), with ``-dirty`` if a tracked file outside
    :data:`OUTPUTS` has uncommitted changes (a benchmark that rewrote an earlier result file still ran the
    commit's code); None outside git."""
    root = root or Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                *(f":(exclude){p}" for p in OUTPUTS)], cwd=root, capture_output=True, text=True,
                               timeout=5)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    """Installed versions of the libraries that change results."""
    out = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def machine(device: str | None = None) -> dict[str, Any]:
    """Where the row was measured: host, CPU count, memory, and the torch device."""
    info: dict[str, Any] = {"platform": platform.platform(), "processor": platform.machine(),
                            "cpus": os.cpu_count()}
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    if device is not None:
        info["device"] = str(device)
        if str(device).startswith("cuda"):
            import torch

            info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def make_row(eval_name: str, config: dict[str, Any], metrics: dict[str, Any] | None = None, *,
             higher_is_better: dict[str, bool] | None = None, runtime_s: float | None = None,
             error: str | None = None, device: str | None = None, row_id: str | None = None,
             notes: str | None = None) -> dict[str, Any]:
    """Build a complete row. ``status`` is "failed" when ``error`` is given."""
    return {
        "schema": SCHEMA_VERSION,
        "id": row_id or config_hash({"eval": eval_name, **config}),
        "status": "failed" if error else "ok",
        "eval": eval_name,
        "config": config,
        "metrics": metrics or {},
        "higher_is_better": higher_is_better or {},
        "error": error,
        "notes": notes,
        "runtime_s": None if runtime_s is None else round(runtime_s, 3),
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "kvlab_version": versions().get("kvlab"),
        "git_hash": git_hash(),
        "versions": versions(),
        "machine": machine(device),
    }


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to (hidden, ending in ``.tmp``, so no ``*.json`` glob of a
    reader sees it; give writers that infer a format from the name the format explicitly); when the block
    ends without an error the file is made readable by everyone (mkstemp makes 0600 files) and renamed over
    ``path``, so a reader sees the old file or the whole new one, never a half. On an error the temporary
    file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically (see :func:`atomic_path`), synced to disk."""
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON so that a reader sees either the old file or the whole new one, never a half."""
    return write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")
