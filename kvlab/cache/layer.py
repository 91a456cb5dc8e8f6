"""One attention layer of the compressed cache as transformers sees it: a ``CacheLayerMixin`` holding one
:class:`~kvlab.storage.Storage` per head group (:class:`KVLayer`).

``update`` only hands the new keys to the layer and returns an empty tensor tagged with it (:func:`tag`);
the layer evicts, appends and attends when kvlab's attention function reaches it with the padding of the
new tokens (:mod:`kvlab.cache.attention`). A plain decode step of a layer whose segments can step as one goes
through a set (:class:`~kvlab.storage.RingSet`, :class:`~kvlab.storage.SlotSet`); anything else, group by group.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from transformers.cache_utils import CacheLayerMixin

from kvlab.errors import KvlabError
from kvlab.storage import Group, LayerInfo, RecentWindow, RingSet, Rotary, SlotSet, Storage, make_segment

_TAG = "_kvlab_layer"


def tag(empty: torch.Tensor, layer: object) -> None:
    """Mark the tensor ``update`` returns as ``layer``'s: only kvlab's attention function reads it."""
    empty.__dict__[_TAG] = layer


def tagged_layer(key: torch.Tensor) -> object | None:
    """The layer a key tensor was tagged with by :func:`tag`, or None (another cache)."""
    return key.__dict__.get(_TAG)


class KVLayer(CacheLayerMixin):
    """One attention layer's compressed cache: a :class:`Storage` per group of KV heads."""

    is_compileable = False
    is_croppable = False

    def __init__(self, info: LayerInfo, groups: list[Group], rotary: Rotary | None,
                 allocate: Callable[[LayerInfo, list[Storage]], list[int] | None] | None = None):
        super().__init__()
        _check_partition(groups, info)
        if info.sliding_window is not None:  # local layers never hold more than window - 1 tokens
            groups = [_cap_sliding(g, info.sliding_window) for g in groups]
        self.info = info
        self.is_sliding = info.sliding_window is not None
        # in the order of their first KV head: a decode step's outputs of groups of consecutive heads are then
        # one concatenation
        self.segments: list[Storage] = [make_segment(g, rotary) for g in sorted(groups, key=lambda g: min(g.heads))]
        self.seen = 0  # tokens fed through this layer so far
        self.last_q = 0
        self.on_filled: Callable[[], None] | None = None  # called after this layer took a forward pass's tokens
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        # the method's once-per-layer budget allocation (Ada-KV), before the first eviction;
        # sliding layers keep their window
        self._allocate = allocate if info.sliding_window is None else None
        # each segment's query heads as (start, count) where contiguous, else an index tensor
        self._qidx: list[torch.Tensor | tuple[int, int]] = []
        self._kidx: list[tuple[int, int] | None] = []  # each segment's KV heads as (start, count), where contiguous
        self._rings: RingSet | None = None  # segments whose decode steps are taken as one (storage/rings.py)
        self._slots: SlotSet | None = None  # the same for one-head segments' slot steps (storage/slotsets.py)
        self._ringable = self._slotable = False
        self.sets = True  # plain decode steps may be taken as sets (KVCache.use_sets)
        self._in_order = False

    # -- transformers' layer API -------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        g = self.info.num_heads // self.info.num_kv_heads
        for seg in self.segments:
            seg.heads = seg.heads.to(self.device)
        self._qidx, self._kidx = [], []
        for seg in self.segments:
            heads = list(seg.group.heads)
            contiguous = heads == list(range(heads[0], heads[0] + len(heads)))
            self._qidx.append((heads[0] * g, len(heads) * g) if contiguous else
                              (seg.heads[:, None] * g + torch.arange(g, device=self.device)).flatten())
            self._kidx.append((heads[0], len(heads)) if contiguous else None)
        # the segments' query heads follow each other in order: the segments are sorted by their first KV head and
        # cover each head once, so that holds exactly when every segment's heads are contiguous
        self._in_order = all(k is not None for k in self._kidx)
        self._ringable = RingSet.possible(self.segments)
        self._slotable = SlotSet.possible(self.segments)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hold the ``(B, kv_heads, q, D)`` new states for :meth:`attend`; return a tagged empty tensor that
        only kvlab's attention function can read."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._pending = (key_states, value_states)
        self.last_q = key_states.shape[-2]
        self.seen += self.last_q
        empty = key_states.new_empty(*key_states.shape[:2], 0, key_states.shape[-1])
        tag(empty, self)
        return empty, empty

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, self.seen  # the mask covers the new tokens only (kvlab_mask reads their padding)

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        for seg in self.segments:
            seg.clear()
        self.seen = self.last_q = 0
        self._pending = None

    def crop(self, tokens_to_remove: int) -> None:
        raise KvlabError("a compressed KV cache cannot be cropped (assisted decoding is not supported)")

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for seg in self.segments:
            seg.map_batch(fn)  # each storage reorders its own tensors

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    # -- kvlab ---------------------------------------------------------------------------
    def nbytes(self) -> int:
        return sum(seg.nbytes() for seg in self.segments)

    def compress(self) -> None:
        """Evict every group down to its budget now (otherwise done before the next tokens arrive)."""
        self._allocate_once()
        for seg in self.segments:
            seg.compress()

    def _allocate_once(self) -> None:
        """The method's budget allocation (Ada-KV), once, when the layer is about to evict for the first time."""
        if self._allocate is not None and any(seg.group.budget is not None and seg.length > seg.group.budget
                                              for seg in self.segments):
            budgets, self._allocate = self._allocate(self.info, self.segments), None
            for seg, budget in zip(self.segments, budgets or ()):
                seg.group = dataclasses.replace(seg.group, budget=budget)

    def source_nbytes(self) -> int:
        """The part of :meth:`nbytes` that keeps exact originals of re-indexed keys (e.g. StreamingLLM's sinks)."""
        return sum(seg.source_nbytes() for seg in self.segments)

    def reserved_nbytes(self) -> int:
        """Bytes held beside :meth:`nbytes`: the segments' spare room and float32 sink copies, and the sets'."""
        sets = sum(x.reserved_nbytes() for x in (self._rings, self._slots) if x is not None)
        return sets + sum(seg.reserved_nbytes() for seg in self.segments)

    def attend(self, query: torch.Tensor, scaling: float, window: int | None, softcap: float | None = None,
               valid: torch.Tensor | None = None, prefix: KVLayer | None = None) -> torch.Tensor:
        """Store the pending tokens (``valid (B, q)``: which are real), then ``query (B, heads, q, D)`` →
        attention output ``(B, heads, q, D)`` over the kept tokens (after ``prefix``'s, all visible)."""
        pending, self._pending = self._pending, None
        self._allocate_once()
        step = pending is not None and pending[0].shape[2] == 1  # one new token
        plain = step and valid is None and prefix is None  # ... and nothing else: a plain decode step
        if len(self.segments) == 1:
            seg = self.segments[0]
            if pending is not None:
                seg.push(*pending, valid)
            out = seg.attend(query, scaling, window, softcap, prefix=prefix.segments[0] if prefix else None)
        elif (slots := self._slot_set(plain and window is None)) is not None:
            slots.push(*pending)
            out = slots.attend(query, scaling, softcap)
        else:
            out = self._attend_groups(query, pending, scaling, window, softcap, valid, prefix, self._ring_set(plain))
        if self.on_filled is not None:
            self.on_filled()
        return out

    def _attend_groups(self, query: torch.Tensor, pending: tuple[torch.Tensor, torch.Tensor] | None, scaling: float,
                       window: int | None, softcap: float | None, valid: torch.Tensor | None, prefix: KVLayer | None,
                       rings: RingSet | None) -> torch.Tensor:
        """:meth:`attend` group by group: each segment takes its heads' new states (but those of ``rings``, a set
        that steps its members as one) and attends with its heads' queries."""
        step = pending is not None and pending[0].shape[2] == 1
        # a decode step's outputs in head order are one concatenation (a chunk's go in place: the layout the model
        # reads them back in)
        out = None if self._in_order and query.shape[2] == 1 else torch.empty_like(query)
        parts = []
        if rings is not None:
            rings.step(*pending)
        for i, (seg, qidx, kidx) in enumerate(zip(self.segments, self._qidx, self._kidx)):
            if rings is not None and seg in rings.members:
                pass  # stepped with its set
            elif step and kidx is not None:  # one new token: the storage copies it into its slot, so a view of the
                # layer's new keys will do (narrow: cheaper than indexing with a slice, on a CPU)
                seg.push(pending[0].narrow(1, *kidx), pending[1].narrow(1, *kidx), valid)
            elif pending is not None:
                seg.push(pending[0].index_select(1, seg.heads), pending[1].index_select(1, seg.heads), valid)
            res = seg.attend(query.narrow(1, *qidx) if isinstance(qidx, tuple) else query.index_select(1, qidx),
                             scaling, window, softcap, prefix=prefix.segments[i] if prefix else None)
            if out is None:
                parts.append(res)
            elif isinstance(qidx, tuple):
                out.narrow(1, *qidx).copy_(res)
            else:
                out.index_copy_(1, qidx, res)
        return torch.cat(parts, dim=1) if out is None else out

    @property
    def stepped_as_set(self) -> bool:
        """Whether this layer's last plain decode step went through a set (ring or slot) rather than segment by
        segment (``bench/bench_sets.py`` counts them)."""
        return self._slots is not None or self._rings is not None

    def _slot_set(self, step: bool) -> SlotSet | None:
        """The set of this layer's one-head segments that take a plain decode step's slot steps and attention as
        one, kept while it holds (None for any other forward pass)."""
        if not (step and self._slotable and self.sets):
            self._slots = None
        elif self._slots is None or not self._slots.intact():
            self._slots = SlotSet.of(self.segments)
        return self._slots

    def _ring_set(self, step: bool) -> RingSet | None:
        """The set of this layer's segments that take a plain decode step as one, kept while it holds (None for
        any other forward pass, after which the segments hold tensors of their own again)."""
        if not (step and self._ringable and self.sets):
            self._rings = None
        elif self._rings is None or not self._rings.intact():
            self._rings = RingSet.of(self.segments)
        return self._rings


def _check_partition(groups: list[Group], info: LayerInfo) -> None:
    heads = sorted(h for g in groups for h in g.heads)
    if heads != list(range(info.num_kv_heads)):
        raise KvlabError(f"layer {info.index}: head groups {[g.heads for g in groups]} do not cover "
                         f"the {info.num_kv_heads} KV heads exactly once")


def _cap_sliding(group: Group, window: int) -> Group:
    """On a sliding-window layer keep at most ``window - 1`` tokens, by recency when the method's
    own budget would not bind (which is what transformers' own sliding layers do)."""
    cap = window - 1
    if group.budget is not None and group.budget < cap:
        return group
    # replace(): a subclass's fields (a QuantGroup's group_size and residual) survive the cap
    return dataclasses.replace(group, budget=cap, scorer=RecentWindow(cap))
