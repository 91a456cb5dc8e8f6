"""Compressed KV storage for one group of heads: pure torch, no transformers.

A :class:`Segment` holds the kept keys and values of some KV heads of one layer as dense tensors
``(batch, heads, n, head_dim)``, plus the accumulated attention scores when its scorer needs them.

Positions. Keys arrive rotated (RoPE) at their true position ``p``. After an eviction the kept
keys are re-rotated so that the key at cache index ``i`` sits at *frame* position
``seen - n + i``, where ``seen`` counts every token fed so far and ``n`` is the number kept. A
query at true position ``seen + j`` then sees each kept key at distance ``n + j - i``: exactly the
distance it would have if every token's position were its index in the cache (StreamingLLM,
section 3.2), because RoPE attention depends only on the difference of positions. Only keys
that precede an evicted token move, so for StreamingLLM only the sinks are re-rotated.

Ring. In the steady state of a positional method (StreamingLLM: one token in, the oldest of the
window out) a decode step writes the new token over the evicted one in place and re-rotates the
sinks: no copy of the cache. The window is then stored as a ring (``_start`` where it begins,
``_head`` its oldest slot); a single query needs no mask and attention does not depend on the
order of the keys, so decode reads the ring as it is. Everything else (``keys``/``values``, chunks
of several tokens, scorers) sees time order: reading them rolls the ring back first (one copy).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kvlab.methods.base import Group


class Rotary:
    """Rotates keys by a number of positions with a model's RoPE frequencies.

    ``inv_freq``: ``(rot_dim // 2,)``; the first ``rot_dim`` channels of a head are rotated
    (transformers' ``rotate_half`` convention), the rest are left alone (partial rotary).
    """

    def __init__(self, inv_freq: torch.Tensor):
        self.inv_freq = inv_freq.detach().float()

    def shift(self, keys: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Rotate ``keys (..., n, D)`` by ``delta`` positions; ``delta`` broadcasts to ``(..., n)``."""
        inv = self.inv_freq.to(keys.device)
        half = inv.numel()
        ang = delta.to(keys.device, torch.float32)[..., None] * inv  # (..., n, rot/2)
        cos, sin = ang.cos(), ang.sin()
        k1, k2 = keys[..., :half].float(), keys[..., half:2 * half].float()
        out = keys.clone()
        out[..., :half] = k1 * cos - k2 * sin  # transformers' rotate_half convention
        out[..., half:2 * half] = k2 * cos + k1 * sin
        return out


def keep_indices(score: torch.Tensor, budget: int) -> torch.Tensor:
    """Indices of the ``budget`` highest scores along the last axis, in increasing (time) order."""
    idx = score.topk(budget, dim=-1, sorted=False).indices
    return idx.sort(dim=-1).values


def make_segment(group: Group, rotary: Rotary | None) -> Segment:
    """The storage for a group: dense for 16 bits, KIVI-quantized (:mod:`kvlab.kv_quant`) below."""
    if group.bits >= 16:
        return Segment(group, rotary, group.scorer.reindex)
    from kvlab.kv_quant import QuantSegment

    return QuantSegment(group, rotary)


class Segment:
    """The kept tokens of one :class:`~kvlab.methods.base.Group` of KV heads of one layer."""

    def __init__(self, group: Group, rotary: Rotary | None, reindex: bool):
        self.group = group
        self.heads = torch.tensor(group.heads, dtype=torch.long)
        self.rotary = rotary
        self.reindex = reindex and rotary is not None
        self.needs_scores = group.scorer.needs_scores
        self._k: torch.Tensor | None = None  # (B, h, n, D), in time order unless the ring has turned
        self._v: torch.Tensor | None = None  # (B, h, n, D)
        self._start, self._head = 0, 0  # the ring: the window begins at _start, its oldest slot is _start + _head
        self.scores: torch.Tensor | None = None  # (B, h, n) float32, accumulated attention
        self.pending = 0  # tokens appended in the current forward pass (no score yet)

    # -- state ---------------------------------------------------------------------------
    @property
    def keys(self) -> torch.Tensor | None:
        """Kept keys ``(B, h, n, D)`` in time order, at their frame positions."""
        self._unroll()
        return self._k

    @keys.setter
    def keys(self, t: torch.Tensor | None) -> None:
        self._unroll()
        self._k = t

    @property
    def values(self) -> torch.Tensor | None:
        """Kept values ``(B, h, n, D)`` in time order."""
        self._unroll()
        return self._v

    @values.setter
    def values(self, t: torch.Tensor | None) -> None:
        self._unroll()
        self._v = t

    def stored(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Keys and values as stored (the window may be a turned ring): for attention without a mask."""
        return self._k, self._v

    def map_batch(self, fn) -> None:
        """Apply ``fn`` (a batch-axis reorder / repeat / select) to the stored tensors (ring order is kept:
        it is the same for every batch row)."""
        if self._k is not None:
            self._k, self._v = fn(self._k), fn(self._v)
            self.scores = None if self.scores is None else fn(self.scores)

    def _unroll(self) -> None:
        """Put a turned ring back in time order (one copy)."""
        if self._head:
            a, h = self._start, self._start + self._head
            self._k = torch.cat((self._k[:, :, :a], self._k[:, :, h:], self._k[:, :, a:h]), dim=2)
            self._v = torch.cat((self._v[:, :, :a], self._v[:, :, h:], self._v[:, :, a:h]), dim=2)
            self._head = 0

    @property
    def length(self) -> int:
        return 0 if self._k is None else self._k.shape[-2]

    @property
    def device(self) -> torch.device:
        return self._k.device

    def length_after_compress(self) -> int:
        budget = self.group.budget
        return self.length if budget is None else min(self.length, budget)

    def nbytes(self) -> int:
        """Bytes held by the kept keys and values."""
        if self._k is None:
            return 0
        return self._k.numel() * self._k.element_size() + self._v.numel() * self._v.element_size()

    # -- the steps of a forward pass --------------------------------------------------------
    def push(self, key_states: torch.Tensor | None = None, value_states: torch.Tensor | None = None) -> None:
        """Evict down to the budget, then append ``(B, h, q, D)`` new keys/values (rotated at their true
        positions). Eviction and append are one copy of the cache: kept runs and new tokens are
        concatenated at once (StreamingLLM keeps two runs: the sinks and the window)."""
        new = [] if key_states is None else [key_states]
        newv = [] if value_states is None else [value_states]
        q = 0 if key_states is None else key_states.shape[-2]
        newscore = []
        if self.needs_scores and q:
            newscore = [torch.zeros(*key_states.shape[:2], q, dtype=torch.float32, device=key_states.device)]
        budget, n = self.group.budget, self.length
        if q == 1 and self._turn(key_states, value_states):
            return
        if self.keys is None:
            if new:
                self.keys, self.values = key_states, value_states
                self.scores = newscore[0] if newscore else None
        elif budget is None or n <= budget:
            if new:
                self.keys = torch.cat((self.keys, *new), dim=-2)
                self.values = torch.cat((self.values, *newv), dim=-2)
                if newscore:
                    self.scores = torch.cat((self.scores, *newscore), dim=-1)
        else:
            runs = self.group.scorer.runs(n)
            keep = None
            if runs is None:
                keep = keep_indices(self.group.scorer.score(self), budget)  # (budget,) or (B, h, budget)
                runs = _runs(keep) if keep.dim() == 1 else None
            if runs is not None:  # contiguous runs: one concatenation, no gather
                self.keys = torch.cat([self.keys[:, :, a:b] for a, b in runs] + new, dim=-2)
                self.values = torch.cat([self.values[:, :, a:b] for a, b in runs] + newv, dim=-2)
                if self.scores is not None:
                    self.scores = torch.cat([self.scores[..., a:b] for a, b in runs] + newscore, dim=-1)
                if self.reindex:
                    self._reindex_runs(runs, n - budget)
            else:
                index = keep[..., None].expand(-1, -1, -1, self.keys.shape[-1])
                self.keys = torch.cat([self.keys.gather(2, index)] + new, dim=-2)
                self.values = torch.cat([self.values.gather(2, index)] + newv, dim=-2)
                if self.scores is not None:
                    self.scores = torch.cat([self.scores.gather(2, keep)] + newscore, dim=-1)
                if self.reindex:
                    # new frame position minus old one: (n - budget) + j - keep[j]; non-increasing in j, >= 0
                    delta = (n - budget) + torch.arange(budget, device=keep.device) - keep
                    moved = int((delta > 0).sum(-1).max())
                    if moved:
                        self.keys[..., :moved, :] = self.rotary.shift(self.keys[..., :moved, :], delta[..., :moved])
        self.pending = q

    def _turn(self, key: torch.Tensor, value: torch.Tensor) -> bool:
        """The ring step: when one new token evicts exactly the oldest token after a fixed prefix (the
        sinks), write it in that token's slot and re-rotate the prefix by one position. False (nothing
        done) in any other case."""
        budget, n = self.group.budget, self.length
        if budget is None or n != budget + 1 or self.scores is not None:
            return False
        runs = self.group.scorer.runs(n)  # must be [(start + 1, n)], after sinks (0, start) if there are any
        if runs is None or len(runs) > 2 or (len(runs) == 2 and runs[0][0] != 0):
            return False
        start = runs[0][1] if len(runs) == 2 else 0
        if runs[-1] != (start + 1, n):
            return False
        if start != self._start:
            self._unroll()
            self._start = start
        slot = start + self._head
        self._k[:, :, slot] = key[:, :, 0]
        self._v[:, :, slot] = value[:, :, 0]
        self._head = (self._head + 1) % (n - start)
        if self.reindex and start:
            one = torch.ones(start, device=self._k.device)
            self._k[:, :, :start] = self.rotary.shift(self._k[:, :, :start], one)
        self.pending = 1
        return True

    def _reindex_runs(self, runs: list[tuple[int, int]], evicted: int) -> None:
        """Re-rotate the kept runs: run ``(a, b)`` landing at index ``j0`` moves by ``evicted - (a - j0)``."""
        j0 = 0
        for a, b in runs:
            delta = evicted - (a - j0)
            if delta:
                d = torch.full((b - a,), delta, device=self.keys.device)
                self.keys[..., j0:j0 + b - a, :] = self.rotary.shift(self.keys[..., j0:j0 + b - a, :], d)
            j0 += b - a

    def compress(self) -> None:
        """Evict down to the budget without appending."""
        self.push()

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Append without evicting."""
        keys, values, scores = self.keys, self.values, self.scores
        if keys is None:
            self.keys, self.values = key_states, value_states
        else:
            self.keys = torch.cat((keys, key_states), dim=-2)
            self.values = torch.cat((values, value_states), dim=-2)
        if self.needs_scores:
            zeros = torch.zeros(*key_states.shape[:2], key_states.shape[-2], dtype=torch.float32, device=key_states.device)
            self.scores = zeros if scores is None else torch.cat((scores, zeros), dim=-1)
        self.pending = key_states.shape[-2]

    def attend(self, query: torch.Tensor, scaling: float, sliding_window: int | None,
               block: int = 256) -> torch.Tensor:
        """Attention of ``query (B, h*g, q, D)`` (the query heads of this group's KV heads, in
        order) over the kept tokens plus the ``q`` just appended. Returns ``(B, h*g, q, D)``.

        Scores for H2O-like scorers are accumulated here, a block of queries at a time, so the
        ``(q, n)`` probability matrix never exists for more than ``block`` queries.
        """
        q, n = query.shape[-2], self.length
        h = self._k.shape[1]
        g = query.shape[1] // h
        mask = _mask(q, n, sliding_window, query.device)  # (q, n) bool or None
        if not self.needs_scores:
            causal = mask is not None and q == n and sliding_window is None  # nothing cached: sdpa's own causal kernel
            keys, values = self.stored() if mask is None else (self.keys, self.values)  # no mask: any order
            return F.scaled_dot_product_attention(query, keys, values, attn_mask=None if causal else mask,
                                                  is_causal=causal, scale=scaling, enable_gqa=g > 1)
        return scored_attention(query, self.keys, self.values, self.scores, mask, scaling, block)


def scored_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor,
                     mask: torch.Tensor | None, scaling: float, block: int = 256) -> torch.Tensor:
    """Attention of ``query (B, h*g, q, D)`` over ``keys``/``values (B, h, n, D)`` that also adds each key's
    attention probability (summed over the queries, mean over a KV head's ``g`` query heads) to ``scores
    (B, h, n)`` in place: H2O's accumulated attention. ``mask (q, n)`` bool (True = attend) or None. Queries
    go ``block`` at a time, so the ``(q, n)`` probabilities never exist for more than ``block`` queries."""
    h = keys.shape[1]
    g, q = query.shape[1] // h, query.shape[-2]
    out = torch.empty_like(query)
    k, v = keys[:, :, None].float(), values[:, :, None].float()  # (B, h, 1, n, D)
    qg = query.unflatten(1, (h, g)).float()  # (B, h, g, q, D)
    for start in range(0, q, block):
        stop = min(q, start + block)
        logits = qg[..., start:stop, :] @ k.transpose(-1, -2) * scaling  # (B, h, g, b, n)
        if mask is not None:
            logits = logits.masked_fill(~mask[start:stop], -math.inf)
        probs = logits.softmax(dim=-1)
        out[:, :, start:stop] = (probs @ v).flatten(1, 2).to(out.dtype)
        scores += probs.mean(dim=2).sum(dim=2)
    return out


def _runs(keep: torch.Tensor, most: int = 8) -> list[tuple[int, int]] | None:
    """Sorted 1-D indices as at most ``most`` contiguous ``(start, stop)`` runs, else None."""
    cut = (torch.nonzero(keep[1:] != keep[:-1] + 1).flatten() + 1).tolist()
    if len(cut) >= most:
        return None
    bounds = [0, *cut, keep.numel()]
    starts = keep[bounds[:-1]].tolist()
    return [(s, s + b1 - b0) for s, b0, b1 in zip(starts, bounds[:-1], bounds[1:])]


def _mask(q: int, n: int, sliding_window: int | None, device: torch.device) -> torch.Tensor | None:
    """Boolean ``(q, n)`` mask (True = attend) for ``q`` new queries over ``n`` keys, the last
    ``q`` of which are the queries' own tokens. Frame distances make it exact after eviction."""
    if q == 1 and (sliding_window is None or n <= sliding_window):
        return None
    qpos = torch.arange(n - q, n, device=device)[:, None]
    kpos = torch.arange(n, device=device)[None, :]
    mask = kpos <= qpos
    if sliding_window is not None:
        mask &= qpos - kpos < sliding_window
    return mask
