"""The kvpress venv and its worker subprocess: find the venv's python, write the request, read the answer lines.

kvpress 0.5.5 needs transformers < 5.3, so it lives in its own venv (``make kvpress-env`` builds
``.kvpress-venv``) and :mod:`kvlab.compare.kvpress_worker` runs there as a script. kvlab sends one JSON request
on its stdin (:func:`build_request`) and reads one JSON line per (press, ratio, sample) from its stdout
(:func:`run_worker`); what the lines mean is :mod:`kvlab.compare.kvpress_results`.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kvlab.compare.samples import PplSample, QASample
from kvlab.errors import KvlabError


PROTOCOL = 1
WORKER = Path(__file__).with_name("kvpress_worker.py")
DEFAULT_VENV = Path(__file__).resolve().parents[2] / ".kvpress-venv"


def kvpress_python(venv: str | os.PathLike | None = None) -> Path:
    """The kvpress venv's python: ``venv``, else ``$KVLAB_KVPRESS_VENV``, else ``.kvpress-venv`` in the checkout."""
    root = Path(venv or os.environ.get("KVLAB_KVPRESS_VENV") or DEFAULT_VENV)
    python = root / "bin" / "python"
    if not python.exists():
        raise KvlabError(f"kvpress environment not found: run `make kvpress-env` (no {python})")
    return python


def build_request(model_dir: str | os.PathLike, task: str, samples: Sequence[QASample | PplSample],
                  presses: Sequence[str], ratios: Sequence[float], *, device: str = "cpu", dtype: str = "float32",
                  seed: int = 0, max_new_tokens: int = 16, threads: int | None = None) -> dict[str, Any]:
    """The worker's JSON request (``task``: "qa" or "ppl"; "full" is accepted for the press "none")."""
    if task not in ("qa", "ppl"):
        raise KvlabError(f"unknown worker task '{task}'; choose from: ppl, qa")
    if not presses or not samples:
        raise KvlabError("the kvpress comparison needs at least one press and one sample")
    for ratio in ratios:
        if not 0.0 <= float(ratio) < 1.0:
            raise KvlabError(f"kvpress compression ratio must be in [0, 1), got {ratio}")
    return {"protocol": PROTOCOL, "model_dir": str(model_dir), "task": task, "device": str(device), "dtype": dtype,
            "seed": seed, "max_new_tokens": max_new_tokens, "threads": threads,
            "presses": ["none" if p == "full" else p for p in presses], "ratios": [float(r) for r in ratios],
            "samples": [asdict(s) for s in samples]}


def run_worker(request: dict[str, Any], *, python: str | os.PathLike, timeout_s: float = 1800.0,
               script: str | os.PathLike | None = None,
               on_record: Callable[[dict], None] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run the worker (``script``, default :data:`WORKER`) on ``request``; return its hello and result/error lines.

    Exit code 2 (a bad request, e.g. a press kvpress lacks) becomes a KvlabError with the worker's line;
    a crash, a missing ``done`` line or the timeout (the worker is killed) too.
    """
    timed_out = threading.Event()
    lines: list[dict[str, Any]] = []
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([str(python), str(script or WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=err, text=True)

        def kill() -> None:
            timed_out.set()
            proc.kill()

        timer = threading.Timer(timeout_s, kill)
        timer.start()
        try:
            try:
                proc.stdin.write(json.dumps(request))
                proc.stdin.close()
            except BrokenPipeError:
                pass
            for line in proc.stdout:
                record = _parse(line)
                if record is not None:
                    lines.append(record)
                    if on_record is not None:
                        on_record(record)
            code = proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err.seek(0)
        last = next((ln.strip() for ln in reversed(err.read().splitlines()) if ln.strip()), "")
    if timed_out.is_set():
        raise KvlabError(f"kvpress worker timed out after {timeout_s:g} s and was stopped")
    if code == 2:
        raise KvlabError(f"kvpress: {last.removeprefix('kvpress-worker: ')}")
    if code != 0 or not lines or lines[-1].get("type") != "done":
        raise KvlabError(f"kvpress worker failed (exit {code}): {last or 'no output'}")
    hello = next((r for r in lines if r.get("type") == "hello"), None)
    if hello is None or hello.get("protocol") != PROTOCOL:
        raise KvlabError(f"kvpress worker speaks protocol {None if hello is None else hello.get('protocol')}, "
                         f"kvlab expects {PROTOCOL}")
    return hello, [r for r in lines if r.get("type") in ("result", "error")]


def _parse(line: str) -> dict[str, Any] | None:
    line = line.strip()
    if not line.startswith("{"):
        return None  # a stray print from a library
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and "type" in record else None
