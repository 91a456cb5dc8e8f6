"""Uniform KIVI quantization of every head, no eviction: the ablation of HAQ-KV's per-class widths.

``quant:bits=4[,group_size=32,residual=32,rope=pre]`` stores every KV head the way :mod:`kvlab.storage.quantized`
describes (KIVI: keys per channel, values per token, the ``residual`` newest tokens in full
precision) and keeps every token. ``bits=16`` is the full cache. ``rope=pre`` quantizes keys before RoPE
(KVQuant) and rotates them at every step; ``rope=post`` quantizes them as the model rotated them (KIVI).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvlab.errors import KvlabError
from kvlab.methods.base import Group, LayerInfo, Method, positive
from kvlab.storage import GROUP_SIZE, RESIDUAL, WIDTHS, QuantGroup, check_rope


@dataclass
class Quant(Method):
    """``quant:bits=4[,group_size=32,residual=32,rope=pre]``: every head at ``bits``, nothing evicted."""

    bits: int = 4
    group_size: int = GROUP_SIZE
    residual: int = RESIDUAL
    rope: str = "pre"
    name = "quant"
    reindex = False  # nothing is evicted, so positions never move (and models without RoPE work)

    def __post_init__(self) -> None:
        if self.bits not in WIDTHS:
            raise KvlabError(f"bits must be one of {', '.join(map(str, WIDTHS))} (16 = dense), got {self.bits!r}")
        positive("group_size", self.group_size)
        positive("residual", self.residual, allow_zero=True)
        check_rope(self.rope)

    def plan(self, layer: LayerInfo) -> list[Group]:
        return [QuantGroup(heads=tuple(range(layer.num_kv_heads)), budget=None, scorer=self, bits=self.bits,
                           group_size=self.group_size, residual=self.residual, rope=self.rope)]
