"""The step split benchmark (bench/bench_step_split.py): a step's time split into the weights' matmuls, attention and
the rest, each row beside the first, and bad arguments one line."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from bench_scripts import BENCH, load


@pytest.mark.parametrize("spec", ["full", "h2o:budget=16,recent=4"])
def test_a_step_splits_into_weights_attention_and_the_rest(tiny_llama, spec):
    bench = load("bench_step_split")
    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(0))
    rows = bench.run(copy.deepcopy(tiny_llama), ids, ["full", spec], rounds=3, warmup=1, chunk=16, top=4)
    assert [r["method"] for r in rows] == ["full", spec]
    row = rows[1]
    assert row["context"] == 48
    assert row["step_ms"] > 0 and row["weights_ms"] > 0 and row["attention_ms"] > 0  # sdpa, or H2O's two products
    assert row["rest_ms"] == pytest.approx(row["step_ms"] - row["weights_ms"] - row["attention_ms"], abs=0.02)
    assert 0 < len(row["top"]) <= 4
    assert not any(bench.is_weights(o["op"]) or bench.is_attention(o["op"]) for o in row["top"])
    assert [o["ms"] for o in row["top"]] == sorted((o["ms"] for o in row["top"]), reverse=True)


def test_the_table_puts_each_row_beside_the_first():
    bench = load("bench_step_split")
    rows = [{"method": "full", "step_ms": 80.0, "weights_ms": 36.0, "attention_ms": 28.0, "rest_ms": 16.0,
             "top": [{"op": "aten::mul", "ms": 1.5, "calls": 300.0}]},
            {"method": "haq:budget=1024,profile=/x/p.json", "step_ms": 100.0, "weights_ms": 38.0,
             "attention_ms": 4.0, "rest_ms": 58.0, "top": []}]
    text = bench.table(rows)
    assert "| `full` | 80.00 | 36.00 | 28.00 | 16.00 | 0.00 | 0.00 |" in text
    assert "| `haq:budget=1024` | 100.00 | 38.00 | 4.00 | 58.00 | 24.00 | 42.00 |" in text
    assert "`aten::mul` 1.50 ms (300 calls)" in text


@pytest.mark.parametrize("args, word", [(["--context", "0"], "--context"),
                                        (["--methods", "haq:budget=64,profile={p}"], "profile")])
def test_bad_arguments_are_one_error_line_and_nothing_written(tmp_path, args, word):
    run = subprocess.run([sys.executable, str(BENCH / "bench_step_split.py"), *args, "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert word in run.stderr.strip().splitlines()[-1]
    assert not list(tmp_path.iterdir())
