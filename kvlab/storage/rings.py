"""The ring steps of several dense segments of one layer, taken as one.

A method that gives every head its own window (head-aware's local heads: a window per head, from its locality) holds
a layer's heads in several segments, and each of them pays a ring step's fixed cost at every decode step: a write of
the new key and value, a write of its position, and the re-rotation of its sinks, about five kernels whatever its
size. :class:`RingSet` takes the segments of a layer that are in the ring's steady state
(:meth:`~kvlab.storage.inplace.InPlaceSteps.ring_ready`) and moves their keys, values and positions into one buffer
each, of exactly their sizes, the segments keeping views of their part. A ring turns by one slot a step and its
sinks move by one position, so the set plans the next :data:`AHEAD` steps at once: each head's slot, and its sinks'
keys rotated from their originals (:meth:`~kvlab.storage.rope.Rotary.shift_each`). A decode step then writes every
segment's token, position and sinks with four kernels for the whole set. So a set pays from two segments on
(:data:`LEAST`; ``bench/bench_rings.py``): SmolLM2's head-aware layers (three KV heads, mostly each with its own
window) step as sets, and models with 8 KV heads (Llama-3-8B, Gemma-2-9B) have up to 8 segments per layer. Each
segment still attends on its own (its views), and keeps its bookkeeping (``seen``, where its ring turns) as if it
had stepped alone, so the set can be dropped at any time: a segment that does anything else (a chunk of several
tokens, padding, a beam reorder) gets tensors of its own again, and :meth:`RingSet.intact` says the set no longer
holds.

A padded batch (``model.generate`` on prompts of different lengths) steps as a set once its rows hold no padding,
as each segment's own ring does then: a row's positions count its own real tokens (a count the segments share), and
its sinks move to its own frame, so the set plans each row's rotations
(:meth:`~kvlab.storage.rope.Rotary.shift_at_each`).

The values written are those of the segments' own steps, bit for bit (tested): the same rows of the same
cos/sin table, the same products and sums, rounded once to the cache's dtype.
"""

from __future__ import annotations

import torch

from kvlab.storage.dense import Segment
from kvlab.storage.plan import Storage

# The fewest segments worth a set: one set step of 2 segments took 11.4 us, their own steps 28.4 us; of 3 segments
# 12.0 and 42.4 us (bench/bench_rings.py, one CPU core)
LEAST = 2
AHEAD = 16  # steps a set plans at once (their rotated sinks are reserved memory)


class RingSet:
    """Ring steps of ``segments`` (dense, :meth:`~kvlab.storage.inplace.InPlaceSteps.ring_ready`, the same sinks,
    rotary and count of tokens seen) as one. Their keys, values and positions move into one buffer each.
    :meth:`of` picks the segments of a layer that qualify."""

    @staticmethod
    def possible(storages: list[Storage], least: int = LEAST) -> bool:
        """Whether ``least`` or more of a layer's ``storages`` could ever step as one (re-indexed positional rings)."""
        return sum(_ringable(s) for s in storages) >= least

    @classmethod
    def of(cls, storages: list[Storage], least: int = LEAST) -> RingSet | None:
        """A set of those of ``storages`` whose next one-token push is a ring step, if ``least`` or more agree on
        their sinks, rotary, dtype, batch and tokens seen; else None."""
        ready = [s for s in storages if _ringable(s) and s.ring_ready()]
        if len(ready) < least:
            return None
        ready = [s for s in ready if _kind(s) == _kind(ready[0])]
        return cls(ready) if len(ready) >= least else None

    def __init__(self, segments: list[Segment]):
        first = segments[0]
        self.segments = segments
        self.members = frozenset(segments)
        self.sinks = first.prefix
        self.rotary = first.rotary
        self.seen = first.seen
        self.real = first.real_seen  # (B, 1, 1) real tokens seen per row, once a padded batch holds none: else None
        b, _, _, d = first.stored()[0].shape
        sizes = [seg.stored()[0].shape[1] * seg.length for seg in segments]
        total = sum(sizes)
        k0, v0, pos0 = first.stored_state()
        self.k = k0.new_empty(b, total, d)  # (B, sum of h * n, D): each segment's (h, n) block in turn
        self.v = v0.new_empty(b, total, d)
        self.pos = pos0.new_empty(b, total)
        base, phase, width, sinks, lens = [], [], [], [], []
        self._views = []
        off = 0
        for seg, size in zip(segments, sizes):
            state = seg.stored_state()
            h, n = state[0].shape[1], seg.length
            start, turned, _ = seg.ring()
            views = tuple(buf[:, off:off + size].view(b, h, n, *buf.shape[2:]) for buf in (self.k, self.v, self.pos))
            for view, t in zip(views, state):
                view.copy_(t)
            seg.hand_over(*views, real=self.real)  # the same count in every segment of a layer (the same passes)
            self._views.append(views)
            for j in range(h):
                first_slot = off + j * n
                base.append(first_slot + start)
                phase.append(turned)
                width.append(n - start)
                sinks.extend(range(first_slot, first_slot + self.sinks))
                lens.append(n)
            off += size
        device = first.device
        self.heads = torch.cat([seg.heads for seg in segments]).to(device)  # the layer's KV heads, in set order
        # the set's heads are 0..H-1 in order: the new states of a layer of H KV heads need no gather
        self._first = self.heads.tolist() == list(range(len(self.heads)))
        self._base = torch.tensor(base, device=device)  # a head's first ring slot in the buffer
        self._phase = torch.tensor(phase, device=device)  # where its ring turned to when the set began
        self._width = torch.tensor(width, device=device)  # its ring's length
        self._lens = torch.tensor(lens, device=device)
        self._min_len = min(lens)
        self._sink_slots = torch.tensor(sinks, dtype=torch.long, device=device)
        self._steps = 0
        self._slots: torch.Tensor | None = None  # (AHEAD, H) the next steps' slot of each head (see _plan)
        self._rotated: torch.Tensor | None = None  # (AHEAD, B, H * sinks, rot) the sinks' keys at those steps
        self._planned = 0  # the step _slots[0] is for
        self._turned0 = [seg.ring()[1] for seg in segments]
        self._groups = [seg.group for seg in segments]  # a new budget (e.g. none: stop evicting) ends the set
        self._prepared = self._sink_base = None
        if self.sinks:
            src = torch.cat([seg.sink_originals() for seg in segments], dim=1)  # (B, H, m, D) originals
            self._prepared = self.rotary.prepare(src)
            if self.real is not None:  # a row's sink i, at true position p, sits at frame r - n + i: it moves by
                # r + base, base (B, H, m) = i - n - p (fixed while the set holds: sinks never leave their slots)
                pos = self.pos[:, self._sink_slots].view(b, -1, self.sinks)
                self._sink_base = torch.arange(self.sinks, device=device) - self._lens.view(1, -1, 1) - pos
            rot = 2 * self.rotary.inv_freq.shape[0]
            self._k_rot = self.k[..., :rot]  # the rotated channels (partial rotary leaves the others)

    def reserved_nbytes(self) -> int:
        """The float32 copies of the segments' sink originals, and the next steps' slots and rotated sinks (the keys
        and values themselves are the segments' bytes, moved here)."""
        return sum(t.nbytes for t in (self._prepared, self._slots, self._rotated, self._sink_base) if t is not None)

    def intact(self) -> bool:
        """Every segment still holds its views and its group (budget and scorer), and has taken no step of its own
        since the set's last step."""
        for seg, views, turned0, group in zip(self.segments, self._views, self._turned0, self._groups):
            _, turned, width = seg.ring()
            if (seg.group is not group or not seg.holds(*views, padded=self.real is not None) or seg.seen != self.seen
                    or turned != (turned0 + self._steps) % width or seg.real_seen is not self.real):
                return False
        return True

    def step(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """One decode step of every segment: ``key``/``value (B, kv_heads, 1, D)`` are the layer's new states
        (all its KV heads; the set takes its own)."""
        i = self._steps - self._planned
        if self._slots is None or i == AHEAD:
            self._plan()
            i = 0
        b, d = key.shape[0], key.shape[-1]
        slots = self._slots[i]  # (H,)
        if not (self._first and key.shape[1] == len(self.heads)):
            key, value = key.index_select(1, self.heads), value.index_select(1, self.heads)
        self.k.index_copy_(1, slots, key.reshape(b, -1, d))
        self.v.index_copy_(1, slots, value.reshape(b, -1, d))
        if self.real is None:
            self.pos.index_fill_(1, slots, self.seen)
        else:  # positions count a row's real tokens
            self.pos.index_copy_(1, slots, self.real.view(b, 1).expand(b, len(slots)))
            self.real = self.real + 1
        self.seen += 1
        self._steps += 1
        for seg in self.segments:
            seg.advance(self.real)
        if self.sinks:  # each head's sinks, at their frame positions after this step
            self._k_rot.index_copy_(1, self._sink_slots, self._rotated[i])

    def _plan(self) -> None:
        """The slots and the rotated sinks of the next :data:`AHEAD` steps, from the step about to be taken: a ring
        turns by one slot a step, and its sinks by one position, so each step then writes what was planned."""
        ahead = torch.arange(AHEAD, device=self._base.device)[:, None]  # (AHEAD, 1)
        self._slots = torch.remainder(self._phase + (ahead + self._steps), self._width).add_(self._base)
        if self.sinks and self.real is None:  # the step from seen to seen + 1 rotates each head's sinks by seen + 1 - n
            pairs = self.rotary.pairs_each(ahead + (self.seen + 1) - self._lens, self.seen + AHEAD - self._min_len)
            self._rotated = self.rotary.shift_each(self._prepared, pairs).flatten(2, 3).to(self.k.dtype)
        elif self.sinks:  # a padded batch's: each row's by its own r + 1 + base (r: its real tokens before the step)
            delta = ahead.view(AHEAD, 1, 1, 1) + (self.real + 1) + self._sink_base  # (AHEAD, B, H, m)
            rotated = self.rotary.shift_at_each(self._prepared, delta, self.seen + AHEAD)
            self._rotated = rotated.flatten(2, 3).to(self.k.dtype)
        self._planned = self._steps


def _kind(seg: Segment) -> tuple:
    """What segments stepping as one must share: sinks, rotary, dtype, batch, tokens seen, whether padded."""
    keys = seg.stored()[0]
    return seg.prefix, seg.rotary, keys.dtype, keys.shape[0], seg.seen, seg.real_seen is None


def _ringable(storage: object) -> bool:
    """A dense segment of a re-indexing positional method with a budget: its decode steps can be ring steps."""
    return (isinstance(storage, Segment) and storage.reindex and not storage.needs_scores
            and storage.group.budget is not None and storage.track_pos)
