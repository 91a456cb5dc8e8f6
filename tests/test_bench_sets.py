"""The sets benchmark (bench/bench_sets.py): both caches run, the sets really step, its figures come from them."""

from __future__ import annotations

import subprocess
import sys

import torch
from bench_scripts import BENCH, load


def test_sets_and_lone_steps_of_adakv_on_smollm2(smollm2):
    model, tok = smollm2
    bench = load("bench_sets")
    ids = torch.randint(0, 1000, (1, 40 + bench.WARMUP + 3 + 1), generator=torch.Generator().manual_seed(0))
    row = bench.compare(model, ids, "adakv:budget=8,window=2", 40, 3)
    assert row["set_layers"] == row["layers"] == model.config.num_hidden_layers  # every layer stepped as a set
    assert row["max_logit_gap"] < 1e-3 and row["same_greedy"]
    assert row["calls_sets"] < row["calls_alone"]
    assert row["alone_over_sets"] == round(row["alone_ms"] / row["sets_ms"], 3)
    line = bench.table([row]).splitlines()[2]
    assert line.startswith("| `adakv:budget=8,window=2` | float32 | 40 |") and f"| {row['layers']} / " in line


def test_a_padded_batch_steps_as_sets_too(smollm2):
    model, _ = smollm2
    bench = load("bench_sets")
    text = torch.randint(1, 1000, (1, 40 + bench.WARMUP + 3 + 1), generator=torch.Generator().manual_seed(1))
    rows, mask = bench.left_padded(text[0, :40])  # rows of 40, 30 and 20 real tokens
    ids = torch.cat((rows, text[:, 40:].expand(3, -1)), dim=1)
    row = bench.compare(model, ids, "adakv:budget=8,window=2", 40, 3, mask)
    assert row["batch"] == 3 and row["padded"] and row["set_layers"] == row["layers"]
    assert row["max_logit_gap"] < 1e-3 and row["same_greedy"]
    assert "| 40 x 3, padded |" in bench.table([row])


def test_bad_arguments_are_one_error_line_before_any_model_loads(tmp_path):
    for args, says in ((["--methods", "nosuch:budget=1"], "unknown method 'nosuch'"), (["--steps", "0"], "--steps"),
                       (["--dtypes", "float64"], "--dtypes"), (["--model", "nosuch-model"], "unknown model")):
        run = subprocess.run([sys.executable, str(BENCH / "bench_sets.py"), *args, "--out", str(tmp_path / "r")],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and "Traceback" not in run.stderr
        assert says in run.stderr.strip().splitlines()[-1]
    assert not list(tmp_path.iterdir())  # nothing written


def test_the_set_attention_benchmark_times_both_ways_of_one_set(monkeypatch):
    """bench/bench_set_attention.py's set forms, and its two ways give the same attention (within rounding)."""
    from kvlab.storage import slotsets

    bench = load("bench_set_attention")
    s = bench.slot_set(3, 16)
    query = torch.randn(1, 3 * 2, 1, 16, generator=torch.Generator().manual_seed(0))
    outs = []
    for flat in (3, 2):  # one call, then head by head
        monkeypatch.setattr(slotsets, "FLAT_HEADS", flat)
        outs.append(s.attend(query, 0.25))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
