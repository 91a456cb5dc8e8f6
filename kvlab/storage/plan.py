"""The contract between a method and the storage: the layer it plans for, head groups, a scorer, and the storage
the scorer reads.

Imports point one way: :mod:`kvlab.methods` builds these plain types; the storage reads them and
never imports a method. A method is a :class:`Scorer` to the storage: it may pick the tokens to keep
by contiguous runs (positional methods) or by a score per token, and says whether positions are
re-indexed and whether attention probabilities must be accumulated for it.

:class:`Storage` is the one interface :mod:`kvlab.cache` uses; :func:`kvlab.storage.make_segment` picks
the implementation for a :class:`Group` (dense for 16 bits, KIVI-quantized below).
Batch rows may carry padding: ``push`` takes the validity of the new tokens, a row keeps exactly the
tokens it would keep alone (padding never counts against a budget) and attention never reads padding.
The three types refer to each other (a storage holds a group, whose scorer scores a storage), so they live here
together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from kvlab.errors import KvlabError

GROUP_SIZE = 32  # tokens per key-scale block of quantized storage (KIVI's G)
RESIDUAL = 32  # newest tokens a quantized group keeps in full precision (KIVI's R)
WIDTHS = (2, 4, 8, 16)  # bit widths a group may use; 16 = dense
ROPE = ("pre", "post")  # quantized keys stored before RoPE (KVQuant) or as the model rotated them (KIVI)


@dataclass(frozen=True)
class LayerInfo:
    """What a method may know about the attention layer it plans for."""

    index: int
    num_layers: int
    num_kv_heads: int
    num_heads: int
    head_dim: int
    sliding_window: int | None = None  # a sliding-window layer (Gemma local layers) keeps < this many tokens


@runtime_checkable
class Scorer(Protocol):
    """The storage's view of a method (:class:`kvlab.methods.base.Method` implements it)."""

    #: the storage accumulates attention probabilities into ``seg.scores`` (H2O-like methods)
    needs_scores: bool
    #: kept tokens are re-indexed to their index in the cache (StreamingLLM, section 3.2)
    reindex: bool
    #: scores do not depend on the order of kept tokens: a decode step may write in the evicted slot
    order_free: bool
    #: scores with many exact ties (max-pooling): a slot step evicts what the copying eviction would
    ties: bool
    # optional, read with getattr: ``fixed_scores`` and ``arrival_scores(keys)`` (a score fixed when a token
    # arrives, kept in ``seg.scores``: see kvlab.methods.base.Method)

    def score(self, seg: Storage) -> torch.Tensor:
        """``(n,)`` or ``(batch, heads, n)`` scores of the kept tokens; the highest are kept."""
        ...

    def score_in_time(self, seg: Storage) -> torch.Tensor:
        """:meth:`score` in time order, padding first (``seg.time_index``'s): what a slot step ranks when the scorer
        has ``ties``. Asked only of ``order_free`` scorers."""
        ...

    def runs(self, n: int) -> list[tuple[int, int]] | None:
        """The ``(start, stop)`` runs of ``n`` tokens to keep (positional methods), or None to score."""
        ...

    def observed(self) -> int | None:
        """Queries whose attention makes ``seg.scores``: None = every query since a token entered
        (accumulated, H2O); ``w`` = the last ``w`` queries of the newest forward pass (SnapKV, TOVA)."""
        ...


@dataclass(frozen=True)
class Group:
    """A set of KV heads of one layer that share a budget, a scorer and a bit width.

    ``heads`` are KV-head indices (sorted); ``budget`` None means never evict; ``scorer`` picks the
    tokens to keep; ``bits`` 16 means full precision.
    """

    heads: tuple[int, ...]
    budget: int | None
    scorer: Scorer
    bits: int = 16
    label: str = "all"


@dataclass(frozen=True)
class QuantGroup(Group):
    """A :class:`Group` stored KIVI-quantized at ``bits`` (16: dense), ``group_size`` tokens per key
    block, ``residual`` recent tokens in full precision, the scorer's sinks exact if ``exact_sinks``; keys
    quantized before RoPE (``rope="pre"``) or after it (``"post"``, see :mod:`kvlab.storage.quantized`)."""

    group_size: int = GROUP_SIZE
    residual: int = RESIDUAL
    exact_sinks: bool = False
    rope: str = "pre"

    def __post_init__(self) -> None:
        if self.bits not in WIDTHS:
            raise KvlabError(f"bits must be one of {', '.join(map(str, WIDTHS))}, got {self.bits!r}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise KvlabError(f"group_size must be a positive integer, got {self.group_size!r}")
        if not isinstance(self.residual, int) or self.residual < 0:
            raise KvlabError(f"residual must be a non-negative integer, got {self.residual!r}")
        check_rope(self.rope)
        b, s = self.budget, getattr(self.scorer, "sinks", 0) if self.exact_sinks else 0
        if self.rope == "post" and self.scorer.reindex and b is not None and not by_slice(self.scorer, b + 1, s, b - s):
            raise KvlabError(f"rope=post keeps each quantized key at the position the model rotated it at: it cannot "
                             f"re-index the tokens {type(self.scorer).__name__} keeps (chosen by score, or quantized "
                             "sinks); use rope=pre or reindex=0")


@runtime_checkable
class Storage(Protocol):
    """The kept tokens of one group of KV heads of one layer."""

    group: Group
    heads: torch.Tensor  # (h,) long: the KV heads of the layer this storage holds
    scores: torch.Tensor | None  # (B, h, n) float32 attention received (scorers that need it), or fixed (B, h, n[, w])

    @property
    def length(self) -> int:
        """Tokens held per row and head (padding included)."""
        ...

    @property
    def age(self) -> torch.Tensor:
        """How recent each kept token is: ``age < k`` marks a row's ``k`` newest; ``(n,)`` or ``(B, h, n)``."""
        ...

    @property
    def order(self) -> torch.Tensor:
        """Each kept token's index among its row's real kept tokens (time order): ``(n,)`` or ``(B, h, n)`` (or
        ``(B, 1, n)``, the same for every head)."""
        ...

    @property
    def time_index(self) -> torch.Tensor | None:
        """None when the kept tokens are stored in time order; else ``(B, h, n)``, the stored slots in time order
        (a decode step may write a new token in an evicted token's slot: :mod:`kvlab.storage.inplace`)."""
        ...

    def stored(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Keys, values ``(B, h, n, D)`` and validity ``(B, h, n)`` (None: no padding) in the order of ``scores``,
        ``age`` and :attr:`time_index`, without reordering anything: what an order-free scorer reads."""
        ...

    def length_after_compress(self) -> int:
        """Tokens held once evicted down to the budget, before the next tokens arrive."""
        ...

    def push(self, key_states: torch.Tensor, value_states: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Evict down to the budget, then add ``(B, h, q, D)`` new keys (rotated at their true positions)
        and values; ``valid (B, q)`` bool marks real tokens (None: all real)."""
        ...

    def attend(self, query: torch.Tensor, scaling: float, window: int | None, softcap: float | None = None,
               prefix: Storage | None = None) -> torch.Tensor:
        """Attention of ``query (B, h*g, q, D)`` over the kept tokens, the last ``q`` of which are the
        queries' own; ``prefix``'s kept tokens come first and are seen by every query."""
        ...

    def dense(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Keys at their (frame) positions, values ``(B, h, n, D)`` in time order, validity ``(B, h, n)``."""
        ...

    def nbytes(self) -> int:
        """Bytes held by the kept keys and values (and whatever else the storage needs to rebuild them)."""
        ...

    def source_nbytes(self) -> int:
        """The part of :meth:`nbytes` that keeps exact originals of moved keys (no drift in low precision)."""
        ...

    def reserved_nbytes(self) -> int:
        """Bytes held beside :meth:`nbytes` and outside the budget: spare room to grow into, float32 copies that a
        step reads."""
        ...

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a batch-axis reorder / repeat / select to every stored tensor."""
        ...

    def compress(self) -> None:
        """Evict down to the budget now, appending nothing."""
        ...

    def drop_last(self) -> None:
        """Forget the newest token (valid right after the forward pass that appended it)."""
        ...

    def clear(self) -> None:
        """Forget every token."""
        ...


def check_rope(rope: str) -> None:
    """A :class:`KvlabError` unless ``rope`` is one of :data:`ROPE`."""
    if rope not in ROPE:
        raise KvlabError(f"rope must be pre or post (quantize keys before or after RoPE), got '{rope}'")


def by_slice(scorer: Scorer, n: int, sinks: int, newest: int) -> bool:
    """Whether ``scorer`` keeps the first ``sinks`` and the ``newest`` last of ``n`` tokens: a positional method's
    slice, no scores."""
    window = [(n - newest, n)]
    return scorer.runs(n) == ([(0, sinks)] + window if sinks else window)


@dataclass(frozen=True)
class RecentWindow:
    """The scorer of a sliding-window layer: the newest ``window`` tokens, nothing re-indexed."""

    window: int
    needs_scores = False
    reindex = False
    order_free = False
    ties = False
    sinks = 0

    def score(self, seg: Storage) -> torch.Tensor:
        return seg.order.float()  # recency among a row's real tokens

    def runs(self, n: int) -> list[tuple[int, int]]:
        return [(n - self.window, n)]

    def observed(self) -> int | None:
        return None
