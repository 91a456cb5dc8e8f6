"""The compressed cache of a whole model: a ``transformers.Cache`` of :class:`~kvlab.cache.layer.KVLayer` with byte
accounting (:class:`KVCache`), which :func:`kvlab.cache.make_cache` builds.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers.cache_utils import Cache

from kvlab.cache.layer import KVLayer
from kvlab.methods.base import Method


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

    def reserved_nbytes(self) -> int:
        """Bytes held beside :meth:`nbytes` and outside any budget (spare room, float32 copies a step reads), all
        layers."""
        return sum(layer.reserved_nbytes() for layer in self.layers)

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

    def use_sets(self, on: bool = True) -> None:
        """Whether a layer's segments take plain decode steps as one set where they can (ring and slot sets: the
        default), or each alone: the same tokens kept, for comparing the two (``bench/bench_sets.py``)."""
        for layer in self.layers:
            layer.sets = on

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
