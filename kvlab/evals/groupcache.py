"""Two separately compressed KV caches for one sequence: a source part and a target part.

Group Position Encoding (Tong et al. 2025, "LLM as Effective Streaming Processor: Bridging Streaming-Batch
Mismatches with Group Position Encoding") numbers source tokens ``0..S-1`` and target tokens
``phi, phi+1, ...`` in a group of their own; source tokens attend only to the source, target tokens to
every source token read so far and to the earlier target tokens. Here:

* source tokens are fed through the source :class:`~kvlab.cache.KVCache` itself (plain causal attention,
  positions = source tokens seen, so the source part is independent of the target);
* target tokens are fed through a :class:`TargetCache` wrapping both parts, with explicit
  ``position_ids = phi + target tokens seen``. Its layers append to the target part (which compresses
  itself first) and attend over the kept source tokens followed by the kept target tokens.

Each part is compressed by its own cache with its own budget and re-indexes its own positions (a kept
key's position is relative to the tokens its part has seen, see :mod:`kvlab.kv`), so a compressed source
keeps source positions and a compressed target keeps target positions.

What this relies on in kvlab's cache: ``kvlab_attention`` hands any key tensor tagged with
``kvlab.cache._TAG`` to the tag's ``attend(query, scaling, sliding_window)`` (reading ``.info``), and a
:class:`~kvlab.cache.KVLayer` exposes ``segments`` (``keys``/``values``/``scores``, ``(B, h, n, D)``) and
``seen``. Of transformers: a model passes ``position_ids`` to its rotary embedding as given, and
calls ``past_key_values.update`` then the registered attention function. Sliding-window layers are
not supported (a window over two interleaved groups is not defined), nor quantized segments
(:mod:`kvlab.kv_quant`: a quantized part cannot give back its newest token).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from kvlab.cache import _TAG, KVCache, KVLayer
from kvlab.errors import KvlabError
from kvlab.kv import Segment


class TargetLayer(CacheLayerMixin):
    """One layer seen from the target side: appends to ``target``, attends over ``source`` + ``target``."""

    is_compileable = False
    is_sliding = False

    def __init__(self, source: KVLayer, target: KVLayer):
        super().__init__()
        if source.info.sliding_window is not None:
            raise KvlabError("group positions do not support sliding-window layers (e.g. Gemma-3); use batch positions")
        if any(type(seg) is not Segment for seg in (*source.segments, *target.segments)):
            raise KvlabError("group positions support 16-bit methods only (a quantized part cannot give back its last "
                             "token); use batch positions for quant/haq")
        self.source, self.target = source, target
        self.info = target.info
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # the two wrapped layers initialize themselves

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compress the target part, append ``(B, kv_heads, q, D)``; return a tagged empty tensor
        (only :meth:`attend`, reached through kvlab's attention function, reads the two parts)."""
        self.target.update(key_states, value_states)
        empty = key_states.new_empty(*key_states.shape[:2], 0, key_states.shape[-1])
        empty.__dict__[_TAG] = self
        return empty, empty

    def get_seq_length(self) -> int:
        return self.target.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        source = max(seg.length for seg in self.source.segments)
        target = max(seg.length_after_compress() for seg in self.target.segments)
        return source + target + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def attend(self, query: torch.Tensor, scaling: float, sliding_window: int | None) -> torch.Tensor:
        """``query (B, heads, q, D)`` of the ``q`` newest target tokens → ``(B, heads, q, D)``."""
        g = query.shape[1] // self.info.num_kv_heads
        if len(self.target.segments) == 1:
            return _attend_parts(query, self.source.segments[0], self.target.segments[0], scaling)
        out = torch.empty_like(query)
        for src, tgt in zip(self.source.segments, self.target.segments):
            qidx = (tgt.heads[:, None] * g + torch.arange(g, device=query.device)).flatten()
            out[:, qidx] = _attend_parts(query.index_select(1, qidx), src, tgt, scaling)
        return out


def _attend_parts(query: torch.Tensor, src: Segment, tgt: Segment, scaling: float) -> torch.Tensor:
    """Attention of ``query (B, h*g, q, D)`` over the kept source tokens (all visible) and the kept target
    tokens (causal: the last ``q`` are the queries' own). Accumulates H2O-like scores in both parts."""
    q, n_src, n_tgt = query.shape[-2], src.length, tgt.length
    keys = tgt.keys if src.keys is None else torch.cat((src.keys, tgt.keys), dim=-2)  # (B, h, n, D)
    values = tgt.values if src.values is None else torch.cat((src.values, tgt.values), dim=-2)
    h = keys.shape[1]
    g = query.shape[1] // h
    qpos = torch.arange(n_tgt - q, n_tgt, device=query.device)[:, None]
    mask = torch.cat((torch.ones(q, n_src, dtype=torch.bool, device=query.device),
                      torch.arange(n_tgt, device=query.device)[None, :] <= qpos), dim=1)  # (q, n)
    if not tgt.needs_scores:
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling, enable_gqa=g > 1)
    qg = query.unflatten(1, (h, g)).float()  # (B, h, g, q, D)
    logits = qg @ keys[:, :, None].float().transpose(-1, -2) * scaling  # (B, h, g, q, n)
    probs = logits.masked_fill(~mask, -math.inf).softmax(dim=-1)
    out = (probs @ values[:, :, None].float()).flatten(1, 2).to(query.dtype)
    received = probs.mean(dim=2).sum(dim=2)  # (B, h, n)
    if src.scores is not None:
        src.scores += received[..., :n_src]
    tgt.scores += received[..., n_src:]
    return out


class TargetCache(Cache):
    """The cache to pass when feeding target tokens: ``model(ids, past_key_values=cache,
    position_ids=cache.position_ids(q, phi))``. ``source`` and ``target`` are two fresh
    :func:`~kvlab.cache.make_cache` caches of the same method."""

    def __init__(self, source: KVCache, target: KVCache):
        super().__init__(layers=[TargetLayer(s, t) for s, t in zip(source.layers, target.layers)])
        self.source, self.target = source, target

    def position_ids(self, q: int, phi: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """``(1, q)`` group positions of the next ``q`` target tokens: ``phi + target tokens seen``."""
        return (phi + self.target.seen_tokens + torch.arange(q, device=device))[None]

    def pop_last(self) -> None:
        """Forget the newest target token (it is fed again later, after more source has been read).
        Valid right after a forward pass that appended it: the kept tokens keep their positions."""
        for layer in self.target.layers:
            for seg in layer.segments:
                seg.keys, seg.values = seg.keys[..., :-1, :], seg.values[..., :-1, :]
                if seg.scores is not None:
                    seg.scores = seg.scores[..., :-1]
            layer.seen -= 1

    def nbytes(self) -> int:
        return self.source.nbytes() + self.target.nbytes()
