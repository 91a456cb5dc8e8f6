"""DuoAttention-style head split (Xiao et al. 2024, "DuoAttention: Efficient Long-Context LLM Inference
with Retrieval and Streaming Heads")."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvlab.errors import KvlabError
from kvlab.methods.base import Group, LayerInfo, Method, need_profile, positive
from kvlab.methods.full import Full
from kvlab.methods.streaming_llm import StreamingLLM

CLASSES = ("retrieval", "induction", "local")


@dataclass
class Duo(Method):
    """``duo:profile=p.json,sinks=4,window=1020,full=retrieval``: retrieval heads keep every token;
    the other (streaming) heads keep ``sinks`` attention sinks and the ``window`` newest tokens.

    DuoAttention learns a gate per head on synthetic passkey data and keeps full attention where the
    gate is high. kvlab has no trained gates: the split comes from a kvlab head profile
    (``kvlab heads profile``), whose ``retrieval`` class is found by a copy probe; ``full`` names the
    classes kept whole, joined by ``/`` (``full=retrieval/induction`` keeps induction heads too).
    The same policy at prefill (chunked or not) and at every decode step; no query is observed
    (question-agnostic). Streaming heads keep their tokens' original positions (as DuoAttention does;
    ``reindex=1``: StreamingLLM's re-indexing). Memory grows with the context for the full heads
    only, so ``capacity`` is unbounded; a streaming head holds ``sinks + window`` tokens.
    """

    profile: str = ""
    sinks: int = 4
    window: int = 1020
    full: str = "retrieval"
    reindex: bool = False
    name = "duo"
    _classes: list[list[str]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        positive("sinks", self.sinks, allow_zero=True)
        positive("window", self.window)
        need_profile(self.name, self.profile)
        bad = [c for c in self.full.split("/") if c not in CLASSES]
        if bad or not self.full:
            raise KvlabError(f"full must be classes among {', '.join(CLASSES)} joined by '/', got '{self.full}'")

    def prepare(self, model: object) -> None:
        from kvlab.heads import HeadProfile

        prof = HeadProfile.load(self.profile)
        prof.check_matches(model)
        self._classes = [list(row) for row in prof.classes]

    def plan(self, layer: LayerInfo) -> list[Group]:
        if not self._classes:
            raise KvlabError(f"{self.name}: the profile was not loaded (build caches with kvlab.make_cache)")
        keep = set(self.full.split("/"))
        classes = self._classes[layer.index]
        whole = tuple(h for h, c in enumerate(classes) if c in keep)
        stream = tuple(h for h, c in enumerate(classes) if c not in keep)
        groups = []
        if whole:
            groups.append(Group(heads=whole, budget=None, scorer=Full(), label="retrieval"))
        if stream:
            scorer = StreamingLLM(sinks=self.sinks, window=self.window, reindex=self.reindex)
            groups.append(Group(heads=stream, budget=self.sinks + self.window, scorer=scorer, label="streaming"))
        return groups
