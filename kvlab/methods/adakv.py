"""Ada-KV (Feng et al. 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for
Efficient LLM Inference")."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvlab.errors import KvlabError
from kvlab.methods.base import Group, LayerInfo, Method
from kvlab.methods.snapkv import check_window, snap_scores
from kvlab.storage import Storage


@dataclass
class AdaKV(Method):
    """``adakv:budget=1024,window=32,kernel=7,floor=0.2``: SnapKV's scores with per-head budgets.

    A layer's heads share ``budget x heads`` tokens. When a layer first evicts (at prefill), the budget of
    each KV head is its share of the layer's top ``budget x heads`` scores over all its heads (the paper's
    adaptive allocation: a head whose attention is spread keeps more, a concentrated one fewer); every head
    first gets ``floor x budget`` of its own best tokens (the paper's safeguard, alpha = 0.2). With a batch,
    the scores of the rows are averaged. The budgets are then fixed for the rest of the sequence (deciding
    them again at every step would read counts back from the device at every step).

    Each KV head is stored in its own tensors, so the memory really shrinks: a layer holds ``budget x heads``
    tokens (plus at most one pass of new tokens), where kvpress's AdaKVPress masks entries of full tensors.
    Within a head, tokens are kept as by SnapKV: ``window`` newest always, the rest by the attention of the
    last ``window`` queries (max-pooled over ``kernel``). Question-agnostic unless the prompt ends with the
    question. Kept tokens keep their original positions.
    """

    budget: int = 1024
    window: int = 32
    kernel: int = 7
    floor: float = 0.2
    reindex: bool = False
    name = "adakv"
    needs_scores = True
    order_free = True  # decode steps write in the evicted slot
    scores_only = True  # score_in_time pools seg.scores in time order, nothing else

    def __post_init__(self) -> None:
        check_window(self.budget, self.window, self.kernel)
        if not 0.0 <= self.floor <= 1.0:
            raise KvlabError(f"floor must be a share of the budget between 0 and 1, got {self.floor}")

    def capacity(self) -> int:
        return self.budget

    @property
    def ties(self) -> bool:
        return self.kernel > 1

    def observed(self) -> int:
        return self.window

    def plan(self, layer: LayerInfo) -> list[Group]:
        return [Group(heads=(h,), budget=self.budget, scorer=self, label=f"head{h}") for h in range(layer.num_kv_heads)]

    def score(self, seg: Storage) -> torch.Tensor:
        return snap_scores(seg, self.window, self.kernel)

    def score_in_time(self, seg: Storage) -> torch.Tensor:
        return snap_scores(seg, self.window, self.kernel, time_order=True)

    def allocate(self, layer: LayerInfo, segments: Sequence[Storage]) -> list[int] | None:
        """Budgets of the layer's one-head groups, from their scores just before the first eviction."""
        scores = torch.stack([self.score(seg).mean(dim=0)[0] for seg in segments])  # (heads, n)
        heads, n = scores.shape
        total = min(self.budget * heads, heads * n)
        own = min(n, max(self.window, int(self.floor * self.budget)))
        forced = scores.topk(own, dim=-1).indices  # every head's own best tokens first (the safeguard)
        ranked = scores.scatter(1, forced, float("inf")).flatten()
        chosen = ranked.topk(total).indices // n
        counts = torch.bincount(chosen, minlength=heads).tolist()  # one read from the device, once per layer
        return [max(1, c) for c in counts]
