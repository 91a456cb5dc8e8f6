"""kvlab's methods on kvpress's samples, and the combined run behind ``kvlab compare kvpress`` (issue 6).

kvpress compresses a context by a *ratio* (the fraction of its tokens evicted); a kvlab method keeps a *budget*
of tokens per KV head. On a sample of ``n`` context tokens, ratio ``r`` keeps ``kept = int(n * (1 - r))``
(at least 1: kvpress's own ``compute_n_kept``, so both keep exactly as many), and each kvlab method runs at
that budget (:func:`method_spec`):

    streaming   streaming:sinks=4,window=kept-4          beside StreamingLLMPress
    h2o         h2o:budget=kept,recent=kept//4           beside ObservedAttentionPress (attention it received)
    head-aware  head-aware:budget=kept,profile=P         beside AdaKVPress (per-head budgets)
    haq         haq:budget=kept,profile=P,bits=8/4/2
    full        full                                     beside kvpress without a press ("none")

Both libraries get the same token ids (:func:`kvlab.compare.kvpress.passkey_samples` / ``ppl_samples``).

*Passkey QA*, question-agnostic like kvpress's pipeline: the context streams through kvlab's cache
``chunk_size`` tokens at a time, compressed between chunks and once more after the last one (:func:`compress_now`,
so what the cache holds is measured at the budget); then the question in one pass and greedy decoding. kvpress
prefills the whole context and compresses it once; both compress before the question is seen. Graded and timed
like the worker; peak RSS is the worker's measure (VmHWM, reset per sample) in this process.

*Perplexity*, as kvpress does it: the context in one pass, compressed ONCE to the budget, the continuation scored
in one pass on a cache that then grows without eviction (:func:`unbound` lifts every group's budget).

What still differs, and is written in each kvlab row's ``notes``: kvpress keeps kept tokens at their original
positions, kvlab's ``streaming`` re-indexes them (StreamingLLM, section 3.2; ``h2o`` keeps the original ones, and
``head-aware`` mixes by head class); kvlab's H2O keeps a recent window and ranks by summed attention, kvpress's
ObservedAttention by attention averaged over the queries that could see each token.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvlab.cache import KVCache, make_cache
from kvlab.compare import kvpress as kp
from kvlab.compare.kvpress_worker import _peak_rss_bytes, _reset_peak_rss  # the worker's own RSS measure
from kvlab.device import synchronize
from kvlab.errors import KvlabError, unknown
from kvlab.results import make_row

EVAL = "compare_kvpress"
METHODS = ("streaming", "h2o", "head-aware", "haq", "full")
NEEDS_PROFILE = ("head-aware", "haq")
HIGHER_IS_BETTER = {**kp.HIGHER_IS_BETTER, "kv_bytes": False, "workload_s": False}


def kept_tokens(ratio: float, context_tokens: int) -> int:
    """Tokens per KV head kvpress keeps of ``context_tokens`` at compression ``ratio`` (0 keeps all)."""
    if not 0.0 <= ratio < 1.0:
        raise KvlabError(f"compression ratio must be in [0, 1) (the fraction of the context evicted), got {ratio}")
    return max(1, int(context_tokens * (1 - ratio)))


def method_spec(method: str, kept: int, profile: str | None = None) -> str:
    """The kvlab spec of ``method`` at ``kept`` tokens per KV head (see the module docstring)."""
    if method not in METHODS:
        raise unknown("kvlab method for the kvpress comparison", method, METHODS)
    if method in NEEDS_PROFILE and not profile:
        raise KvlabError(f"kvlab method '{method}' needs a head profile: give --profile FILE "
                         "(make one with 'kvlab heads profile --model M --output FILE')")
    if method == "streaming":
        if kept <= 4:
            raise KvlabError(f"streaming keeps 4 sinks plus a window: {kept} kept tokens leave no window")
        return f"streaming:sinks=4,window={kept - 4}"
    if method == "h2o":
        return f"h2o:budget={kept},recent={kept // 4}"
    if method == "head-aware":
        return f"head-aware:budget={kept},profile={profile}"
    if method == "haq":
        return f"haq:budget={kept},profile={profile},bits=8/4/2"
    return "full"


def grade(text: str, answer: str) -> tuple[bool, bool]:
    """(contains, exact_match) of a generated ``text``: the worker's rule (the answer as a whole word; the
    whole answer, spaces collapsed and outer dots dropped)."""
    import re

    contains = re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", text) is not None
    return contains, " ".join(text.split()).strip(" .") == answer.strip()


def compress_now(cache: KVCache) -> None:
    """Evict every group down to its budget now (the cache otherwise does it before the next tokens arrive)."""
    for layer in cache.layers:
        for seg in layer.segments:
            seg.compress()


def unbound(cache: KVCache) -> None:
    """Lift the budget of every group of every full-attention layer: from now on the cache only grows.
    Sliding-window layers keep their window (that is the model's own attention, not compression)."""
    for layer in cache.layers:
        if not layer.is_sliding:
            for seg in layer.segments:
                seg.group = dataclasses.replace(seg.group, budget=None)


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


@torch.no_grad()
def qa_sample(model: Any, tokenizer: Any, spec: str, sample: kp.QASample, *, chunk_size: int,
              max_new_tokens: int) -> dict[str, Any]:
    """One passkey sample on a fresh kvlab cache: the worker's record fields (timings, cache, answer check)."""
    from kvlab.stream import feed, greedy

    dev = model.device
    ctx = torch.tensor([sample.context_ids], dtype=torch.long, device=dev)  # (1, n)
    question = torch.tensor([sample.question_ids], dtype=torch.long, device=dev)  # (1, q)
    cache = make_cache(model, spec)
    synchronize(dev)
    start = time.perf_counter()
    feed(model, cache, ctx, chunk_size)  # one row of logits per chunk (keep_last_logits=False would project all)
    compress_now(cache)
    synchronize(dev)
    prefill_s = time.perf_counter() - start
    acct = accounting(cache)
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
    cache = make_cache(model, spec)
    synchronize(dev)
    start = time.perf_counter()
    first = model(input_ids=ctx, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]  # (vocab,)
    compress_now(cache)
    synchronize(dev)
    prefill_s = time.perf_counter() - start
    acct = accounting(cache)
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
                reset = _reset_peak_rss()
                if task == "qa":
                    rec = qa_sample(model, tokenizer, spec, sample, chunk_size=chunk_size,
                                    max_new_tokens=max_new_tokens)
                else:
                    rec = ppl_sample(model, spec, sample)
                rec = {"type": "result", "implementation": "kvlab", "press": method, "ratio": ratio, "sample": i,
                       "spec": spec, **rec, "peak_rss_bytes": _peak_rss_bytes(),
                       "peak_rss_scope": "sample" if reset else "process"}
                records.append(rec)
                if on_record is not None:
                    on_record(rec)
        except KvlabError as exc:
            error = f"KvlabError: {exc}"
            if on_record is not None:
                on_record({"type": "error", "implementation": "kvlab", "press": method, "ratio": ratio, "error": error})
        metrics = kp._metrics(records, task) if records and error is None else {}  # the kvpress side's aggregation
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


def to_rows(results: Sequence[dict[str, Any]], base: dict[str, Any], params: dict[str, Any], *,
            device: str | None = None, notes: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One row (eval ``compare_kvpress``) per (implementation, method or press, ratio).

    ``base``: model, device, dtype; ``params``: the run's settings (task, samples, context_tokens, ...), stored
    as the lab's ``params`` with the implementation and ratio, so ``kvlab report`` groups the rows by them."""
    rows = []
    for res in results:
        impl = res.get("implementation", "kvpress")
        samples = res["samples"]
        kept = sum(kept_tokens(res["ratio"], s["context_tokens"]) for s in samples) / len(samples) if samples \
            else None
        config = {**base, "implementation": impl, "method": res["press"], "ratio": res["ratio"], "kept_tokens": kept,
                  "task": params["task"], "samples": params["samples"], "context_tokens": params["context_tokens"],
                  "params": {**params, "implementation": impl, "ratio": res["ratio"]}}
        if impl == "kvlab":
            config["specs"] = res["specs"]
        metrics = dict(res["metrics"])
        if metrics:
            metrics.update(kv_bytes=metrics["cache_bytes"], workload_s=workload_s(res))
            if any("generated_text" in s for s in samples):
                metrics["answers"] = [s.get("generated_text") for s in samples]
        runtime = sum(float(s.get(k) or 0.0) for s in samples for k in ("prefill_s", "question_s", "decode_s",
                                                                          "score_s"))
        note = "; ".join(filter(None, [(notes or {}).get(impl), res.get("positions") and
                                       f"kept positions {res['positions']}"])) or None
        row = make_row(EVAL, config, metrics, higher_is_better=HIGHER_IS_BETTER, error=res["error"], device=device,
                       runtime_s=runtime, notes=note)
        if impl == "kvpress":
            row["versions"] = {**row["versions"], "kvpress": res.get("kvpress_version"),
                               "kvpress_transformers": res.get("transformers_version")}
        rows.append(row)
    return rows


@dataclass
class Comparison:
    """One side-by-side run. ``task``: passkey | ppl; ``ratios``: kvpress compression ratios; ``presses``: kvpress
    press names; ``methods``: kvlab methods (:data:`METHODS`, at the same kept tokens); ``profile``: the head
    profile of head-aware/haq; ``full``: add both full caches (kvpress "none", kvlab "full"); ``samples`` of
    ``context_tokens`` (ppl: then ``continuation_tokens`` of ``data`` scored); ``chunk_size``: kvlab's context
    tokens per forward pass in the passkey task; ``timeout_s`` bounds the kvpress worker."""

    task: str = "passkey"
    ratios: tuple[float, ...] = (0.25, 0.5, 0.75)
    presses: tuple[str, ...] = ("StreamingLLMPress", "SnapKVPress", "ObservedAttentionPress", "ExpectedAttentionPress",
                                "AdaKVPress(SnapKVPress)")
    methods: tuple[str, ...] = ("streaming", "h2o")
    profile: str | None = None
    full: bool = False
    samples: int = 3
    context_tokens: int = 1024
    continuation_tokens: int = 256
    data: str = "pydoc"
    chunk_size: int = 512
    max_new_tokens: int = 16
    seed: int = 0
    timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        self.ratios, self.presses, self.methods = (tuple(dict.fromkeys(x)) for x in (self.ratios, self.presses,
                                                                                     self.methods))
        if not self.ratios or not self.presses:
            raise KvlabError("the kvpress comparison needs at least one ratio and one press")
        for ratio in self.ratios:  # kvpress's own checks of every setting, with its messages
            kp.Params(task=self.task, ratio=ratio, samples=self.samples, context_tokens=self.context_tokens,
                      continuation_tokens=self.continuation_tokens, max_new_tokens=self.max_new_tokens,
                      timeout_s=self.timeout_s)
        if self.chunk_size < 1:
            raise KvlabError(f"chunk_size must be at least 1, got {self.chunk_size}")
        for method in self.methods:
            method_spec(method, 1024, self.profile)  # unknown names and a missing --profile, before any model loads
        if any(m in NEEDS_PROFILE for m in self.methods):
            from pathlib import Path

            if not Path(str(self.profile)).is_file():
                raise KvlabError(f"head profile '{self.profile}' not found")
            if any(c in str(self.profile) for c in ",=:"):
                raise KvlabError(f"the head profile path '{self.profile}' must not contain ',', '=' or ':' "
                                 "(it goes into a method spec)")

    @property
    def worker_task(self) -> str:
        return "qa" if self.task == "passkey" else "ppl"

    def params(self) -> dict[str, Any]:
        """The settings every row of the run shares (the lab's ``params``)."""
        out: dict[str, Any] = {"task": self.task, "samples": self.samples, "context_tokens": self.context_tokens}
        if self.task == "passkey":
            out.update(max_new_tokens=self.max_new_tokens, chunk_size=self.chunk_size)
        else:
            out.update(continuation_tokens=self.continuation_tokens, data=self.data)
        return {**out, "seed": self.seed}

    def make_samples(self, tokenizer: Any) -> list[kp.QASample] | list[kp.PplSample]:
        if self.task == "passkey":
            return kp.passkey_samples(tokenizer, self.samples, self.context_tokens, self.seed)
        return kp.ppl_samples(tokenizer, self.samples, self.context_tokens, self.continuation_tokens, self.data)


KVLAB_NOTE = {"passkey": "kvlab: context fed {chunk} tokens per pass, compressed between passes and after the last",
              "ppl": "kvlab: context in one pass, compressed once, continuation scored with no further eviction"}


def available_methods(methods: Sequence[str], echo: Callable[[str], None] = print) -> list[str]:
    """``methods`` this kvlab has registered (``haq`` may not be); the others are skipped with a message."""
    from kvlab.methods import names

    have = set(names())
    for m in methods:
        if m not in have:
            echo(f"skipping kvlab method '{m}': this kvlab has no such method (it has: {', '.join(sorted(have))})")
    return [m for m in methods if m in have]


def run_comparison(model: Any, tokenizer: Any, cmp: Comparison, *, model_name: str, device: str = "auto",
                   dtype: str = "auto", venv: str | None = None,
                   echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """kvpress (one worker run: every press x ratio) then kvlab on the same samples; the rows of both.

    A missing kvpress environment, a model not loaded from a local folder, a profile of another model or a
    press kvpress lacks is a KvlabError (one line) before anything is measured or written."""
    python = kp.kvpress_python(venv)  # a missing environment is the first thing to say
    folder = kp.model_folder(model)
    methods = available_methods([*cmp.methods, *(["full"] if cmp.full else [])], echo)
    from kvlab.methods import build

    for m in (m for m in methods if m in NEEDS_PROFILE):
        build(method_spec(m, 1024, cmp.profile)).prepare(model)  # the profile must fit this model
    samples = cmp.make_samples(tokenizer)
    presses = [*(["none"] if cmp.full else []), *cmp.presses]

    def progress(record: dict) -> None:
        if record.get("type") == "result":
            echo(f"  {record.get('implementation', 'kvpress')} {record['press']} ratio {record['ratio']:g} "
                 f"sample {record['sample']}: prefill {record['prefill_s']:.2f}s")
        elif record.get("type") == "error":
            echo(f"  {record.get('implementation', 'kvpress')} {record['press']} ratio {record['ratio']:g} failed: "
                 f"{record['error']}")

    echo(f"kvpress: {len(presses)} presses x {len(cmp.ratios)} ratios x {len(samples)} samples (one worker run)")
    press_results = kp.run_kvpress(folder, cmp.worker_task, samples, presses, cmp.ratios, device=str(model.device),
                                   dtype=str(model.dtype).replace("torch.", ""), seed=cmp.seed,
                                   max_new_tokens=cmp.max_new_tokens, threads=torch.get_num_threads(),
                                   timeout_s=cmp.timeout_s, venv=str(python.parent.parent), on_record=progress)
    echo(f"kvlab: {len(methods)} methods x {len(cmp.ratios)} ratios x {len(samples)} samples")
    lab_results = run_kvlab(model, tokenizer, cmp.worker_task, samples, methods, cmp.ratios, profile=cmp.profile,
                            chunk_size=cmp.chunk_size, max_new_tokens=cmp.max_new_tokens, on_record=progress)
    base = {"model": model_name, "device": device, "dtype": dtype}
    notes = {"kvlab": KVLAB_NOTE[cmp.task].format(chunk=cmp.chunk_size)}
    return to_rows([*press_results, *lab_results], base, cmp.params(), device=str(model.device), notes=notes)
