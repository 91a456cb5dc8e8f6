"""KV-byte accounting of the memory evaluation, not-applicable cells, and the peak-memory tracker."""

from __future__ import annotations

import pytest
import torch

from kvlab.cache import make_cache
from kvlab.evals import memory
from kvlab.evals.common import position_note
from kvlab.evals.peakmem import PeakMemory
from kvlab.stream import feed
from test_eval_helpers import FILLER, ByteTokenizer


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gemma3"])
@pytest.mark.parametrize("tokens, chunk", [(100, 32), (64, 64), (33, 8), (5, 16)])
def test_computed_full_bytes_match_the_full_cache(request, family, tokens, chunk):
    model = request.getfixturevalue(family)
    cache = make_cache(model, "full")
    feed(model, cache, torch.randint(0, 256, (1, tokens), generator=torch.Generator().manual_seed(0)), chunk)
    assert memory.full_kv_bytes(model, tokens, chunk) == cache.peak_nbytes
    if family == "tiny_llama":  # no sliding layer: the peak is the end
        assert cache.peak_nbytes == cache.full_nbytes()


def test_streaming_bytes_are_bounded_and_reduction_is_exact(tiny_llama, tmp_path):
    data = tmp_path / "t.txt"
    data.write_text(FILLER)
    per_token = 2 * 2 * 2 * 16 * 4  # layers * kv heads * (K+V) * head_dim * float32
    m = memory.evaluate(tiny_llama, ByteTokenizer(), "streaming:sinks=4,window=60", memory.Params(tokens=500, data=str(data),
                                                                                                  chunk_size=50))
    sinks = 4 * per_token // 2  # the exact originals of the 4 re-indexed sink keys (keys only)
    assert m["kv_bytes_peak"] == (64 + 50) * per_token + sinks  # budget + one chunk
    assert m["kv_bytes"] == (64 + 50) * per_token + sinks
    assert m["kv_bytes_full"] == 500 * per_token
    assert m["mem_reduction_pct"] == pytest.approx(100 * (1 - 116 / 500))
    assert m["peak_mem_bytes"] >= m["peak_mem_delta_bytes"] >= 0
    full = memory.evaluate(tiny_llama, ByteTokenizer(), "full", memory.Params(tokens=500, data=str(data), chunk_size=50))
    assert full["kv_bytes_peak"] == full["kv_bytes_full"] and full["mem_reduction_pct"] == pytest.approx(0.0)


def test_past_max_positions_full_is_not_applicable_streaming_runs(tiny_llama):
    tok = ByteTokenizer()  # pydoc has ~465k bytes; the tiny model has 1024 positions
    full = memory.evaluate(tiny_llama, tok, "full", memory.Params(tokens=1500, chunk_size=500))
    assert full["kv_bytes_peak"] is None and full["mem_reduction_pct"] is None
    assert "1500 tokens exceed the model's 1024 positions" in full["note"]
    assert full["kv_bytes_full"] == memory.full_kv_bytes(tiny_llama, 1500, 500)
    stream = memory.evaluate(tiny_llama, tok, "streaming:sinks=4,window=252", memory.Params(tokens=1500, chunk_size=500))
    assert stream["kv_bytes_peak"] is not None and stream["mem_reduction_pct"] == pytest.approx(100 * (1 - 758 / 1500))  # + the 4 sinks' original keys


def test_position_note_only_for_methods_that_keep_positions(tiny_llama):
    assert position_note(tiny_llama, "full", 1024) is None
    assert "not applicable" in position_note(tiny_llama, "full", 1025)
    assert position_note(tiny_llama, "streaming:sinks=4,window=100", 10**6) is None
    assert position_note(tiny_llama, "h2o:budget=64,recent=8,reindex=1", 10**6) is None
    assert "not applicable" in position_note(tiny_llama, "h2o:budget=64,recent=8", 10**6)  # paper positions


def test_text_shorter_than_the_length_says_how_many_tokens(tmp_path):
    from kvlab.errors import KvlabError

    data = tmp_path / "t.txt"
    data.write_text("short text")
    with pytest.raises(KvlabError, match="has only 10 tokens"):
        memory.load_ids(ByteTokenizer(), str(data), 100)
    data.write_text("  \n")
    with pytest.raises(KvlabError, match="empty"):
        memory.load_ids(ByteTokenizer(), str(data), 100)


def test_peak_memory_sees_a_short_lived_allocation():
    with PeakMemory("cpu") as mem:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    assert mem.delta_bytes >= 48 * 2**20, (mem.how, mem.delta_bytes)
    with PeakMemory("cpu") as idle:
        pass
    assert idle.delta_bytes < 16 * 2**20
