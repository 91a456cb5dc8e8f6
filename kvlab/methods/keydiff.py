"""KeyDiff (Park et al. 2025, "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM
Inference in Resource-Constrained Environments")."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvlab.methods.knorm import KNorm
from kvlab.storage import Storage

NORMALIZE_EPS = 1e-12  # F.normalize's floor under a key's norm
COSINE_EPS = 1e-8  # F.cosine_similarity's floor under the norms it divides by


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
    # the anchor moves with every token kept, but a key's two norms below do not: storage whose keys never move keeps
    # them from the token's arrival (``seg.scores``, (B, h, n, 2)), so a step computes no norm over the cache
    fixed_scores = True

    def key_scores(self, seg: Storage) -> torch.Tensor:
        keys, _, valid = seg.stored()
        norms = seg.scores  # (B, h, n, 2): kept since each token's arrival; None where the storage keeps none
        # k: (B, h, n, D) unit keys, a new tensor, turned into the scores in place below; the same bits as
        # F.normalize(keys.float(), dim=-1), from the kept norms where there are some
        k = F.normalize(keys.float(), dim=-1, eps=NORMALIZE_EPS) if norms is None else keys.float() / norms[..., :1]
        if valid is None:
            anchor = k.mean(2, keepdim=True)  # (B, h, 1, D)
        else:
            real = valid.to(k.dtype)[..., None]  # (B, h, n, 1), padding 0
            anchor = (k * real).sum(2, keepdim=True) / real.sum(2, keepdim=True).clamp_min(1)
        # -F.cosine_similarity(k, anchor, dim=-1), the same bits: it divides both by their norms, multiplies and
        # sums; but it broadcasts the anchor to k's shape first (so normalizes it once per token), and writes each
        # step to a new (B, h, n, D) tensor. Here the anchor once, and k in place, by its kept norm if there is one.
        k = _unit_(k) if norms is None else k.div_(norms[..., 1:])
        return k.mul_(_unit_(anchor)).sum(-1).neg_()  # (B, h, n)

    def arrival_scores(self, keys: torch.Tensor) -> torch.Tensor:
        """``(B, h, q, 2)`` float32: what scoring ``keys (B, h, q, D)`` takes from each key alone, its norm (as
        ``F.normalize`` computes and clamps it) and the norm of the unit key it gives (as ``F.cosine_similarity``
        computes and clamps it). Row by row a norm is the same bits as over the whole cache (a reduction over each
        key's own channels)."""
        k = keys.float()
        norms = torch.empty(*k.shape[:-1], 2, dtype=torch.float32, device=k.device)  # filled in place: no concatenation
        unit = torch.linalg.vector_norm(k, dim=-1, out=norms[..., 0]).clamp_min_(NORMALIZE_EPS)
        torch.linalg.vector_norm(k / unit[..., None], dim=-1, out=norms[..., 1]).clamp_min_(COSINE_EPS)
        return norms


def _unit_(t: torch.Tensor) -> torch.Tensor:
    """``t (..., D)`` divided in place by its norms along the last axis, clamped at :data:`COSINE_EPS`."""
    return t.div_(torch.linalg.vector_norm(t, dim=-1, keepdim=True).clamp_min_(COSINE_EPS))
