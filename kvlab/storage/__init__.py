"""Compressed KV storage: pure torch, no transformers, no methods.

``plan``: the contract (layer info, head groups, the scorer and storage protocols); ``tokens``: picking and
gathering kept tokens; ``rope``: exact re-rotation of keys; ``attention``: masked, blocked attention;
``dense`` and ``quantized`` (with ``codes``): the storage's two implementations;
``rows``: one storage per batch row once padding arrives (quantized storage keeps no padding); ``rings``:
the decode steps of several dense rings of a layer taken as one; ``slotsets``: the same for the slot steps of a
layer's one-head segments (per-head budgets).
"""

from kvlab.storage.dense import Segment
from kvlab.storage.plan import (GROUP_SIZE, RESIDUAL, ROPE, WIDTHS, Group, LayerInfo, QuantGroup, RecentWindow, Scorer,
                                Storage, check_rope)
from kvlab.storage.quantized import QuantSegment
from kvlab.storage.rings import RingSet
from kvlab.storage.rope import Rotary
from kvlab.storage.rows import RowSplit
from kvlab.storage.slotsets import SlotSet
from kvlab.storage.tokens import force_newest, in_time, keep_indices, pool_max

__all__ = ["GROUP_SIZE", "RESIDUAL", "ROPE", "WIDTHS", "Group", "LayerInfo", "QuantGroup", "QuantSegment",
           "RecentWindow", "RingSet", "Rotary", "RowSplit", "Scorer", "Segment", "SlotSet", "Storage", "check_rope",
           "force_newest", "in_time", "keep_indices", "make_segment", "pool_max"]


def make_segment(group: Group, rotary: Rotary | None) -> Storage:
    """The storage for a group: dense for 16 bits, KIVI-quantized (:mod:`kvlab.storage.quantized`) below, one per
    batch row once a padded batch arrives (:mod:`kvlab.storage.rows`)."""
    if group.bits >= 16:
        return Segment(group, rotary)
    return RowSplit(lambda: QuantSegment(group, rotary))
