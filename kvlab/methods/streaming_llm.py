"""StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks")."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlab.kv import Segment
from kvlab.methods.base import Method, positive


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

    def score(self, seg: Segment) -> torch.Tensor:
        # recency, with the sinks forced in: (n,)
        s = torch.arange(seg.length, dtype=torch.float32, device=seg.device)
        s[: self.sinks] = float("inf")
        return s
