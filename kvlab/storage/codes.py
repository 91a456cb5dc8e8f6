"""The quantized tokens of a quantized segment: KIVI codes and scales in time order (pure torch, any device).

Keys are quantized **per channel** in blocks of ``group_size`` tokens (every (head, channel) has a scale and
zero point per block), values **per token** in groups of ``min(group_size, D)`` channels; asymmetric,
round-to-nearest, float16 scales (:mod:`kvlab.quant`). Layout (cheap tensor ops to append blocks or drop
tokens, no lists of tensors)::

    kcodes, vcodes   (B, h, T, D * bits / 8)  uint8, codes packed along the channel axis
    kscale, kzero    (B, h, NB, D)            float16, one row per block of G tokens (per channel)
    kblock           (B, h, T)                int16, the row of kscale each token uses
    kpos             (B, h, T)                int32 true positions, only when positions are kept (no re-indexing)
    vscale, vzero    (B, h, T, D / Gv)        float16, one per Gv channels per token

Dropping a token leaves the codes of its block's other tokens valid under the block's key scales, so tokens
are dropped one by one (:meth:`QuantBody.keep`, :meth:`QuantBody.keep_last`); a block's scale row lives as
long as one of its tokens does (:meth:`QuantBody.compact`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvlab.device import HostCopy
from kvlab.errors import KvlabError
from kvlab.quant import BITS, finite, overflow, pack, quantize, quantize_codes, scales_finite
from kvlab.storage.tokens import gather_tokens

PER_TOKEN = ("kcodes", "vcodes", "vscale", "vzero", "kblock", "kpos")  # tensors with one entry per token (axis 2)
ALL = PER_TOKEN + ("kscale", "kzero")


class QuantBody:
    """Quantized keys (before RoPE, or as rotated: the segment decides) and values of ``T`` tokens of ``h`` heads,
    in time order."""

    def __init__(self, bits: int, group_size: int, positions: bool):
        if bits not in BITS:
            raise KvlabError(f"quantized storage needs bits {', '.join(map(str, BITS))}, got {bits}")
        self.bits, self.group_size, self.positions = bits, group_size, positions
        self.clear()

    def clear(self) -> None:
        self.kcodes = self.vcodes = self.kscale = self.kzero = self.kblock = self.vscale = self.vzero = None
        self.kpos: torch.Tensor | None = None
        # token i uses key-scale row (i + lead) // G for every head (blocks added whole, only the oldest tokens
        # dropped: a positional window); None once tokens were chosen one by one (kblock says)
        self.lead: int | None = 0
        # values sent to the host for later, so a decode step never waits on the device: (rows then, a bound on
        # the live rows among them) for the next lazy compaction; whether the last unchecked block's scales are finite
        self._live: tuple[int, HostCopy] | None = None
        self._finite: HostCopy | None = None

    def start(self, b: int, h: int, d: int, device: torch.device) -> None:
        """Empty tensors for ``b`` rows of ``h`` heads of ``d`` channels."""
        self.vgroup = min(self.group_size, d)
        if (d * self.bits) % 8 or d % self.vgroup:
            raise KvlabError(f"head_dim {d} cannot be packed at {self.bits} bits in value groups of {self.vgroup} "
                             f"channels; choose a group_size that divides {d}")
        half, width = torch.float16, d * self.bits // 8
        per = 8 // self.bits  # codes per byte; byte -> its codes as one wider integer, read back as bytes
        codes = (torch.arange(256)[:, None] >> torch.arange(0, 8, self.bits)) & ((1 << self.bits) - 1)
        wide = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[per]
        self._table = codes.to(torch.uint8).contiguous().view(wide).view(256).to(device)
        self.kcodes = torch.empty(b, h, 0, width, dtype=torch.uint8, device=device)
        self.vcodes = torch.empty(b, h, 0, width, dtype=torch.uint8, device=device)
        self.kscale = torch.empty(b, h, 0, d, dtype=half, device=device)
        self.kzero = torch.empty_like(self.kscale)
        self.kblock = torch.empty(b, h, 0, dtype=torch.int16, device=device)
        if self.positions:
            self.kpos = torch.empty(b, h, 0, dtype=torch.int32, device=device)
        self.vscale = torch.empty(b, h, 0, d // self.vgroup, dtype=half, device=device)
        self.vzero = torch.empty_like(self.vscale)

    @property
    def length(self) -> int:
        return 0 if self.kcodes is None else self.kcodes.shape[2]

    def nbytes(self) -> tuple[int, int]:
        """Bytes of the packed codes; of the scales, zero points, block rows (and positions)."""
        codes = self.kcodes.nbytes + self.vcodes.nbytes if self.kcodes is not None else 0
        scales = sum(getattr(self, n).nbytes for n in ("kscale", "kzero", "kblock", "kpos", "vscale", "vzero")
                     if getattr(self, n) is not None)
        return codes, scales

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``fn`` (a batch-axis reorder / repeat / select) to every tensor."""
        for name in ALL:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def add(self, keys: torch.Tensor, values: torch.Tensor, first: int, check: bool = True) -> None:
        """Quantize ``keys`` and ``values`` ``(B, h, m, D)``, m a multiple of G, at true positions
        ``first..first+m-1``, as the newest tokens. ``check``: raise now if a scale overflows float16 (a read
        from the device); else (a decode step) that is checked by the next :meth:`add` or :meth:`check`."""
        b, h, m, d = keys.shape
        bits, width = self.bits, d * self.bits // 8
        if self.lead is not None and self.lead + self.length != self.group_size * self.kscale.shape[2]:
            self.lead = None
        # the keys' codes come unpacked, in (B, h, D, m) order, and are packed once token-major
        kc, kscale, kzero = quantize_codes(keys, bits, axis=2, group_size=self.group_size, check=False)
        qv = quantize(values, bits, axis=3, group_size=self.vgroup, check=False)  # codes in (B, h, m, D) order
        ok = scales_finite(kscale, kzero) & finite(qv)
        self.check()  # the previous unchecked block (its flag is on the host by now)
        if check and not bool(ok):
            raise KvlabError(overflow())
        self._finite = None if check else HostCopy(ok)
        self.kcodes = torch.cat((self.kcodes, pack(kc.transpose(2, 3), bits).view(b, h, m, width)), dim=2)
        self.vcodes = torch.cat((self.vcodes, qv.data.view(b, h, m, width)), dim=2)
        rows = self.kscale.shape[2] + torch.arange(m, device=keys.device) // self.group_size
        self.kblock = torch.cat((self.kblock, rows.to(torch.int16).expand(b, h, m)), dim=2)
        self.kscale = torch.cat((self.kscale, kscale.transpose(2, 3)), dim=2)  # (B, h, m/G, D)
        self.kzero = torch.cat((self.kzero, kzero.transpose(2, 3)), dim=2)
        self.vscale = torch.cat((self.vscale, qv.scale), dim=2)  # (B, h, m, D/Gv)
        self.vzero = torch.cat((self.vzero, qv.zero), dim=2)
        if self.kpos is not None:
            pos = torch.arange(first, first + m, dtype=torch.int32, device=keys.device).expand(b, h, m)
            self.kpos = torch.cat((self.kpos, pos), dim=2)

    def check(self) -> None:
        """Raise if the last block quantized without a check overflowed float16 (a value sent to the host then,
        so this does not wait for the device)."""
        finite, self._finite = self._finite, None
        if finite is not None and not all(finite.ints()):
            raise KvlabError(overflow())

    def dequantize(self, keys: torch.Tensor | None = None,
                   values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (as stored: before RoPE, or rotated) and values, ``(B, h, T, D)`` each, float32 unless ``keys`` /
        ``values`` are given (views of larger buffers, so no copy follows): computed in float32, stored in their
        dtype."""
        b, h, t, _ = self.kcodes.shape
        d, g, gv = self.kscale.shape[-1], self.group_size, self.vgroup
        keys = torch.empty(b, h, t, d, device=self.kcodes.device) if keys is None else keys
        values = torch.empty(b, h, t, d, device=self.kcodes.device) if values is None else values
        # addcmul computes in float32, the zero points' dtype: it reads the uint8 codes and float16 scales as float32
        # (exactly) as it goes, with no converted copy of them first
        kc = self._unpack(self.kcodes)
        if self.lead is not None:  # a partial oldest block (row r0), then whole blocks: views, no index
            r0, head = self.lead // g, min(t, -self.lead % g)
            if head:
                torch.addcmul(self.kzero[:, :, r0, None].float(), kc[:, :, :head], self.kscale[:, :, r0, None],
                              out=keys[:, :, :head])
            r1, whole = r0 + (head > 0), (t - head) // g
            torch.addcmul(self.kzero[:, :, r1:r1 + whole, None].float(), kc[:, :, head:].view(b, h, whole, g, d),
                          self.kscale[:, :, r1:r1 + whole, None], out=keys[:, :, head:].view(b, h, whole, g, d))
        else:  # each token's row, as one index into the (B * h * NB) rows: a row copy, not a per-element gather
            nb = self.kscale.shape[2]
            rows = (self.kblock.long() + torch.arange(0, b * h * nb, nb, device=kc.device).view(b, h, 1)).flatten()
            scale = self.kscale.flatten(0, 2).index_select(0, rows).view(b, h, t, d)
            torch.addcmul(self.kzero.float().flatten(0, 2).index_select(0, rows).view(b, h, t, d), kc, scale, out=keys)
        vc = self._unpack(self.vcodes).view(b, h, t, d // gv, gv)
        _affine_into(values.view(b, h, t, d // gv, gv), vc, self.vscale[..., None], self.vzero[..., None])
        return keys, values

    def _unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """Codes ``(..., W * 8 / bits)`` uint8 of packed bytes ``(..., W)`` (the layout of :func:`kvlab.quant.pack`:
        code ``i`` of a byte in bits ``[bits * i, bits * (i + 1))``): one table lookup per byte."""
        if self.bits == 8:
            return packed
        return self._table.index_select(0, packed.flatten().int()).view(torch.uint8).view(*packed.shape[:-1], -1)

    def keep(self, idx: torch.Tensor) -> None:
        """Keep the tokens at ``idx (B, h, k)`` (increasing): per-head choices."""
        self.lead = None
        for name in PER_TOKEN:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, gather_tokens(t, idx))

    def keep_last(self, k: int) -> None:
        """Keep the newest ``k`` tokens (a positional scorer's window): views, no copy. The dropped tokens'
        memory is freed by the next :meth:`add` (a concatenation: in a window, within ``group_size`` steps);
        :meth:`reserved_nbytes` counts it until then."""
        drop = self.length - k
        if self.lead is not None:
            self.lead += drop
        for name in PER_TOKEN:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t[:, :, drop:])

    def reserved_nbytes(self) -> int:
        """Bytes allocated beside those held: dropped tokens whose memory a view still holds (:meth:`keep_last`)."""
        return sum(t.untyped_storage().nbytes() - t.nbytes for t in map(self.__getattribute__, ALL) if t is not None)

    def compact(self, wait: bool = True) -> None:
        """Drop the key-scale rows no kept token uses; renumber ``kblock``. Heads keep their live rows in
        time order, padded to the largest count over heads. Where only the oldest rows die (``lead``) that
        is a slice. Else the count comes from the device: read now (``wait``), or, in a decode step, the one
        the previous compaction sent to the host. A row dead then is dead now (tokens only leave; new blocks
        add rows behind), so that count bounds the live rows among the rows there were: those are compacted,
        newer rows wait for the next compaction."""
        if self.lead is not None:
            dead = self.lead // self.group_size
            if dead:
                self.kscale, self.kzero = self.kscale[:, :, dead:].clone(), self.kzero[:, :, dead:].clone()
                self.kblock = self.kblock - dead
                self.lead -= dead * self.group_size
            return
        rows, idx = self.kscale.shape[2], self.kblock.long()  # idx: (B, h, T)
        live = torch.zeros(*idx.shape[:2], rows, dtype=torch.bool, device=idx.device).scatter_(2, idx, True)
        if wait:
            old, count = rows, int(live.sum(-1).max()) if live.numel() else 0
        else:
            old, count = (self._live[0], max(self._live[1].ints())) if self._live is not None else (0, 0)
        if count < old:
            # the first `old` rows, live ones first in time order (per head), cut to `count`; then the newer rows
            order = torch.argsort((~live[..., :old]).to(torch.uint8), dim=-1, stable=True)[..., :count]
            newer = torch.arange(old, rows, device=idx.device).expand(*idx.shape[:2], -1)
            renumber = torch.cat((live[..., :old].cumsum(-1) - 1, newer - old + count), dim=-1)
            self.kblock = renumber.gather(2, idx).to(torch.int16)
            take = torch.cat((order, newer), dim=-1)
            live = live.gather(2, take)
            take = take[..., None].expand(-1, -1, -1, self.kscale.shape[-1])
            self.kscale, self.kzero = self.kscale.gather(2, take), self.kzero.gather(2, take)
        if not wait and live.numel():
            self._live = live.shape[-1], HostCopy(live.sum(-1).amax())
        else:
            self._live = None


def _affine_into(out: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
    """``out = codes * scale + zero``, computed in float32 and rounded once to ``out``'s dtype (``scale`` and ``zero``
    broadcast to ``codes``). Three in-place binary kernels: where the scale broadcasts along the innermost axis (a
    value's per-token scale), one three-input ``addcmul`` runs about 5x slower on a CPU, and gives the same bits."""
    acc = out.copy_(codes) if out.dtype == torch.float32 else codes.float()
    acc.mul_(scale)
    acc.add_(zero)
    if acc is not out:
        out.copy_(acc)
