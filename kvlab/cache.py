"""The one module that touches transformers' cache and attention internals (transformers 5.20-5.23).

* :class:`KVLayer` — a ``CacheLayerMixin`` holding one :class:`~kvlab.kv.Segment` per head group.
* :class:`KVCache` — a ``transformers.Cache`` of KVLayers with byte accounting; pass it to
  ``model.generate(past_key_values=cache)`` or to a hand-written forward loop.
* :func:`kvlab_attention` — registered as attention implementation ``"kvlab"``. The cache tags the
  key tensor it returns with its layer; tagged calls are computed by the layer (per-group
  lengths, exact masks after eviction, H2O scores); untagged calls fall through to ``sdpa``.
* :func:`make_cache` — the public entry point.

Positions: the cache reports ``get_seq_length() == tokens seen``, so the model rotates new tokens
at their true positions (whether or not ``generate`` passes ``position_ids``); re-indexing is done
inside the storage (see :mod:`kvlab.kv`).
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
from kvlab.kv import Rotary, Segment, make_segment
from kvlab.methods.base import Group, LayerInfo, Method
from kvlab.methods.streaming_llm import StreamingLLM

ATTN_NAME = "kvlab"
_TAG = "_kvlab_layer"


class KVLayer(CacheLayerMixin):
    """One attention layer's compressed cache: a :class:`Segment` per group of KV heads."""

    is_compileable = False
    is_croppable = False

    def __init__(self, info: LayerInfo, groups: list[Group], rotary: Rotary | None):
        super().__init__()
        _check_partition(groups, info)
        if info.sliding_window is not None:  # local layers never hold more than window - 1 tokens
            groups = [_cap_sliding(g, info.sliding_window) for g in groups]
        self.info = info
        self.is_sliding = info.sliding_window is not None
        self.segments = [make_segment(g, rotary) for g in groups]
        # one dense group: attention can read its tensors directly (and sdpa could, untagged)
        self.single = len(self.segments) == 1 and type(self.segments[0]) is Segment
        self.seen = 0  # tokens fed through this layer so far
        self.last_q = 0

    # -- transformers' layer API -------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        for seg in self.segments:
            seg.heads = seg.heads.to(self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Evict down to budget, append ``(B, kv_heads, q, D)`` new states, return what to attend."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        whole = len(self.segments) == 1
        for seg in self.segments:
            k, v = (key_states, value_states) if whole else (key_states.index_select(1, seg.heads),
                                                               value_states.index_select(1, seg.heads))
            if isinstance(seg, Segment):
                seg.push(k, v)  # eviction and append in one copy
            else:
                seg.compress()
                seg.append(k, v)
        self.last_q = key_states.shape[-2]
        self.seen += self.last_q
        if self.single:
            keys, values = self.segments[0].stored()  # as stored: a turned ring is read without a mask
        else:  # only kvlab_attention can read a multi-group layer: give sdpa nothing it could misuse
            keys = values = key_states.new_empty(*key_states.shape[:2], 0, key_states.shape[-1])
        keys.__dict__[_TAG] = self
        return keys, values

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        n = max(seg.length_after_compress() for seg in self.segments)
        return n + query_length, self.seen - n

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        for seg in self.segments:
            seg.keys = seg.values = seg.scores = None
        self.seen = self.last_q = 0

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

    def attend(self, query: torch.Tensor, scaling: float, sliding_window: int | None) -> torch.Tensor:
        """``query (B, heads, q, D)`` → attention output ``(B, heads, q, D)``."""
        if len(self.segments) == 1:
            return self.segments[0].attend(query, scaling, sliding_window)
        g = query.shape[1] // self.info.num_kv_heads
        out = torch.empty_like(query)
        for seg in self.segments:
            qidx = (seg.heads[:, None] * g + torch.arange(g, device=query.device)).flatten()
            out[:, qidx] = seg.attend(query.index_select(1, qidx), scaling, sliding_window)
        return out


class KVCache(Cache):
    """A compressed KV cache for a whole model. ``nbytes()`` is what its tensors hold now;
    ``peak_nbytes`` the most they held after any forward pass."""

    def __init__(self, layers: list[KVLayer], method: Method):
        super().__init__(layers=layers)
        self.method = method
        self.peak_nbytes = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == len(self.layers) - 1:
            self.peak_nbytes = max(self.peak_nbytes, self.nbytes())
        return out

    def nbytes(self) -> int:
        """Bytes held now by the kept keys and values (and quantization scales), all layers."""
        return sum(layer.nbytes() for layer in self.layers)

    @property
    def seen_tokens(self) -> int:
        return self.layers[0].seen

    def kept_tokens(self) -> list[list[int]]:
        """Tokens held per layer per KV head (head order of the model)."""
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


def kvlab_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    sliding_window: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: the tagged layer computes, anything else goes to sdpa."""
    layer = key.__dict__.get(_TAG)
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, sliding_window=sliding_window, **kwargs)
    if kwargs.get("softcap") is not None:
        raise KvlabError("attention logit soft-capping (Gemma-2) is not supported by kvlab's cache yet")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = layer.attend(query, scale, sliding_window or layer.info.sliding_window)
    return out.transpose(1, 2).contiguous(), None


def use_kvlab_attention(model: PreTrainedModel) -> None:
    """Register and select the ``"kvlab"`` attention implementation (sdpa for any other cache)."""
    AttentionInterface.register(ATTN_NAME, kvlab_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    if model.config._attn_implementation != ATTN_NAME:
        model.set_attn_implementation(ATTN_NAME)


def layer_infos(model: PreTrainedModel) -> list[LayerInfo]:
    """Shapes of every attention layer, from the model's (text) config."""
    cfg = model.config.get_text_config()
    n = cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * n
    window = getattr(cfg, "sliding_window", None)
    return [LayerInfo(index=i, num_layers=n, num_kv_heads=kv, num_heads=heads, head_dim=head_dim,
                      sliding_window=window if types[i] == "sliding_attention" else None) for i in range(n)]


def rotaries(model: PreTrainedModel) -> list[Rotary | None]:
    """The RoPE frequencies each layer rotates its keys with (None for a model without RoPE)."""
    cfg = model.config.get_text_config()
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    rope = next((m for name, m in model.named_modules() if name.endswith("rotary_emb")), None)
    if rope is None:
        return [None] * len(types)
    out = []
    for t in types:
        inv = getattr(rope, f"{t}_inv_freq", None)
        out.append(Rotary(inv if inv is not None else rope.inv_freq))
    return out


def make_cache(model: PreTrainedModel, method: str | Method = "full") -> KVCache:
    """A fresh compressed cache for ``model`` running ``method`` (a spec string or a Method).

    Switches the model to kvlab's attention implementation (identical to sdpa for any other
    cache). Use one cache per sequence: it is filled by the forward passes it is given to.
    """
    from kvlab.methods.registry import build

    m = build(method) if isinstance(method, str) else method
    m.prepare(model)
    use_kvlab_attention(model)
    infos = layer_infos(model)
    rots = rotaries(model)
    if m.reindex and rots[0] is None:
        raise KvlabError(f"method '{m.name}' re-indexes positions, which needs a RoPE model")
    return KVCache([KVLayer(info, m.plan(info), rot) for info, rot in zip(infos, rots)], m)


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
    return dataclasses.replace(group, budget=cap, scorer=StreamingLLM(sinks=0, window=cap))
