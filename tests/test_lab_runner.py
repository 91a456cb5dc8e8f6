"""The resumable runner and its store: one row per cell, atomic, resumable, failures stored and retried."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

import lab_fakes
from kvlab.errors import KvlabError
from kvlab.lab.config import parse_config
from kvlab.lab.runner import run
from kvlab.lab.store import Store, load_rows
from kvlab.results import config_hash

TESTS = Path(__file__).resolve().parent
RAW = {"name": "t", "models": ["smollm2-135m", "qwen2.5-0.5b"],
       "methods": ["full", "streaming:sinks=4,window=60", "h2o:budget=64,recent=16"],
       "evals": {"fake": {"tokens": [128, 256]}}}


@pytest.fixture(autouse=True)
def fake_eval(monkeypatch):
    monkeypatch.delenv("LAB_FAKES_FAIL", raising=False)
    monkeypatch.delenv("LAB_FAKES_HOLD_AFTER", raising=False)
    lab_fakes.LOADS.clear()
    with lab_fakes.registered():
        yield


def go(out: Path, raw: dict = RAW, **kw):
    return run(parse_config(raw), out, loader=lab_fakes.load, progress=False, echo=lambda _m: None, **kw)


def test_rows_hold_everything_and_each_model_loads_once(tmp_path):
    summary = go(tmp_path)
    assert (summary.total, summary.ok, summary.failed, summary.skipped) == (12, 12, 0, 0)
    assert lab_fakes.LOADS == ["smollm2-135m", "qwen2.5-0.5b"]  # grouped by model, loaded once each
    rows = load_rows(tmp_path)
    assert len(rows) == 12
    assert sorted(p.stem for p in (tmp_path / "rows").glob("*.json")) == sorted(r["id"] for r in rows)
    row = rows[0]
    assert row["id"] == config_hash(row["config"]) and row["status"] == "ok" and row["error"] is None
    assert set(row["config"]) == {"model", "method", "eval", "params", "device", "dtype"}
    assert row["metrics"]["ppl"] > 0 and row["higher_is_better"]["ppl"] is False
    assert row["versions"]["torch"] and row["machine"]["device"] and "git_hash" in row
    assert row["model_info"]["model_type"] in ("llama", "qwen2")
    saved = (tmp_path / "config.yaml").read_text()
    assert "streaming:sinks=4,window=60" in saved and "fake" in saved


def test_rerun_skips_done_cells(tmp_path):
    go(tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "rows").iterdir()}
    lab_fakes.LOADS.clear()
    summary = go(tmp_path)
    assert (summary.skipped, summary.ok) == (12, 0) and lab_fakes.LOADS == []
    assert before == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "rows").iterdir()}


def test_a_failing_cell_is_stored_and_the_sweep_goes_on_then_a_rerun_retries_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_FAKES_FAIL", "h2o")
    summary = go(tmp_path)
    assert (summary.ok, summary.failed) == (8, 4)
    failed = [r for r in load_rows(tmp_path) if r["status"] == "failed"]
    assert len(failed) == 4 and all("RuntimeError: synthetic failure of h2o" in r["error"] for r in failed)
    assert all(r["metrics"] == {} and "Traceback" in r["notes"] for r in failed)
    monkeypatch.delenv("LAB_FAKES_FAIL")
    summary = go(tmp_path)
    assert (summary.skipped, summary.ok, summary.failed) == (8, 4, 0)
    assert len(load_rows(tmp_path, status="ok")) == 12 and len(load_rows(tmp_path)) == 12


def test_a_model_that_fails_to_load_fails_its_cells_only(tmp_path):
    summary = go(tmp_path, {**RAW, "models": ["broken/model", "smollm2-135m"]})
    assert (summary.ok, summary.failed) == (6, 6)
    errors = {r["error"] for r in load_rows(tmp_path, status="failed")}
    assert errors == {"loading model 'broken/model' failed: OSError: cannot load broken/model"}
    assert lab_fakes.LOADS == ["broken/model", "smollm2-135m"]


def test_half_written_files_are_never_rows(tmp_path):
    go(tmp_path)
    rows_dir = tmp_path / "rows"
    (rows_dir / ".abc.json.123.tmp").write_text('{"id": "abc", "sta')  # a writer killed mid-write
    assert len(load_rows(tmp_path)) == 12
    assert Store(tmp_path).clean_temporaries() == 1 and not list(rows_dir.glob(".*"))
    (rows_dir / "0000.json").write_text('{"id": "0000", "sta')
    with pytest.raises(KvlabError, match="0000.json is not valid JSON.*delete it"):
        load_rows(tmp_path)


def test_two_runs_cannot_write_one_folder(tmp_path):
    with Store(tmp_path):
        with pytest.raises(KvlabError, match="another 'kvlab run' is writing"):
            go(tmp_path)
    assert go(tmp_path).ok == 12


def test_not_a_run_folder(tmp_path):
    with pytest.raises(KvlabError, match="not a run folder"):
        load_rows(tmp_path)


KILL_RAW = {"name": "k", "models": ["smollm2-135m", "qwen2.5-0.5b"], "methods": ["full", "streaming:sinks=4,window=60"],
            "evals": {"fake": {"tokens": [128, 256]}}}
DRIVER = textwrap.dedent("""
    import signal, sys
    if sys.argv[3] == "ignored":  # started as a background job: bash leaves SIGINT ignored
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    import kvlab.cli.main as cli_main, kvlab.evals, lab_fakes
    from kvlab.lab import worker
    kvlab.evals.register_eval("fake", "lab_fakes")
    worker.default_loader = lab_fakes.load
    cli_main.COMMAND_MODULES = ("kvlab.cli.lab",)
    sys.exit(cli_main.main(["run", sys.argv[1], "--out", sys.argv[2], "--no-progress"]))
""")


@pytest.mark.parametrize("sig, started", [(signal.SIGINT, "default"), (signal.SIGINT, "ignored"),
                                          (signal.SIGTERM, "default"), (signal.SIGKILL, "default")],
                         ids=["sigint", "sigint-background", "sigterm", "sigkill"])
def test_killed_sweep_resumes_with_nothing_lost_or_duplicated(tmp_path, monkeypatch, sig, started):
    out, log, config = tmp_path / "run", tmp_path / "evaluated.log", tmp_path / "k.yaml"
    config.write_text(yaml.safe_dump(KILL_RAW))
    # the third cell (and any later one) blocks until the test says go, which it never does: the signal
    # always lands part-way through, with exactly two rows written, however slow or loaded the machine
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "LAB_FAKES_LOG": str(log), "LAB_FAKES_HOLD_AFTER": "2"}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(config), str(out), started], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    held, deadline = Path(f"{log}.held"), time.monotonic() + 300
    while not held.exists():  # wait until the sweep is part-way through (a safety net, not a timing assumption)
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the sweep never reached its third cell"
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    first = {p.stem for p in (out / "rows").glob("*.json")}
    assert 2 <= len(first) < 8
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 130
        assert f"interrupted with {len(first)} cell(s) done" in err and "run the same command again" in err
    evaluated_first = log.read_text().count("\n")

    monkeypatch.setenv("LAB_FAKES_LOG", str(log))
    summary = go(out, KILL_RAW)
    assert (summary.ok, summary.skipped, summary.failed) == (8 - len(first), len(first), 0)
    rows = load_rows(out)
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    assert len({r["id"] for r in rows}) == 8 and not list((out / "rows").glob(".*"))
    # only the cells without a row ran again (at most the one interrupted mid-cell ran twice)
    assert log.read_text().count("\n") - evaluated_first == 8 - len(first)
    assert all(json.loads(p.read_text())["id"] == p.stem for p in (out / "rows").glob("*.json"))


def test_a_missing_head_profile_stops_the_run_before_any_model_loads(tmp_path):
    raw = {**RAW, "methods": ["full", f"head-aware:budget=64,profile={tmp_path}/{{model}}.json"]}
    with pytest.raises(KvlabError, match=r"smollm2-135m.json, which does not exist; make it with: kvlab heads profile"):
        go(tmp_path / "run", raw)
    assert lab_fakes.LOADS == [] and not (tmp_path / "run").exists()


def test_git_hash_is_dirty_for_code_not_for_results(tmp_path):
    """A row's commit says -dirty when code differs from it, not when a benchmark rewrote an earlier result."""
    import subprocess

    from kvlab.results import git_hash

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    for name in ("kvlab/m.py", "bench/results/r.json", "docs/BENCHMARKS.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("0\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "c")
    (tmp_path / "bench/results/r.json").write_text("1\n")
    (tmp_path / "docs/BENCHMARKS.md").write_text("1\n")
    clean = git_hash(tmp_path)
    assert clean and not clean.endswith("-dirty")
    (tmp_path / "kvlab/m.py").write_text("1\n")
    git_hash.cache_clear()
    assert git_hash(tmp_path) == clean + "-dirty"
