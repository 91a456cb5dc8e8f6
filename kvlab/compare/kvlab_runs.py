"""kvlab's side of ``kvlab compare kvpress``: kvlab's methods on kvpress's samples, at kvpress's kept tokens.

kvpress compresses a context by a *ratio* (the fraction of its tokens evicted); a kvlab method keeps a *budget*
of tokens per KV head. On a sample of ``n`` context tokens, ratio ``r`` keeps ``kept = int(n * (1 - r))``
(at least 1: kvpress's own ``compute_n_kept``, so both keep exactly as many), and each kvlab method runs at
that budget (:func:`method_spec`):

    streaming   streaming:sinks=4,window=kept-4          beside StreamingLLMPress
    h2o         h2o:budget=kept,recent=kept//4           beside ObservedAttentionPress (attention it received)
    head-aware  head-aware:budget=kept,profile=P         beside AdaKVPress (per-head budgets)
    haq         haq:budget=kept,profile=P,bits=8/4/2
    snapkv      snapkv:budget=kept,window=min(64,kept),kernel=5      beside SnapKVPress (its defaults)
    pyramidkv   pyramidkv:budget=kept,window=min(64,kept),kernel=5   beside PyramidKVPress
    tova        tova:budget=kept,shared=1                beside TOVAPress (both: every head's mean)
    knorm       knorm:budget=kept                        beside KnormPress
    keydiff     keydiff:budget=kept                      beside KeyDiffPress
    duo         duo:profile=P,sinks=4,window=kept-4      (retrieval heads keep everything)
    full        full                                     beside kvpress without a press ("none")

These are data (:data:`AT_KEPT`); any other registered method, an outside package's too, runs as
``name:budget=kept`` (plus ``profile=P`` when its class has a ``profile`` field).

*Passkey QA*, question-agnostic like kvpress's pipeline: the context streams through kvlab's cache
``chunk_size`` tokens at a time, compressed between chunks and once more after the last one (:func:`compress_now`,
so what the cache holds is measured at the budget); then the question in one pass and greedy decoding. kvpress
prefills the whole context and compresses it once; both compress before the question is seen. Graded and timed
like the worker; peak RSS is the worker's measure (VmHWM, reset per sample) in this process.

*Perplexity*, as kvpress does it: the context in one pass, compressed ONCE to the budget, the continuation scored
in one pass on a cache that then grows without eviction (:func:`unbound` lifts every group's budget).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kvlab.cache import KVCache, make_cache
from kvlab.compare import kvpress as kp
from kvlab.compare.kvpress_worker import peak_rss_bytes, reset_peak_rss  # the worker's own RSS measure
from kvlab.device import synchronize
from kvlab.errors import KvlabError, unknown
from kvlab.evals.haystack import grade  # the one passkey grader (side_by_side re-exports it)

#: how a method sits at kvpress's ``kept`` tokens per KV head: spec templates, filled by :func:`method_spec`
#: (``{window}`` = kept - 4 beside 4 sinks, ``{quarter}`` = kept // 4, ``{obs}`` = min(64, kept): kvpress's window)
AT_KEPT = {
    "streaming": "streaming:sinks=4,window={window}",
    "h2o": "h2o:budget={kept},recent={quarter}",
    "haq": "haq:budget={kept},profile={profile},bits=8/4/2",
    "snapkv": "snapkv:budget={kept},window={obs},kernel=5",
    "pyramidkv": "pyramidkv:budget={kept},window={obs},kernel=5",
    "tova": "tova:budget={kept},shared=1",  # TOVAPress averages the last query's attention over all heads
    "duo": "duo:profile={profile},sinks=4,window={window}",
    "full": "full",
}
METHODS = ("streaming", "h2o", "head-aware", "haq", "snapkv", "pyramidkv", "tova", "knorm", "keydiff", "duo", "full")


class _NeedsProfile:
    """``m in NEEDS_PROFILE``: whether registered method ``m`` has a ``profile`` field (asks the registry)."""

    def __contains__(self, method: object) -> bool:
        from kvlab.methods import registry

        try:
            cls = registry.get(str(method))
        except KvlabError:
            return False
        return any(f.name == "profile" for f in dataclasses.fields(cls))


NEEDS_PROFILE = _NeedsProfile()


def kept_tokens(ratio: float, context_tokens: int) -> int:
    """Tokens per KV head kvpress keeps of ``context_tokens`` at compression ``ratio`` (0 keeps all)."""
    if not 0.0 <= ratio < 1.0:
        raise KvlabError(f"compression ratio must be in [0, 1) (the fraction of the context evicted), got {ratio}")
    return max(1, int(context_tokens * (1 - ratio)))


def method_spec(method: str, kept: int, profile: str | None = None) -> str:
    """The kvlab spec of ``method`` at ``kept`` tokens per KV head (see the module docstring)."""
    from kvlab.methods import registry

    known = registry.names()
    if method not in known:
        raise unknown("kvlab method for the kvpress comparison", method, known)
    if method in NEEDS_PROFILE and not profile:
        raise KvlabError(f"kvlab method '{method}' needs a head profile: give --profile FILE "
                         "(make one with 'kvlab heads profile --model M --output FILE')")
    template = AT_KEPT.get(method)
    if template is None:
        fields = {f.name for f in dataclasses.fields(registry.get(method))}
        if "budget" not in fields:
            raise KvlabError(f"kvlab method '{method}' has no 'budget' setting to set at kvpress's kept tokens")
        template = method + ":budget={kept}" + (",profile={profile}" if "profile" in fields else "")
    if "{window}" in template and kept <= 4:
        raise KvlabError(f"{method} keeps 4 sinks plus a window: {kept} kept tokens leave no window")
    return template.format(kept=kept, window=kept - 4, quarter=kept // 4, obs=min(64, kept), profile=profile)


def compress_now(cache: KVCache) -> None:
    """Evict every group down to its budget now (the cache otherwise does it before the next tokens arrive)."""
    cache.compress()


def unbound(cache: KVCache) -> None:
    """Lift the budget of every group of every full-attention layer: from now on the cache only grows.
    Sliding-window layers keep their window (that is the model's own attention, not compression)."""
    cache.stop_evicting()


def accounting(cache: KVCache) -> dict[str, Any]:
    """What the cache holds: kvlab frees what it evicts, so held = effective (kvpress's AdaKV differs);
    and how kept tokens are positioned (``positions``: re-indexed, original as in kvpress, or mixed by group)."""
    per_head = [n for layer in cache.kept_tokens() for n in layer]
    kept = sum(per_head) / max(len(per_head), 1)
    held = cache.nbytes()
    reindex = {bool(getattr(seg, "reindex", True)) for layer in cache.layers for seg in layer.segments}
    positions = "mixed (re-indexed in some head groups)" if len(reindex) > 1 else \
        "re-indexed" if reindex == {True} else "original, as kvpress"
    return {"cache_bytes": held, "effective_cache_bytes": held, "kept_tokens": kept, "held_tokens": kept,
            "positions": positions}


def _stop_ids(model: Any) -> set:
    stop = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return set(stop if isinstance(stop, (list, tuple, set)) else [stop])  # the worker's rule


def _prefill(model: Any, spec: str, run: Callable[[KVCache], Any]) -> tuple[KVCache, Any, float, dict[str, Any]]:
    """A fresh ``spec`` cache, ``run(cache)`` (the context's forward passes), compressed once to the budget:
    the cache, what ``run`` returned, its seconds (compression included) and :func:`accounting` after it."""
    cache = make_cache(model, spec)
    synchronize(model.device)
    start = time.perf_counter()
    out = run(cache)
    compress_now(cache)
    synchronize(model.device)
    return cache, out, time.perf_counter() - start, accounting(cache)


@torch.no_grad()
def qa_sample(model: Any, tokenizer: Any, spec: str, sample: kp.QASample, *, chunk_size: int,
              max_new_tokens: int) -> dict[str, Any]:
    """One passkey sample on a fresh kvlab cache: the worker's record fields (timings, cache, answer check)."""
    from kvlab.stream import feed, greedy

    dev = model.device
    ctx = torch.tensor([sample.context_ids], dtype=torch.long, device=dev)  # (1, n)
    question = torch.tensor([sample.question_ids], dtype=torch.long, device=dev)  # (1, q)
    # one row of logits per chunk (keep_last_logits=False would project all)
    cache, _, prefill_s, acct = _prefill(model, spec, lambda c: feed(model, c, ctx, chunk_size))
    start = time.perf_counter()
    logits = feed(model, cache, question, question.shape[1])  # (1, vocab)
    synchronize(dev)
    question_s = time.perf_counter() - start
    start = time.perf_counter()
    generated = list(greedy(model, cache, logits, max_new_tokens, _stop_ids(model)))
    decode_s = time.perf_counter() - start
    steps = len(generated) - 1  # forward passes after the question's (the last token is never fed back)
    text = tokenizer.decode(generated, skip_special_tokens=True)
    contains, exact = grade(text, str(sample.answer))
    return {**acct, "context_tokens": ctx.shape[1], "prefill_s": prefill_s, "question_s": question_s,
            "decode_s": decode_s, "decode_steps": steps, "decode_tok_s": steps / decode_s if steps and decode_s > 0
            else None, "generated_tokens": len(generated), "generated_text": text, "answer": str(sample.answer),
            "contains": contains, "exact_match": exact}


@torch.no_grad()
def ppl_sample(model: Any, spec: str, sample: kp.PplSample) -> dict[str, Any]:
    """One (context, continuation): prefill, compress once, score the continuation with no further eviction."""
    import math

    dev = model.device
    ctx = torch.tensor([sample.context_ids], dtype=torch.long, device=dev)  # (1, n)
    cont = torch.tensor([sample.continuation_ids], dtype=torch.long, device=dev)  # (1, m)
    cache, first, prefill_s, acct = _prefill(  # first: (vocab,), the prediction of cont[0]
        model, spec, lambda c: model(input_ids=ctx, past_key_values=c, use_cache=True, logits_to_keep=1).logits[0, -1])
    unbound(cache)
    start = time.perf_counter()
    logits = model(input_ids=cont, past_key_values=cache, use_cache=True).logits[0]  # (m, vocab)
    synchronize(dev)
    score_s = time.perf_counter() - start
    logits = torch.cat([first[None], logits[:-1]], dim=0).float()  # row i predicts cont[i]
    nll = float(torch.nn.functional.cross_entropy(logits, cont[0], reduction="sum"))
    m = cont.shape[1]
    return {**acct, "context_tokens": ctx.shape[1], "prefill_s": prefill_s, "score_s": score_s, "scored_tokens": m,
            "nll_sum": nll, "ppl": math.exp(nll / m)}


def _warm_up(model: Any, spec: str) -> None:
    """A short prefill and one step on this method's code path, so the first timed sample pays no one-time costs."""
    from kvlab.stream import feed

    cache = make_cache(model, spec)
    feed(model, cache, torch.arange(100, 116, device=model.device)[None], 16)
    feed(model, cache, torch.tensor([[100]], device=model.device), 1)


def run_kvlab(model: Any, tokenizer: Any, task: str, samples: Sequence[kp.QASample | kp.PplSample],
              methods: Sequence[str], ratios: Sequence[float], *, profile: str | None = None, chunk_size: int = 512,
              max_new_tokens: int = 16, on_record: Callable[[dict], None] | None = None) -> list[dict[str, Any]]:
    """kvlab's ``methods`` at every ratio on ``samples`` (task "qa" or "ppl"); one dict per (method, ratio)
    shaped like :func:`kvlab.compare.kvpress.summarize`'s, plus ``specs`` (one per sample). A (method, ratio)
    that fails (e.g. a head class left with fewer tokens than its recent window) is reported, the others run."""
    runs = [(m, 0.0 if m == "full" else r) for m in methods for r in ([0.0] if m == "full" else ratios)]
    out, warmed = [], set()
    for method, ratio in runs:
        specs: list[str] = []
        records, error = [], None
        try:
            specs = [method_spec(method, kept_tokens(ratio, len(s.context_ids)), profile) for s in samples]
            if method not in warmed:
                with torch.no_grad():
                    _warm_up(model, specs[0])
                warmed.add(method)
            for i, (spec, sample) in enumerate(zip(specs, samples)):
                reset = reset_peak_rss()
                if task == "qa":
                    rec = qa_sample(model, tokenizer, spec, sample, chunk_size=chunk_size,
                                    max_new_tokens=max_new_tokens)
                else:
                    rec = ppl_sample(model, spec, sample)
                rec = {"type": "result", "implementation": "kvlab", "press": method, "ratio": ratio, "sample": i,
                       "spec": spec, **rec, "peak_rss_bytes": peak_rss_bytes(),
                       "peak_rss_scope": "sample" if reset else "process"}
                records.append(rec)
                if on_record is not None:
                    on_record(rec)
        except KvlabError as exc:
            error = f"KvlabError: {exc}"
            if on_record is not None:
                on_record({"type": "error", "implementation": "kvlab", "press": method, "ratio": ratio, "error": error})
        metrics = kp.aggregate(records, task) if records and error is None else {}  # the kvpress side's aggregation
        out.append({"implementation": "kvlab", "press": method, "ratio": ratio, "task": task, "error": error,
                    "metrics": metrics, "samples": records, "specs": specs,
                    "positions": records[0]["positions"] if records else None})
    return out


def workload_s(result: dict[str, Any]) -> float | None:
    """Mean seconds per sample of the whole workload: prefill + question + decode, or prefill + scoring."""
    samples = result.get("samples") or []
    if not samples or result.get("error"):
        return None
    parts = ("prefill_s", "question_s", "decode_s", "score_s")
    return sum(sum(float(s.get(k) or 0.0) for k in parts) for s in samples) / len(samples)
