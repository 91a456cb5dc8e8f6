"""PyramidKV (Cai et al. 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling")."""

from __future__ import annotations

from dataclasses import dataclass

from kvlab.errors import KvlabError
from kvlab.methods.base import Group, LayerInfo, Method
from kvlab.methods.snapkv import SnapKV, check_window


def layer_budget(budget: int, window: int, beta: float, index: int, num_layers: int) -> int:
    """Tokens kept per KV head in layer ``index``: the paper's arithmetic sequence, as in kvpress.

    Beyond the ``window``, the top layer keeps ``top = (budget - window) / beta`` and the bottom layer
    ``bottom = 2 (budget - window) - top``; layers in between decrease linearly, so the mean over the
    layers is ``budget`` (up to rounding)."""
    extra = budget - window
    top = extra / beta
    bottom = 2 * extra - top
    step = (bottom - top) / (num_layers - 1) if num_layers > 1 else 0.0
    return window + round(bottom - index * step) if num_layers > 1 else budget


@dataclass
class PyramidKV(Method):
    """``pyramidkv:budget=1024,window=32,kernel=7,beta=20``: layer budgets that shrink linearly with
    depth around the mean ``budget`` (:func:`layer_budget`: the bottom layer keeps up to about twice
    the mean, the top ``window + (budget - window) / beta``), and SnapKV's selection inside each layer
    (observation window of the last ``window`` queries, max-pooling over ``kernel``, the window kept).

    Prefill and decoding as :class:`~kvlab.methods.snapkv.SnapKV` (the paper compresses once, at
    prefill; here every step keeps each layer at its budget, scored by the newest token's attention).
    Question-agnostic unless the prompt ends with the question. Every layer's memory is really its
    own budget: the model holds ``budget`` tokens per KV head on average. Original positions kept.
    """

    budget: int = 1024
    window: int = 32
    kernel: int = 7
    beta: float = 20.0
    reindex: bool = False
    name = "pyramidkv"
    needs_scores = True

    def __post_init__(self) -> None:
        check_window(self.budget, self.window, self.kernel)
        if not self.beta >= 1:
            raise KvlabError(f"beta must be >= 1 (1: every layer gets budget), got {self.beta}")

    def capacity(self) -> int:
        return self.budget

    def observed(self) -> int:
        return self.window

    def plan(self, layer: LayerInfo) -> list[Group]:
        b = layer_budget(self.budget, self.window, self.beta, layer.index, layer.num_layers)
        scorer = SnapKV(budget=b, window=self.window, kernel=self.kernel)
        return [Group(heads=tuple(range(layer.num_kv_heads)), budget=b, scorer=scorer, label=f"layer {layer.index}")]
