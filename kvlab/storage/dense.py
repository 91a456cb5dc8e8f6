"""Dense storage of one group of heads: the kept keys and values as ``(B, h, n, D)`` tensors.

Positions. Where the scorer re-indexes, kept keys sit at *frame* positions (StreamingLLM): see
:mod:`kvlab.storage.frames`.

In place. Decode steps that write the new token over an evicted one (a ring for positional scorers,
slots for order-free ones) are in :mod:`kvlab.storage.inplace`.

Padding. ``_valid (B, h, n)`` marks real tokens once a padded chunk arrived (None before: no cost
without padding). Padding scores ``-inf`` against any scorer, so a row keeps exactly what it would
keep alone and budgets count real tokens; attention never reads it. Until a scorer chooses per head, every head
of a row holds the same tokens, so attention gets one mask per row (``(B, 1, n)``), which sdpa shares across
heads, instead of one per head. Padding leaves first, so once the rows hold none (``_pad_held``: counted when a
pass with padding arrives, one less per token evicted) attention needs no mask and positional methods turn a ring.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvlab.storage.attention import attend
from kvlab.storage.frames import FramePositions
from kvlab.storage.inplace import PER_TOKEN, InPlaceSteps
from kvlab.storage.plan import Group, Storage
from kvlab.storage.rope import Rotary
from kvlab.storage.tokens import gather_tokens, keep_indices, order


class Segment(InPlaceSteps, FramePositions):
    """The kept tokens of one :class:`~kvlab.storage.plan.Group` of KV heads, dense."""

    def __init__(self, group: Group, rotary: Rotary | None):
        self.group = group
        self.heads = torch.tensor(group.heads, dtype=torch.long)
        self.rotary = rotary
        scorer = group.scorer
        self.reindex = bool(scorer.reindex) and rotary is not None and group.budget is not None
        self.needs_scores = scorer.needs_scores
        self.observed = scorer.observed() if self.needs_scores else None
        # a score fixed when its token arrives (KNorm's norm), kept in `scores` while the keys stay where they are
        self.fixed = bool(getattr(scorer, "fixed_scores", False)) and not self.reindex and not self.needs_scores
        self.prefix = self._moved_prefix() if self.reindex else 0  # slots whose keys may move
        # decode steps may overwrite the evicted token's slot: any order of kept tokens scores the same
        self.slots = bool(getattr(scorer, "order_free", False)) and not self.reindex
        self.track_pos = self.reindex or self.needs_scores or self.slots
        self.clear()

    def clear(self) -> None:
        self._k: torch.Tensor | None = None  # (B, h, n, D) keys at frame positions
        self._v: torch.Tensor | None = None  # (B, h, n, D)
        self._pos: torch.Tensor | None = None  # (B, h, n) int64 true positions (re-indexing, scored eviction)
        self._valid: torch.Tensor | None = None  # (B, h, n) bool, once padding was seen
        self._rows_valid = True  # every head of a row holds the same tokens (no per-head choice since padding)
        self._src: torch.Tensor | None = None  # (B, h, prefix, D) original keys of the prefix slots
        self._src_fixed = False  # _src holds the stream's first tokens, which never leave the prefix slots
        self._prepared: tuple | None = None  # (_src, _k, the rotation's two inputs, padded rows' shifts: frames.py)
        self._real: torch.Tensor | None = None  # (B, 1, 1) real tokens seen per row, once padding was seen
        self._pad_held: int | None = None  # at least the most padding any row and head holds (None: none seen)
        self.scores: torch.Tensor | None = None  # (B, h, n) float32: accumulated attention; or fixed (B, h, n[, w])
        self.seen = 0  # tokens fed (padding included)
        self._start, self._head = 0, 0
        self._scrambled = False  # slot writes broke time order (the true positions in _pos restore it)
        self._time: tuple[torch.Tensor, int, torch.Tensor] | None = None  # time_index, with the _pos state it orders
        self._index: torch.Tensor | None = None  # (n - 1,) arange, for the time order after a slot step
        self._room: dict[str, torch.Tensor] = {}  # buffers with spare room behind _k and _v (see inplace.py)

    # -- state ---------------------------------------------------------------------------
    @property
    def length(self) -> int:
        return 0 if self._k is None else self._k.shape[2]

    @property
    def device(self) -> torch.device:
        return self._k.device

    @property
    def keys(self) -> torch.Tensor | None:
        """Kept keys ``(B, h, n, D)`` in time order, at their frame positions."""
        self._unroll()
        return self._k

    @property
    def values(self) -> torch.Tensor | None:
        """Kept values ``(B, h, n, D)`` in time order."""
        self._unroll()
        return self._v

    @property
    def age(self) -> torch.Tensor:
        """Real tokens that arrived after each kept one: ``(n,)`` in time order, or ``(B, h, n)`` (with padding,
        or after slot writes; padding's age is meaningless, it is never kept)."""
        if self._pos is None:
            self._unroll()
            return torch.arange(self.length - 1, -1, -1, device=self.device)
        seen = self._real if self._real is not None else self.seen
        return seen - 1 - self._pos

    @property
    def order(self) -> torch.Tensor:
        """Each kept token's index among its row's real kept tokens: ``(n,)``, or ``(B, h, n)`` with padding
        (``(B, 1, n)`` while every head of a row holds the same tokens)."""
        self._unroll()
        return order(self._masks, self.length, self.device)

    @property
    def _masks(self) -> torch.Tensor | None:
        """The validity as attention and :attr:`order` read it: ``(B, 1, n)`` while every head of a row holds the same
        tokens (one mask per row, which sdpa shares across heads), else ``(B, h, n)``; None without padding."""
        if self._valid is None or self._pad_held == 0:  # no padding held: nothing to mask
            return None
        return self._valid[:, :1] if self._rows_valid else self._valid

    def dense(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        self._unroll()
        return self._k, self._v, self._valid

    def length_after_compress(self) -> int:
        budget = self.group.budget
        return self.length if budget is None else min(self.length, budget)

    def nbytes(self) -> int:
        """Bytes of the kept keys and values, plus the exact originals of moved keys (re-indexing only)."""
        return sum(t.nbytes for t in (self._k, self._v, self._src) if t is not None)

    def source_nbytes(self) -> int:
        """Bytes of the exact originals kept for moved keys (StreamingLLM: its sinks), part of :meth:`nbytes`."""
        return 0 if self._src is None else self._src.numel() * self._src.element_size()

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``fn`` to every stored tensor (the ring order is the same for every row, so it is kept)."""
        self._room.clear()
        for name in (*PER_TOKEN, "_src", "_real"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def drop_last(self) -> None:
        self._unroll()
        if self._real is not None:  # the newest token counted as a real one if it was
            self._real = self._real - self._valid[:, :1, -1:].long()
        for name in PER_TOKEN:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t[:, :, :-1])
        self.seen -= 1

    # -- a forward pass ------------------------------------------------------------------
    def push(self, key_states: torch.Tensor, value_states: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Evict down to the budget, then append ``(B, h, q, D)`` new keys/values (rotated at their true
        positions); ``valid (B, q)`` marks real tokens. Eviction and append are one copy of the cache."""
        b, h, q, _ = key_states.shape
        if valid is not None and self._valid is None:
            self._start_padding(b, h, key_states.device)
        if q == 1 and valid is None and ((not self._pad_held and self._turn(key_states, value_states))
                                         or self._slot(key_states, value_states)):
            return
        self._unroll()
        new = {"_k": key_states, "_v": value_states}
        if self._valid is not None:
            v = torch.ones(b, q, dtype=torch.bool, device=key_states.device) if valid is None else valid
            new["_valid"] = v[:, None].expand(b, h, q).clone()
            if self.track_pos:
                new["_pos"] = (self._real + v[:, None].cumsum(-1) - 1).clamp(min=0).expand(b, h, q).clone()
            real = self._real + v.sum(-1)[:, None, None]  # set once the cache is evicted (scores read ages)
        elif self.track_pos:
            new["_pos"] = torch.arange(self.seen, self.seen + q, device=key_states.device).expand(b, h, q).clone()
        if self.needs_scores:
            new["scores"] = torch.zeros(b, h, q, dtype=torch.float32, device=key_states.device)
        elif self.fixed:
            new["scores"] = self.group.scorer.arrival_scores(key_states)
        self._evict_and_append(new)
        self.seen += q
        if self._valid is not None:
            self._real = real
        if valid is not None:  # a pass with padding (it read its mask already): count what the rows hold
            self._pad_held = int((~self._valid).sum(-1).max())
        self._refresh()

    def compress(self) -> None:
        """Evict down to the budget without appending."""
        if self._k is not None:
            self._unroll()
            self._evict_and_append({})
            self._refresh()

    def attend(self, query: torch.Tensor, scaling: float, window: int | None, softcap: float | None = None,
               prefix: Storage | None = None) -> torch.Tensor:
        """Attention of ``query (B, h*g, q, D)`` over the kept tokens plus the ``q`` just appended
        (after ``prefix``'s, seen by every query). Accumulates the scores of H2O-like scorers."""
        if prefix is None:
            keys, values = self._k, self._v  # a turned ring is read only by a single query, without a mask
            valid, visible = self._masks, 0
            if self._head and (window is not None and self.length > window):
                keys, values, valid = self.dense()
        else:
            pk, pv, pvalid = prefix.dense()
            keys, values, valid = self.dense()
            keys, values = torch.cat((pk, keys), dim=2), torch.cat((pv, values), dim=2)
            if valid is not None or pvalid is not None:
                valid = torch.cat((_ones_like(pvalid, pk), _ones_like(valid, self._k)), dim=2)
            visible = pk.shape[2]
        out, received = attend(query, keys, values, scaling=scaling, visible=visible, valid=valid, window=window,
                               softcap=softcap, need_probs=self.needs_scores or _needs(prefix),
                               observed=self.observed, own=not self._scrambled)
        if received is not None:
            if prefix is not None:
                prefix.receive(received[:, :, :visible])
                received = received[:, :, visible:]
            self.receive(received)
        return out

    def receive(self, received: torch.Tensor) -> None:
        """Add the attention ``(B, h, n)`` the kept tokens just received to their scores (or replace them,
        for a scorer that observes only the newest queries)."""
        if self.needs_scores:
            self.scores = received if self.observed is not None else self.scores + received

    # -- internals -----------------------------------------------------------------------
    def _start_padding(self, b: int, h: int, device: torch.device) -> None:
        self._unroll()
        self._valid = torch.ones(b, h, self.length, dtype=torch.bool, device=device)
        self._rows_valid, self._pad_held = True, 0
        self._real = torch.full((b, 1, 1), self.seen, dtype=torch.long, device=device)

    def _evict_and_append(self, new: dict[str, torch.Tensor]) -> None:
        """Keep the budget's best tokens of the cache and append ``new`` (per-token tensors) in one copy."""
        budget, n = self.group.budget, self.length
        if self._k is None:
            for name, t in new.items():
                setattr(self, name, t)
            return
        if budget is None or n <= budget:
            for name, t in new.items():  # keys and values grow into spare room, the small bookkeeping by a copy
                grown = self._extend(name, t) if name in ("_k", "_v") else torch.cat((getattr(self, name), t), dim=2)
                setattr(self, name, grown)
            return
        self._room.clear()  # evicting makes new tensors: the buffers behind the old ones are released
        runs = None if self._valid is not None else self.group.scorer.runs(n)
        if runs is not None and (self.prefix == 0 or runs[0] == (0, self.prefix)):
            self._keep_originals()
            for name in PER_TOKEN:
                t = getattr(self, name)
                if t is not None:
                    tail = [new[name]] if name in new else []
                    setattr(self, name, torch.cat([t[:, :, a:b] for a, b in runs] + tail, dim=2))
            return
        if runs is not None:
            keep = torch.cat([torch.arange(a, b, device=self.device) for a, b in runs])
        else:
            score = self.group.scorer.score(self)
            if self._valid is not None:
                self._rows_valid &= score.dim() == 1 or score.shape[1] == 1  # else heads may now keep other tokens
                score = score.expand(*self._valid.shape).masked_fill(~self._valid, -torch.inf)
            keep = keep_indices(score, budget)  # (budget,) or (B, h, budget)
            if self._pad_held:  # padding scores -inf: it leaves first
                self._pad_held = max(0, self._pad_held - (n - budget))
        keep = keep.expand(*self._k.shape[:2], -1) if keep.dim() == 1 else keep
        if self.prefix:
            self._src, self._src_fixed = self._gather_originals(keep[..., :self.prefix]), False
        for name in PER_TOKEN:
            t = getattr(self, name)
            if t is not None:
                kept = gather_tokens(t, keep)
                setattr(self, name, torch.cat((kept, new[name]), dim=2) if name in new else kept)


def _ones_like(valid: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``valid``, or all True ``(B, h, n)`` for storage without padding."""
    return valid if valid is not None else torch.ones(like.shape[:3], dtype=torch.bool, device=like.device)


def _needs(prefix: Storage | None) -> bool:
    return prefix is not None and getattr(prefix, "needs_scores", False)
