"""TOVA (Oren et al. 2024, "Transformers are Multi-State RNNs")."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlab.methods.base import Method, positive
from kvlab.storage import Storage


@dataclass
class TOVA(Method):
    """``tova:budget=1024``: Token Omission Via Attention. Keep the ``budget`` tokens with the largest
    attention from the last query (no accumulation, no recent window, no pooling).

    Per KV head by default (the query heads of a KV head averaged); ``shared=1`` averages over all the
    layer's heads, so every head keeps the same tokens, as in the paper's main setting and kvpress.
    Prefill: eviction runs before each forward pass's new tokens are appended, scored by the previous
    pass's last query (with the prompt in one pass: the prompt's last token — question-agnostic unless
    the prompt ends with the question). Decoding: every step, by the newest token's attention; the
    paper drops one token per step once the budget is reached, which is what a step does here.
    Kept tokens keep their original positions.
    """

    budget: int = 1024
    shared: bool = False
    reindex: bool = False
    name = "tova"
    needs_scores = True
    order_free = True  # decode steps write in the evicted slot (shared: every head picks the same slot)

    def __post_init__(self) -> None:
        positive("budget", self.budget)

    def capacity(self) -> int:
        return self.budget

    def observed(self) -> int:
        return 1

    def score(self, seg: Storage) -> torch.Tensor:
        s = seg.scores  # (B, h, n) attention of the last query
        return s.mean(1, keepdim=True).expand_as(s) if self.shared else s
