"""Compressed KV storage: pure torch, no transformers, no methods.

``plan``: the types a method hands over (layer info, head groups, the scorer protocol);
``rope``: exact re-rotation of keys; ``attention``: masked, blocked attention;
``base``: the storage contract; ``dense`` and ``quantized``: its two implementations.
"""

from kvlab.storage.base import Storage, keep_indices, make_segment
from kvlab.storage.plan import GROUP_SIZE, RESIDUAL, WIDTHS, Group, LayerInfo, QuantGroup, RecentWindow, Scorer
from kvlab.storage.rope import Rotary

__all__ = ["GROUP_SIZE", "RESIDUAL", "WIDTHS", "Group", "LayerInfo", "QuantGroup", "RecentWindow", "Rotary", "Scorer", "Storage",
           "keep_indices", "make_segment"]
