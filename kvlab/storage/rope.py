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


class Rotary:
    """Rotates keys by a number of positions with a model's RoPE frequencies.

    ``inv_freq``: ``(rot_dim // 2,)``; the first ``rot_dim`` channels of a head are rotated
    (transformers' ``rotate_half`` convention), the rest are left alone (partial rotary). A RoPE
    whose cos/sin carry an attention factor (YaRN) is still a rotation times that factor, which a
    stored key already carries: shifting it needs the frequencies only.
    """

    def __init__(self, inv_freq: torch.Tensor):
        self.inv_freq = inv_freq.detach().float()

    def shift(self, keys: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``keys (..., n, D)`` rotated by ``delta`` positions (an int tensor broadcasting to ``(..., n)``),
        computed in float32 and returned in the keys' dtype. A zero ``delta`` returns the key unchanged."""
        inv = self.inv_freq.to(keys.device)
        half = inv.numel()
        ang = delta.to(keys.device, torch.float32)[..., None] * inv  # (..., n, rot/2)
        cos, sin = ang.cos(), ang.sin()
        k1, k2 = keys[..., :half].float(), keys[..., half:2 * half].float()
        out = keys.clone()
        out[..., :half] = k1 * cos - k2 * sin  # transformers' rotate_half convention
        out[..., half:2 * half] = k2 * cos + k1 * sin
        return out
