"""Decode latency per token as the sequence grows, and prefill time, for one method.

One run (repeated ``runs`` times, a fresh cache each time) over ``tokens`` tokens of ``data``:

1. prefill the first ``prefill`` tokens (``chunk_size`` per forward) — timed as ``prefill_s``;
2. ``warmup`` single-token decode steps, not timed;
3. up to position ``tokens``: ``probe_steps`` timed single-token steps every ``probe_every`` positions,
   the positions in between fed ``chunk_size`` at a time (untimed, to reach long sequences quickly).
   ``probe_every == probe_steps`` times every token (the exact per-token curve; slow on a CPU).

Decode steps feed the text's next token (teacher forcing), so every method does the same work per step
and a run is deterministic. Timings are wall-clock around the forward pass, synchronized on CUDA.
Metrics: ``decode_ms_median`` / ``decode_ms_p90`` over every timed step of every run, ``prefill_s``
(median over runs), and the curve ``positions`` / ``decode_ms`` (median per probe) with
``latency_growth`` = last probe / first probe (about 1 when flat).

:func:`evaluate_many` interleaves the runs of several methods (run 1 of each, then run 2, ...) so that
load drifting on a shared machine slows every method alike; ``kvlab latency`` uses it.

Cost: ``prefill`` + ``warmup`` + (probes x ``probe_steps``) single-token steps and a chunked fast-forward
to ``tokens`` per run. Defaults (5000 tokens, 200 warm-up steps, probes of 8 steps every 500 positions,
3 runs): about 5 minutes per method for SmolLM2-135M on a shared 2-core CPU (a decode step there is
100-500 ms); ``--runs 1 --tokens 2500`` gives a first look in about a minute per method; ``--dense``
times every token (slow on a CPU).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from kvlab.cache import make_cache
from kvlab.device import synchronize
from kvlab.errors import KvlabError
from kvlab.evals.common import position_note
from kvlab.evals.memory import load_ids
from kvlab.stream import feed

HIGHER_IS_BETTER = {"decode_ms_median": False, "decode_ms_p90": False, "prefill_s": False,
                    "prefill_tok_s": True, "decode_tok_s": True, "latency_growth": False, "kv_bytes_peak": False}


@dataclass
class Params:
    """See the module docstring; ``prefill + warmup + probe_steps <= tokens``."""

    tokens: int = 5000
    prefill: int = 512
    warmup: int = 200
    runs: int = 3
    probe_every: int = 500
    probe_steps: int = 8
    chunk_size: int = 512
    data: str = "pydoc"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("tokens", "prefill", "runs", "probe_every", "probe_steps", "chunk_size"):
            if getattr(self, name) < 1:
                raise KvlabError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise KvlabError(f"warmup must be >= 0, got {self.warmup}")
        if self.probe_steps > self.probe_every:
            raise KvlabError(f"probe_steps ({self.probe_steps}) cannot exceed probe_every ({self.probe_every})")
        if self.prefill + self.warmup + self.probe_steps > self.tokens:
            raise KvlabError(f"tokens ({self.tokens}) must cover prefill ({self.prefill}) + warmup ({self.warmup}) "
                             f"+ one probe ({self.probe_steps})")


def probe_starts(params: Params) -> list[int]:
    """Positions where timed probes start (each lasts ``probe_steps`` tokens)."""
    first = params.prefill + params.warmup
    return list(range(first, params.tokens - params.probe_steps + 1, params.probe_every))


@torch.no_grad()
def _run(model, method: str, ids: torch.Tensor, params: Params) -> tuple[float, list[list[float]], int]:
    """One run: ``(prefill seconds, per-probe step times in ms, peak KV bytes)``."""
    device = model.device
    cache = make_cache(model, method)
    synchronize(device)
    start = time.perf_counter()
    feed(model, cache, ids[:, :params.prefill], params.chunk_size)
    synchronize(device)
    prefill_s = time.perf_counter() - start
    pos = params.prefill
    for _ in range(params.warmup):
        model(input_ids=ids[:, pos:pos + 1], past_key_values=cache, use_cache=True)
        pos += 1
    probes: list[list[float]] = []
    for begin in probe_starts(params):
        if begin > pos:  # fast-forward to the probe
            feed(model, cache, ids[:, pos:begin], params.chunk_size)
            pos = begin
        times = []
        for _ in range(params.probe_steps):
            synchronize(device)
            t0 = time.perf_counter()
            model(input_ids=ids[:, pos:pos + 1], past_key_values=cache, use_cache=True)
            synchronize(device)
            times.append(1000.0 * (time.perf_counter() - t0))
            pos += 1
        probes.append(times)
    return prefill_s, probes, cache.peak_nbytes


@dataclass
class Run:
    """One run's measurements: prefill seconds, per-probe step times (ms), peak KV bytes, wall time."""

    prefill_s: float
    probes: list[list[float]]
    kv_bytes_peak: int
    seconds: float


def measure(model, method: str, ids: torch.Tensor, params: Params) -> Run:
    """One run of ``method`` over ``ids (1, params.tokens)`` (a fresh cache)."""
    start = time.perf_counter()
    prefill_s, probes, peak = _run(model, method, ids, params)
    return Run(prefill_s, probes, peak, time.perf_counter() - start)


def summarize(runs: list[Run], params: Params) -> dict:
    """One row's metrics from the runs of one method."""
    steps = sorted(t for run in runs for times in run.probes for t in times)
    curve = [statistics.median(t for run in runs for t in run.probes[j]) for j in range(len(runs[0].probes))]
    median = statistics.median(steps)
    prefill_s = statistics.median(run.prefill_s for run in runs)
    return {
        "decode_ms_median": median,
        "decode_ms_p90": _quantile(steps, 0.9),
        "decode_tok_s": 1000.0 / median,
        "prefill_s": prefill_s,
        "prefill_tok_s": params.prefill / prefill_s,
        "latency_growth": curve[-1] / curve[0],
        "kv_bytes_peak": max(run.kv_bytes_peak for run in runs),
        "timed_steps": len(steps),
        "runtime_s": sum(run.seconds for run in runs),
        "positions": [p + params.probe_steps // 2 for p in probe_starts(params)],
        "decode_ms": curve,
    }


def not_applicable(model, method: str, params: Params) -> dict | None:
    """The row's metrics when ``params.tokens`` is past the model's positions for ``method``, else None."""
    note = position_note(model, method, params.tokens)
    return {"decode_ms_median": None, "decode_ms_p90": None, "prefill_s": None, "note": note} if note else None


def evaluate(model, tokenizer, method: str, params: Params, *, progress: bool = False) -> dict:
    """Latency of ``method`` over ``params.tokens`` tokens (``params.runs`` runs in a row); one row's metrics."""
    return evaluate_many(model, tokenizer, [method], params, progress=progress)[method]


def evaluate_many(model, tokenizer, methods: list[str], params: Params, *, progress: bool = False) -> dict[str, dict]:
    """``{method: metrics}``, the runs interleaved (run 1 of every method, then run 2, ...), so that a
    machine whose load drifts during the measurement slows every method alike."""
    ids = load_ids(tokenizer, params.data, params.tokens).to(model.device)
    out: dict[str, dict] = {}
    live = []
    for m in methods:
        na = not_applicable(model, m, params)
        if na is None:
            live.append(m)
        else:
            out[m] = na
    runs: dict[str, list[Run]] = {m: [] for m in live}
    bar = tqdm(total=params.runs * len(live), desc="latency", disable=not progress, leave=False)
    for _ in range(params.runs):
        for m in live:
            runs[m].append(measure(model, m, ids, params))
            bar.update(1)
    bar.close()
    return {m: out[m] if m in out else summarize(runs[m], params) for m in methods}


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated quantile of already sorted values (numpy's default method)."""
    x = q * (len(sorted_values) - 1)
    lo = int(x)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (x - lo)
