"""Head-aware budgets: every KV head gets the budget and the policy of its class.

A head profile (``kvlab heads profile``) classes each KV head as ``retrieval``, ``induction`` or
``local``. Within each layer the budget is shared out by class weight, so that the mean over the
layer's KV heads is ``budget`` (the same memory as a uniform method at that budget, up to rounding
down by less than one token per head):

    b_class = floor(budget * n_heads * w_class / sum_h w_class(h))

Local heads keep ``sinks`` + a recent window (StreamingLLM, re-indexed); retrieval and induction
heads keep a recent window plus the tokens with the most accumulated attention (H2O-style, at
prefill and at every step, original positions; ``pool=k`` ranks each token by the max over its ``k``
neighbours, SnapKV's clustering, so spans such as a number's digits stay whole). Heads of one class live in their own tensors, so memory really shrinks: a layer holds
``sum_h b_h`` tokens, not ``max_h b_h * n_heads``.

Ablations (``assign=``): ``uniform`` — equal budgets for every class (the classes keep their
policies); ``shuffled`` — the profile's labels permuted at random (seeded) over all heads, budgets
as usual. ``sinks=0`` removes the sinks of local heads.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from kvlab.errors import KvlabError
from kvlab.methods.base import Group, LayerInfo, Method, positive
from kvlab.methods.h2o import H2O
from kvlab.methods.streaming_llm import StreamingLLM

CLASSES = ("retrieval", "induction", "local")
ASSIGN = ("profile", "uniform", "shuffled")


@dataclass
class HeadAware(Method):
    """``head-aware:budget=512,profile=p.json[,retrieval=2,induction=1,local=0.25,sinks=4,recent=32,pool=1,assign=profile]``"""

    budget: int = 1024
    profile: str = ""
    retrieval: float = 2.0
    induction: float = 1.0
    local: float = 0.25
    sinks: int = 4
    recent: int = 32
    pool: int = 1
    assign: str = "profile"
    seed: int = 0
    name = "head-aware"
    _classes: list[list[str]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        positive("budget", self.budget)
        positive("sinks", self.sinks, allow_zero=True)
        positive("recent", self.recent, allow_zero=True)
        H2O(budget=max(1, self.recent), recent=self.recent, pool=self.pool)  # the same checks of recent/pool
        if not self.profile:
            raise KvlabError(f"{self.name} needs profile=FILE (make one with 'kvlab heads profile --model M --output FILE')")
        for cls in CLASSES:
            if not getattr(self, cls) > 0:
                raise KvlabError(f"the weight of class '{cls}' must be > 0, got {getattr(self, cls)}")
        if self.assign not in ASSIGN:
            raise KvlabError(f"assign must be one of {', '.join(ASSIGN)}, got '{self.assign}'")

    def capacity(self) -> int:
        return self.budget

    def prepare(self, model: object) -> None:
        from kvlab.heads import HeadProfile

        prof = HeadProfile.load(self.profile)
        prof.check_matches(model)
        classes = [list(row) for row in prof.classes]
        if self.assign == "shuffled":
            flat = [c for row in classes for c in row]
            random.Random(self.seed).shuffle(flat)
            width = prof.num_kv_heads
            classes = [flat[i * width:(i + 1) * width] for i in range(prof.num_layers)]
        self._classes = classes

    def weight(self, cls: str) -> float:
        return 1.0 if self.assign == "uniform" else getattr(self, cls)

    def bits(self, cls: str) -> int:
        """Bit width of a class's keys and values (16: full precision)."""
        return 16

    def budgets(self, classes: list[str]) -> dict[str, int]:
        """Tokens per head for each class present in a layer whose heads have ``classes``."""
        total = self.budget * len(classes)
        norm = sum(self.weight(c) for c in classes)
        return {c: int(total * self.weight(c) / norm) for c in set(classes)}

    def plan(self, layer: LayerInfo) -> list[Group]:
        if not self._classes:
            raise KvlabError(f"{self.name}: the profile was not loaded (build caches with kvlab.make_cache)")
        classes = self._classes[layer.index]
        groups = []
        for cls, b in sorted(self.budgets(classes).items()):
            heads = tuple(h for h, c in enumerate(classes) if c == cls)
            if cls == "local":
                if b <= self.sinks:
                    raise KvlabError(f"layer {layer.index}: local heads get {b} tokens, not more than sinks={self.sinks}; "
                                     f"raise budget or the 'local' weight")
                scorer: Method = StreamingLLM(sinks=self.sinks, window=b - self.sinks)
            else:
                if b < 1 or b < self.recent:
                    raise KvlabError(f"layer {layer.index}: {cls} heads get {b} tokens, fewer than recent={self.recent}; "
                                     f"raise budget or lower recent")
                # quantized storage rotates keys at attention time, so it re-indexes for free
                scorer = H2O(budget=b, recent=self.recent, reindex=self.bits(cls) < 16, pool=self.pool)
            groups.append(Group(heads=heads, budget=b, scorer=scorer, bits=self.bits(cls), label=cls))
        return groups
