"""StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks")."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlab.methods.base import Method, positive
from kvlab.storage import Storage


@dataclass
class StreamingLLM(Method):
    """Keep the first ``sinks`` tokens (attention sinks) and the last ``window`` tokens.

    Positions are re-indexed inside the cache (section 3.2 of the paper): a kept token's position
    is its index in the cache, so a stream can run far past the model's maximum position.
    ``reindex=0`` keeps every token at its original position instead (an ablation).
    """

    sinks: int = 4
    window: int = 1020
    reindex: bool = True
    name = "streaming"

    def __post_init__(self) -> None:
        positive("sinks", self.sinks, allow_zero=True)
        positive("window", self.window)

    def capacity(self) -> int:
        return self.sinks + self.window

    def runs(self, n: int) -> list[tuple[int, int]]:
        # the sinks and the window: two slices, no top-k (score() below says the same, for storage
        # that evicts by blocks)
        return [(0, self.sinks), (n - self.window, n)] if self.sinks else [(n - self.window, n)]

    def score(self, seg: Storage) -> torch.Tensor:
        # recency among a row's real tokens, with its first `sinks` real tokens forced in: (n,) or (B, h, n)
        rank = seg.order.float()
        return rank.masked_fill(rank < self.sinks, float("inf"))
