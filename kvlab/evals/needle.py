"""Needle in a haystack: retrieve a pass key (or one of several keys) placed at a depth of natural text.

One cell is one (length, depth): ``samples`` haystacks built by :func:`kvlab.evals.haystack.make_samples`,
each answered greedily and graded by exact match of the first number of the answer.

Two settings (``question_aware``):

* ``False`` (default, question-agnostic): the context streams through the cache ``chunk_size`` tokens at
  a time and is compressed before the question is seen — the streaming setting, and kvpress's pipeline;
* ``True``: context and question are one prefill, so a scoring method (H2O) sees the question's
  attention before it evicts anything (SnapKV's observation window). The prefill holds every token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from kvlab.cache import make_cache
from kvlab.errors import KvlabError
from kvlab.evals.common import position_note
from kvlab.evals.haystack import VARIANTS, check_depths, is_correct, make_samples
from kvlab.stream import eos_ids, feed, greedy

HIGHER_IS_BETTER = {"accuracy": True, "kv_bytes_peak": False, "kv_bytes": False, "compression_ratio": True, "runtime_s": False}


@dataclass
class Params:
    """``length``: context tokens; ``depth``: where the asked needle sits, percent of the filler;
    ``samples``: haystacks per cell; ``variant``: passkey | multikey (``keys`` needles, one asked);
    ``data``: filler text (pydoc | pg19 | wikitext-2 | PATH); ``chunk_size``: prefill tokens per forward."""

    length: int = 2000
    depth: float = 50.0
    samples: int = 1
    variant: str = "passkey"
    keys: int = 4
    question_aware: bool = False
    data: str = "pydoc"
    chunk_size: int = 512
    max_new_tokens: int = 12
    seed: int = 0

    def __post_init__(self) -> None:
        check_depths([self.depth])
        if self.variant not in VARIANTS:
            raise KvlabError(f"unknown needle variant '{self.variant}'; choose from: {', '.join(VARIANTS)}")
        for name in ("length", "samples", "chunk_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise KvlabError(f"{name} must be at least 1, got {getattr(self, name)}")


def evaluate(model, tokenizer, method: str, params: Params, *, progress: bool = False) -> dict:
    """Accuracy of ``method`` at one (length, depth); one row's metrics (accuracy None past the model's
    positions for a method that does not re-index them)."""
    samples = make_samples(tokenizer, params.length, [params.depth], params.seed, data=params.data,
                           variant=params.variant, keys=params.keys, n=params.samples)
    encoded = [(tokenizer.encode(s.context, add_special_tokens=False), tokenizer.encode(s.question, add_special_tokens=False))
               for s in samples]
    longest = max(len(c) + len(q) for c, q in encoded) + params.max_new_tokens
    note = position_note(model, method, longest)
    base = {"samples": len(samples), "context_tokens": max(s.context_tokens for s in samples),
            "needle_depth": sum(s.needle_depth for s in samples) / len(samples)}
    if note:
        return {"accuracy": None, "correct": None, **base, "note": note}
    eos = eos_ids(model, tokenizer)
    correct, answers, peak, full, kept = 0, [], 0, 0, 0
    start = time.perf_counter()
    for sample, (ctx, question) in tqdm(list(zip(samples, encoded)), desc=f"needle {method}", disable=not progress,
                                        leave=False):
        text, cache = ask(model, tokenizer, method, ctx, question, question_aware=params.question_aware,
                          chunk_size=params.chunk_size, max_new_tokens=params.max_new_tokens, eos=eos)
        correct += is_correct(text, sample.answer)
        answers.append(text.strip())
        peak, full, kept = max(peak, cache.peak_nbytes), max(full, cache.full_nbytes()), max(kept, cache.nbytes())
    runtime = time.perf_counter() - start
    return {"accuracy": correct / len(samples), "correct": correct, **base, "kv_bytes_peak": peak,
            "kv_bytes": kept, "kv_bytes_full": full, "compression_ratio": 1.0 - peak / full if full else None, "runtime_s": runtime,
            "answers": answers, "expected": [s.answer for s in samples]}


def ask(model: Any, tokenizer: Any, method: str, context: list[int], question: list[int], *, question_aware: bool,
        chunk_size: int, max_new_tokens: int, eos: set[int]) -> tuple[str, Any]:
    """Greedy answer to one prompt on a fresh ``method`` cache: ``(decoded text, the cache)``.

    Question-agnostic (``question_aware=False``): the ``context`` ids stream through the cache ``chunk_size``
    at a time (compressed between chunks), then the ``question`` ids in one pass. Question-aware: context and
    question are one prefill. The cache is returned for its byte counts."""
    ctx_ids = torch.tensor([context], device=model.device)  # (1, n)
    q_ids = torch.tensor([question], device=model.device)  # (1, q)
    cache = make_cache(model, method)
    if question_aware:
        ids = torch.cat((ctx_ids, q_ids), dim=1)  # (1, n + q)
        logits = feed(model, cache, ids, ids.shape[1])
    else:
        feed(model, cache, ctx_ids, chunk_size)
        logits = feed(model, cache, q_ids, q_ids.shape[1])  # (1, vocab)
    tokens = list(greedy(model, cache, logits, max_new_tokens, eos))
    return tokenizer.decode(tokens, skip_special_tokens=True), cache


def filler_table(rows: list[dict]) -> str:
    """Accuracy per filler text, their mean and the worst filler, one line per (method, setting, length);
    from needle rows only (markdown). A method tuned to one haystack shows here as a low worst beside its mean."""
    cells: dict[tuple[str, int], dict[str, list[float]]] = {}
    for r in rows:
        p, acc = r["config"]["params"], r["metrics"].get("accuracy")
        if r.get("status", "ok") != "ok" or acc is None:
            continue
        key = r["config"]["method"] + (" (question-aware)" if p.get("question_aware") else "") + \
            (f" [{p['variant']}]" if p.get("variant", "passkey") != "passkey" else "")
        cells.setdefault((key, p["length"]), {}).setdefault(p.get("data", "pydoc"), []).append(float(acc))
    fillers = list(dict.fromkeys(f for by in cells.values() for f in by))
    lines = ["| method | length | " + " | ".join(fillers) + " | mean | worst |",
             "|---|---:|" + "---:|" * (len(fillers) + 2)]
    for (key, length), by in cells.items():
        acc = {f: sum(v) / len(v) for f, v in by.items()}
        worst = min(acc, key=lambda f: (acc[f], f))
        vals = " | ".join(f"{acc[f]:.2f}" if f in acc else "n/a" for f in fillers)
        lines.append(f"| {key} | {length} | {vals} | {sum(acc.values()) / len(acc):.2f} | "
                     f"{acc[worst]:.2f} ({worst}) |")
    return "\n".join(lines)
