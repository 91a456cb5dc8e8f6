"""The decode benchmark's table: its ratios are computed from the rows (bench/bench_decode.py), never typed in."""

from __future__ import annotations

import subprocess
import sys

import pytest
from bench_scripts import BENCH, load


def _row(impl: str, context: int, step_ms: float) -> dict:
    return {"impl": impl, "context": context, "prefill_s": 1.0, "step_ms": step_ms, "update_share": 0.0,
            "torch_calls": 1, "kv_mib": 1.0}


def test_each_step_is_compared_with_the_full_caches_and_streamingllms_of_its_own_context():
    table = load("bench_decode").table([
        _row("sdpa", 4096, 66.0), _row("full", 4096, 60.0), _row("streaming:sinks=4,window=1020", 4096, 40.0),
        _row("head-aware:budget=1024,profile=/tmp/p.json", 4096, 44.0), _row("full", 16384, 150.0),
        _row("h2o:budget=1024,recent=256", 16384, 50.0)])
    lines = {(line.split(" | ")[0][2:], line.split(" | ")[1]): line.split(" | ") for line in table.splitlines()[2:]}
    sdpa, full, stream, ha = (lines[("4096", name)] for name in (
        "transformers (DynamicCache, sdpa)", "`full`", "`streaming:sinks=4,window=1020`", "`head-aware:budget=1024`"))
    # vs full, the rounds' median and quartiles of that (none in these rows), vs sdpa, step / StreamingLLM's
    assert full[4:8] == ["1.00x", "n/a", "1.10x", "1.50"]
    assert stream[4:8] == ["1.50x", "n/a", "1.65x", "1.00"]
    assert ha[4:8] == ["1.36x", "n/a", "1.50x", "1.10"]  # the profile's path is left out of the name
    assert sdpa[4:8] == ["0.91x", "n/a", "1.00x", "1.65"]
    assert lines[("16384", "`h2o:budget=1024,recent=256`")][4:8] == ["3.00x", "n/a", "n/a", "n/a"]  # no StreamingLLM


def test_the_rounds_quartiles_pair_each_step_with_the_full_caches_of_its_round():
    bench = load("bench_decode")
    # a machine slow in the second round: every implementation slows down together, the ratio does not
    assert bench.quartiles([0.30, 0.60, 0.30, 0.30, 0.30], [0.10, 0.20, 0.10, 0.10, 0.12]) == [3.0, 3.0, 3.0]
    assert bench.quartiles([0.3], [0.1]) == [3.0, 3.0, 3.0]  # one round
    row = dict(_row("h2o:budget=1024,recent=256", 16384, 50.0), vs_full_rounds=[2.9, 3.0, 3.1])
    line = bench.table([_row("full", 16384, 150.0), row]).splitlines()[-1].split(" | ")
    assert line[4:6] == ["3.00x", "3.00x (2.90-3.10)"]


@pytest.mark.parametrize("args, says", [(["--methods", "full;nosuch:budget=1"], "unknown method 'nosuch'"),
                                        (["--contexts", "4096,abc"], "--contexts"),
                                        (["--rounds", "0"], "--rounds"),
                                        (["--profile", "/no/such/p.json"], "no head profile")])
def test_bad_arguments_are_one_error_line_before_any_model_loads(tmp_path, args, says):
    run = subprocess.run([sys.executable, str(BENCH / "bench_decode.py"), *args, "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert says in run.stderr.strip().splitlines()[-1]
    assert not list(tmp_path.iterdir())  # nothing written


def test_padded_rows_are_the_contexts_first_tokens_left_padded():
    import torch

    ids, mask = load("bench_decode").left_padded(torch.arange(1, 9))  # (from bench/timing.py)
    assert ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8], [0, 0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 1, 2, 3, 4]]
    assert mask.tolist() == [[1] * 8, [0] * 2 + [1] * 6, [0] * 4 + [1] * 4]


def test_every_kind_of_storage_counts_in_the_update_share(tiny_llama):
    """A quantized group's update (eviction, append, quantizing a block) counts, as a dense segment's does."""
    import copy

    import torch

    ids = torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(0))
    models = {"sdpa": copy.deepcopy(tiny_llama), "kvlab": tiny_llama}
    rows = load("bench_decode").run_context(models, ids, ["sdpa", "full", "quant:bits=4"], rounds=2, warmup=1,
                                             chunk=32)
    share = {row["impl"]: row["update_share"] for row in rows}
    assert share["sdpa"] == 0 and share["full"] > 0 and share["quant:bits=4"] > 0


def test_the_targets_are_judged_from_the_rows_that_ran():
    bench = load("bench_decode")
    rounds = {"vs_full_rounds": [2.9, 3.05, 3.1]}
    rows = [_row("sdpa", 4096, 66.0), _row("full", 4096, 60.0), _row("h2o:budget=1024,recent=256", 4096, 50.0),
            _row("head-aware:budget=1024,profile=/tmp/p.json", 4096, 52.0), _row("full", 16384, 150.0),
            dict(_row("snapkv:budget=1024", 16384, 50.0), **rounds), _row("adakv:budget=1024", 16384, 51.0),
            _row("duo:profile=/tmp/p.json", 16384, 60.0)]
    lines = bench.targets(rows).splitlines()[2:]
    assert lines == [
        "- 4,096 tokens: kvlab `full` against transformers (DynamicCache, sdpa) at least 0.97x: 1.10x: met",
        "- 4,096 tokens: `h2o:budget=1024,recent=256` against kvlab `full` at least 1.0x: 1.20x: met",
        "- 4,096 tokens: `head-aware:budget=1024` against kvlab `full` at least 1.2x: 1.15x: MISSED",
        "- 16,384 tokens: `snapkv:budget=1024` against kvlab `full` at least 3.0x: 3.00x "
        "(rounds 3.05x, 2.90-3.10): met",
        "- 16,384 tokens: `adakv:budget=1024` against kvlab `full` at least 3.0x: 2.94x: MISSED"]  # duo: not bounded
    # no full cache at 1k, no streaming, no haq: no line for them; a padded batch is judged by nothing here
    assert bench.targets([dict(row, padded=True) for row in rows]) == ""
