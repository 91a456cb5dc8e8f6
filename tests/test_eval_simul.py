"""Latency and quality arithmetic of simultaneous translation, against values computed by hand."""

from __future__ import annotations

import pytest

from kvlab.evals.simul import (average_lagging, corpus_scores, length_adaptive_average_lagging, waitk_delays)


def test_waitk_delays_cap_at_source_length():
    assert waitk_delays(3, 5, 8) == [3, 4, 5, 5, 5, 5, 5, 5]
    assert waitk_delays(1, 2, 1) == [1]


def test_al_by_hand():
    # |X| = 5, |Y*| = 4: gamma = 0.8; terms 3 - 0, 4 - 1/0.8, 5 - 2/0.8 (d = |X| stops at tau = 3)
    assert average_lagging([3, 4, 5, 5], 5, 4) == pytest.approx((3 + 2.75 + 2.5) / 3)


def test_al_and_laal_differ_when_the_hypothesis_is_longer_than_the_reference():
    delays, src, ref = [2, 2, 3, 4, 4, 4], 4, 3
    # AL: gamma = 3/4 -> 2, 2 - 4/3, 3 - 8/3, 4 - 4 (tau = 4)
    assert average_lagging(delays, src, ref) == pytest.approx((2 + (2 - 4 / 3) + (3 - 8 / 3) + 0) / 4)
    # LAAL: gamma = max(6, 3)/4 = 1.5 -> 2, 2 - 2/3, 3 - 4/3, 4 - 2
    assert length_adaptive_average_lagging(delays, src, ref) == pytest.approx(7 / 4)


def test_laal_equals_al_when_the_reference_is_longer():
    delays = [1, 2, 3, 3]
    assert length_adaptive_average_lagging(delays, 3, 6) == pytest.approx(average_lagging(delays, 3, 6))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_waitk_with_equal_lengths_lags_exactly_k(k):
    n = 12
    assert average_lagging(waitk_delays(k, n, n), n, n) == pytest.approx(k)


def test_first_delay_past_the_source_is_returned_as_is():
    assert average_lagging([7, 7], 5, 2) == 7.0


def test_empty_output_has_no_latency():
    with pytest.raises(ValueError):
        average_lagging([], 5, 3)


def test_corpus_scores_perfect_and_empty():
    refs = ["le chat est noir .", "il pleut beaucoup aujourd'hui ."]
    srcs = ["the cat is black .", "it rains a lot today ."]
    perfect = corpus_scores(refs, refs, [waitk_delays(2, 5, 5), waitk_delays(2, 6, 5)], srcs)
    assert perfect["bleu"] == pytest.approx(100.0)
    assert perfect["chrf"] == pytest.approx(100.0)
    assert perfect["empty_outputs"] == 0
    half = corpus_scores([refs[0], ""], refs, [waitk_delays(2, 5, 5), []], srcs)
    assert half["empty_outputs"] == 1
    # words were written, but only special tokens or whitespace, which decode to no text: empty too
    blank = corpus_scores([refs[0], " "], refs, [waitk_delays(2, 5, 5), [6]], srcs)
    assert blank["empty_outputs"] == 1
    assert half["al"] == pytest.approx(average_lagging(waitk_delays(2, 5, 5), 5, 5))
    assert 0 < half["bleu"] < 100
