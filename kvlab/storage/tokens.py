"""Picking and gathering kept tokens, shared by the storages and the scorers: the top-k a budget keeps, the one
token a decode step leaves out, row gathers, max-pooled scores, time order, the newest forced in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvlab.storage.plan import Storage


def keep_indices(score: torch.Tensor, budget: int) -> torch.Tensor:
    """Indices of the ``budget`` highest scores along the last axis, in increasing (time) order."""
    n = score.shape[-1]
    if budget == n - 1 and n > 1:  # one token leaves (a decode step): every index but :func:`left_out`'s, no sort
        idx = torch.arange(n - 1, device=score.device)
        return idx + (idx >= left_out(score))
    idx = score.topk(budget, dim=-1, sorted=False).indices
    return idx.sort(dim=-1).values


def left_out(score: torch.Tensor) -> torch.Tensor:
    """``(B, h, 1)``: the index of the one token that the top ``n - 1`` of ``score (B, h, n)`` leave out (what a
    top-k eviction of one token drops, ties included: :func:`keep_indices` keeps the others)."""
    n = score.shape[-1]
    kept = score.topk(n - 1, dim=-1, sorted=False).indices  # n - 1 distinct indices: the missing one is what they leave
    return n * (n - 1) // 2 - kept.sum(dim=-1, keepdim=True)  # out of the sum of 0..n-1 (exact integers)


def gather_tokens(t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``t (B, h, n[, D])`` at token indices ``keep (B, h, k)`` (or ``(k,)``, the same for every row and head)
    along axis 2. A contiguous ``t`` is copied by whole rows (``index_select`` over its ``B * h * n`` rows), which
    on a CPU is several times faster than ``gather`` with an index expanded over ``D``."""
    b, h, n = t.shape[:3]
    keep = keep.expand(b, h, -1)
    if not t.is_contiguous():
        return t.gather(2, keep if t.dim() == 3 else keep[..., None].expand(b, h, -1, t.shape[-1]))
    rows = (keep + torch.arange(0, b * h * n, n, device=keep.device).view(b, h, 1)).flatten()
    return t.view(b * h * n, *t.shape[3:]).index_select(0, rows).view(b, h, -1, *t.shape[3:])


def pool_max(seg: Storage, scores: torch.Tensor, kernel: int, time_order: bool = False) -> torch.Tensor:
    """``scores (B, h, n)`` of ``seg``'s kept tokens, each replaced by the largest within ``kernel`` (odd) tokens
    centred on it in time order (max-pooling; padding's ``-inf`` never wins; ``kernel`` 1: no pooling), whatever
    order the tokens are stored in (:attr:`Storage.time_index`): returned in the stored order, or in time order
    (``time_order``), where they were pooled."""
    if kernel == 1:
        return in_time(seg, scores) if time_order else scores
    perm = seg.time_index
    s = scores if perm is None else scores.gather(-1, perm)
    s = F.max_pool1d(s.flatten(0, -2)[:, None], kernel, stride=1, padding=kernel // 2).view_as(s)
    return s if perm is None or time_order else torch.empty_like(s).scatter_(-1, perm, s)


def in_time(seg: Storage, scores: torch.Tensor) -> torch.Tensor:
    """``scores`` of ``seg``'s kept tokens (``(n,)`` or ``(B, h, n)``, in the stored order) in time order: ``(B, h, n)``
    sorted by :attr:`Storage.time_index`, or ``scores`` itself where the tokens are stored in time order."""
    perm = seg.time_index
    return scores if perm is None else scores.expand_as(perm).gather(-1, perm)


def force_newest(scores: torch.Tensor, seg: Storage, newest: int, time_order: bool) -> torch.Tensor:
    """``scores (B, h, n)`` with the ``newest`` most recent kept tokens set to ``inf`` (always kept). ``time_order``:
    the scores are in time order, padding first, so those tokens are the last ``newest``: one fill in place
    (``seg.scores`` itself is copied first), no ages read. That holds where they were forced at every eviction before
    (ages only grow, so the ``newest`` most recent tokens were always among those forced); a row with fewer real
    tokens has padding forced too, which the caller's ``-inf`` for padding overrides. Else a new tensor."""
    if not time_order:
        return scores.masked_fill(seg.age < newest, float("inf"))
    out = scores.clone() if scores is seg.scores else scores  # never write the storage's own scores
    out[..., max(0, out.shape[-1] - newest):] = float("inf")
    return out


def order(valid: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    """A kept token's index among its row's real kept tokens: ``(n,)`` without padding, else shaped like ``valid``
    (``(B, h, n)`` or ``(B, 1, n)``) with -1 for padding."""
    if valid is None:
        return torch.arange(n, device=device)
    return (valid.cumsum(-1) - 1).masked_fill(~valid, -1)
