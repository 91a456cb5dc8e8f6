"""Decode steps of dense storage that write in place: no copy of the cache.

Ring. In the steady state of a positional method (one token in, the oldest of the window out) a decode
step writes the new token over the evicted one. The window is then a ring (``_start`` where it begins,
``_head`` its oldest slot); a single query needs no mask and attention does not depend on key order, so
decode reads the ring as it is. A padded batch turns its ring once its rows hold no padding (a left-padded
``generate`` whose prompts all outgrew the budget, or once the copying steps evicted the rest): every row then
holds ``n`` real tokens, its sinks first, and writes the same slot; a row's positions count its own real tokens,
and its sinks move to its own frame (one gather of cos/sin rows for the batch: :meth:`Rotary.shift_at`).

Slots. A scorer whose scores do not depend on the order the kept tokens are stored in (``order_free``: H2O,
TOVA, SnapKV and its kin, KNorm, KeyDiff) does the same at any slot: the new token takes the place of the
lowest-scoring one, found by one ``argmin``, and each kept token's true position (``_pos``) says its age; a
scorer that pools over time neighbours reads them through :attr:`Segment.time_index` (a sort of ``n``
positions, not a copy of the cache). In a padded batch padding scores ``-inf``, as in the copying eviction, so a
row that still holds padding writes the new token over it; attention masks the padding left in the slots. A
scorer whose scores are fixed when a token arrives (``fixed_scores``: KNorm's key norms; KeyDiff's two norms of each
key, from which it scores) finds them in ``scores``, where the step writes the new token's own.

Room to grow. A segment that only grows (the full cache, any method while it fills its budget) appends
its keys and values into spare room at the end of a larger buffer instead of concatenating, which
would copy the whole cache at every step: the room is ``max(ROOM, n / 8)`` tokens, so a decode step
copies one token and a reallocation happens once every ``ROOM`` steps or more. :meth:`nbytes` counts
the kept tokens; the room is reserved memory, at most 1/8 of the kept keys and values plus ``ROOM``
tokens, and is counted by :meth:`reserved_nbytes`.

Readers that need time order (``keys``/``values``, chunks of several tokens, :meth:`dense`) call
:meth:`InPlaceSteps._unroll` first: one copy.
"""

from __future__ import annotations

import torch

from kvlab.storage.tokens import gather_tokens, left_out

PER_TOKEN = ("_k", "_v", "_pos", "_valid", "scores")  # the dense segment's tensors with a token axis 2
ROOM = 64  # tokens of spare room, at least, when keys and values grow (see "Room to grow")


def later(order: torch.Tensor, gone: torch.Tensor, slot: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """A time order ``(..., n)`` of slots after a slot step: ``order`` without its entry at index ``gone (..., 1)`` (the
    evicted token), then ``slot (..., 1)``, which now holds the newest token; ``index``: ``arange(n - 1)``. Three
    kernels, no sort and no read from the device."""
    return torch.cat((torch.where(index < gone, order[..., :-1], order[..., 1:]), slot), dim=-1)


class InPlaceSteps:
    """The in-place steps of :class:`kvlab.storage.dense.Segment` (whose state they read and write)."""

    def _ring_start(self) -> int | None:
        """Where the ring begins (after the sinks) when one new token evicts exactly the oldest token after a
        fixed prefix (the sinks) and a ring step applies; None in any other case."""
        budget, n = self.group.budget, self.length
        if budget is None or n != budget + 1 or self.needs_scores:
            return None
        runs = self.group.scorer.runs(n)  # must be [(start + 1, n)], after sinks (0, start) if there are any
        if runs is None or len(runs) > 2 or (len(runs) == 2 and runs[0][0] != 0):
            return None
        start = runs[0][1] if len(runs) == 2 else 0
        if runs[-1] != (start + 1, n) or (self.prefix and start != self.prefix):
            return None
        return start

    def ring_ready(self) -> bool:
        """The next one-token push is a ring step that needs nothing prepared first (the ring settled and
        begins where it should, the sinks' originals kept, no padding held): what a
        :class:`~kvlab.storage.rings.RingSet` may take over."""
        padded = self._valid is not None
        return ((not padded or self._pad_held == 0) and not self._room and self._ring_start() == self._start
                and (self.prefix == 0 or (self._src is not None and (self._src_fixed or padded))))

    def _turn(self, key: torch.Tensor, value: torch.Tensor) -> bool:
        """The ring step: when one new token evicts exactly the oldest token after a fixed prefix (the
        sinks), write it in that token's slot and re-derive the prefix's rotation. False (nothing done)
        in any other case."""
        start = self._ring_start()
        if start is None:
            return False
        self._settle()
        if start != self._start:
            self._unroll()
            self._start = start
        self._keep_originals()
        slot = start + self._head  # narrow + copy_: cheaper than indexing with slices, on a CPU
        self._k.narrow(2, slot, 1).copy_(key)
        self._v.narrow(2, slot, 1).copy_(value)
        if self._pos is not None and self._real is not None:  # a padded batch whose rows hold no padding:
            self._pos.narrow(2, slot, 1).copy_(self._real.expand(-1, self._pos.shape[1], 1))  # a row's real tokens
        elif self._pos is not None:
            self._pos.narrow(2, slot, 1).fill_(self.seen)
        if self._real is not None:
            self._real = self._real + 1
        self.advance()
        self._refresh()
        return True

    def advance(self, real: torch.Tensor | None = None) -> None:
        """A ring step's bookkeeping, once its token is written: the ring turns, one more token was seen (``real``: a
        set's count of each row's real tokens now, in a padded batch, which its segments share)."""
        self._head = (self._head + 1) % (self.length - self._start)
        self.slot_advance(real)

    def slot_advance(self, real: torch.Tensor | None = None) -> None:
        """A set's slot step's bookkeeping, once its token is written: one more token was seen (``real``: as for
        :meth:`advance`)."""
        self.seen += 1
        if real is not None:
            self._real = real

    @property
    def real_seen(self) -> torch.Tensor | None:
        """``(B, 1, 1)`` real tokens seen per row, once a padded batch arrived (positions count them); else None."""
        return self._real

    def ring(self) -> tuple[int, int, int]:
        """``(first ring slot, slots the ring has turned by, ring length)`` of a ring-ready segment."""
        return self._start, self._head, self.length - self._start

    @property
    def time_index(self) -> torch.Tensor | None:
        """None in time order; after slot writes, the slots sorted by true position, padding first ``(B, h, n)``:
        sorted when first asked for, then carried along by each slot step (which moves one slot to the end), so a
        scorer that reads it at every step never sorts again."""
        if not self._scrambled:
            return None
        pos, version, index = self._time or (None, -1, None)
        if pos is not self._pos or version != self._pos._version:  # _pos replaced, or written in place since
            index = self._time_key().argsort(dim=-1, stable=True)
            self._time = (self._pos, self._pos._version, index)
        return index

    def _time_key(self) -> torch.Tensor:
        """``(B, h, n)``: what sorts the slots into time order: the true positions, padding first (-1), as a
        padded row's tokens are stored by the copying steps."""
        return self._pos if self._valid is None else self._pos.masked_fill(~self._valid, -1)

    def _later(self, order: torch.Tensor, gone: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """The time order ``(B, h, n)`` after a slot step (:func:`later`)."""
        n = order.shape[-1]
        if self._index is None or self._index.shape[0] != n - 1 or self._index.device != order.device:
            self._index = torch.arange(n - 1, device=order.device)
        return later(order, gone, slot, self._index)

    def stored(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Keys, values and validity as stored (a turned ring, slot writes): for attention without a mask and for
        order-free scorers."""
        return self._k, self._v, self._valid

    def stored_state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values ``(B, h, n, D)`` and true positions ``(B, h, n)`` as stored (a turned ring included)."""
        return self._k, self._v, self._pos

    def hand_over(self, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor, scores: torch.Tensor | None = None,
                  real: torch.Tensor | None = None) -> None:
        """Hold ``keys``, ``values`` and ``pos`` (views of a :class:`~kvlab.storage.rings.RingSet`'s or
        :class:`~kvlab.storage.slotsets.SlotSet`'s buffers, holding a copy of :meth:`stored_state`) instead of the
        segment's own tensors; a slot set's view of the ``scores`` too (its slots then hold tokens in any order);
        ``real``: the count of each row's real tokens that the set's segments share (a padded batch)."""
        self._k, self._v, self._pos = keys, values, pos
        self._prepared = None  # it held the former keys
        if scores is not None:
            self.scores, self._scrambled = scores, True  # time order: the sort of the positions
        if real is not None:
            self._real = real

    def slot_ready(self) -> bool:
        """The next one-token push is a slot step that needs nothing prepared first (the budget reached, no padding
        held, no spare room): what a :class:`~kvlab.storage.slotsets.SlotSet` may take over."""
        budget = self.group.budget
        return (self.slots and self._k is not None and budget is not None and self.length == budget + 1
                and not self._pad_held and not self._room)

    def holds(self, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor, padded: bool = False) -> bool:
        """Whether the segment still holds exactly these tensors (what :meth:`hand_over` gave it), with no padding
        (``padded``: or none left in a padded batch's rows, whose positions then count each row's real tokens)."""
        return (self._k is keys and self._v is values and self._pos is pos
                and (self._valid is None or (padded and not self._pad_held)))

    def _slot(self, key: torch.Tensor, value: torch.Tensor) -> bool:
        """The slot step of an order-free scorer: when one new token (a real one in every row) evicts one kept
        token, write it in the lowest-scoring token's slot (per row and head; for a scorer with ties, the token the
        copying eviction leaves out). In a padded batch padding scores ``-inf``, as in the copying eviction: a row
        that still holds padding writes over it (and grows by one real token). False (nothing done) in any other
        case."""
        budget, n = self.group.budget, self.length
        if not self.slots or budget is None or n != budget + 1:
            return False
        self._settle()
        b, h, _, d = self._k.shape
        scorer, order, valid = self.group.scorer, None, self._valid if self._pad_held else None
        shared = False  # every head of a row scores alike (their slots of padding stay alike)
        if getattr(scorer, "ties", False):  # argmin's tie-break (the first slot) would differ from top-k's:
            # rank in time order, as the copying eviction does. In a padded batch, from a sort that puts padding
            # first (a right-padded row's copying steps keep it last: the same ranks, since padding scores -inf and
            # its attention, 0, never raises a max-pool of attention)
            self._scrambled = self._scrambled or valid is not None  # so time_index sorts the slots
            order = self.time_index
            score = scorer.score_in_time(self).expand(b, h, n)
            if valid is not None:
                score = score.masked_fill(~valid.gather(-1, order), -torch.inf)  # order: sorted above
            gone = left_out(score)  # (B, h, 1), its index in time order
            victim = gone if order is None else order.gather(-1, gone)  # its slot
        else:
            score = scorer.score(self)
            shared = score.dim() == 1 or score.shape[1] == 1
            score = score.expand(b, h, n) if valid is None else score.expand(b, h, n).masked_fill(~valid, -torch.inf)
            victim = score.argmin(dim=-1, keepdim=True)
        slot = victim[..., None].expand(b, h, 1, d)
        self._k.scatter_(2, slot, key)
        self._v.scatter_(2, slot, value)
        if self.fixed:  # the newest token's own score (the victim was chosen from the old ones above)
            new = scorer.arrival_scores(key)  # (B, h, 1[, w]): a score, or what it is computed from
            self.scores.scatter_(2, victim if new.dim() == 3 else victim[..., None].expand_as(new), new)
        elif self.scores is not None and self.observed is None:  # accumulated scores: the newest token's starts at 0
            self.scores.scatter_(2, victim, 0.0)  # (observed scores are replaced whole by the attention that follows)
        if self._real is None:
            self._pos.scatter_(2, victim, self.seen)
        else:  # positions count a row's real tokens
            self._pos.scatter_(2, victim, self._real.expand(b, h, 1))
            self._real = self._real + 1
        if valid is not None:  # a row that held padding holds one slot less; heads may now hold different slots
            valid.scatter_(2, victim, True)
            self._rows_valid &= h == 1 or shared
            self._pad_held -= 1
        if order is not None:  # the victim's slot now holds the newest token; the other slots keep their order
            self._time = (self._pos, self._pos._version, self._later(order, gone, victim))
        self.seen += 1
        self._scrambled = True
        return True

    def _extend(self, name: str, new: torch.Tensor) -> torch.Tensor:
        """``getattr(self, name)`` with ``new (B, h, q, ...)`` appended on the token axis: written into the
        spare room of its buffer when it is a view of that buffer's start with room left, else into a new
        buffer with room."""
        t, buf = getattr(self, name), self._room.get(name)
        n, q = t.shape[2], new.shape[2]
        if (buf is None or buf.shape[2] < n + q or buf.data_ptr() != t.data_ptr() or buf.shape[:2] != t.shape[:2]
                or buf.stride() != t.stride()):
            buf = t.new_empty(*t.shape[:2], n + q + max(ROOM, (n + q) // 8), *t.shape[3:])
            buf[:, :, :n] = t
            self._room[name] = buf
        buf[:, :, n:n + q] = new
        return buf[:, :, :n + q]

    def _settle(self) -> None:
        """Stop growing (the budget is reached and steps now write in place): keys and values leave their
        roomy buffers for tensors of their own size, once."""
        if self._room:
            self._k, self._v = self._k.clone(), self._v.clone()
            self._room.clear()

    def reserved_nbytes(self) -> int:
        """Bytes not counted in :meth:`nbytes`: the spare room behind the kept keys and values, and the float32
        copies of the moved keys' originals that a ring step rotates (a few sinks)."""
        room = sum(buf.nbytes - getattr(self, name).nbytes for name, buf in self._room.items()
                   if getattr(self, name) is not None and buf.data_ptr() == getattr(self, name).data_ptr())
        return room + (self._prepared[2].nbytes if self._prepared else 0)

    def _unroll(self) -> None:
        """Put a turned ring or slot-written tokens back in time order (one copy)."""
        if self._scrambled or self._head:
            self._room.clear()  # the tensors are rebuilt below
        if self._scrambled:
            idx = self._time_key().argsort(dim=-1, stable=True)  # (B, h, n): real positions are distinct in a row
            for name in PER_TOKEN:
                t = getattr(self, name)
                if t is not None:
                    setattr(self, name, gather_tokens(t, idx))
            self._scrambled = False
        if self._head:
            a, h = self._start, self._start + self._head
            for name in ("_k", "_v", "_pos"):
                t = getattr(self, name)
                if t is not None:
                    setattr(self, name, torch.cat((t[:, :, :a], t[:, :, h:], t[:, :, a:h]), dim=2))
            self._head = 0
