"""HAQ-KV: head-aware budgets plus a KIVI bit width per head class.

``haq:budget=512,profile=p.json,bits=8/4/2[,group_size=32,residual=32,exact_sinks=1]`` is
:class:`~kvlab.methods.head_aware.HeadAware` (every option of ``head-aware`` works: class weights,
``sinks``, ``recent``, ``assign=uniform|shuffled``) whose heads are stored quantized
(:mod:`kvlab.storage.quantized`): ``bits=R/I/L`` gives the width of retrieval, induction and local heads in
that order, each one of 2, 4, 8 or 16 (16 keeps that class dense); a single number applies to every
class. Retrieval heads copy exact tokens from far back, so they keep the most bits; local heads only
read the last few tokens and the sinks, so they tolerate the fewest.

Eviction inside a quantized group is token-level, as for dense heads (see :mod:`kvlab.storage.quantized`).
The ``residual`` most recent tokens of a head stay in full precision and are never evicted; so do
the ``sinks`` of local heads (``exact_sinks=1``, the default; ``exact_sinks=0`` quantizes them like
any other token, as KIVI does: see :mod:`kvlab.storage.quantized` for what they are worth). A head whose budget
cannot hold ``residual + group_size - 1`` tokens besides its exact sinks gets a shorter residual,
``budget - sinks - group_size + 1`` (so a head never holds more than its budget between forward passes).

``rope=pre`` (the default) quantizes keys before RoPE (KVQuant) and rotates every kept key to its position
at every step, so retrieval and induction heads re-index what they keep; ``rope=post`` quantizes them as the
model rotated them (KIVI), so a step rotates nothing but the exact sinks, and those heads keep H2O's original
positions (as head-aware's dense heads do). ``rope=post`` needs ``exact_sinks=1``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kvlab.errors import KvlabError
from kvlab.methods.base import Group, LayerInfo, positive
from kvlab.methods.head_aware import CLASSES, HeadAware
from kvlab.storage import GROUP_SIZE, RESIDUAL, WIDTHS, QuantGroup, check_rope


class ClassBits(str):
    """The ``bits=R/I/L`` setting: a string (so the spec round-trips) called as ``bits(cls) -> int``,
    which is the hook :meth:`HeadAware.bits` that :meth:`HeadAware.plan` uses."""

    widths: dict[str, int]

    def __new__(cls, text: str) -> ClassBits:
        parts = str(text).split("/")
        if len(parts) == 1:
            parts = parts * len(CLASSES)
        try:
            widths = [int(p) for p in parts]
        except ValueError:
            widths = []
        if len(widths) != len(CLASSES) or any(w not in WIDTHS for w in widths):
            raise KvlabError(f"bits must be R/I/L (retrieval/induction/local) or one width for all, each one of "
                             f"{', '.join(map(str, WIDTHS))} (16 = dense), e.g. bits=8/4/2; got '{text}'")
        obj = super().__new__(cls, text)
        obj.widths = dict(zip(CLASSES, widths))
        return obj

    def __call__(self, cls: str) -> int:
        return self.widths[cls]


@dataclass
class HAQ(HeadAware):
    """``haq:budget=512,profile=p.json,bits=8/4/2[,group_size=32,residual=32,exact_sinks=1,rope=pre, + head-aware
    options]``"""

    bits: str = "8/4/2"  # type: ignore[assignment]  # a ClassBits after __post_init__: also bits(cls)
    group_size: int = GROUP_SIZE
    residual: int = RESIDUAL
    exact_sinks: bool = True
    rope: str = "pre"
    name = "haq"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.bits = ClassBits(self.bits)
        positive("group_size", self.group_size)
        positive("residual", self.residual, allow_zero=True)
        check_rope(self.rope)
        if self.rope == "post" and not self.exact_sinks:
            raise KvlabError("rope=post needs exact_sinks=1: quantized sinks would have to move with every step")

    def reindexes(self, cls: str) -> bool:
        return super().reindexes(cls) and self.rope == "pre"

    def plan(self, layer: LayerInfo) -> list[Group]:
        groups = []
        for g in super().plan(layer):
            if g.bits < 16:
                sinks = self.sinks if g.label == "local" and self.exact_sinks else 0
                residual = min(self.residual, g.budget - sinks - self.group_size + 1)
                if residual < 0:
                    raise KvlabError(f"layer {layer.index}: {g.label} heads get {g.budget} tokens, fewer than "
                                     f"{sinks + self.group_size - 1} ({sinks} exact sinks + group_size - 1); raise "
                                     f"budget or lower group_size")
                g = QuantGroup(**{f.name: getattr(g, f.name) for f in dataclasses.fields(g)},
                               group_size=self.group_size, residual=residual, exact_sinks=sinks > 0, rope=self.rope)
            groups.append(g)
        return groups
