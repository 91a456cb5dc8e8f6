"""The method contract: a KV-cache method is a small dataclass of hyper-parameters.

Most methods override ONE thing, :meth:`Method.score` — a score per cached token, higher keeps —
and the cache does the rest (top-k, gather, position re-indexing, byte accounting). Methods that
treat heads differently (head-aware budgets, per-class bit widths) override :meth:`Method.plan`,
which splits a layer's KV heads into :class:`Group` s, each with its own budget, scorer and bits.

Budgets are *tokens kept per KV head per layer between forward passes*; while a chunk of ``q`` new
tokens is processed, a group holds at most ``budget + q`` tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvlab.errors import KvlabError
from kvlab.storage import Group, LayerInfo, Storage, in_time

__all__ = ["Group", "LayerInfo", "Method", "positive"]


@dataclass
class Method:
    """Base class. Fields of a subclass are its hyper-parameters, validated in ``__post_init__``."""

    name: ClassVar[str] = ""
    #: whether the cache must accumulate attention probabilities (H2O-like scores) for this method
    needs_scores: ClassVar[bool] = False
    #: whether kept tokens are re-indexed to their index in the cache (StreamingLLM, section 3.2);
    #: a plain class attribute, so that a subclass may make it a field (``streaming:reindex=0``). Off by
    #: default: a scorer that evicts anywhere would move (and keep exact copies of) most of its keys
    reindex = False
    #: a token's score does not depend on where the kept tokens are stored (a scorer that pools over time
    #: neighbours reads them through ``seg.time_index``), so a decode step may write the new token into the
    #: evicted token's slot instead of copying the cache
    order_free: ClassVar[bool] = False
    #: scores with many exact ties (max-pooling): a slot step then evicts the token the copying eviction's
    #: top-k would leave out, in time order, rather than the first lowest slot (see kvlab.storage.inplace)
    ties = False
    #: :meth:`score_in_time` reads nothing of the storage but ``seg.scores`` and ``seg.time_index``: a layer's
    #: one-head groups may then rank their slot steps as one (kvlab.storage.slotsets)
    scores_only: ClassVar[bool] = False
    #: a token's score, or what it is computed from, is fixed when it arrives (:meth:`arrival_scores` of its key:
    #: KNorm's norm; KeyDiff's two norms): storage whose keys never move computes it once, keeps it in ``seg.scores``
    #: and writes it into a slot step's slot, so a step does not read every kept key for it again
    fixed_scores: ClassVar[bool] = False

    def capacity(self) -> int | None:
        """Tokens kept per KV head between forward passes (None: unbounded)."""
        return None

    def prepare(self, model: object) -> None:
        """Called once by ``make_cache`` before planning: load files, check they fit the model."""

    def plan(self, layer: LayerInfo) -> list[Group]:
        """Split the layer's KV heads into groups. Default: one group, this method's capacity."""
        return [Group(heads=tuple(range(layer.num_kv_heads)), budget=self.capacity(), scorer=self)]

    def score(self, seg: Storage) -> torch.Tensor:
        """Score the ``seg.length`` cached tokens of a group: shape ``(n,)`` (same for every head)
        or ``(batch, heads, n)``; the ``budget`` highest are kept. ``inf`` forces a keep. Padding of a
        batch row is never kept, whatever its score; ``seg.order`` numbers a row's real tokens. The result may
        be ``seg.scores`` itself: callers read it and never write it."""
        raise NotImplementedError(f"{type(self).__name__} must implement score() or plan()")

    def arrival_scores(self, keys: torch.Tensor) -> torch.Tensor:
        """For a method with ``fixed_scores``: the scores ``(B, h, q)`` float32 of ``q`` arriving tokens from their
        keys ``(B, h, q, D)`` as the storage keeps them, or ``(B, h, q, w)``, ``w`` values a token's score is computed
        from; :meth:`score` then reads them in ``seg.scores`` (None where the storage keeps none: keys that move,
        quantized keys)."""
        raise NotImplementedError(f"{type(self).__name__} has fixed_scores but no arrival_scores()")

    def score_in_time(self, seg: Storage) -> torch.Tensor:
        """:meth:`score` in time order ``(B, h, n)``, padding first (``seg.time_index``'s order; the caller then gives
        padding ``-inf``): what a decode step that writes in the evicted slot ranks when the scores have ``ties``.
        Default: :meth:`score`, sorted into time order. Override it only where time order comes cheaper (max-pooling
        works in time order)."""
        return in_time(seg, self.score(seg))

    def runs(self, n: int) -> list[tuple[int, int]] | None:
        """Optional fast path for positional methods: the ``(start, stop)`` runs of the ``n`` cached
        tokens to keep (the same for every head), instead of scoring them. Default: None (score)."""
        return None

    def allocate(self, layer: LayerInfo, segments: Sequence[Storage]) -> list[int] | None:
        """Optional: new budgets for a layer's groups (in :meth:`plan`'s order), decided once, when the layer
        first evicts, from what its storage holds then (Ada-KV's adaptive per-head budgets). None: keep them."""
        return None

    def observed(self) -> int | None:
        """For a method that ``needs_scores``: the queries whose attention ``seg.scores`` holds. None
        (default): every query since the token entered, accumulated (H2O); ``w``: the last ``w`` queries
        of the newest forward pass only (SnapKV's observation window; 1 for TOVA)."""
        return None

    def spec(self) -> str:
        """The spec string that rebuilds this method, e.g. ``streaming:sinks=4,window=1020``."""
        parts = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self) if f.init]
        return self.name + (":" + ",".join(parts) if parts else "")


def need_profile(method: str, profile: str) -> None:
    """Methods that read a head profile (head-aware, haq, duo): a clear error when none is given."""
    if not profile:
        raise KvlabError(f"{method} needs profile=FILE (make one with 'kvlab heads profile --model M --output FILE')")


def positive(name: str, value: int, *, allow_zero: bool = False) -> None:
    """Validate an integer hyper-parameter with a message a user understands."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or (value == 0 and not allow_zero):
        need = "a non-negative" if allow_zero else "a positive"
        raise KvlabError(f"{name} must be {need} integer, got {value!r}")
