"""Simultaneous translation arithmetic: wait-k schedules, latency metrics, corpus quality.

Delays are counted in source words: ``delays[i]`` is how many source words had been read when target
word ``i`` was written. Latency follows SimulEval's text-to-text scorers (Ma et al. 2020, "SimulEval"),
with its default of measuring the target length on the reference:

* AL (Ma et al. 2019, STACL): ``1/tau * sum_{i=1..tau} (d_i - (i - 1) / gamma)``, ``gamma = |Y*| / |X|``
  (``|Y*|`` reference words, ``|X|`` source words) and ``tau`` the first target word written with the
  whole source read (``d_i >= |X|``); ``d_1`` itself when ``d_1 > |X|``.
* LAAL (Papi et al. 2022): the same with ``gamma = max(|Y|, |Y*|) / |X|`` (``|Y|`` hypothesis words), so a
  long hypothesis cannot lower its lag by over-generating.

Corpus scores: the mean of the sentence AL/LAAL values (sentences with an empty output are skipped, as
SimulEval does), corpus BLEU and chrF from sacrebleu.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def waitk_delays(k: int, source_words: int, target_words: int) -> list[int]:
    """The delays of wait-k: target word ``i`` (0-based) is written after ``min(k + i, |X|)`` words."""
    return [min(k + i, source_words) for i in range(target_words)]


def _lagging(delays: Sequence[float], source_len: int, gamma: float) -> float:
    if delays[0] > source_len:
        return float(delays[0])
    total, tau = 0.0, 0
    for i, d in enumerate(delays):
        total += d - i / gamma
        tau = i + 1
        if d >= source_len:
            break
    return total / tau


def average_lagging(delays: Sequence[float], source_len: int, reference_len: int) -> float:
    """AL of one sentence (SimulEval, target length from the reference)."""
    _check(delays, source_len)
    return _lagging(delays, source_len, max(reference_len, 1) / source_len)


def length_adaptive_average_lagging(delays: Sequence[float], source_len: int, reference_len: int) -> float:
    """LAAL of one sentence: AL with ``gamma = max(|Y|, |Y*|) / |X|``."""
    _check(delays, source_len)
    return _lagging(delays, source_len, max(len(delays), reference_len, 1) / source_len)


def _check(delays: Sequence[float], source_len: int) -> None:
    if not delays:
        raise ValueError("latency of an empty output is undefined")
    if source_len < 1:
        raise ValueError("source length must be at least 1 word")


def corpus_scores(hypotheses: list[str], references: list[str], delays: list[list[int]],
                  sources: list[str]) -> dict[str, float | int | None]:
    """BLEU, chrF (sacrebleu, corpus level) and mean AL / LAAL over the sentences with output."""
    import sacrebleu

    al, laal = [], []
    for hyp_delays, src, ref in zip(delays, sources, references):
        if hyp_delays:
            n_src, n_ref = len(src.split()), len(ref.split())
            al.append(average_lagging(hyp_delays, n_src, n_ref))
            laal.append(length_adaptive_average_lagging(hyp_delays, n_src, n_ref))
    return {
        "bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
        "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score,
        "al": statistics.mean(al) if al else None,
        "laal": statistics.mean(laal) if laal else None,
        # no word written, or only tokens whose text is empty (special tokens, whitespace): nothing to score
        "empty_outputs": sum(1 for d, h in zip(delays, hypotheses) if not d or not h.strip()),
    }
