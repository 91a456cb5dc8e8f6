"""A cache whose new tokens also attend to every token another cache keeps: the target side of group
positions in streaming translation (:mod:`kvlab.evals.groupcache`)."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvlab.cache.kvcache import KVCache
from kvlab.cache.layer import KVLayer, tag
from kvlab.errors import KvlabError


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
        tag(empty, self)
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
