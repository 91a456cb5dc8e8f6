"""KIVI-style asymmetric group quantization of KV-cache tensors: pure torch, any device.

KIVI (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache") quantizes

- **keys per channel**: for every (batch, head, channel) the values of ``group_size`` consecutive
  *tokens* share one scale and zero point, because key outliers live in a few fixed channels;
- **values per token**: for every (batch, head, token) the values of ``group_size`` consecutive
  *channels* share one scale and zero point.

Each group is quantized asymmetrically with round-to-nearest::

    zero  = min(group)                       (rounded down to the stored dtype)
    scale = (max(group) - zero) / (2**bits - 1)   (rounded up to the stored dtype)
    code  = clamp(round((x - zero) / scale), 0, 2**bits - 1)
    x_hat = code * scale + zero              so |x - x_hat| <= scale / 2

A group whose values are all equal has ``scale == 0`` and restores exactly (no NaN).
Codes are packed into ``uint8``: one per byte at 8 bits, two at 4 bits, four at 2 bits, so
4-bit data takes exactly half the bytes of 8-bit data. ``bits == 16`` means "no quantization"
and is handled by callers; this module accepts only 2, 4 and 8.

Lengths that are not a multiple of ``group_size`` are fine: the last group is simply shorter
(it is padded internally by repeating its last value, which changes neither its min nor its max,
and the padding is never stored). The KIVI cache quantizes whole groups of tokens only and keeps
the most recent tokens in full precision, so in practice keys arrive in multiples of ``group_size``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlab.errors import KvlabError

BITS = (2, 4, 8)

__all__ = ["BITS", "QTensor", "quantize", "quantize_codes", "dequantize", "fake_quantize", "finite", "scales_finite",
           "overflow", "pack", "unpack", "quantize_keys", "quantize_values"]


def _check_bits(bits: int) -> None:
    if bits not in BITS:
        raise KvlabError(f"quantization bits must be one of {', '.join(map(str, BITS))} (16 means no quantization), "
                         f"got {bits!r}")


@dataclass
class QTensor:
    """A quantized tensor: packed codes plus one scale and zero point per group.

    ``data`` holds the codes of the tensor with ``axis`` moved last (shape ``moved_shape``, the
    original shape with ``axis`` moved to the end), flattened in row-major order and packed
    ``8 // bits`` codes per byte. ``scale`` and ``zero`` have shape ``(*moved_shape[:-1], n_groups)``
    with ``n_groups = ceil(shape[axis] / group_size)``; their dtype is ``scale_dtype`` of
    :func:`quantize` (float16 by default, as in KIVI). :meth:`nbytes` counts all three.
    """

    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    shape: torch.Size
    axis: int
    group_size: int

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        self.shape = torch.Size(self.shape)
        if not 0 <= self.axis < len(self.shape):
            raise KvlabError(f"QTensor axis {self.axis} is out of range for shape {tuple(self.shape)}")
        if self.data.dtype != torch.uint8:
            raise KvlabError(f"QTensor data must be uint8, got {self.data.dtype}")
        expected = (self.shape.numel() * self.bits + 7) // 8
        if self.data.numel() != expected:
            raise KvlabError(f"QTensor data has {self.data.numel()} bytes, expected {expected} for shape "
                             f"{tuple(self.shape)} at {self.bits} bits")

    @property
    def moved_shape(self) -> torch.Size:
        """The original shape with ``axis`` moved to the end (the layout of the codes)."""
        dims = list(self.shape)
        return torch.Size(dims[:self.axis] + dims[self.axis + 1:] + [dims[self.axis]])

    def nbytes(self) -> int:
        """Bytes of the packed codes plus the scales and zero points."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero))


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` into a flat ``uint8`` tensor, ``8 // bits`` per byte.

    Code ``i`` of each byte sits in bits ``[bits * i, bits * (i + 1))`` (little end first). The flat
    codes are zero-padded to a multiple of ``8 // bits``; :func:`unpack` with ``numel`` drops the padding.
    """
    _check_bits(bits)
    flat = codes.reshape(-1).to(torch.uint8)
    per = 8 // bits
    if per == 1:
        return flat.clone()
    pad = (-flat.numel()) % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, per)
    out = groups[:, 0].clone()
    for i in range(1, per):
        out |= groups[:, i] << (bits * i)
    return out


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``numel`` codes as a flat ``uint8`` tensor."""
    _check_bits(bits)
    per = 8 // bits
    if packed.dtype != torch.uint8 or packed.numel() * per < numel:
        raise KvlabError(f"cannot unpack {numel} codes of {bits} bits from {packed.numel()} bytes of {packed.dtype}")
    if per == 1:
        return packed.reshape(-1)[:numel].clone()
    mask = (1 << bits) - 1
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)  # (per,)
    codes = (packed.reshape(-1, 1) >> shifts) & mask  # (n_bytes, per)
    return codes.reshape(-1)[:numel]


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """(..., L) -> (..., G, group_size), padding the last group by repeating its last value."""
    length = x.shape[-1]
    pad = (-length) % group_size
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    return x.reshape(*x.shape[:-1], -1, group_size)


def _round_toward(t: torch.Tensor, dtype: torch.dtype, exact: torch.Tensor, up: bool) -> torch.Tensor:
    """``t`` cast to ``dtype``, nudged one ulp so the stored value is >= (``up``) or <= ``exact`` (no branch on
    the values: nothing is read back from the device)."""
    stored = t.to(dtype)
    wrong = stored.to(exact.dtype) < exact if up else stored.to(exact.dtype) > exact
    direction = torch.full_like(stored, float("inf") if up else float("-inf"))
    return torch.where(wrong, torch.nextafter(stored, direction), stored)


def quantize(x: torch.Tensor, bits: int, *, axis: int, group_size: int,
             scale_dtype: torch.dtype = torch.float16, check: bool = True) -> QTensor:
    """Quantize ``x`` in groups of ``group_size`` consecutive elements along ``axis``.

    Every index of the other axes gets its own groups, e.g. for keys ``(B, H, T, D)`` with
    ``axis=2`` each channel of each head has one scale per ``group_size`` tokens.
    ``scale_dtype`` is the dtype of the stored scales and zero points (float16 by default);
    values beyond its range are a KvlabError (pass ``torch.float32``). That check reads a flag back from the
    device; ``check=False`` skips it, for a caller that checks :func:`finite` of the result later.
    """
    codes, scale, zero = quantize_codes(x, bits, axis=axis, group_size=group_size, scale_dtype=scale_dtype,
                                        check=check)
    return QTensor(data=pack(codes, bits), scale=scale, zero=zero, bits=bits, shape=x.shape,
                   axis=axis % x.dim(), group_size=group_size)


def quantize_codes(x: torch.Tensor, bits: int, *, axis: int, group_size: int,
                   scale_dtype: torch.dtype = torch.float16, check: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What :func:`quantize` packs: the codes, unpacked, of ``x`` with ``axis`` moved last (integers in
    ``[0, 2**bits)``, in the compute dtype), and the ``(..., n_groups)`` scales and zero points, for a caller that
    packs the codes in another layout (a key block's codes go token-major)."""
    _check_bits(bits)
    if not x.is_floating_point():
        raise KvlabError(f"quantize needs a floating-point tensor, got {x.dtype}")
    if x.dim() == 0 or x.numel() == 0:
        raise KvlabError(f"quantize needs a non-empty tensor with at least one axis, got shape {tuple(x.shape)}")
    if not -x.dim() <= axis < x.dim():
        raise KvlabError(f"axis {axis} is out of range for a tensor of {x.dim()} dimensions")
    if group_size < 1:
        raise KvlabError(f"group_size must be >= 1, got {group_size}")
    axis = axis % x.dim()
    levels = (1 << bits) - 1
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    moved = x.movedim(axis, -1).to(compute)                         # (..., L)
    groups = _grouped(moved, group_size)                            # (..., G, gs)
    mn, mx = groups.amin(dim=-1), groups.amax(dim=-1)               # (..., G)
    zero = _round_toward(mn, scale_dtype, mn, up=False)
    scale = _round_toward((mx - zero.to(compute)) / levels, scale_dtype, (mx - zero.to(compute)) / levels, up=True)
    if check and not bool(scales_finite(scale, zero)):
        raise KvlabError(f"{overflow(scale_dtype)} (values of magnitude up to {float(moved.abs().max()):.3g})")
    s, z = scale.to(compute).unsqueeze(-1), zero.to(compute).unsqueeze(-1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.clamp(torch.round((groups - z) / safe), 0, levels)  # (..., G, gs)
    return codes.reshape(*moved.shape[:-1], -1)[..., :moved.shape[-1]], scale, zero


def finite(q: QTensor) -> torch.Tensor:
    """Whether every scale and zero point of ``q`` is finite: a 0-dim bool tensor on ``q``'s device (not read
    back)."""
    return scales_finite(q.scale, q.zero)


def scales_finite(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor on their device: every scale and zero point is finite (read it when it suits)."""
    return torch.isfinite(scale).all() & torch.isfinite(zero).all()


def overflow(scale_dtype: torch.dtype = torch.float16) -> str:
    """The error of values whose scales do not fit ``scale_dtype``."""
    return (f"values too large (or non-finite) for {scale_dtype} quantization scales; quantize with "
            "scale_dtype=torch.float32")


def dequantize(q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Restore a tensor of shape ``q.shape`` and dtype ``dtype`` from a :class:`QTensor`."""
    moved_shape = q.moved_shape
    length = moved_shape[-1]
    codes = unpack(q.data, q.bits, moved_shape.numel()).reshape(moved_shape)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    groups = _grouped(codes.to(compute), q.group_size)              # (..., G, gs)
    x = groups * q.scale.to(compute).unsqueeze(-1) + q.zero.to(compute).unsqueeze(-1)
    x = x.reshape(*moved_shape[:-1], -1)[..., :length]
    return x.movedim(-1, q.axis).to(dtype).contiguous()


def fake_quantize(x: torch.Tensor, bits: int, *, axis: int, group_size: int,
                  scale_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """``dequantize(quantize(x))`` in ``x``'s dtype: the values a quantized cache would attend to."""
    return dequantize(quantize(x, bits, axis=axis, group_size=group_size, scale_dtype=scale_dtype), x.dtype)


def quantize_keys(k: torch.Tensor, bits: int, group_size: int, *,
                  scale_dtype: torch.dtype = torch.float16) -> QTensor:
    """KIVI keys, per channel: ``k`` is ``(B, H, T, D)``; groups of ``group_size`` tokens along T."""
    if k.dim() != 4:
        raise KvlabError(f"keys must be (batch, heads, tokens, head_dim), got shape {tuple(k.shape)}")
    return quantize(k, bits, axis=2, group_size=group_size, scale_dtype=scale_dtype)


def quantize_values(v: torch.Tensor, bits: int, group_size: int, *,
                    scale_dtype: torch.dtype = torch.float16) -> QTensor:
    """KIVI values, per token: ``v`` is ``(B, H, T, D)``; groups of ``min(group_size, D)`` channels along D."""
    if v.dim() != 4:
        raise KvlabError(f"values must be (batch, heads, tokens, head_dim), got shape {tuple(v.shape)}")
    if group_size < 1:
        raise KvlabError(f"group_size must be >= 1, got {group_size}")
    return quantize(v, bits, axis=3, group_size=min(group_size, v.shape[-1]), scale_dtype=scale_dtype)
