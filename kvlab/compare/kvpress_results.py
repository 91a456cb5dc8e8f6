"""The kvpress worker's answer lines as metrics and as the lab's rows (eval ``kvpress``).

The worker sends one ``result`` line per (press, ratio, sample) and an ``error`` line when a press fails
(:mod:`kvlab.compare.kvpress_worker`). :func:`summarize` groups them per (press, ratio), :func:`aggregate`
makes one cell's metrics from its samples (kvlab's own per-sample records have the same keys), and
:func:`to_rows` writes the rows, with kvpress's versions beside kvlab's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from kvlab.results import make_row

HIGHER_IS_BETTER = {"accuracy": True, "exact_match": True, "ppl": False, "nll": False, "prefill_s": False,
                    "prefill_tok_s": True, "decode_tok_s": True, "cache_bytes": False,
                    "effective_cache_bytes": False, "peak_rss_bytes": False}


def summarize(hello: dict[str, Any], records: Sequence[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    """One dict per (press, ratio), in the order they ran: its metrics over the samples, or its error."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for record in records:
        groups.setdefault((record["press"], float(record["ratio"])), []).append(record)
    out = []
    for (press, ratio), group in groups.items():
        results = [r for r in group if r["type"] == "result"]
        errors = [r["error"] for r in group if r["type"] == "error"]
        metrics = aggregate(results, task) if results and not errors else {}
        if results:
            metrics["note"] = (f"kvpress {hello.get('kvpress')}, transformers {hello.get('transformers')}, "
                               f"attention {results[0].get('attn_implementation')}, {len(results)} samples")
        out.append({"press": press, "ratio": ratio, "task": task, "error": errors[0] if errors else None,
                    "metrics": metrics, "samples": results, "kvpress_version": hello.get("kvpress"),
                    "transformers_version": hello.get("transformers")})
    return out


def aggregate(results: list[dict], task: str) -> dict[str, Any]:
    """The metrics of one (press, ratio) from its per-sample records (the worker's or kvlab's): means of
    accuracy or perplexity, timings, kept tokens and bytes."""
    def mean(key: str) -> float:
        return sum(float(r[key]) for r in results) / len(results)

    prefill = sum(r["prefill_s"] for r in results)
    metrics: dict[str, Any] = {
        "samples": len(results), "context_tokens": mean("context_tokens"), "kept_tokens": mean("kept_tokens"),
        "held_tokens": mean("held_tokens"), "cache_bytes": mean("cache_bytes"),
        "effective_cache_bytes": mean("effective_cache_bytes"), "prefill_s": mean("prefill_s"),
        "prefill_tok_s": sum(r["context_tokens"] for r in results) / prefill if prefill > 0 else None,
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in results),
    }
    if task == "qa":
        steps, decode = sum(r["decode_steps"] for r in results), sum(r["decode_s"] for r in results)
        metrics.update(accuracy=mean("contains"), exact_match=mean("exact_match"),
                       decode_tok_s=steps / decode if steps and decode > 0 else None, question_s=mean("question_s"))
    else:
        tokens = sum(r["scored_tokens"] for r in results)
        nll = sum(r["nll_sum"] for r in results) / tokens
        metrics.update(ppl=math.exp(nll), nll=nll, scored_tokens=tokens)
    return metrics


def to_rows(results: Sequence[dict[str, Any]], config: dict[str, Any], *, device: str | None = None) -> list[dict]:
    """The lab's rows (eval "kvpress"), one per (press, ratio); kvpress's own versions go under ``versions``."""
    rows = []
    for res in results:
        cfg = {**config, "implementation": "kvpress", "method": res["press"], "ratio": res["ratio"], "task": res["task"]}
        row = make_row("kvpress", cfg, res["metrics"], higher_is_better=HIGHER_IS_BETTER, error=res["error"],
                       device=device, runtime_s=sum(s["prefill_s"] + s.get("decode_s", 0.0) for s in res["samples"]))
        row["versions"] = {**row["versions"], "kvpress": res["kvpress_version"],
                           "kvpress_transformers": res["transformers_version"]}
        rows.append(row)
    return rows
