"""Re-indexed positions stay exact in low precision: every moved key is re-derived from its original."""

from __future__ import annotations

import pytest
import torch

from kvlab.methods.streaming_llm import StreamingLLM
from kvlab.storage import Group, Rotary
from kvlab.storage.dense import Segment

HEAD_DIM = 128
# Llama-3's frequencies (theta 500,000), head_dim 128
INV_FREQ = 1.0 / (500_000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))


def _rotate(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Literal RoPE (rotate_half) of ``x (..., n, D)`` at positions ``pos (n,)``, in float64."""
    ang = pos.double()[:, None] * INV_FREQ.double()
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
    x = x.double()
    return x * cos + torch.cat((-x[..., HEAD_DIM // 2:], x[..., :HEAD_DIM // 2]), -1) * sin


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ten_thousand_steps_keep_sinks_within_one_rounding(dtype):
    """10,000 single-token steps: the sinks' keys equal the original keys rotated once to their frame
    positions, within the dtype's rounding of one rotation, and the error does not grow with the steps."""
    g = torch.Generator().manual_seed(0)
    sinks, window, steps = 4, 60, 10_000
    k0 = torch.randn(1, 2, sinks, HEAD_DIM, generator=g)  # pre-RoPE sink keys
    seg = Segment(Group(heads=(0, 1), budget=sinks + window, scorer=StreamingLLM(sinks=sinks, window=window)),
                  Rotary(INV_FREQ))
    seg.push(_rotate(k0, torch.arange(sinks)).to(dtype), torch.zeros(1, 2, sinks, HEAD_DIM, dtype=dtype))
    filler = torch.randn(1, 2, 1, HEAD_DIM, generator=g).to(dtype)
    one = (_rotate(k0, torch.arange(sinks)).to(dtype).double() - _rotate(k0, torch.arange(sinks))).norm()
    errors = {}
    for t in range(sinks, sinks + steps):
        seg.push(filler, filler)
        if t + 1 - sinks in (100, 1000, steps):
            n = seg.length
            frame = torch.arange(t + 1 - n, t + 1 - n + sinks)
            exact = _rotate(k0, frame)
            errors[t + 1 - sinks] = (seg.stored()[0][:, :, :sinks].double() - exact).norm() / exact.norm()
    eps = torch.finfo(dtype).eps
    assert all(e <= 2 * eps for e in errors.values()), errors  # one rounding of one rotation
    assert errors[steps] <= max(errors[100], one / _rotate(k0, torch.arange(sinks)).norm()) * 1.5 + eps / 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_over_the_cache_matches_the_originals_rotated_once(dtype):
    g = torch.Generator().manual_seed(1)
    sinks, window, total = 4, 28, 3_000
    k0 = torch.randn(1, 1, total, HEAD_DIM, generator=g)
    v = torch.randn(1, 1, total, HEAD_DIM, generator=g).to(dtype)
    seg = Segment(Group(heads=(0,), budget=sinks + window, scorer=StreamingLLM(sinks=sinks, window=window)),
                  Rotary(INV_FREQ))
    keys = torch.cat([_rotate(k0[:, :, t:t + 1], torch.tensor([t])) for t in range(total)], dim=2).to(dtype)
    for t in range(total):
        seg.push(keys[:, :, t:t + 1], v[:, :, t:t + 1])
    q = torch.randn(1, 1, 1, HEAD_DIM, generator=g).to(dtype)
    ours = seg.attend(q, HEAD_DIM ** -0.5, None).double()
    kept = [*range(sinks), *range(total - window - 1, total)]  # the budget, plus the token just appended
    n = len(kept)
    exact_keys = _rotate(k0[:, :, kept], torch.arange(total - n, total)).to(dtype)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), exact_keys.double(), v[:, :, kept].double(),
                                                           scale=HEAD_DIM ** -0.5)
    assert (ours - ref).abs().max() <= 4 * torch.finfo(dtype).eps * ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("delta", [0, 1, 1000, 65_535, 70_000])
def test_shift_by_one_delta_is_bit_for_bit_shift(dtype, delta):
    """The ring step's rotation of its sinks (one delta for all, from prepared float32 originals) gives the
    very bits of the general per-key rotation, inside and beyond the cos/sin table."""
    rotary = Rotary(INV_FREQ)
    keys = torch.randn(2, 3, 4, HEAD_DIM, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = torch.zeros_like(keys)
    rotary.shift_by(rotary.prepare(keys), delta, rotary.rotated(out))
    assert torch.equal(out, rotary.shift(keys, torch.full((2, 3, 4), delta), bound=delta + 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("top", [9, 65_535, 70_000])
def test_shift_at_each_keys_delta_is_bit_for_bit_shift(dtype, top):
    """A padded batch's ring step rotates each key by its own delta (a row's real tokens seen) from prepared float32
    originals: the very bits of the general per-key rotation, inside and beyond the cos/sin table."""
    rotary = Rotary(INV_FREQ)
    keys = torch.randn(2, 3, 4, HEAD_DIM, generator=torch.Generator().manual_seed(1)).to(dtype)
    delta = torch.randint(0, top + 1, (2, 3, 4), generator=torch.Generator().manual_seed(2))
    delta[0, 0, 0] = top
    out = torch.zeros_like(keys)
    rotary.shift_at(rotary.prepare(keys), delta, top, rotary.rotated(out))
    assert torch.equal(out, rotary.shift(keys, delta, bound=top + 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("start", [0, 5, 65_533, 70_000])
def test_shift_range_by_is_bit_for_bit_shift_range(dtype, start):
    """The quantized segment's sinks (key i to position start + i, from float32 originals prepared once) get the
    very bits of :meth:`Rotary.shift_range`, written into a slice of a larger buffer, inside and beyond the table."""
    rotary = Rotary(INV_FREQ)
    keys = torch.randn(2, 3, 4, HEAD_DIM, generator=torch.Generator().manual_seed(2))
    buf = torch.zeros(2, 3, 7, HEAD_DIM, dtype=dtype)
    rotary.shift_range_by(rotary.prepare(keys), start, rotary.rotated(buf[:, :, :4]))
    assert torch.equal(buf[:, :, :4], rotary.shift_range(keys, start, dtype=dtype))
    assert not buf[:, :, 4:].any()
