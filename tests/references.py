"""Reference computations the storage tests compare against: literal RoPE at absolute positions, and attention
over a grouped layer as one dense, masked computation."""

from __future__ import annotations

import torch

D = 8
INV_FREQ = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))


def rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """RoPE (transformers' rotate_half convention) of ``x (..., n, D)`` at absolute positions ``pos (n,)``."""
    ang = pos.float()[:, None] * INV_FREQ
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
    return x * cos + torch.cat((-x[..., D // 2:], x[..., : D // 2]), -1) * sin


def feed(seg, k0: torch.Tensor, v: torch.Tensor, chunk: int) -> None:
    """Append pre-RoPE keys ``k0 (B, h, T, D)`` rotated at their true positions, a chunk at a time, compressing
    before each chunk."""
    for s in range(0, k0.shape[2], chunk):
        e = min(k0.shape[2], s + chunk)
        seg.push(rope(k0[:, :, s:e], torch.arange(s, e)), v[:, :, s:e])


def masked_dense_attention(layer, query: torch.Tensor) -> torch.Tensor:
    """Attention of one query ``(1, heads, 1, d)`` over a layer whose KV heads sit in groups of different
    lengths: every head padded to the longest, the padding masked out. Returns ``(heads, 1, d)``."""
    kv, g, d = layer.info.num_kv_heads, layer.info.num_heads // layer.info.num_kv_heads, layer.info.head_dim
    per_head = {h: (s.keys[0, i], s.values[0, i]) for s in layer.segments for i, h in enumerate(s.group.heads)}
    longest = max(k.shape[0] for k, _ in per_head.values())
    keys, values = torch.zeros(kv, longest, d), torch.zeros(kv, longest, d)
    valid = torch.zeros(kv, longest, dtype=torch.bool)
    for h, (k, v) in per_head.items():
        keys[h, : k.shape[0]], values[h, : k.shape[0]], valid[h, : k.shape[0]] = k, v, True
    keys, values, valid = (t.repeat_interleave(g, dim=0) for t in (keys, values, valid))
    logits = (query[0] @ keys.transpose(1, 2)) * d ** -0.5
    return logits.masked_fill(~valid[:, None], float("-inf")).softmax(-1) @ values
