"""The combined run behind ``kvlab compare kvpress`` (issue 6): kvpress's presses in their own environment
(:mod:`kvlab.compare.kvpress`), kvlab's methods on the same token ids at the same kept tokens
(:mod:`kvlab.compare.kvlab_runs`), one row per (implementation, method or press, ratio).

What still differs, and is written in each kvlab row's ``notes``: kvpress keeps kept tokens at their original
positions, kvlab's ``streaming`` re-indexes them (StreamingLLM, section 3.2; ``h2o`` keeps the original ones, and
``head-aware`` mixes by head class); kvlab's H2O keeps a recent window and ranks by summed attention, kvpress's
ObservedAttention by attention averaged over the queries that could see each token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvlab.compare import kvpress as kp
from kvlab.compare.kvlab_runs import (METHODS, NEEDS_PROFILE, accounting, compress_now, grade, kept_tokens,  # noqa: F401
                                      method_spec, ppl_sample, qa_sample, run_kvlab, unbound, workload_s)
from kvlab.errors import KvlabError
from kvlab.results import make_row

EVAL = "compare_kvpress"
HIGHER_IS_BETTER = {**kp.HIGHER_IS_BETTER, "kv_bytes": False, "workload_s": False}


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
                   echo: Callable[[str], None] = print, progress: bool = True) -> list[dict[str, Any]]:
    """kvpress (one worker run: every press x ratio) then kvlab on the same samples; the rows of both.
    ``echo`` says what runs (with a line per sample when ``progress``) and what failed.

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

    def report(record: dict) -> None:
        if record.get("type") == "result" and progress:
            echo(f"  {record.get('implementation', 'kvpress')} {record['press']} ratio {record['ratio']:g} "
                 f"sample {record['sample']}: prefill {record['prefill_s']:.2f}s")
        elif record.get("type") == "error":
            echo(f"  {record.get('implementation', 'kvpress')} {record['press']} ratio {record['ratio']:g} failed: "
                 f"{record['error']}")

    echo(f"kvpress: {len(presses)} presses x {len(cmp.ratios)} ratios x {len(samples)} samples (one worker run)")
    press_results = kp.run_kvpress(folder, cmp.worker_task, samples, presses, cmp.ratios, device=str(model.device),
                                   dtype=str(model.dtype).replace("torch.", ""), seed=cmp.seed,
                                   max_new_tokens=cmp.max_new_tokens, threads=torch.get_num_threads(),
                                   timeout_s=cmp.timeout_s, venv=str(python.parent.parent), on_record=report)
    echo(f"kvlab: {len(methods)} methods x {len(cmp.ratios)} ratios x {len(samples)} samples")
    lab_results = run_kvlab(model, tokenizer, cmp.worker_task, samples, methods, cmp.ratios, profile=cmp.profile,
                            chunk_size=cmp.chunk_size, max_new_tokens=cmp.max_new_tokens, on_record=report)
    base = {"model": model_name, "device": device, "dtype": dtype}
    notes = {"kvlab": KVLAB_NOTE[cmp.task].format(chunk=cmp.chunk_size)}
    return to_rows([*press_results, *lab_results], base, cmp.params(), device=str(model.device), notes=notes)
