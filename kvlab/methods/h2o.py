"""H2O (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs")."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlab.errors import KvlabError
from kvlab.methods.base import Method, positive
from kvlab.storage import Storage, force_newest, pool_max


@dataclass
class H2O(Method):
    """Per KV head, keep the ``recent`` newest tokens plus the heavy hitters: the tokens with the
    largest attention accumulated over every query since they entered the cache (at prefill and at
    every decode step). With grouped-query attention the query heads of a group are averaged.

    Kept tokens keep their original positions, as in the paper (a stream is then bounded by the
    model's maximum position); ``reindex=1`` re-indexes them to their index in the cache, as
    StreamingLLM does, at the cost of re-rotating every key that precedes an evicted one.

    ``pool`` (odd, default 1 = the paper): a token is ranked by the largest accumulated attention within
    ``pool`` tokens centred on it (max-pooling, SnapKV's clustering, Li et al. 2024), so a heavy hitter keeps
    its neighbours: a number split into digit tokens is kept or evicted whole.
    """

    budget: int = 1024
    recent: int = 256
    reindex: bool = False
    pool: int = 1
    name = "h2o"
    needs_scores = True
    order_free = True  # decode steps write in the evicted slot (pooling reads neighbours through seg.time_index)

    def __post_init__(self) -> None:
        positive("budget", self.budget)
        positive("recent", self.recent, allow_zero=True)
        if self.recent > self.budget:
            raise KvlabError(f"recent ({self.recent}) cannot exceed budget ({self.budget})")
        if self.pool < 1 or self.pool % 2 == 0:
            raise KvlabError(f"pool must be an odd number of tokens (1 = no pooling), got {self.pool}")

    def capacity(self) -> int:
        return self.budget

    @property
    def ties(self) -> bool:
        return self.pool > 1

    def score(self, seg: Storage) -> torch.Tensor:
        return self._score(seg, time_order=False)

    def score_in_time(self, seg: Storage) -> torch.Tensor:
        return self._score(seg, time_order=True)

    def _score(self, seg: Storage, time_order: bool) -> torch.Tensor:
        # seg.scores (batch, heads, n) accumulated attention: read, never written (as every scorer's score); each
        # token's the max over its neighbourhood in time with pool > 1 (padding never wins: -inf)
        s = pool_max(seg, seg.scores, self.pool, time_order=time_order)
        if self.recent:  # the newest tokens by age: kept tokens may sit in any order (see order_free)
            s = force_newest(s, seg, self.recent, time_order)
        return s
