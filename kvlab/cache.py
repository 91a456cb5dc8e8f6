"""The one module that touches transformers' cache and attention internals (transformers 5.20-5.23).

* :class:`KVLayer` — a ``CacheLayerMixin`` holding one :class:`~kvlab.storage.Storage` per head group.
* :class:`KVCache` — a ``transformers.Cache`` of KVLayers with byte accounting; pass it to
  ``model.generate(past_key_values=cache)`` or to a hand-written forward loop.
* :class:`JoinedCache` — a cache whose tokens also attend to every token another cache kept
  (the target side of group positions in streaming translation).
* :func:`kvlab_attention` / :func:`kvlab_mask` — the attention implementation ``"kvlab"`` and its mask.
  ``update`` only hands the new keys to the layer; the layer evicts, appends and attends when the
  attention function reaches it with the new tokens' padding. Any other cache falls through to sdpa.
* :func:`make_cache` — the public entry point.

Positions: the cache reports ``get_seq_length() == tokens seen``, so the model rotates new tokens at
their true positions; re-indexing is done inside the storage (see :mod:`kvlab.storage.dense`). A padded
batch must number its tokens as ``generate`` does (``position_ids = cumsum(attention_mask) - 1``).
Masks: the mask of a forward pass covers only its new tokens; it is None unless one of them is padding
(then ``(B, q)`` bool), so no ``q x n`` mask is ever built here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvlab.errors import KvlabError
from kvlab.families import check_supported, layer_infos, layer_kinds, rope_layers
from kvlab.methods.base import Method
from kvlab.storage import Group, LayerInfo, RecentWindow, Rotary, Storage, make_segment

ATTN_NAME = "kvlab"
_TAG = "_kvlab_layer"


class KVLayer(CacheLayerMixin):
    """One attention layer's compressed cache: a :class:`Storage` per group of KV heads."""

    is_compileable = False
    is_croppable = False

    def __init__(self, info: LayerInfo, groups: list[Group], rotary: Rotary | None,
                 allocate: Callable[[LayerInfo, list[Storage]], list[int] | None] | None = None):
        super().__init__()
        _check_partition(groups, info)
        if info.sliding_window is not None:  # local layers never hold more than window - 1 tokens
            groups = [_cap_sliding(g, info.sliding_window) for g in groups]
        self.info = info
        self.is_sliding = info.sliding_window is not None
        self.segments: list[Storage] = [make_segment(g, rotary) for g in groups]
        self.seen = 0  # tokens fed through this layer so far
        self.last_q = 0
        self.on_filled: Callable[[], None] | None = None  # called after this layer took a forward pass's tokens
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        # the method's once-per-layer budget allocation (Ada-KV), before the first eviction; a sliding layer keeps its window
        self._allocate = allocate if info.sliding_window is None else None
        self._qidx: list[torch.Tensor] = []

    # -- transformers' layer API -------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        g = self.info.num_heads // self.info.num_kv_heads
        for seg in self.segments:
            seg.heads = seg.heads.to(self.device)
        self._qidx = [(seg.heads[:, None] * g + torch.arange(g, device=self.device)).flatten() for seg in self.segments]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hold the ``(B, kv_heads, q, D)`` new states for :meth:`attend`; return a tagged empty tensor that
        only kvlab's attention function can read."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._pending = (key_states, value_states)
        self.last_q = key_states.shape[-2]
        self.seen += self.last_q
        empty = key_states.new_empty(*key_states.shape[:2], 0, key_states.shape[-1])
        empty.__dict__[_TAG] = self
        return empty, empty

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, self.seen  # the mask covers the new tokens only (kvlab_mask reads their padding)

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        for seg in self.segments:
            seg.clear()
        self.seen = self.last_q = 0
        self._pending = None

    def crop(self, tokens_to_remove: int) -> None:
        raise KvlabError("a compressed KV cache cannot be cropped (assisted decoding is not supported)")

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for seg in self.segments:
            seg.map_batch(fn)  # each storage reorders its own tensors

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    # -- kvlab ---------------------------------------------------------------------------
    def nbytes(self) -> int:
        return sum(seg.nbytes() for seg in self.segments)

    def compress(self) -> None:
        """Evict every group down to its budget now (otherwise done before the next tokens arrive)."""
        self._allocate_once()
        for seg in self.segments:
            seg.compress()

    def _allocate_once(self) -> None:
        """The method's budget allocation (Ada-KV), once, when the layer is about to evict for the first time."""
        if self._allocate is not None and any(seg.group.budget is not None and seg.length > seg.group.budget
                                              for seg in self.segments):
            budgets, self._allocate = self._allocate(self.info, self.segments), None
            for seg, budget in zip(self.segments, budgets or ()):
                seg.group = dataclasses.replace(seg.group, budget=budget)

    def source_nbytes(self) -> int:
        """The part of :meth:`nbytes` that keeps exact originals of re-indexed keys (e.g. StreamingLLM's sinks)."""
        return sum(seg.source_nbytes() for seg in self.segments)

    def attend(self, query: torch.Tensor, scaling: float, window: int | None, softcap: float | None = None,
               valid: torch.Tensor | None = None, prefix: KVLayer | None = None) -> torch.Tensor:
        """Store the pending tokens (``valid (B, q)``: which are real), then ``query (B, heads, q, D)`` →
        attention output ``(B, heads, q, D)`` over the kept tokens (after ``prefix``'s, all visible)."""
        pending, self._pending = self._pending, None
        self._allocate_once()
        if len(self.segments) == 1:
            seg = self.segments[0]
            if pending is not None:
                seg.push(*pending, valid)
            out = seg.attend(query, scaling, window, softcap, prefix=prefix.segments[0] if prefix else None)
        else:
            out = torch.empty_like(query)
            for i, (seg, qidx) in enumerate(zip(self.segments, self._qidx)):
                if pending is not None:
                    seg.push(pending[0].index_select(1, seg.heads), pending[1].index_select(1, seg.heads), valid)
                out[:, qidx] = seg.attend(query.index_select(1, qidx), scaling, window, softcap,
                                          prefix=prefix.segments[i] if prefix else None)
        if self.on_filled is not None:
            self.on_filled()
        return out


class KVCache(Cache):
    """A compressed KV cache for a whole model. ``nbytes()`` is what its tensors hold now;
    ``peak_nbytes`` the most they held after any forward pass."""

    def __init__(self, layers: list[KVLayer], method: Method):
        super().__init__(layers=layers)
        self.method = method
        self.peak_nbytes = 0
        layers[-1].on_filled = self._note_peak

    def _note_peak(self) -> None:
        self.peak_nbytes = max(self.peak_nbytes, self.nbytes())

    def nbytes(self) -> int:
        """Bytes held now by the kept keys and values (and quantization scales), all layers."""
        return sum(layer.nbytes() for layer in self.layers)

    @property
    def seen_tokens(self) -> int:
        return self.layers[0].seen

    def kept_tokens(self) -> list[list[int]]:
        """Tokens held per layer per KV head (head order of the model), padding included."""
        out = []
        for layer in self.layers:
            per_head = [0] * layer.info.num_kv_heads
            for seg in layer.segments:
                for h in seg.group.heads:
                    per_head[h] = seg.length
            out.append(per_head)
        return out

    def full_nbytes(self) -> int:
        """What a full (uncompressed) cache would hold at its peak for the same tokens."""
        total = 0
        for layer in self.layers:
            tokens = layer.seen
            if layer.info.sliding_window is not None:
                tokens = min(tokens, layer.info.sliding_window - 1 + layer.last_q)
            elsize = torch.empty((), dtype=getattr(layer, "dtype", torch.float32)).element_size()
            total += 2 * tokens * layer.info.num_kv_heads * layer.info.head_dim * elsize
        return total

    def compress(self) -> None:
        """Evict every group down to its budget now (otherwise done before the next tokens arrive)."""
        for layer in self.layers:
            layer.compress()

    def stop_evicting(self) -> None:
        """Lift the budget of every group of every full-attention layer: from now on the cache only grows.
        Sliding-window layers keep their window (the model's own attention, not compression)."""
        for layer in self.layers:
            if not layer.is_sliding:
                for seg in layer.segments:
                    seg.group = dataclasses.replace(seg.group, budget=None)

    def drop_last(self) -> None:
        """Forget the newest token of every layer (right after the forward pass that appended it)."""
        for layer in self.layers:
            for seg in layer.segments:
                seg.drop_last()
            layer.seen -= 1


class _JoinedLayer(CacheLayerMixin):
    """One layer seen from ``own``'s side: new tokens go to ``own``; they attend to ``prefix``'s kept
    tokens (all visible) and causally to ``own``'s."""

    is_compileable = False
    is_sliding = False

    def __init__(self, prefix: KVLayer, own: KVLayer):
        super().__init__()
        if prefix.info.sliding_window is not None:
            raise KvlabError("group positions do not support sliding-window layers (e.g. Gemma-3); use batch positions")
        if any(seg.group.bits < 16 for seg in (*prefix.segments, *own.segments)):
            raise KvlabError("group positions support 16-bit methods only (a quantized part cannot give back its last "
                             "token); use batch positions for quant/haq")
        self.prefix, self.own, self.info = prefix, own, own.info
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # the two wrapped layers initialize themselves

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        empty, _ = self.own.update(key_states, value_states)
        empty.__dict__[_TAG] = self
        return empty, empty

    def get_seq_length(self) -> int:
        return self.own.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, self.own.seen

    def get_max_length(self) -> int:
        return -1

    def attend(self, query: torch.Tensor, scaling: float, window: int | None, softcap: float | None = None,
               valid: torch.Tensor | None = None) -> torch.Tensor:
        return self.own.attend(query, scaling, None, softcap, valid, prefix=self.prefix)


class JoinedCache(Cache):
    """Feed tokens through ``own`` while they also see every token ``prefix`` keeps: two fresh
    :func:`make_cache` caches of the same method, each compressing (and re-indexing) itself."""

    def __init__(self, prefix: KVCache, own: KVCache):
        super().__init__(layers=[_JoinedLayer(p, o) for p, o in zip(prefix.layers, own.layers)])
        self.prefix, self.own = prefix, own

    def nbytes(self) -> int:
        return self.prefix.nbytes() + self.own.nbytes()


def kvlab_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
               attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """The mask of a forward pass through a kvlab cache, which covers only the ``q`` new tokens: None
    when none of them is padding, else their validity ``(B, q)`` bool (one check per forward pass, as
    transformers' sdpa mask makes). Any other cache gets transformers' sdpa mask."""
    if kv_length != q_length or kv_offset != q_offset or attention_mask is None:
        return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                         kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)
    valid = attention_mask[:, kv_offset:kv_offset + q_length].bool()
    if valid.shape[-1] < q_length:  # a mask shorter than the input: the rest is real
        valid = torch.nn.functional.pad(valid, (0, q_length - valid.shape[-1]), value=True)
    return None if bool(valid.all()) else valid


def kvlab_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    sliding_window: int | None = None, softcap: float | None = None, **kwargs
                    ) -> tuple[torch.Tensor, None]:
    """transformers attention function: the tagged layer computes, anything else goes to sdpa."""
    layer = key.__dict__.get(_TAG)
    if layer is None:
        if softcap is not None:
            raise KvlabError("kvlab's attention with another cache cannot soft-cap logits; use a kvlab cache, or "
                             "model.set_attn_implementation('eager')")
        if attention_mask is not None and attention_mask.dim() == 2:  # a prefill: kvlab_mask gave the padding
            q = query.shape[-2]
            causal = torch.ones(q, q, dtype=torch.bool, device=query.device).tril()
            attention_mask = causal & attention_mask[:, None, None, :]
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, sliding_window=sliding_window, **kwargs)
    valid = None
    if attention_mask is not None:  # (B, q) from kvlab_mask; a 4D mask's diagonal says the same
        valid = attention_mask if attention_mask.dim() == 2 else attention_mask[:, 0].diagonal(dim1=-2, dim2=-1)
        valid = valid.bool()
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = layer.attend(query, scale, sliding_window or layer.info.sliding_window, softcap, valid)
    return out.transpose(1, 2).contiguous(), None


def use_kvlab_attention(model: PreTrainedModel) -> None:
    """Register and select the ``"kvlab"`` attention implementation (sdpa for any other cache)."""
    AttentionInterface.register(ATTN_NAME, kvlab_attention)
    AttentionMaskInterface.register(ATTN_NAME, kvlab_mask)
    if model.config._attn_implementation != ATTN_NAME:
        model.set_attn_implementation(ATTN_NAME)


def rotaries(model: PreTrainedModel) -> list[Rotary | None]:
    """The RoPE frequencies each layer rotates its keys with (None for a layer without RoPE)."""
    cfg = model.config.get_text_config()
    rope = next((m for name, m in model.named_modules() if name.endswith("rotary_emb")), None)
    out: list[Rotary | None] = []
    for kind, uses_rope in zip(layer_kinds(cfg), rope_layers(cfg)):
        inv = None
        if rope is not None and uses_rope:
            inv = getattr(rope, f"{kind}_inv_freq", None)
            inv = rope.inv_freq if inv is None else inv
        out.append(None if inv is None else Rotary(inv))
    return out


def make_cache(model: PreTrainedModel, method: str | Method = "full") -> KVCache:
    """A fresh compressed cache for ``model`` running ``method`` (a spec string or a Method).

    Refuses, before any forward pass, a model whose attention kvlab cannot reproduce exactly
    (:func:`kvlab.families.check_supported`). Switches the model to kvlab's attention implementation
    (identical to sdpa for any other cache). Use one cache per batch of sequences.
    """
    from kvlab.methods.registry import build

    m = build(method) if isinstance(method, str) else method
    check_supported(model)
    m.prepare(model)
    use_kvlab_attention(model)
    infos = layer_infos(model)
    rots = rotaries(model)
    if m.reindex and all(r is None for r in rots):
        raise KvlabError(f"method '{m.name}' re-indexes positions, which needs a RoPE model")
    return KVCache([KVLayer(info, m.plan(info), rot, m.allocate) for info, rot in zip(infos, rots)], m)


def _check_partition(groups: list[Group], info: LayerInfo) -> None:
    heads = sorted(h for g in groups for h in g.heads)
    if heads != list(range(info.num_kv_heads)):
        raise KvlabError(f"layer {info.index}: head groups {[g.heads for g in groups]} do not cover "
                         f"the {info.num_kv_heads} KV heads exactly once")


def _cap_sliding(group: Group, window: int) -> Group:
    """On a sliding-window layer keep at most ``window - 1`` tokens, by recency when the method's
    own budget would not bind (which is what transformers' own sliding layers do)."""
    cap = window - 1
    if group.budget is not None and group.budget < cap:
        return group
    # replace(): a subclass's fields (a QuantGroup's group_size and residual) survive the cap
    return dataclasses.replace(group, budget=cap, scorer=RecentWindow(cap))
