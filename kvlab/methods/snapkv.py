"""SnapKV (Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation")."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlab.errors import KvlabError
from kvlab.methods.base import Method, positive
from kvlab.storage import Storage, force_newest, pool_max


def check_window(budget: int, window: int, kernel: int) -> None:
    """The checks SnapKV and PyramidKV share: a positive budget, a window inside it, an odd kernel."""
    positive("budget", budget)
    positive("window", window)
    if window > budget:
        raise KvlabError(f"window ({window}) cannot exceed budget ({budget}): the window's tokens are always kept")
    if not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
        raise KvlabError(f"kernel must be an odd number of tokens (1 = no pooling), got {kernel!r}")


def snap_scores(seg: Storage, window: int, kernel: int, time_order: bool = False) -> torch.Tensor:
    """``(B, h, n)``: attention from the observation window, max-pooled over ``kernel`` neighbours in time, the
    ``window`` newest tokens forced in (``inf``), whatever order the kept tokens are stored in; in that order, or
    in time order (``time_order``: :meth:`~kvlab.methods.base.Method.score_in_time`)."""
    # seg.scores (B, h, n): mean over the KV head's query heads, summed over the window's queries
    s = pool_max(seg, seg.scores, kernel, time_order=time_order)  # padding never wins the max
    return force_newest(s, seg, window, time_order)


@dataclass
class SnapKV(Method):
    """``snapkv:budget=1024,window=32,kernel=7``: per KV head, keep the ``window`` newest tokens plus
    the ``budget - window`` tokens most attended by the last ``window`` queries (the observation
    window), each token ranked by the max over ``kernel`` neighbours (max-pooling, the paper's
    clustering). With grouped-query attention the query heads of a KV head are averaged.

    Prefill: eviction runs before each forward pass's new tokens are appended, scored by the last
    ``window`` queries of the previous pass; with one forward pass over the prompt (``--chunk-size``
    >= its length) that is the paper's policy: the window is the prompt's last ``window`` tokens,
    whatever they are (question-agnostic unless the prompt ends with the question, as in the paper).
    Chunked prefill observes each chunk's last ``min(window, chunk)`` queries.
    Decoding: a step has one query, so each step ranks by the newest token's attention (pooled), the
    ``window`` newest tokens always kept; the paper compresses once at prefill and never again.
    Kept tokens keep their original positions (as in the paper and kvpress).
    """

    budget: int = 1024
    window: int = 32
    kernel: int = 7
    reindex: bool = False
    name = "snapkv"
    needs_scores = True
    order_free = True  # decode steps write in the evicted slot
    scores_only = True  # score_in_time pools seg.scores in time order, nothing else

    def __post_init__(self) -> None:
        check_window(self.budget, self.window, self.kernel)

    def capacity(self) -> int:
        return self.budget

    @property
    def ties(self) -> bool:
        return self.kernel > 1

    def observed(self) -> int:
        return self.window

    def score(self, seg: Storage) -> torch.Tensor:
        return snap_scores(seg, self.window, self.kernel)

    def score_in_time(self, seg: Storage) -> torch.Tensor:
        return snap_scores(seg, self.window, self.kernel, time_order=True)
