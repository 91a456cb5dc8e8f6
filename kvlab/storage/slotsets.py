"""The slot steps of a layer's one-head segments, taken as one (Ada-KV's per-head budgets).

A method that gives every KV head its own budget (Ada-KV) holds each head of a layer in its own segment, so that
memory really shrinks, and each of them pays a slot step's fixed cost at every decode step: its ranking, its writes
and an attention call of its own, some twenty operations whatever its size. On a GPU at batch 1 those are kernel
launches, and a model with 8 KV heads per layer (Llama-3-8B, Gemma-2-9B) multiplies them by 8.
:class:`SlotSet` takes the segments of a layer once they all step in place
(:meth:`~kvlab.storage.inplace.InPlaceSteps._slot`'s steady state) and moves their keys, values, positions and
scores into one flat buffer each, of exactly their sizes (``N``, the sum of the heads' lengths), the segments keeping
views of their part. A decode step then, for every head at once:

* ranks the kept tokens as each head's own slot step would: the scores, in each head's time order, go into one
  ``(B, H, L)`` table (``L`` the longest head; a shorter head's row starts with padding, which scores ``-inf`` and
  is never chosen), which the scorer ranks in one call (:meth:`~kvlab.methods.base.Method.score_in_time`, for
  scorers that read only the scores: ``scores_only``); the token each head leaves out is found on that head's own
  part of its row, so ties break as in its own step;
* writes the new keys, values and positions into the chosen slots and carries the time order along;
* attends with one call: every query head against the ``N`` flat keys, those of other KV heads masked out. That
  computes ``H`` times the products one head needs, but reads each key once and launches a few kernels for the
  layer. On a CPU it pays for few heads only (``bench/bench_set_attention.py``, one core, float32, 700 to 1,300
  tokens a head: 0.80-0.95x the time of one call per head at 2 KV heads, 0.87-1.16x at 3, 0.91-1.22x at 4,
  1.31-1.88x at 8), so there a layer of more than :data:`FLAT_HEADS` KV heads attends head by head, each call the
  segment's own (the same bits).

The set's results are those of the segments' own steps up to float rounding: the same products, but the softmax
and the output of one call sum over the ``N`` keys with exact zeros for other heads' keys, in another order (the
same class of difference as between a slot step and a copying step; tested); head by head, the same bits. Each
segment keeps its bookkeeping (``seen``, its scores as a view of the set's) as if it had stepped alone, and re-sorts
its time order from its positions when asked, so the set can be dropped at any time: a segment that does anything
else (a chunk, padding, a beam reorder) steps on its own, in its views or in new tensors once it copies, and
:meth:`SlotSet.intact` says the set no longer holds.
"""

from __future__ import annotations

import math

import torch

from kvlab.storage.attention import attend, probabilities
from kvlab.storage.dense import Segment
from kvlab.storage.inplace import later
from kvlab.storage.plan import Storage
from kvlab.storage.tokens import left_out

LEAST = 2  # the fewest one-head segments worth a set
FLAT_HEADS = 3  # on a CPU, the most KV heads that attend in one call (see the module docstring); any on a GPU


class SlotSet:
    """Slot steps of ``segments`` (dense, one KV head each, the layer's heads in order, in the slot steps' steady
    state, one scorer that reads only the scores) as one. :meth:`of` picks them."""

    @staticmethod
    def possible(storages: list[Storage]) -> bool:
        """Whether a layer's ``storages`` could ever step as one: :data:`LEAST` or more, every one a dense one-head
        segment of the same ``scores_only`` scorer, whose scores each attention replaces."""
        first = storages[0]
        return len(storages) >= LEAST and all(
            isinstance(s, Segment) and len(s.group.heads) == 1 and s.slots and s.needs_scores
            and s.observed is not None and getattr(s.group.scorer, "scores_only", False)
            and getattr(s.group.scorer, "ties", False) and s.group.scorer is first.group.scorer for s in storages)

    @classmethod
    def of(cls, storages: list[Storage]) -> SlotSet | None:
        """A set of ``storages`` (:meth:`possible`) if each one's next one-token push is a slot step with nothing
        to prepare (its budget reached, no padding held, no spare room) and they agree on batch, dtype and tokens
        seen; else None. A padded batch's rows count their own real tokens for positions (``_real``, the same in
        every segment of a layer: they see the same passes), which the set then shares among them."""
        if not all(s.slot_ready() for s in storages):
            return None
        first, padded = storages[0].stored()[0], storages[0].real_seen is not None
        for s in storages:
            keys = s.stored()[0]
            if (s.seen != storages[0].seen or (s.real_seen is not None) != padded or s.scores is None
                    or keys.shape[0] != first.shape[0] or keys.dtype != first.dtype):
                return None
        return cls(storages)

    def __init__(self, segments: list[Segment]):
        self.segments = segments
        self.seen = segments[0].seen
        self.real = segments[0].real_seen  # (B, 1, 1) real tokens seen per row, in a padded batch; else None
        self.groups = [seg.group for seg in segments]
        k0 = segments[0].stored()[0]
        b, d, device = k0.shape[0], k0.shape[-1], k0.device
        lens = [seg.length for seg in segments]
        n, h, width = sum(lens), len(segments), max(lens)
        self.k = k0.new_empty(b, n, d)  # (B, N, D): each head's slots in turn
        self.v = k0.new_empty(b, n, d)
        self.pos = segments[0].stored_state()[2].new_empty(b, n)
        self.scores = torch.full((b, n + 1), -math.inf, device=device)  # the last entry: padding's score
        table = torch.full((b, h, width), n, dtype=torch.long, device=device)  # (B, H, L): slots in time order
        own = torch.zeros(h, 1, n, dtype=torch.bool, device=device)  # (H, 1, N): a head's own slots
        self._views = []
        off = 0
        for i, (seg, m) in enumerate(zip(segments, lens)):
            views = (self.k[:, off:off + m].view(b, 1, m, d), self.v[:, off:off + m].view(b, 1, m, d),
                     self.pos[:, off:off + m].view(b, 1, m))
            order = seg.time_index
            table[:, i, width - m:] = off + (torch.arange(m, device=device) if order is None else order[:, 0])
            for view, t in zip(views, seg.stored_state()):
                view.copy_(t)
            scores = self.scores[:, off:off + m].view(b, 1, m)
            scores.copy_(seg.scores)
            seg.hand_over(*views, scores=scores, real=self.real)
            self._views.append((*views, scores))
            own[i, :, off:off + m] = True
            off += m
        self.table = table
        self._away = ~own  # where a head's queries must not look
        self._pad = table == n  # (B, H, L): padding of the shorter heads' rows
        # a head's slice of its row, where it is shorter: its ranking must see exactly its own tokens
        self._uneven = [(i, width - m) for i, m in enumerate(lens)] if min(lens) < width else None
        self._shift = torch.tensor([width - m for m in lens], device=device).view(1, h, 1)
        self._index = torch.arange(width - 1, device=device)
        self._version = self.pos._version

    def reserved_nbytes(self) -> int:
        """The time-order table and the masks (the keys, values, positions and scores are the segments' own,
        moved here)."""
        return sum(t.nbytes for t in (self.table, self._away, self._pad, self._shift, self._index))

    def intact(self) -> bool:
        """Every segment still holds its views, its scores and its group (budget and scorer), has taken no step of
        its own since the set's last step, and nothing else wrote to the positions."""
        if self.pos._version != self._version:
            return False
        for seg, (k, v, pos, scores), group in zip(self.segments, self._views, self.groups):
            if (seg.group is not group or not seg.holds(k, v, pos, padded=True) or seg.scores is not scores
                    or seg.seen != self.seen or seg.real_seen is not self.real):
                return False
        return True

    def push(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """One decode step's slot step of every segment: ``key``/``value (B, H, 1, D)`` are the layer's new states;
        :meth:`attend` follows."""
        b, h, _, d = key.shape
        width = self.table.shape[-1]
        # each head's slot step: rank its kept tokens in time order, leave out one, write the new token there
        ranked = _Ranked(self.scores.gather(1, self.table.view(b, -1)).view(b, h, width))
        score = self.segments[0].group.scorer.score_in_time(ranked).masked_fill_(self._pad, torch.inf)
        if self._uneven is None:
            gone = left_out(score)  # (B, H, 1): its index in the table's row
        else:
            gone = torch.cat([left_out(score[:, i:i + 1, s:]) for i, s in self._uneven], dim=1).add_(self._shift)
        victim = self.table.gather(2, gone).view(b, h)  # (B, H): its slot
        slot = victim[..., None].expand(b, h, d)
        self.k.scatter_(1, slot, key.reshape(b, h, d))
        self.v.scatter_(1, slot, value.reshape(b, h, d))
        if self.real is None:
            self.pos.scatter_(1, victim, self.seen)
        else:  # positions count a row's real tokens
            self.pos.scatter_(1, victim, self.real.view(b, 1).expand(b, h))
            self.real = self.real + 1
        self.table = later(self.table, gone, victim[..., None], self._index)
        self._version = self.pos._version
        self.seen += 1
        for seg in self.segments:
            seg.slot_advance(self.real)

    def attend(self, query: torch.Tensor, scaling: float, softcap: float | None = None) -> torch.Tensor:
        """The attention output ``(B, H*g, 1, D)`` of ``query (B, H*g, 1, D)`` (the layer's), each query head against
        its KV head's kept tokens; each key's probability (the mean over its head's queries) becomes its score. In
        one call, or on a CPU beyond :data:`FLAT_HEADS` heads head by head."""
        if self.k.device.type == "cpu" and len(self.segments) > FLAT_HEADS:
            return self._attend_each(query, scaling, softcap)
        b, hq, _, d = query.shape
        h, n = self._away.shape[0], self.k.shape[1]
        g = hq // h
        # (B, H*g, N): every query head against every head's keys, other heads' masked out
        probs = probabilities(query.reshape(b, hq, d), self.k, scaling, softcap, self._away, (b, h, g, n))
        out = (probs.to(self.v.dtype) @ self.v).view(b, hq, 1, d)
        torch.sum(probs, dim=1, out=self.scores[:, :n]).div_(g)  # other heads' probabilities are exact zeros
        return out

    def _attend_each(self, query: torch.Tensor, scaling: float, softcap: float | None) -> torch.Tensor:
        """:meth:`attend` head by head, each call what the segment's own attention computes."""
        g = query.shape[1] // len(self.segments)
        outs = []
        for i, (k, v, _, scores) in enumerate(self._views):
            out, received = attend(query.narrow(1, i * g, g), k, v, scaling=scaling, softcap=softcap, need_probs=True,
                                   observed=self.segments[i].observed, own=False)
            scores.copy_(received)  # (observed scores: replaced whole)
            outs.append(out)
        return torch.cat(outs, dim=1)


class _Ranked:
    """What a ``scores_only`` scorer's :meth:`~kvlab.methods.base.Method.score_in_time` reads: the scores ``(B, H, L)``
    already in time order (padding first, ``-inf``)."""

    time_index = None

    def __init__(self, scores: torch.Tensor):
        self.scores = scores
