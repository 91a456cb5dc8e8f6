"""Attention over stored keys and values: exact masks, a block of queries at a time.

Every path takes the same inputs: ``query (B, h*g, q, D)`` (the query heads of ``h`` KV heads, in
order), ``keys``/``values (B, h, n, D)`` of which the last ``q`` are the queries' own tokens, and
optionally

* ``visible``: the first ``visible`` keys are seen by every query (another part of the sequence, e.g.
  the source of a translation read so far); causality applies to the rest;
* ``valid (B, h, n)`` bool: False marks padding, which no query attends (a padding query attends only
  to itself, so that its output stays finite); ``(B, 1, n)`` where every head of a row holds the same tokens
  (one mask per row, which sdpa shares across heads);
* ``window``: a sliding window (a query sees keys less than ``window`` tokens back);
* ``softcap``: Gemma-2's attention logit soft-capping, ``cap * tanh(logits / cap)``;
* ``own``: the queries' own keys are the last ``q`` (True, the default: a padding query then attends to itself);
  False: they are stored elsewhere (slot steps in a padded batch), and every query is a real token;
* ``need_probs``: also return the attention probability each key received ``(B, h, n)`` float32 (mean
  over a KV head's ``g`` query heads, summed over the queries; or over the last ``observed`` queries, whose
  probabilities are then the only ones computed: the outputs take the plain path).

Nothing of size ``q x n`` is materialized beyond one block of queries: a prefill with nothing cached
and no padding uses sdpa's causal kernel; a single query without padding needs no mask at all (the
keys may then be in any order, e.g. a ring); anything else goes a block at a time. Where sdpa computes
the block with one ``(block, n)`` mask for every head (one per row of a padded batch whose heads hold the
same tokens; no probabilities), sdpa keeps no logits and the block is sized so that the mask, in the query's
dtype as sdpa uses it, stays under ``MASK_BYTES`` (a chunk of 512 queries over 16k float32 keys in one call,
as transformers makes it; blocks of 14 queries, sized like logits, made that 1.5x slower). Otherwise the block
is sized so that its float32 logits (or its masks per query head) stay under ``BLOCK_BYTES``. Logits are
computed in the model's dtype and soft-maxed in float32; only the probabilities of one block exist at a time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BLOCK_BYTES = 1 << 23  # 8 MiB of float32 logits per block of queries
MASK_BYTES = 1 << 25  # 32 MiB of one mask shared by every head, in the query's dtype (sdpa's path)


def block_rows(batch_heads: int, n: int, limit: int = BLOCK_BYTES, itemsize: int = 4) -> int:
    """Queries per block so that ``batch_heads x block x n`` elements of ``itemsize`` bytes (float32 logits by
    default) stay under ``limit`` bytes."""
    return max(1, min(4096, limit // max(1, itemsize * batch_heads * n)))


def block_mask(start: int, stop: int, q: int, n: int, *, visible: int = 0, window: int | None = None,
               valid: torch.Tensor | None = None, own: bool = True, device: torch.device | str = "cpu"
               ) -> torch.Tensor:
    """``(b, n)`` bool (True = attend) for queries ``start..stop-1`` of the ``q`` newest; with ``valid (B, h, n)``
    (or ``(B, 1, n)``), ``(B, h, b, n)`` (or ``(B, 1, b, n)``).

    Query ``i`` is the key at index ``n - q + i``; keys before ``visible`` are always seen (never padding
    of the query's own part), the others causally and within ``window``."""
    qidx = torch.arange(n - q + start, n - q + stop, device=device)[:, None]  # (b, 1)
    kidx = torch.arange(n, device=device)[None, :]  # (1, n)
    mask = kidx <= qidx
    if window is not None:
        mask = mask & (qidx - kidx < window)
    if visible:
        mask = mask | (kidx < visible)
    if valid is not None:
        mask = mask & valid[:, :, None, :]  # (B, h, b, n)
        if own:  # padding attends itself
            mask = mask | (kidx == qidx)
    return mask


def attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *, scaling: float, visible: int = 0,
           valid: torch.Tensor | None = None, window: int | None = None, softcap: float | None = None,
           need_probs: bool = False, observed: int | None = None, block: int | None = None, own: bool = True,
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention output ``(B, h*g, q, D)`` and, with ``need_probs``, the probability received by each key
    ``(B, h, n)`` float32 (see the module docstring for the arguments)."""
    b, hq, q, _ = query.shape
    h, n = keys.shape[1], keys.shape[2]
    g = hq // h
    if need_probs and observed is not None and q > observed:  # the scorer reads only the last queries' attention:
        # every output by the plain path, then those queries again for their probabilities (as kvpress's presses do)
        kw = dict(scaling=scaling, visible=visible, valid=valid, window=window, softcap=softcap, block=block, own=own)
        return attend(query, keys, values, **kw)[0], attend(query[:, :, q - observed:], keys, values, **kw,
                                                            need_probs=True)[1]
    plain = softcap is None and not need_probs
    unmasked = q == 1 and valid is None and not visible and (window is None or n <= window)
    if plain and valid is None and not visible:
        if unmasked:  # one query, nothing masked: keys in any order
            return F.scaled_dot_product_attention(query, keys, values, scale=scaling, enable_gqa=g > 1), None
        if q == n and window is None:  # nothing cached: sdpa's own causal kernel, no mask
            return F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scaling,
                                                  enable_gqa=g > 1), None
    shared = valid is None or valid.shape[1] == 1  # one mask for every head (of a row)
    if block is not None:
        rows = block
    elif plain and shared:  # sdpa reads one (block, n) mask for every head (of a row) and keeps no logits
        rows = block_rows(1 if valid is None else b, n, MASK_BYTES, query.element_size())
    else:
        rows = block_rows(b * hq, n)
    one = rows >= q  # a single block: its results are the outputs, nothing is copied into place
    out = None if one else torch.empty_like(query)
    received = torch.zeros(b, h, n, dtype=torch.float32, device=keys.device) if need_probs and not one else None
    for start in range(0, q, rows):
        stop = min(q, start + rows)
        block = query if one else query[:, :, start:stop]
        mask = None if unmasked else block_mask(start, stop, q, n, visible=visible, window=window, valid=valid,
                                                own=own, device=query.device)
        if plain:
            m = mask if shared else mask[:, :, None].expand(b, h, g, *mask.shape[-2:]).flatten(1, 2)
            res = F.scaled_dot_product_attention(block, keys, values, attn_mask=m, scale=scaling, enable_gqa=g > 1)
        else:
            rows_ = stop - start
            qg = block.reshape(b, h, g * rows_, -1)  # (B, h, g*b, D): a KV head's queries together
            hidden = None if mask is None else ~(mask if mask.dim() == 2 else mask[:, :, None])
            probs = probabilities(qg, keys, scaling, softcap, hidden, (b, h, g, rows_, n)).view(b, h, g, rows_, n)
            res = (probs.view(b, h, g * rows_, n).to(values.dtype) @ values).view(b, h * g, rows_, -1)
            if need_probs:  # one query: its probabilities are the sum (a copy saved)
                got = probs.mean(dim=2)
                got = got[:, :, 0] if rows_ == 1 else got.sum(dim=2)
                received = got if received is None else received.add_(got)
        if one:
            out = res
        else:
            out[:, :, start:stop] = res
    return out, received


def probabilities(query: torch.Tensor, keys: torch.Tensor, scaling: float, softcap: float | None = None,
                  hidden: torch.Tensor | None = None, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """The attention probabilities of ``query (..., m, D)`` over ``keys (..., n, D)`` (leading axes broadcasting):
    ``(..., m, n)`` float32. Logits in the model's dtype (the product), then in float32 scaled, soft-capped
    (``softcap``), masked where ``hidden`` (bool, True = not seen; it broadcasts to the logits viewed as ``shape``)
    and soft-maxed, each step in place: the explicit path of :func:`attend`, and of a slot set's one call over its
    heads' flat keys (:mod:`kvlab.storage.slotsets`)."""
    logits = (query @ keys.transpose(-1, -2)).float()
    logits.mul_(scaling)
    if softcap is not None:
        logits.div_(softcap).tanh_().mul_(softcap)
    if hidden is not None:
        logits.view(shape).masked_fill_(hidden, -math.inf)
    return logits.softmax(dim=-1)
