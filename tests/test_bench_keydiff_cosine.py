"""The KeyDiff cosine benchmark (bench/bench_keydiff_cosine.py): its variant computes KeyDiff's scores up to rounding,
its side-by-side run counts what differs, and bad arguments are one line."""

from __future__ import annotations

import copy
import subprocess
import sys

import torch
from bench_scripts import BENCH, load


def test_three_reads_score_as_keydiff_up_to_rounding():
    bench = load("bench_keydiff_cosine")
    row = bench.scoring(heads=2, kept=40, rounds=1)
    assert 0 < row["max_score_diff"] < 1e-6 and row["kept_norms_same_bits"]
    assert row["keydiff_us"] > 0 and row["from_keys_us"] > 0 and row["three_reads_us"] > 0


def test_the_side_by_side_run_feeds_both_caches_the_same_text(tiny_llama):
    bench = load("bench_keydiff_cosine")
    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(0))
    row = bench.side_by_side(copy.deepcopy(tiny_llama), ids, chunk=8, budget=16)
    assert row["passes"] == 6 and 0 <= row["passes_kept_differ"] <= row["passes"]
    assert (row["first_pass_kept_differ"] is None) == (row["passes_kept_differ"] == 0)
    assert row["ppl_keydiff"] > 1 and abs(row["ppl_keydiff"] / row["ppl_three_reads"] - 1) < 1e-3


def test_bad_arguments_are_one_error_line_and_nothing_written(tmp_path):
    run = subprocess.run([sys.executable, str(BENCH / "bench_keydiff_cosine.py"), "--budget", "0",
                          "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "--budget" in run.stderr.strip().splitlines()[-1]
    assert not list(tmp_path.iterdir())
