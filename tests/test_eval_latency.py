"""The latency evaluation's schedule and bookkeeping (never its timings: performance lives in bench/)."""

from __future__ import annotations

import numpy as np
import pytest

from kvlab.cli.evals import latency_specs
from kvlab.errors import KvlabError
from kvlab.evals import latency
from test_eval_helpers import FILLER, ByteTokenizer


def test_probe_schedule():
    p = latency.Params(tokens=1000, prefill=100, warmup=50, probe_every=200, probe_steps=10)
    assert latency.probe_starts(p) == [150, 350, 550, 750, 950]
    dense = latency.Params(tokens=40, prefill=10, warmup=0, probe_every=5, probe_steps=5)
    assert latency.probe_starts(dense) == [10, 15, 20, 25, 30, 35]


@pytest.mark.parametrize("kwargs, message", [
    ({"probe_steps": 30, "probe_every": 20}, "cannot exceed"),
    ({"tokens": 100, "prefill": 90, "warmup": 10}, "must cover"),
    ({"runs": 0}, "runs must be at least 1"),
    ({"warmup": -1}, "warmup must be >= 0"),
])
def test_params_are_validated(kwargs, message):
    with pytest.raises(KvlabError, match=message):
        latency.Params(**kwargs)


def test_quantile_matches_numpy():
    values = sorted(np.random.default_rng(0).random(37).tolist())
    for q in (0.0, 0.5, 0.9, 1.0):
        assert latency._quantile(values, q) == pytest.approx(float(np.quantile(values, q)))


def test_evaluate_bookkeeping_on_a_tiny_model(tiny_llama, tmp_path):
    data = tmp_path / "t.txt"
    data.write_text(FILLER)
    params = latency.Params(tokens=200, prefill=32, warmup=8, runs=2, probe_every=40, probe_steps=4, chunk_size=32,
                            data=str(data))
    m = latency.evaluate(tiny_llama, ByteTokenizer(), "streaming:sinks=4,window=28", params)
    starts = latency.probe_starts(params)
    assert m["positions"] == [s + 2 for s in starts] and len(m["decode_ms"]) == len(starts)
    assert m["timed_steps"] == 2 * len(starts) * 4
    assert 0 < m["decode_ms_median"] <= m["decode_ms_p90"]
    sinks = 4 * 2 * 2 * 16 * 4  # the exact originals of the 4 re-indexed sink keys
    assert m["kv_bytes_peak"] == (32 + 32) * 2 * 2 * 2 * 16 * 4 + sinks  # budget + one fast-forward chunk


def test_streaming_specs_for_cache_sizes_and_sinks():
    assert latency_specs("512,1024", "0,4") == ["streaming:sinks=0,window=512", "streaming:sinks=4,window=508",
                                                "streaming:sinks=0,window=1024", "streaming:sinks=4,window=1020"]
    assert latency_specs("none", "4") == []
    with pytest.raises(KvlabError, match="below the cache size"):
        latency_specs("16", "16")


def test_runs_of_several_methods_are_interleaved_and_past_positions_is_not_applicable(tiny_llama, monkeypatch):
    calls = []

    def fake_measure(model, method, ids, params):
        calls.append(method)
        return latency.Run(prefill_s=1.0, probes=[[1.0] * params.probe_steps] * len(latency.probe_starts(params)),
                           kv_bytes_peak=10, seconds=2.0)

    monkeypatch.setattr(latency, "measure", fake_measure)
    params = latency.Params(tokens=1100, prefill=64, warmup=0, runs=2, probe_every=500, probe_steps=4)  # tiny: 1024
    h2o = "h2o:budget=64,recent=8,reindex=1"
    out = latency.evaluate_many(tiny_llama, ByteTokenizer(), ["full", "streaming:sinks=4,window=60", h2o], params)
    assert calls == ["streaming:sinks=4,window=60", h2o] * 2
    assert out["full"]["decode_ms_median"] is None and "not applicable" in out["full"]["note"]
    assert out[h2o]["runtime_s"] == 4.0 and out[h2o]["latency_growth"] == 1.0
