"""KeyDiff (Park et al. 2025, "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM
Inference in Resource-Constrained Environments")."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvlab.methods.knorm import KNorm
from kvlab.storage import Storage


@dataclass
class KeyDiff(KNorm):
    """``keydiff:budget=1024,recent=0``: per KV head, keep the ``budget`` tokens whose keys are least
    similar (cosine) to the anchor, the mean of the head's normalized cached keys (padding excluded);
    distinctive keys are kept, redundant ones evicted. Plus the ``recent`` newest tokens if set.

    Needs no attention scores (any attention kernel) and observes no query: question-agnostic. The
    same policy before each forward pass's new tokens are appended at prefill (the paper's block-wise
    prefill) and at every decode step. Kept tokens keep their original positions (as kvpress's KeyDiffPress).
    """

    name = "keydiff"
    ties = False  # a key's cosine to the anchor changes with its rotation: repeated tokens do not tie

    def key_scores(self, seg: Storage) -> torch.Tensor:
        keys, _, valid = seg.stored()
        k = F.normalize(keys.float(), dim=-1)  # (B, h, n, D)
        real = torch.ones(k.shape[:-1], device=k.device) if valid is None else valid.to(k.dtype)  # padding 0
        real = real[..., None]  # (B, h, n, 1)
        anchor = (k * real).sum(2, keepdim=True) / real.sum(2, keepdim=True).clamp_min(1)  # (B, h, 1, D)
        return -F.cosine_similarity(k, anchor, dim=-1)  # (B, h, n)
