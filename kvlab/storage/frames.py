"""Frame positions of a dense segment: the keys that move when a re-indexing scorer evicts, from exact originals.

Keys arrive rotated (RoPE) at their true position ``p`` (for a padded row: its count of
real tokens before it, as ``generate`` numbers them). When the scorer re-indexes, the key at cache
index ``i`` of ``n`` kept real tokens sits at *frame* position ``seen - n + i`` (``seen``: real tokens
fed so far). A query at true position ``seen + j`` then sees each kept key at distance ``n + j - i``:
exactly the distance it would have if every token's position were its index in the cache
(StreamingLLM, section 3.2), because RoPE attention depends only on differences of positions. Only
keys that precede an evicted token move: a prefix of the cache (for StreamingLLM the sinks; for a
scored method every slot). Moved keys are re-derived from an exact copy of their original, held for
that prefix only, by one rotation (:mod:`kvlab.storage.rope`): no drift in bf16 however long the stream.

:class:`FramePositions` holds that part of :class:`~kvlab.storage.dense.Segment` (whose state it reads and writes):
which slots may move, the originals kept for them, and their rotation to the frame.
"""

from __future__ import annotations

import torch

from kvlab.storage.tokens import gather_tokens


class FramePositions:
    """The re-indexing of :class:`kvlab.storage.dense.Segment`: its moved prefix of slots and their originals."""

    def _moved_prefix(self) -> int:
        """Slots that can hold a moved key: before the last run of a positional scorer, else all."""
        budget = self.group.budget
        runs = self.group.scorer.runs(budget + 1)
        if runs and runs[-1][1] == budget + 1:
            return budget - (runs[-1][1] - runs[-1][0])
        return budget

    def sink_originals(self) -> torch.Tensor:
        """The exact originals of the moved prefix's keys (the sinks) ``(B, h, prefix, D)``."""
        return self._src[:, :, :self.prefix]

    def _keep_originals(self) -> None:
        """Before the first eviction of a re-indexing segment: copy the prefix slots' keys, the stream's first
        tokens, which never leave those slots (nothing has moved yet)."""
        if self.prefix and self._src is None:
            self._src, self._src_fixed = self._k[:, :, :self.prefix].clone(), True

    def _gather_originals(self, idx: torch.Tensor) -> torch.Tensor:
        """Original keys of the tokens at slots ``idx (B, h, m)``: from ``_src`` for the prefix slots, else the
        stored key itself (a key outside the prefix has never moved)."""
        stored = gather_tokens(self._k, idx)
        if self._src is None:
            return stored
        m = self._src.shape[2]
        inside = gather_tokens(self._src, idx.clamp(max=m - 1))
        return torch.where((idx < m)[..., None], inside, stored)

    def _refresh(self) -> None:
        """Rotate the prefix slots' keys from their originals to their frame positions."""
        if self._src is None:
            return
        m = min(self._src.shape[2], self.length)
        n = self.length
        padded = self._valid is not None
        if (self._src_fixed and not padded) or (padded and self._pad_held == 0):  # a few kernels, from prepared keys
            src, k, prepared, out, base = self._prepared or (None, None, None, None, None)
            if src is not self._src or k is not self._k or out.shape[2] != m or (base is None) == padded:
                prepared = self.rotary.prepare(self._src[:, :, :m])
                out = self.rotary.rotated(self._k[:, :, :m])
                # rows that hold no padding: key i of a row that has seen r real tokens sits at frame r - n + i, so
                # the original at true position p moves by r + base, base (B, h, m) = i - n - p
                base = torch.arange(m, device=self.device) - n - self._pos[:, :, :m] if padded else None
                self._prepared = (self._src, self._k, prepared, out, base)
            if padded:  # each key's cos/sin rows gathered from the table
                self.rotary.shift_at(prepared, base + self._real, self.seen, out)
            else:  # the stream's first tokens 0..m-1 at frame seen - n..: all move by seen - n
                self.rotary.shift_by(prepared, self.seen - n, out)
            return
        if padded:
            valid = self._valid
            frame = self._real - valid.sum(-1, keepdim=True) + valid[..., :m].cumsum(-1) - 1
        else:
            frame = torch.arange(self.seen - n, self.seen - n + m, device=self.device)
        delta = frame - self._pos[:, :, :m]
        if padded:
            delta = delta.masked_fill(~self._valid[..., :m], 0)
        self._k[:, :, :m] = self.rotary.shift(self._src[:, :, :m], delta, bound=self.seen + 1)
