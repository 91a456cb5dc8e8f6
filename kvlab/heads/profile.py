"""``profile_heads(model, tokenizer)``: score every KV head as retrieval / induction / local.

Three probes, all on the unmodified model with eager attention (no KV compression):

- **retrieval** (Wu et al. 2024): ``retrieval_samples`` needle-copy prompts, the needle at evenly spread
  depths of a ``context_len``-token haystack, the needle teacher-forced as the answer; a head's score is
  the fraction of copy steps whose attention argmax is the needle token being copied
  (:func:`~kvlab.heads.scores.retrieval_hits`). Every teacher-forced step counts, copied correctly by the
  model or not; ``copy_accuracy`` in the profile says how often the model's top-1 was the needle token.
- **induction**: ``induction_samples`` random token sequences of length ``induction_len`` repeated twice
  (:func:`~kvlab.heads.scores.induction_score`), averaged.
- **locality**: ``locality_samples`` natural-text samples of ``locality_len`` tokens, queries from position
  ``4 * window`` on (:func:`~kvlab.heads.scores.locality_score`), averaged.

Grouped-query attention: scores are computed per query head, then a KV head takes the **max** over its
query heads for retrieval and induction (a KV head is needed long-range if any query head reading it is)
and the **min** for locality (it is only as local as its least local query head). Per-query-head scores
are kept in the profile too. Classes come from :func:`~kvlab.heads.scores.classify` (quotas).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from kvlab.errors import KvlabError
from kvlab.heads import probes
from kvlab.heads.scores import classify, group_query_heads, induction_score, locality_score, retrieval_hits
from kvlab.heads.store import HeadProfile, model_shape, signature, weights_fingerprint
from kvlab.results import versions

SCORES = ("retrieval", "induction", "locality")
_REDUCE = {"retrieval": "max", "induction": "max", "locality": "min"}


@dataclass(frozen=True)
class ProfileSettings:
    """Everything that changes a profile besides the model. Defaults profile SmolLM2-135M in about a minute."""

    seed: int = 0
    retrieval_samples: int = 4      # needle prompts (depths (i + 0.5) / n)
    context_len: int = 1024         # haystack tokens per needle prompt
    needle_words: int = 12          # random words in the needle (copy steps per prompt)
    induction_samples: int = 2
    induction_len: int = 64         # length L of the random sequence repeated twice
    locality_samples: int = 2
    locality_len: int = 512         # tokens per natural-text sample (queries from 4 * window on)
    window: int = 64                # recent keys counted as local
    sinks: int = 4                  # first keys counted as local (attention sinks)
    retrieval_quota: float = 0.15   # at most this fraction of all KV heads is retrieval (top retrieval scores)
    induction_quota: float = 0.15   # at most this fraction is induction (top induction scores of the rest)
    min_retrieval: float = 0.1      # and a retrieval head needs a score above this (Wu et al.'s 0.1)
    min_induction: float = 0.05     # an induction head too (chance is about 1 / (1.5 * induction_len))

    def __post_init__(self) -> None:
        for name in ("retrieval_samples", "context_len", "needle_words", "induction_samples", "induction_len",
                     "locality_samples", "locality_len", "window"):
            if getattr(self, name) < 1:
                raise KvlabError(f"head profile setting {name} must be >= 1, got {getattr(self, name)}")
        if self.sinks < 0:
            raise KvlabError(f"sinks must be >= 0, got {self.sinks}")
        if self.needle_words > len(probes.WORDS):
            raise KvlabError(f"needle_words must be <= {len(probes.WORDS)}, got {self.needle_words}")
        if self.locality_len - 4 * self.window < 16:
            raise KvlabError(f"locality_len {self.locality_len} leaves fewer than 16 queries past 4 * window "
                             f"({4 * self.window}); raise locality_len to at least {4 * self.window + 16}")
        for name in ("retrieval_quota", "induction_quota"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise KvlabError(f"{name} must be within [0, 1], got {getattr(self, name)}")
        if self.retrieval_quota + self.induction_quota > 1.0:
            raise KvlabError("retrieval_quota + induction_quota must be <= 1")


@dataclass
class ScoreGrids:
    """Per-query-head scores (layers, Hq) for each of :data:`SCORES`, and the retrieval copy accuracy."""

    per_query_head: dict[str, torch.Tensor] = field(default_factory=dict)
    copy_accuracy: float = 0.0


def _vocab_size(model: Any, tokenizer: Any) -> int:
    size = model.config.get_text_config().vocab_size
    try:
        size = min(size, len(tokenizer))
    except TypeError:
        pass
    return size


def compute_scores(model: Any, tokenizer: Any, settings: ProfileSettings,
                   progress: Callable[[str], None] | None = None) -> ScoreGrids:
    """Run the three probes; per-query-head scores (layers, Hq) in [0, 1]."""
    say = progress or (lambda _msg: None)
    text = probes.haystack_text()
    rng = random.Random(settings.seed)
    s = settings

    hits, correct, steps = [], 0, 0
    for i in range(s.retrieval_samples):
        say(f"retrieval {i + 1}/{s.retrieval_samples}")
        probe = probes.needle_probe(tokenizer, text, rng, context_len=s.context_len,
                                    depth=(i + 0.5) / s.retrieval_samples, needle_words=s.needle_words)
        target = probe.target_pos
        assert target is not None and probe.target_ids is not None
        k = target.numel()
        h, logits = probes.run_probe(model, probe, lambda a, t=target: retrieval_hits(a, t), logits_to_keep=k + 1)
        hits.append(h.float())                                                # (layers, Hq, k)
        correct += int((logits[0, :k].argmax(-1).cpu() == probe.target_ids).sum())
        steps += k
    retrieval = torch.cat(hits, dim=-1).mean(dim=-1)

    induction = []
    for i in range(s.induction_samples):
        say(f"induction {i + 1}/{s.induction_samples}")
        probe = probes.repeat_probe(tokenizer, rng, period=s.induction_len, vocab_size=_vocab_size(model, tokenizer))
        induction.append(probes.run_probe(
            model, probe, lambda a, q=probe.query_pos: induction_score(a, q, s.induction_len))[0])
    locality = []
    for i in range(s.locality_samples):
        say(f"locality {i + 1}/{s.locality_samples}")
        probe = probes.text_probe(tokenizer, text, rng, length=s.locality_len, first_query=4 * s.window)
        locality.append(probes.run_probe(
            model, probe, lambda a, q=probe.query_pos: locality_score(a, q, s.sinks, s.window))[0])
    grids = {"retrieval": retrieval, "induction": torch.stack(induction).mean(0),
             "locality": torch.stack(locality).mean(0)}
    return ScoreGrids({k: v.cpu().clamp(0.0, 1.0) for k, v in grids.items()}, correct / max(steps, 1))


def _round(grid: torch.Tensor, digits: int = 4) -> list[list[float]]:
    """(layers, heads) -> nested lists rounded to ``digits`` decimals: stable JSON across runs, and across
    thread counts, whose different float summation orders move scores in the 6th decimal."""
    return [[round(float(x), digits) for x in row] for row in grid.tolist()]


def profile_heads(model: Any, tokenizer: Any, settings: ProfileSettings | None = None, *, model_id: str | None = None,
                  progress: Callable[[str], None] | None = None) -> HeadProfile:
    """Profile every (layer, KV head) of a loaded causal LM; see the module docstring for the method."""
    settings = settings or ProfileSettings()
    layers, kv_heads, q_heads = model_shape(model)
    grids = compute_scores(model, tokenizer, settings, progress)
    per_q = {name: grids.per_query_head[name] for name in SCORES}
    per_kv = {name: group_query_heads(per_q[name], kv_heads, _REDUCE[name]) for name in SCORES}
    # Round before classifying so that a profile reloaded from JSON classifies the same way.
    per_kv = {name: torch.tensor(_round(v), dtype=torch.float64) for name, v in per_kv.items()}
    classes = classify(per_kv["retrieval"], per_kv["induction"], retrieval_quota=settings.retrieval_quota,
                       induction_quota=settings.induction_quota, min_retrieval=settings.min_retrieval,
                       min_induction=settings.min_induction)
    if model_id is None:
        from kvlab.models.loading import model_id as _model_id

        model_id = _model_id(model)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return HeadProfile(
        model=model_id, fingerprint=weights_fingerprint(model), signature=signature(model), dtype=dtype,
        num_layers=layers, num_kv_heads=kv_heads, num_attention_heads=q_heads, settings=asdict(settings),
        scores={name: _round(v) for name, v in per_kv.items()},
        query_head_scores={name: _round(v) for name, v in per_q.items()},
        classes=classes, copy_accuracy=round(grids.copy_accuracy, 4), versions=versions())
