"""H2O (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs")."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlab.errors import KvlabError
from kvlab.kv import Segment
from kvlab.methods.base import Method, positive


@dataclass
class H2O(Method):
    """Per KV head, keep the ``recent`` newest tokens plus the heavy hitters: the tokens with the
    largest attention accumulated over every query since they entered the cache (at prefill and at
    every decode step). With grouped-query attention the query heads of a group are averaged.

    Kept tokens are re-indexed to their index in the cache, as in StreamingLLM, so that a stream can
    run past the model's maximum position; ``reindex=0`` keeps original positions (the H2O paper's
    setting, bounded by the model's maximum position).
    """

    budget: int = 1024
    recent: int = 256
    reindex: bool = True
    name = "h2o"
    needs_scores = True

    def __post_init__(self) -> None:
        positive("budget", self.budget)
        positive("recent", self.recent, allow_zero=True)
        if self.recent > self.budget:
            raise KvlabError(f"recent ({self.recent}) cannot exceed budget ({self.budget})")

    def capacity(self) -> int:
        return self.budget

    def score(self, seg: Segment) -> torch.Tensor:
        s = seg.scores.clone()  # (batch, heads, n) accumulated attention
        if self.recent:
            s[..., -self.recent :] = float("inf")
        return s
