"""A storage that keeps one storage per batch row once a padded batch arrives (pure torch).

Quantized storage counts a row's real tokens in everything it does: which tokens form a key block (its
scales), which are the full-precision residual, which are the sinks. Rows of different lengths cannot
share those slots, so a row must be stored as it would be alone. :class:`RowSplit` holds one storage
for the batch until a forward pass brings padding, then splits it into one single-row storage per row
(what the rows hold so far goes with them) and feeds each row only its real tokens: every row then keeps,
quantizes and attends exactly as it would alone. The cost is one call per row per layer, so a padded
batch decodes about as fast as its rows one after another; a batch without padding keeps the one storage.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from kvlab.storage.plan import Group, Storage


class RowSplit:
    """One :class:`~kvlab.storage.plan.Storage` for the batch, one per row once padding was seen."""

    def __init__(self, make: Callable[[], Storage]):
        self._make = make
        self.batch: Storage = make()
        self.rows: list[Storage] | None = None
        self.heads = self.batch.heads
        self._valid: torch.Tensor | None = None  # (B, q) the last forward pass's real tokens, in row mode

    @property
    def parts(self) -> list[Storage]:
        return self.rows if self.rows is not None else [self.batch]

    @property
    def group(self) -> Group:
        return self.parts[0].group

    @group.setter
    def group(self, group: Group) -> None:
        for part in self.parts:
            part.group = group

    @property
    def length(self) -> int:
        return max(part.length for part in self.parts)

    def nbytes(self) -> int:
        return sum(part.nbytes() for part in self.parts)

    def source_nbytes(self) -> int:
        return sum(part.source_nbytes() for part in self.parts)

    def reserved_nbytes(self) -> int:
        return sum(part.reserved_nbytes() for part in self.parts)

    def push(self, key_states: torch.Tensor, value_states: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Add ``(B, h, q, D)`` keys and values, ``valid (B, q)`` marking the real ones (None: all)."""
        if self.rows is None and valid is not None and not bool(valid.all()):
            self._split(key_states.shape[0])
        if self.rows is None:
            self.batch.push(key_states, value_states, valid)
            return
        self._valid = valid
        for b, row in enumerate(self.rows):
            real = None if valid is None else valid[b]
            k, v = key_states[b:b + 1], value_states[b:b + 1]
            if real is not None:
                k, v = k[:, :, real], v[:, :, real]
            if k.shape[2]:
                row.push(k, v, None)

    def attend(self, query: torch.Tensor, scaling: float, window: int | None, softcap: float | None = None,
               prefix: Storage | None = None) -> torch.Tensor:
        """``query (B, h*g, q, D)`` → ``(B, h*g, q, D)``; each row over its own tokens (a padding query gets 0)."""
        if self.rows is None:
            return self.batch.attend(query, scaling, window, softcap, prefix=prefix)
        out = torch.zeros_like(query)
        for b, row in enumerate(self.rows):
            real = None if self._valid is None else self._valid[b]
            q = query[b:b + 1] if real is None else query[b:b + 1, :, real]
            if q.shape[2]:
                part = row.attend(q, scaling, window, softcap, prefix=None if prefix is None else prefix.parts[b])
                if real is None:
                    out[b:b + 1] = part
                else:
                    out[b:b + 1, :, real] = part
        return out

    def dense(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Keys, values ``(B, h, n, D)`` and, in row mode, ``valid (B, h, n)`` (rows left-padded to the longest)."""
        if self.rows is None:
            return self.batch.dense()
        parts = [row.dense()[:2] for row in self.rows]
        n = max(k.shape[2] for k, _ in parts)
        keys = torch.cat([torch.nn.functional.pad(k, (0, 0, n - k.shape[2], 0)) for k, _ in parts])
        values = torch.cat([torch.nn.functional.pad(v, (0, 0, n - v.shape[2], 0)) for _, v in parts])
        valid = torch.stack([torch.arange(n, device=keys.device) >= n - k.shape[2] for k, _ in parts])
        return keys, values, valid[:, None].expand(*keys.shape[:3])

    @property
    def keys(self) -> torch.Tensor | None:
        return self.dense()[0] if self.length else None

    @property
    def values(self) -> torch.Tensor | None:
        return self.dense()[1] if self.length else None

    def compress(self) -> None:
        for part in self.parts:
            part.compress()

    def drop_last(self) -> None:
        for part in self.parts:
            part.drop_last()

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Reorder / repeat / select rows (beam search): whole row storages in row mode."""
        if self.rows is None:
            self.batch.map_batch(fn)
            return
        order = fn(torch.arange(len(self.rows))).tolist()  # once per beam step, on the host
        self.rows = [copy.deepcopy(self.rows[i]) for i in order]
        if self._valid is not None:
            self._valid = fn(self._valid.cpu()).to(self._valid.device)

    def clear(self) -> None:
        self.batch, self.rows, self._valid = self._make(), None, None

    def _split(self, batch: int) -> None:
        """One storage per row, each holding its row of what the batch storage holds (empty at the first pass)."""
        rows = []
        for b in range(batch):
            row = copy.deepcopy(self.batch)
            row.map_batch(lambda t, b=b: t[b:b + 1].clone())
            rows.append(row)
        self.rows = rows
