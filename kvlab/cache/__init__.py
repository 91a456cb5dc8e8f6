"""The one package that touches transformers' cache and attention internals (transformers 5.20-5.23).

* :mod:`kvlab.cache.layer` — :class:`KVLayer`, a ``CacheLayerMixin`` holding one
  :class:`~kvlab.storage.Storage` per head group, which evicts, appends and attends.
* :mod:`kvlab.cache.kvcache` — :class:`KVCache`, a ``transformers.Cache`` of KVLayers with byte
  accounting; pass it to ``model.generate(past_key_values=cache)`` or to a hand-written forward loop.
* :mod:`kvlab.cache.joined` — :class:`JoinedCache`, a cache whose tokens also attend to every token
  another cache kept (the target side of group positions in streaming translation).
* :mod:`kvlab.cache.attention` — :func:`kvlab_attention` / :func:`kvlab_mask`, the attention
  implementation ``"kvlab"`` and its mask.
  ``update`` only hands the new keys to the layer; the layer evicts, appends and attends when the
  attention function reaches it with the new tokens' padding. Any other cache falls through to sdpa.
* :func:`make_cache` — the public entry point.

Positions: the cache reports ``get_seq_length() == tokens seen``, so the model rotates new tokens at
their true positions; re-indexing is done inside the storage (see :mod:`kvlab.storage.frames`). A padded
batch must number its tokens as ``generate`` does (``position_ids = cumsum(attention_mask) - 1``).
Masks: the mask of a forward pass covers only its new tokens; it is None unless one of them is padding
(then ``(B, q)`` bool), so no ``q x n`` mask is ever built here.
"""

from __future__ import annotations

from transformers import PreTrainedModel

from kvlab.cache.attention import ATTN_NAME, kvlab_attention, kvlab_mask, use_kvlab_attention
from kvlab.cache.joined import JoinedCache
from kvlab.cache.kvcache import KVCache
from kvlab.cache.layer import KVLayer
from kvlab.errors import KvlabError
from kvlab.families import check_supported, layer_infos, layer_kinds, rope_layers
from kvlab.methods.base import Method
from kvlab.storage import Rotary

__all__ = ["ATTN_NAME", "JoinedCache", "KVCache", "KVLayer", "kvlab_attention", "kvlab_mask", "make_cache", "rotaries",
           "use_kvlab_attention"]


def rotaries(model: PreTrainedModel) -> list[Rotary | None]:
    """The RoPE frequencies each layer rotates its keys with (None for a layer without RoPE): one
    :class:`Rotary` (and one cos/sin table) shared by the layers of each set of frequencies."""
    cfg = model.config.get_text_config()
    rope = next((m for name, m in model.named_modules() if name.endswith("rotary_emb")), None)
    out: list[Rotary | None] = []
    shared: dict[int, Rotary] = {}
    for kind, uses_rope in zip(layer_kinds(cfg), rope_layers(cfg)):
        inv = None
        if rope is not None and uses_rope:
            inv = getattr(rope, f"{kind}_inv_freq", None)
            inv = rope.inv_freq if inv is None else inv
        if inv is not None and id(inv) not in shared:
            shared[id(inv)] = Rotary(inv)
        out.append(None if inv is None else shared[id(inv)])
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
    # only a method that overrides allocate (Ada-KV) gets it: no per-step check for the others
    allocate = m.allocate if type(m).allocate is not Method.allocate else None
    return KVCache([KVLayer(info, m.plan(info), rot, allocate) for info, rot in zip(infos, rots)], m)
