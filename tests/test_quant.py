"""KIVI-style quantization: round-trip bounds, packing, byte accounting, edge cases."""

from __future__ import annotations

import pytest
import torch

from kvlab.errors import KvlabError
from kvlab.quant import (QTensor, dequantize, fake_quantize, pack, quantize, quantize_keys, quantize_values,
                         unpack)


def _kv(seed: int = 0, shape=(2, 3, 64, 16)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 3 + 1


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis,group_size", [(2, 32), (3, 8), (2, 20), (3, 5)])
def test_round_trip_error_is_at_most_half_a_step(bits, axis, group_size):
    x = _kv(bits)
    q = quantize(x, bits, axis=axis, group_size=group_size)
    y = dequantize(q)
    assert y.shape == x.shape and y.dtype == torch.float32
    # The bound is per group: expand each group's scale back over its elements.
    err = (x - y).abs().movedim(axis, -1)
    scale = q.scale.float().repeat_interleave(group_size, dim=-1)[..., :x.shape[axis]]
    assert torch.all(err <= scale / 2 * (1 + 1e-5) + 1e-6)
    # More bits, smaller error: the bound is not vacuous.
    assert err.max() <= (x.max() - x.min()) / ((1 << bits) - 1)


def test_error_shrinks_with_bits():
    x = _kv(1)
    errs = [(x - fake_quantize(x, b, axis=2, group_size=32)).abs().mean().item() for b in (2, 4, 8)]
    assert errs[0] > 3 * errs[1] > 9 * errs[2]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n", [1, 3, 7, 8, 33])
def test_pack_unpack_is_exact_inverse(bits, n):
    g = torch.Generator().manual_seed(n)
    codes = torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == (n * bits + 7) // 8
    assert torch.equal(unpack(packed, bits, n), codes)


def test_pack_layout_is_little_end_first():
    assert pack(torch.tensor([1, 2, 3, 0]), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert pack(torch.tensor([0xA, 0x5]), 4).tolist() == [0x5A]


def test_four_bit_data_is_half_of_eight_bit():
    x = _kv(2)
    q8, q4, q2 = (quantize(x, b, axis=2, group_size=32) for b in (8, 4, 2))
    assert q4.data.numel() * 2 == q8.data.numel() == x.numel()
    assert q2.data.numel() * 4 == q8.data.numel()
    # nbytes counts the scales and zeros too (float16 by default, one per group).
    groups = x.numel() // 32
    assert q4.nbytes() == x.numel() // 2 + 2 * 2 * groups
    assert q4.scale.dtype == torch.float16


def test_constant_tensor_restores_exactly_without_nan():
    x = torch.full((1, 2, 32, 8), 0.75)
    x[0, 1] = -2.0
    for bits in (2, 4, 8):
        y = dequantize(quantize(x, bits, axis=2, group_size=16))
        assert not torch.isnan(y).any()
        assert torch.equal(y, x)


def test_zero_range_group_beside_normal_groups():
    x = _kv(3, (1, 1, 32, 4))
    x[..., :16, 0] = 5.0  # channel 0, first token group constant
    y = dequantize(quantize(x, 4, axis=2, group_size=16))
    assert torch.isfinite(y).all()
    assert torch.equal(y[..., :16, 0], x[..., :16, 0])


def test_outlier_channel_hurts_per_token_more_than_per_channel():
    """Why KIVI quantizes keys per channel: a few channels carry large magnitudes."""
    k = _kv(4, (1, 2, 128, 64))
    k[..., 7] += 40.0  # fixed-offset outlier channels, as in real keys
    k[..., 40] -= 30.0
    for bits in (2, 4):
        err_channel = (k - dequantize(quantize_keys(k, bits, 32))).pow(2).mean()
        err_token = (k - dequantize(quantize(k, bits, axis=3, group_size=32))).pow(2).mean()
        assert err_token > 5 * err_channel


def test_keys_group_along_tokens_values_along_channels():
    x = _kv(5, (1, 2, 64, 16))
    qk = quantize_keys(x, 4, 32)
    assert qk.axis == 2 and qk.scale.shape == (1, 2, 16, 2)  # (B, H, D, T // gs)
    qv = quantize_values(x, 4, 64)  # group clamped to head_dim 16
    assert qv.axis == 3 and qv.group_size == 16 and qv.scale.shape == (1, 2, 64, 1)
    assert torch.allclose(dequantize(qv), x, atol=(x.max() - x.min()).item() / 15)


def test_dtype_and_device_follow_the_request():
    x = _kv(6).to(torch.bfloat16)
    y = dequantize(quantize(x, 8, axis=3, group_size=16), torch.bfloat16)
    assert y.dtype == torch.bfloat16 and y.device == x.device
    q = quantize(x, 8, axis=3, group_size=16, scale_dtype=torch.float32)
    assert q.scale.dtype == torch.float32


@pytest.mark.parametrize("bits", [0, 1, 3, 16, 32])
def test_bad_bits_raise(bits):
    with pytest.raises(KvlabError, match="bits"):
        quantize(_kv(), bits, axis=2, group_size=32)


def test_bad_arguments_raise():
    x = _kv()
    with pytest.raises(KvlabError):
        quantize(x, 4, axis=4, group_size=32)
    with pytest.raises(KvlabError):
        quantize(x, 4, axis=2, group_size=0)
    with pytest.raises(KvlabError):
        quantize(torch.ones(4, dtype=torch.int64), 4, axis=0, group_size=2)
    with pytest.raises(KvlabError):
        quantize_keys(x[0], 4, 32)
    with pytest.raises(KvlabError, match="float32"):
        quantize(torch.tensor([0.0, 1e6]), 4, axis=0, group_size=2)
    q = quantize(x, 4, axis=2, group_size=32)
    with pytest.raises(KvlabError):
        QTensor(q.data[:-1], q.scale, q.zero, q.bits, q.shape, q.axis, q.group_size)
