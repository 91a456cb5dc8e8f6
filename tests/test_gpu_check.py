"""The GPU check's code path, on the CPU at its smoke sizes: no GPU has run it yet, so CI keeps it runnable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--smoke", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=600)


def test_the_smoke_run_measures_every_method_with_its_torch_calls(tmp_path):
    done = _run("--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["contract"] and all(r["ok"] for r in report["contract"])
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from gpu_check import METHODS
    finally:
        sys.path.remove(str(SCRIPT.parent))
    runs = {(r["context"], r["batch"]) for r in report["speed"]}
    assert runs == {(256, 1), (256, 2), (512, 1), (512, 2)}
    for context, batch in runs:
        rows = [r for r in report["speed"] if (r["context"], r["batch"]) == (context, batch)]
        assert [r["impl"] for r in rows] == ["sdpa", *METHODS]  # issue 12's methods included (haq-post, snapkv, adakv)
        assert all(r["finite"] and r["decode_ms"] > 0 and r["torch_calls"] > 0 for r in rows)
        calls = {r["impl"]: r["torch_calls"] for r in rows}
        assert calls["adakv"] < calls["adakv-alone"]  # its heads step as one set: fewer launches than alone
    assert "torch calls per step" in (tmp_path / "gpu_check.md").read_text()


def test_an_unknown_method_is_one_usage_error(tmp_path):
    done = _run("--out", str(tmp_path), "--methods", "full,nope")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "invalid method_names value: 'full,nope'" in done.stderr
    assert not (tmp_path / "gpu_check.json").exists()
