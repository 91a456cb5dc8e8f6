"""Key-norm eviction (Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression")."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlab.errors import KvlabError
from kvlab.methods.base import Method, positive
from kvlab.storage import Storage


@dataclass
class KNorm(Method):
    """``knorm:budget=1024,recent=0``: per KV head, keep the ``budget`` tokens whose keys have the
    smallest L2 norm (low-norm keys draw high attention), plus the ``recent`` newest tokens if set.

    Needs no attention scores, so it runs with any attention kernel, and observes no query at all:
    question-agnostic by construction. Prefill: before each forward pass's new tokens are appended;
    decoding: at every step. Keys are scored as stored (rotated by RoPE, which preserves their norm), each one
    once, when it arrives: dense storage keeps the norms (``fixed_scores``), so a step computes one norm, not ``n``.
    Kept tokens keep their original positions (as in kvpress's KnormPress).
    """

    budget: int = 1024
    recent: int = 0
    reindex: bool = False
    name = "knorm"
    order_free = True  # decode steps write in the evicted slot
    ties = True  # RoPE keeps a key's norm: a repeated token's keys tie in the first layer
    fixed_scores = True  # a kept key's norm never changes: dense storage keeps it from the token's arrival

    def __post_init__(self) -> None:
        positive("budget", self.budget)
        positive("recent", self.recent, allow_zero=True)
        if self.recent > self.budget:
            raise KvlabError(f"recent ({self.recent}) cannot exceed budget ({self.budget})")

    def capacity(self) -> int:
        return self.budget

    def score(self, seg: Storage) -> torch.Tensor:
        s = self.key_scores(seg)  # (B, h, n)
        return s.masked_fill(seg.age < self.recent, float("inf")) if self.recent else s

    def key_scores(self, seg: Storage) -> torch.Tensor:
        """``(B, h, n)`` scores from the kept keys alone, as stored (the one thing a key-only variant overrides, with
        :meth:`arrival_scores`, or ``fixed_scores = False`` where nothing of a key's score is fixed at its arrival):
        the norms kept since each token arrived (``seg.scores``), or, where the storage keeps none (keys that move,
        quantized keys), those of the keys it holds now."""
        return seg.scores if seg.scores is not None else self.arrival_scores(seg.stored()[0])

    def arrival_scores(self, keys: torch.Tensor) -> torch.Tensor:
        """``(B, h, q)``: minus the norms of ``keys (B, h, q, D)``."""
        # norms summed in float32 as the keys are read: no float32 copy of a low-precision cache (the same bits)
        return -torch.linalg.vector_norm(keys, dim=-1, dtype=torch.float32)
