"""Rotating stored keys by a number of positions, always from an exact source.

A key the model hands over is rotated (RoPE) at its true position ``p``. Storage that moves a key to
another position ``p + delta`` rotates that *original* key once by ``delta``, in float32, and rounds
once to the cache's dtype; it never rotates an already-moved key again. Rotating a bf16 key by one
position a thousand times drifts 44% away from rotating it once by a thousand (the rounding of each
step accumulates); deriving every rotation from the original keeps the error at one rounding, however
long the stream (tested over 10,000 steps in bf16 and fp16).
"""

from __future__ import annotations

import torch


TABLE_POSITIONS = 1 << 16  # cos/sin rows a Rotary keeps at most (positions beyond are computed when needed)


class Rotary:
    """Rotates keys by a number of positions with a model's RoPE frequencies.

    ``inv_freq``: ``(rot_dim // 2,)``; the first ``rot_dim`` channels of a head are rotated
    (transformers' ``rotate_half`` convention), the rest are left alone (partial rotary). A RoPE
    whose cos/sin carry an attention factor (YaRN) is still a rotation times that factor, which a
    stored key already carries: shifting it needs the frequencies only.

    The cos/sin of positions ``0..m-1`` are kept in a float32 table (``m`` grows by doubling, up to
    :data:`TABLE_POSITIONS`: 16 MiB for head_dim 64), as inference engines keep a cos/sin cache: a decode
    step then reads its rows instead of computing sines. They are the values a rotation computes
    itself (``cos(p * inv_freq)``), so reading them changes no bit. Layers with the same frequencies share
    one ``Rotary`` (:func:`kvlab.cache.rotaries`), hence one table per model (two for local/global RoPE).
    """

    def __init__(self, inv_freq: torch.Tensor):
        self.inv_freq = inv_freq.detach().float()
        self._invs: dict[torch.device, torch.Tensor] = {}
        self._table: dict[torch.device, torch.Tensor] = {}  # (positions, 2, 1, 1, 1, 1, rot/2): cos and sin

    def shift(self, keys: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype | None = None,
              bound: int | None = None) -> torch.Tensor:
        """``keys (..., n, D)`` rotated by ``delta`` positions (an int tensor broadcasting to ``(..., n)``;
        ``bound``: if given, every delta is in ``[0, bound)``), computed in float32 and returned in ``dtype``
        (default: the keys' dtype). A zero ``delta`` returns the key unchanged."""
        if bound is not None and bound <= TABLE_POSITIONS:
            cos, sin = self._rows(bound, keys.device)
            delta = delta.to(keys.device, torch.long)
            return self._rotate(keys, cos[delta], sin[delta], 1, dtype or keys.dtype)
        ang = delta.to(keys.device, torch.float32)[..., None] * self._inv(keys.device)  # (..., n, rot/2)
        return self._rotate(keys, ang.cos(), ang.sin(), 1, dtype or keys.dtype)

    def shift_range(self, keys: torch.Tensor, start: int, sign: int = 1, dtype: torch.dtype | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
        """``keys (..., n, D)`` rotated by ``sign * (start + i)`` for the key at index ``i`` (``sign`` -1 un-rotates
        keys that sit at positions ``start..start+n-1``): :meth:`shift` without a position tensor on the host.
        ``out``: a tensor of the result's shape to write it into (its dtype, else ``dtype``)."""
        n = keys.shape[-2]
        if 0 <= start and start + n <= TABLE_POSITIONS:
            cos, sin = self._rows(start + n, keys.device)
            cos, sin = cos[start:start + n], sin[start:start + n]
        else:
            pos = torch.arange(start, start + n, dtype=torch.float32, device=keys.device)  # exact below 2**24
            ang = torch.outer(pos, self._inv(keys.device))  # (n, rot/2)
            cos, sin = ang.cos(), ang.sin()
        return self._rotate(keys, cos, sin, sign, dtype or keys.dtype, out)

    def prepare(self, keys: torch.Tensor) -> torch.Tensor:
        """Original ``keys (B, h, m, D)`` made ready for :meth:`shift_by`: ``(2, B, h, m, 2, rot/2)`` float32
        holding ``(k1, k2)`` and ``(-k2, k1)`` of the rotated channels (twice those channels, in float32)."""
        half = self.inv_freq.shape[0]
        k = keys[..., :2 * half].float().unflatten(-1, (2, half))
        return torch.stack((k, torch.stack((-k[..., 1, :], k[..., 0, :]), dim=-2)))

    def rotated(self, keys: torch.Tensor) -> torch.Tensor:
        """The rotated channels of ``keys (B, h, m, D)`` as a ``(B, h, m, 2, rot/2)`` view (an ``out`` for
        :meth:`shift_by`)."""
        half = self.inv_freq.shape[0]
        return keys[..., :2 * half].unflatten(-1, (2, half))

    def shift_by(self, prepared: torch.Tensor, delta: int, out: torch.Tensor) -> None:
        """Write the keys of ``prepared`` (:meth:`prepare`) rotated by the same ``delta`` positions (a host
        int) into ``out`` (:meth:`rotated` of the destination): three or four kernels, whatever ``m``.
        Bit for bit what :meth:`shift` gives: ``k1 cos + (-k2) sin`` is ``k1 cos - k2 sin`` in IEEE
        arithmetic, summed in float32 and rounded once to ``out``'s dtype."""
        if 0 <= delta < TABLE_POSITIONS:
            table = self._table.get(prepared.device)
            if table is None or delta >= table.shape[0]:
                table = self._pairs(delta + 1, prepared.device)
            pair = table[delta]
        else:
            ang = self._inv(prepared.device) * float(delta)
            pair = torch.stack((ang.cos(), ang.sin())).view(2, 1, 1, 1, 1, -1)
        _sum_into(prepared * pair, out)

    def shift_range_by(self, prepared: torch.Tensor, start: int, out: torch.Tensor) -> None:
        """Write the keys of ``prepared`` (:meth:`prepare` of ``(B, h, m, D)`` keys), key ``i`` rotated by
        ``start + i`` positions, into ``out`` (:meth:`rotated` of the destination): :meth:`shift_range` in two
        kernels, bit for bit (the same table rows, products and sums)."""
        m, half = prepared.shape[-3], self.inv_freq.shape[0]
        if 0 <= start and start + m <= TABLE_POSITIONS:
            pairs = self._pairs(start + m, prepared.device)[start:start + m].view(m, 2, half)
        else:
            ang = torch.outer(torch.arange(start, start + m, dtype=torch.float32, device=prepared.device),
                              self._inv(prepared.device))  # (m, rot/2), exact below 2**24
            pairs = torch.stack((ang.cos(), ang.sin()), 1)
        _sum_into(prepared * pairs.transpose(0, 1)[:, None, None, :, None, :], out)  # pairs: (2, 1, 1, m, 1, rot/2)

    def shift_at(self, prepared: torch.Tensor, delta: torch.Tensor, top: int, out: torch.Tensor) -> None:
        """Write the keys of ``prepared`` (:meth:`prepare` of ``(B, h, m, D)`` keys), each rotated by its own
        ``delta (B, h, m)`` positions (long, every value in ``[0, top]``, ``top`` a host int), into ``out``
        (:meth:`rotated` of the destination): bit for bit :meth:`shift`, in three or four kernels (one gather of the
        table's rows for every key)."""
        _sum_into(prepared * self._rows_at(delta, top).movedim(-3, 0), out)  # rows: (2, B, h, m, 1, rot/2)

    def shift_at_each(self, prepared: torch.Tensor, delta: torch.Tensor, top: int) -> torch.Tensor:
        """The keys of ``prepared`` (:meth:`prepare` of ``(B, h, m, D)`` keys) rotated by ``delta (A, B, h, m)``
        positions each (long, every value in ``[0, top]``, ``top`` a host int), ``A`` rotations at once: the rotated
        channels ``(A, B, h, m, 2 * (rot/2))`` in float32. Bit for bit :meth:`shift_at` of each."""
        rows = self._rows_at(delta, top).movedim(-3, -6)  # (A, 2, B, h, m, 1, rot/2)
        return (prepared * rows).sum(-6).flatten(-2)

    def _rows_at(self, delta: torch.Tensor, top: int) -> torch.Tensor:
        """The cos and sin rows of ``delta (...)`` positions (every value in ``[0, top]``): ``(..., 2, 1, rot/2)``
        float32, gathered from the table (one gather for all of them) or computed beyond it."""
        half = self.inv_freq.shape[0]
        if top < TABLE_POSITIONS:
            return self._pairs(top + 1, delta.device).index_select(0, delta.flatten()).view(*delta.shape, 2, 1, half)
        ang = delta.float()[..., None] * self._inv(delta.device)  # (..., rot/2)
        return torch.stack((ang.cos(), ang.sin()), dim=-2)[..., None, :]

    def pairs_each(self, delta: torch.Tensor, top: int) -> torch.Tensor:
        """The cos and sin rows of ``delta (..., h)`` positions (long on the keys' device, every value in ``[0, top]``,
        ``top`` a host int), shaped for :meth:`shift_each`: ``(..., 2, h, rot/2)`` float32 (:meth:`_rows_at`'s rows)."""
        return self._rows_at(delta, top).squeeze(-2).transpose(-2, -3)

    def shift_each(self, prepared: torch.Tensor, pair: torch.Tensor) -> torch.Tensor:
        """The keys of ``prepared`` (:meth:`prepare`, ``(2, B, h, m, 2, rot/2)``), head ``j`` rotated by its own
        number of positions, whose cos/sin rows ``pair (..., 2, h, rot/2)`` :meth:`pairs_each` gave: the rotated
        channels ``(..., B, h, m, 2 * (rot/2))`` in float32 (leading axes of ``pair``: several rotations at once). Bit
        for bit :meth:`shift_by` of each head."""
        return (prepared * pair[..., None, :, None, None, :]).sum(-6).flatten(-2)

    def _pairs(self, m: int, device: torch.device) -> torch.Tensor:
        """``(>= m, 2, 1, 1, 1, 1, rot/2)``: the table, each position's cos and sin shaped to multiply a
        :meth:`prepare`d tensor."""
        self._rows(m, device)
        return self._table[device]

    def _inv(self, device: torch.device) -> torch.Tensor:
        inv = self._invs.get(device)  # per device: layers on several devices share this Rotary
        if inv is None:
            inv = self._invs[device] = self.inv_freq.to(device)
        return inv

    def _rows(self, m: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The table's cos and sin, ``(>= m, rot/2)`` float32 each (views of the one table)."""
        table = self._table.get(device)
        if table is None or table.shape[0] < m:
            size = min(TABLE_POSITIONS, max(m, 2 * (table.shape[0] if table is not None else 512)))
            ang = torch.outer(torch.arange(size, dtype=torch.float32, device=device), self._inv(device))
            table = self._table[device] = torch.stack((ang.cos(), ang.sin()), 1).view(size, 2, 1, 1, 1, 1, -1)
        flat = table.view(table.shape[0], 2, -1)
        return flat[:, 0], flat[:, 1]

    @staticmethod
    def _rotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: int, dtype: torch.dtype,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """``keys`` rotated by the angles whose ``cos``/``sin`` are given (``(..., n, rot/2)``; ``sign`` -1: by
        minus those angles) in float32 (transformers' ``rotate_half`` convention), rounded once to ``dtype`` (or
        written into ``out``)."""
        half = cos.shape[-1]
        k = keys.float()
        k1, k2 = k[..., :half], k[..., half:2 * half]
        out = torch.empty(keys.shape, dtype=dtype, device=keys.device) if out is None else out
        if out.dtype == torch.float32:  # the same products and sums, written straight into out: one temporary
            o1, o2 = out[..., :half], out[..., half:2 * half]
            first, second = (torch.sub, torch.add) if sign > 0 else (torch.add, torch.sub)
            tmp = k2 * sin
            first(torch.mul(k1, cos, out=o1), tmp, out=o1)  # k1 cos -+ k2 sin
            torch.mul(k1, sin, out=tmp)
            second(torch.mul(k2, cos, out=o2), tmp, out=o2)  # k2 cos +- k1 sin
        elif sign > 0:
            torch.sub(k1 * cos, k2 * sin, out=out[..., :half])
            torch.add(k2 * cos, k1 * sin, out=out[..., half:2 * half])
        else:  # cos(-a) = cos(a) and sin(-a) = -sin(a), bit for bit
            torch.add(k1 * cos, k2 * sin, out=out[..., :half])
            torch.sub(k2 * cos, k1 * sin, out=out[..., half:2 * half])
        pass_through(keys, out, 2 * half)
        return out


def pass_through(keys: torch.Tensor, out: torch.Tensor, rot: int) -> None:
    """Copy the channels of ``keys (..., D)`` past the first ``rot`` (those a partial RoPE leaves alone) into
    ``out (..., D)``; nothing when every channel is rotated."""
    if rot < keys.shape[-1]:
        out[..., rot:] = keys[..., rot:]


def _sum_into(prod: torch.Tensor, out: torch.Tensor) -> None:
    """``out = prod[0] + prod[1]``, summed in float32 and rounded once to ``out``'s dtype."""
    if out.dtype == torch.float32:
        torch.sum(prod, 0, out=out)
    else:  # a reduction into a low-precision out would round the terms first
        out.copy_(prod.sum(0))
