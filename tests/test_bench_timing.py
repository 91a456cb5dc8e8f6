"""What every benchmark's result file records about its run (bench/timing.py), never its timings."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _timing():
    spec = importlib.util.spec_from_file_location("bench_timing", BENCH / "timing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not hasattr(os, "getloadavg"), reason="this OS reports no load average")
def test_a_result_file_records_the_machine_load_at_the_start_and_end_of_its_run(tmp_path):
    """A second job on the machine shares its memory bus and moves every timing: the load says whether one ran."""
    timing = _timing()
    meta = timing.run_meta(None, argparse.Namespace(contexts="1024"))
    timing.write(tmp_path / "r", [{"impl": "full", "step_ms": 1.0}], "| impl |", meta)
    saved = json.loads((tmp_path / "r.json").read_text())
    for key in ("load_avg_start", "load_avg_end"):
        load = saved["meta"][key]
        assert len(load) == 3 and all(isinstance(x, float) and x >= 0 for x in load)  # 1, 5 and 15 minutes
    assert saved["meta"]["args"] == {"contexts": "1024"} and saved["rows"] == [{"impl": "full", "step_ms": 1.0}]
    assert (tmp_path / "r.md").read_text() == "| impl |\n"
