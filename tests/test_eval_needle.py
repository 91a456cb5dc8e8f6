"""Needle samples (depth, determinism, rendering, errors) and the needle evaluation's mechanics."""

from __future__ import annotations

import re

import pytest

from kvlab.errors import KvlabError
from kvlab.evals import needle
from kvlab.evals.haystack import is_correct, make_samples, render
from test_eval_helpers import FILLER, ByteTokenizer, ChatByteTokenizer

DEPTHS = [0, 25, 50, 75, 100]


def _needle_span(sample) -> tuple[int, int]:
    start = sample.context.index("The pass key is")
    return start, sample.context.index("is the pass key.", start)


def test_needle_sits_at_the_requested_depth():
    tok = ByteTokenizer()
    samples = make_samples(tok, 1500, DEPTHS, seed=0, text=FILLER)
    assert [s.depth for s in samples] == DEPTHS
    for s in samples:
        assert abs(s.needle_depth - s.depth) <= 3.0, (s.depth, s.needle_depth)
        intro_end = s.context.index("quiz you about it.\n\n") + len("quiz you about it.\n\n")
        start, end = _needle_span(s)
        filler_chars = len(s.context) - intro_end - (end - start)
        assert abs(100 * (start - intro_end) / filler_chars - s.depth) <= 4.0
    # the same haystack at every depth of a sample: only the key and its place change
    fillers = {s.context[:_needle_span(s)[0] - 1] + s.context[_needle_span(s)[1] + len("is the pass key.\n"):]
               for s in samples}
    assert len(fillers) == 1
    assert "quiz you about it.\n\n\nThe pass key is" in samples[0].context  # depth 0: right after the intro
    assert samples[-1].context.endswith("is the pass key.\n")  # depth 100: at the very end


def test_samples_are_deterministic_and_seeded():
    tok = ByteTokenizer()
    a = make_samples(tok, 800, [50], seed=3, text=FILLER, n=2)
    b = make_samples(tok, 800, [50], seed=3, text=FILLER, n=2)
    c = make_samples(tok, 800, [50], seed=4, text=FILLER, n=2)
    assert a == b
    assert [s.answer for s in a] != [s.answer for s in c]
    assert a[0].answer != a[1].answer  # two samples per depth differ


def test_length_is_the_context_token_count():
    tok = ByteTokenizer()  # bytes re-encode exactly, so the count is exact
    for s in make_samples(tok, 1000, [0, 50, 100], seed=0, text=FILLER):
        assert s.context_tokens == len(tok.encode(s.context)) == 1000
        assert s.context.count(s.answer) == 2 and s.answer not in s.question


def test_multikey_has_distractors_and_asks_one_key():
    tok = ByteTokenizer()
    (s,) = make_samples(tok, 1500, [40], seed=1, text=FILLER, variant="multikey", keys=5)
    needles = re.findall(r"magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.", s.context)
    assert len(needles) == 5 and len({k for k, _ in needles}) == 5
    asked = re.search(r"for ([a-z]+-[a-z]+) mentioned", s.question).group(1)
    assert dict(needles)[asked] == s.answer
    assert abs(s.needle_depth - 40) <= 3.0


def test_chat_rendering_splits_before_the_question():
    tok = ChatByteTokenizer()
    head, tail = render(tok, "CONTEXT", "QUESTION?")
    assert head == "<u>CONTEXT" and tail == "QUESTION?</u><a>"
    (s,) = make_samples(tok, 600, [50], seed=0, text=FILLER)
    assert s.context.startswith("<u>") and "</u>" not in s.context
    assert s.question.endswith("</u><a>The pass key is")
    assert render(ByteTokenizer(), "C", "Q?") == ("C", "Q?\n")


@pytest.mark.parametrize("kwargs, message", [
    ({"depths": [101]}, "between 0 and 100"),
    ({"depths": [-1]}, "between 0 and 100"),
    ({"length": 10**6}, f"has only {len(FILLER)} tokens"),
    ({"length": 40}, "too short"),
    ({"variant": "haystack"}, "unknown needle variant"),
])
def test_bad_input_is_one_clear_error(kwargs, message):
    args = {"length": 800, "depths": [50], **kwargs}
    with pytest.raises(KvlabError, match=message):
        make_samples(ByteTokenizer(), args.pop("length"), args.pop("depths"), seed=0, text=FILLER, **args)


def test_params_validate_depth_and_sizes():
    with pytest.raises(KvlabError, match="between 0 and 100"):
        needle.Params(depth=150)
    with pytest.raises(KvlabError, match="samples must be at least 1"):
        needle.Params(samples=0)


@pytest.mark.parametrize("text, answer, ok", [
    (" 48213.", "48213", True), ("The key is 48213", "48213", True), ("4821", "48213", False),
    ("482130", "48213", False), ("no number", "48213", False), (" 1,234,567.", "1234567", True),
])
def test_exact_match_of_the_first_number(text, answer, ok):
    assert is_correct(text, answer) is ok


def test_evaluate_runs_both_settings_on_a_tiny_model(tiny_llama, tmp_path):
    data = tmp_path / "filler.txt"
    data.write_text(FILLER)
    tok = ByteTokenizer()
    for aware in (False, True):
        params = needle.Params(length=500, depth=50, samples=2, data=str(data), chunk_size=128, question_aware=aware,
                               max_new_tokens=4)
        full = needle.evaluate(tiny_llama, tok, "full", params)
        small = needle.evaluate(tiny_llama, tok, "streaming:sinks=4,window=60", params)
        assert full["samples"] == 2 and 0.0 <= full["accuracy"] <= 1.0 and len(full["answers"]) == 2
        assert full["compression_ratio"] == pytest.approx(0.0)
        assert small["kv_bytes"] < full["kv_bytes"] / 2  # after compression, in both settings
        if not aware:  # streamed in chunks: the cache never holds the whole context
            assert small["compression_ratio"] > 0.5
        else:  # one prefill of context + question: the peak is the full prefill
            assert small["kv_bytes_peak"] > 0.95 * full["kv_bytes_peak"]


def test_past_max_positions_is_not_applicable_for_the_full_cache_only(tiny_llama, tmp_path):
    data = tmp_path / "filler.txt"
    data.write_text(FILLER)
    params = needle.Params(length=1100, depth=50, data=str(data), chunk_size=256, max_new_tokens=2)  # tiny: 1024 positions
    full = needle.evaluate(tiny_llama, ByteTokenizer(), "full", params)
    assert full["accuracy"] is None and "not applicable" in full["note"] and "1024" in full["note"]
    streaming = needle.evaluate(tiny_llama, ByteTokenizer(), "streaming:sinks=4,window=200", params)
    assert streaming["accuracy"] is not None


@pytest.mark.real
def test_qwen_finds_a_pass_key_with_the_full_cache_and_loses_it_when_evicted(qwen):
    model, tok = qwen
    params = needle.Params(length=500, depth=30, chunk_size=512)
    assert needle.evaluate(model, tok, "full", params)["accuracy"] == 1.0
    assert needle.evaluate(model, tok, "streaming:sinks=4,window=128", params)["accuracy"] == 0.0
