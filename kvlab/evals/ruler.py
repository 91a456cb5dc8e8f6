"""RULER (Hsieh et al. 2024) on a kvlab cache: the synthetic tasks of :mod:`kvlab.evals.ruler_tasks`, generated
locally at a length in the model's own tokens, answered greedily and scored as RULER scores.

    samples = make_samples(tokenizer, "niah_multikey_1", length=4096, n=2, seed=0, data="pydoc")
    samples[0].context    # rendered text prefilled (and compressed) BEFORE the question is seen
    samples[0].question   # the question, the chat template's assistant header and RULER's answer prefix
    samples[0].answers    # ("4812093",): the strings the answer must contain (:func:`score`)

*Length*: ``tokens`` = context + question tokens as the model reads them (chat template included); the largest
haystack with ``tokens <= length``, so ``length - tokens`` is under one haystack unit (a filler word, a noise
sentence, a distractor needle: under 64 tokens). Deterministic in (seed, task, length, sample index).

*Score* (RULER's ``string_match_all``): the fraction of the expected strings found, case-insensitive, in the
answer; in [0, 1] per sample, the mean per cell.

*Settings*: question-agnostic by default (the context streams through the cache ``chunk_size`` tokens at a
time and is compressed before the question is seen); ``question_aware`` puts the question in the prefill the
method scores, as kvpress does.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from kvlab.errors import KvlabError, unknown
from kvlab.evals.common import position_note
from kvlab.evals.haystack import render
from kvlab.evals.ruler_tasks import TASKS, build, max_units, min_units

HIGHER_IS_BETTER = {"score": True, "kv_bytes_peak": False, "kv_bytes": False, "compression_ratio": True,
                    "runtime_s": False}
GROUPS = {"all": tuple(TASKS), "niah": tuple(t for t in TASKS if t.startswith("niah"))}


@dataclass(frozen=True)
class Sample:
    """One RULER prompt: ``context`` + ``question`` (rendered), the expected ``answers``, its token counts and
    ``units``, the haystack size the length search chose."""

    task: str
    context: str
    question: str
    answers: tuple[str, ...]
    context_tokens: int
    tokens: int
    units: int


@dataclass
class Params:
    """``task``: one of :data:`~kvlab.evals.ruler_tasks.TASKS`; ``length``: prompt tokens; ``samples`` per cell;
    ``data``: filler of the essay haystacks (pydoc | pg19 | wikitext-2 | PATH); ``max_new_tokens``: 0 for RULER's
    own per task; ``chunk_size``: context tokens per forward pass."""

    task: str = "niah_single_1"
    length: int = 4096
    samples: int = 1
    data: str = "pydoc"
    question_aware: bool = False
    chunk_size: int = 512
    max_new_tokens: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        check_task(self.task)
        for name in ("length", "samples", "chunk_size"):
            if getattr(self, name) < 1:
                raise KvlabError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_new_tokens < 0:
            raise KvlabError(f"max_new_tokens must be 0 (the task's own) or more, got {self.max_new_tokens}")


def check_task(name: str) -> str:
    if name not in TASKS:
        raise unknown("task", name, TASKS)
    return name


def expand_tasks(names: list[str]) -> list[str]:
    """Task names with the groups ``all`` and ``niah`` expanded, in order, without repeats."""
    out = [t for n in names for t in (GROUPS[n] if n in GROUPS else (check_task(n),))]
    return list(dict.fromkeys(out))


def score(prediction: str, answers: tuple[str, ...] | list[str]) -> float:
    """RULER's ``string_match_all`` for one sample: the share of ``answers`` found (case-insensitive) in the
    prediction, after dropping non-printable characters and outer whitespace."""
    text = re.sub(r"[\x00-\x1f]", "\n", prediction).strip().lower()
    return sum(a.lower() in text for a in answers) / len(answers)


def make_samples(tokenizer: Any, task: str, length: int, n: int = 1, seed: int = 0, *, data: str = "pydoc",
                 text: str | None = None) -> list[Sample]:
    """``n`` samples of ``task`` with at most ``length`` prompt tokens each (see the module docstring).
    ``data`` names the filler of essay haystacks (:func:`kvlab.data.load_text`; ``text`` overrides it)."""
    spec = TASKS[check_task(task)]
    filler: list[str] = []
    if spec.uses_filler:
        if text is None:
            from kvlab.data import load_text

            text = load_text(data)
        filler = re.sub(r"\s+", " ", text).strip().split(" ")
    return [_fit(tokenizer, task, length, f"ruler:{task}:{seed}:{length}:{i}", filler) for i in range(n)]


def _fit(tokenizer: Any, task: str, length: int, key: str, filler: list[str]) -> Sample:
    """The sample with the most haystack units whose prompt has at most ``length`` tokens."""
    spec = TASKS[task]

    def sample(units: int) -> Sample:
        context, question, prefix, answers = build(spec, units, key, filler, length)
        head, tail = render(tokenizer, context, question)
        n_head = _count(tokenizer, head)
        return Sample(task, head, tail + prefix, tuple(answers), n_head, n_head + _count(tokenizer, tail + prefix),
                      units)

    lo, cap = min_units(spec), max_units(spec)
    best = sample(lo)
    if best.tokens > length:
        raise KvlabError(f"length {length} is too short for {task}: its smallest prompt takes {best.tokens} tokens")
    hi = lo
    while True:  # double until a size is too long (or the word list runs out)
        hi = hi * 2 if cap is None else min(hi * 2, cap)
        s = sample(hi)
        if s.tokens > length:
            break
        lo, best = hi, s
        if hi == cap:
            raise KvlabError(f"length {length} is too long for {task}: {cap} words make only {s.tokens} tokens")
    while hi - lo > 1:  # best = sample(lo) fits, sample(hi) does not
        mid = (lo + hi) // 2
        s = sample(mid)
        lo, hi, best = (mid, hi, s) if s.tokens <= length else (lo, mid, best)
    return best


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def evaluate(model: Any, tokenizer: Any, method: str, params: Params, *, progress: bool = False) -> dict:
    """Mean RULER score of ``method`` on ``params.samples`` samples of one task at one length; one row's metrics
    (score None past the model's positions for a method that does not re-index them)."""
    from kvlab.evals.needle import ask
    from kvlab.stream import eos_ids

    samples = make_samples(tokenizer, params.task, params.length, params.samples, params.seed, data=params.data)
    max_new = params.max_new_tokens or TASKS[params.task].max_new_tokens
    encoded = [(tokenizer.encode(s.context, add_special_tokens=False),
                tokenizer.encode(s.question, add_special_tokens=False)) for s in samples]
    base = {"samples": len(samples), "context_tokens": max(s.context_tokens for s in samples),
            "prompt_tokens": max(s.tokens for s in samples), "expected": [list(s.answers) for s in samples]}
    note = position_note(model, method, max(len(c) + len(q) for c, q in encoded) + max_new)
    if note:
        return {"score": None, **base, "note": note}
    eos = eos_ids(model, tokenizer)
    scores, answers, peak, full, kept = [], [], 0, 0, 0
    start = time.perf_counter()
    for sample, (ctx, question) in tqdm(list(zip(samples, encoded)), desc=f"ruler {params.task} {method}",
                                        disable=not progress, leave=False):
        text, cache = ask(model, tokenizer, method, ctx, question, question_aware=params.question_aware,
                          chunk_size=params.chunk_size, max_new_tokens=max_new, eos=eos)
        scores.append(score(text, sample.answers))
        answers.append(text.strip())
        peak, full, kept = max(peak, cache.peak_nbytes), max(full, cache.full_nbytes()), max(kept, cache.nbytes())
    return {"score": sum(scores) / len(scores), "scores": scores, **base, "kv_bytes_peak": peak, "kv_bytes": kept,
            "kv_bytes_full": full, "compression_ratio": 1.0 - peak / full if full else None,
            "runtime_s": time.perf_counter() - start, "answers": answers}
