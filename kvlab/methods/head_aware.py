"""Head-aware budgets: every KV head gets the budget and the policy of its class.

A head profile (``kvlab heads profile``) classes each KV head as ``retrieval``, ``induction`` or
``local`` and measures its ``locality``: the share of its attention on the sinks and the last few
tokens. Budgets come from one pool: the mean over the model's KV heads is ``budget`` (``scope=model``,
the default: the same memory as a uniform method at that budget), or the mean over each layer's KV
heads (``scope=layer``: the same memory in every layer). Within the pool a head's share is its weight:

    w(h) = w_class                                                for retrieval and induction heads
    w(h) = w_local * need(h) / mean(need over local heads)        for local heads (spread=locality)
    need(h) = 1 - locality(h) + 0.05

so a local head that already finds nearly all its attention in the window gets a short window, and a
diffuse one (typically in early layers) a long one; ``spread=even`` gives every local head ``w_local``.
The pool is then shared out in whole tokens, ``b(h) = floor(pool * w(h) / sum w)``, except that no
head gets less than its policy needs (``sinks + max(recent, 1)`` for a local head, ``max(recent, 1)``
for the others): heads below that get exactly it and the rest is shared again among the others
(water-filling), so the total never exceeds the pool (by less than one token per head under it).

Why one pool: the total memory is the same either way, but with 2 KV heads per layer (Qwen2.5-0.5B)
a per-layer pool lets a retrieval head take at most twice the budget. At 25% of a 3,000-token context
that lost digits of a pass key (1/5 found), where the model's pool gives each retrieval head 2,080
tokens (5/5); on SmolLM2 the pool and the spread take perplexity at budget 512 from +6.6% to +3.9%
of the full cache's (docs/BENCHMARKS.md). ``kvlab heads show p.json --method SPEC`` prints every
head's budget.

Local heads keep ``sinks`` + a recent window (StreamingLLM, re-indexed); retrieval and induction
heads keep a recent window plus the tokens with the most accumulated attention (H2O-style, at
prefill and at every step, original positions; ``pool=k`` ranks each token by the max over its ``k``
neighbours, SnapKV's clustering). ``retrieve=keydiff`` has the retrieval heads keep, besides their recent
window, the tokens whose keys differ most from the head's mean key (KeyDiff, Park et al. 2025) instead:
a question-agnostic cache cannot know which tokens a later question will attend to, but a needle's
tokens stand out from the haystack they sit in; those heads then need no attention probabilities.
Heads of one class and budget live in their own tensors, so memory really shrinks: a layer holds
``sum_h b(h)`` tokens, not ``max_h b(h) * n_heads``.

Ablations (``assign=``): ``uniform`` — every head gets ``budget`` (the classes keep their policies);
``shuffled`` — the profile's labels permuted at random (seeded) over all heads, budgets as usual.
``retrieve=h2o|keydiff`` — the retrieval heads' policy (default ``h2o``).
``spread=even`` drops the locality spread; ``scope=layer`` the sharing across layers; ``sinks=0``
removes the sinks of local heads.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvlab.errors import KvlabError
from kvlab.methods.base import Group, LayerInfo, Method, need_profile, positive
from kvlab.methods.h2o import H2O
from kvlab.methods.keydiff import KeyDiff
from kvlab.methods.streaming_llm import StreamingLLM

if TYPE_CHECKING:
    from kvlab.heads import HeadProfile

CLASSES = ("retrieval", "induction", "local")
ASSIGN = ("profile", "uniform", "shuffled")
SCOPES = ("model", "layer")
SPREADS = ("locality", "even")
RETRIEVE = ("h2o", "keydiff")  # the policy of retrieval heads
NEED_FLOOR = 0.05  # added to 1 - locality, so that no local head's share vanishes


def share(total: int, weights: Sequence[float], floors: Sequence[int]) -> list[int]:
    """Whole-token budgets proportional to ``weights``, none below its floor, summing to at most ``total``.

    Heads whose proportional share falls below their floor get the floor; the rest of ``total`` is
    shared again among the others, until every share is above its floor (water-filling).
    """
    if sum(floors) > total:
        raise KvlabError(f"a pool of {total} tokens cannot give {len(floors)} heads their minimum of "
                         f"{sum(floors)} in all; raise budget, or lower sinks/recent")
    fixed: set[int] = set()
    while True:
        free = [i for i in range(len(weights)) if i not in fixed]
        rest = total - sum(floors[i] for i in fixed)
        norm = sum(weights[i] for i in free)
        low = [i for i in free if rest * weights[i] / norm < floors[i]]
        if not low:
            break
        fixed.update(low)
    return [floors[i] if i in fixed else int(rest * weights[i] / norm) for i in range(len(weights))]


@dataclass
class HeadAware(Method):
    """``head-aware:budget=512,profile=p.json[,retrieval=2,induction=1,local=0.4,scope=model,spread=locality,
    sinks=4,recent=32,pool=1,assign=profile,retrieve=h2o]``"""

    budget: int = 1024
    profile: str = ""
    retrieval: float = 2.0
    induction: float = 1.0
    local: float = 0.4
    scope: str = "model"
    spread: str = "locality"
    sinks: int = 4
    recent: int = 32
    pool: int = 1
    assign: str = "profile"
    retrieve: str = "h2o"
    seed: int = 0
    name = "head-aware"
    _classes: list[list[str]] = field(default_factory=list, init=False, repr=False)
    _budgets: list[list[int]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        positive("budget", self.budget)
        positive("sinks", self.sinks, allow_zero=True)
        positive("recent", self.recent, allow_zero=True)
        H2O(budget=max(1, self.recent), recent=self.recent, pool=self.pool)  # the same checks of recent/pool
        need_profile(self.name, self.profile)
        for cls in CLASSES:
            if not getattr(self, cls) > 0:
                raise KvlabError(f"the weight of class '{cls}' must be > 0, got {getattr(self, cls)}")
        for key, allowed in (("assign", ASSIGN), ("scope", SCOPES), ("spread", SPREADS), ("retrieve", RETRIEVE)):
            if getattr(self, key) not in allowed:
                raise KvlabError(f"{key} must be one of {', '.join(allowed)}, got '{getattr(self, key)}'")

    def capacity(self) -> int:
        return self.budget

    def prepare(self, model: object) -> None:
        from kvlab.heads import HeadProfile

        prof = HeadProfile.load(self.profile)
        prof.check_matches(model)
        self._classes, self._budgets = self.layout(prof)

    def layout(self, prof: HeadProfile) -> tuple[list[list[str]], list[list[int]]]:
        """The class (after ``assign``) and the budget of every (layer, KV head), from a loaded profile."""
        classes = [list(row) for row in prof.classes]
        if self.assign == "shuffled":
            flat = [c for row in classes for c in row]
            random.Random(self.seed).shuffle(flat)
            width = prof.num_kv_heads
            classes = [flat[i * width:(i + 1) * width] for i in range(prof.num_layers)]
        return classes, self.budgets(classes, prof.scores["locality"])

    def weights(self, classes: list[list[str]], locality: list[list[float]]) -> list[list[float]]:
        """w(h) for every (layer, KV head): see the module docstring."""
        if self.assign == "uniform":
            return [[1.0] * len(row) for row in classes]
        need = [[1.0 - x + NEED_FLOOR for x in row] for row in locality]
        local = [n for row_c, row_n in zip(classes, need) for c, n in zip(row_c, row_n) if c == "local"]
        mean = sum(local) / len(local) if local else 1.0
        return [[self.local * (n / mean if self.spread == "locality" else 1.0) if c == "local" else getattr(self, c)
                 for c, n in zip(row_c, row_n)] for row_c, row_n in zip(classes, need)]

    def floor(self, cls: str) -> int:
        """The fewest tokens a head of class ``cls`` keeps under its policy."""
        return self.sinks + max(self.recent, 1) if cls == "local" else max(self.recent, 1)

    def budgets(self, classes: list[list[str]], locality: list[list[float]]) -> list[list[int]]:
        """Tokens kept by every (layer, KV head), shared out of the ``scope``'s pool."""
        w = self.weights(classes, locality)
        floors = [[self.floor(c) for c in row] for row in classes]
        if self.scope == "layer":
            return [share(self.budget * len(r), wr, fr) for r, wr, fr in zip(classes, w, floors)]
        flat = share(self.budget * sum(map(len, classes)), [x for r in w for x in r], [x for r in floors for x in r])
        width = len(classes[0])
        return [flat[i * width:(i + 1) * width] for i in range(len(classes))]

    def bits(self, cls: str) -> int:
        """Bit width of a class's keys and values (16: full precision)."""
        return 16

    def reindexes(self, cls: str) -> bool:
        """Whether a scored class re-indexes what it keeps: quantized storage rotating keys before RoPE at
        attention time does it for free; dense storage keeps H2O's original positions."""
        return self.bits(cls) < 16

    def plan(self, layer: LayerInfo) -> list[Group]:
        if not self._classes:
            raise KvlabError(f"{self.name}: the profile was not loaded (build caches with kvlab.make_cache)")
        classes, budgets = self._classes[layer.index], self._budgets[layer.index]
        groups = []
        for cls, b in sorted(set(zip(classes, budgets))):
            heads = tuple(h for h in range(len(classes)) if (classes[h], budgets[h]) == (cls, b))
            if cls == "local":
                scorer: Method = StreamingLLM(sinks=self.sinks, window=b - self.sinks)
            elif cls == "retrieval" and self.retrieve == "keydiff":
                scorer = KeyDiff(budget=b, recent=self.recent, reindex=self.reindexes(cls))
            else:
                scorer = H2O(budget=b, recent=self.recent, reindex=self.reindexes(cls), pool=self.pool)
            groups.append(Group(heads=heads, budget=b, scorer=scorer, bits=self.bits(cls), label=cls))
        return groups
