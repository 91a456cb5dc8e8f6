"""What the benchmarks share: a prefill then timed greedy decode steps through a method's cache, with the
seconds spent inside one storage method (cache update, dequantization) added up per step; a count of the torch
calls a step makes; the run's metadata, its result files, the parsing of comma-separated arguments, and a script's
entry point (:func:`run_script`)."""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

import kvlab
from kvlab.device import synchronize
from kvlab.errors import KvlabError
from kvlab.results import git_hash, machine, versions, write_json_atomic, write_text_atomic
from kvlab.stream import feed


class CountCalls(TorchFunctionMode):
    """Counts the torch functions and tensor methods called from Python while active (about one kernel launch each
    on a GPU, where a decode step at batch 1 is bound by launches)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


class Inside:
    """While in the ``with`` block, adds up the seconds spent in ``cls.name`` (wrapped, then restored)."""

    def __init__(self, cls: type, name: str) -> None:
        self.cls, self.name, self.seconds = cls, name, 0.0
        self._orig = getattr(cls, name)

    def __enter__(self) -> Inside:
        timer, orig = self, self._orig

        def timed(*args, **kwargs):
            t = time.perf_counter()
            out = orig(*args, **kwargs)
            timer.seconds += time.perf_counter() - t
            return out

        setattr(self.cls, self.name, timed)
        return self

    def __exit__(self, *exc) -> None:
        setattr(self.cls, self.name, self._orig)


@torch.no_grad()
def greedy_step(model: Any, cache: Any, token: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One greedy decode step through ``cache``: ``token (B, 1)`` -> the next ``(B, 1)``; ``mask (B, n)`` the batch's
    attention mask including the new token, if any."""
    logits = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1]
    return logits.argmax(-1, keepdim=True)


@torch.no_grad()
def decode(model: Any, ids: torch.Tensor, spec: str, steps: int, warmup: int, chunk: int,
           inside: Inside) -> tuple[Any, dict[str, Any]]:
    """Prefill ``ids (1, n)`` ``chunk`` tokens at a time through a fresh ``spec`` cache, then ``warmup`` +
    ``steps`` greedy decode steps, timed one by one. Returns the cache and the figures: prefill seconds,
    median step ms, tokens/s, and ``inside_ms`` / ``inside_share`` (median ms per step / share of all timed
    step time spent in ``inside``'s method)."""
    cache = kvlab.make_cache(model, spec)
    t0 = time.perf_counter()
    logits = feed(model, cache, ids, chunk)
    prefill = time.perf_counter() - t0
    token = logits.argmax(-1, keepdim=True)
    times, spent = [], []
    with inside:
        for i in range(warmup + steps):
            before = inside.seconds
            synchronize(model.device)
            t = time.perf_counter()
            logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1]
            token = logits.argmax(-1, keepdim=True)
            synchronize(model.device)
            if i >= warmup:
                times.append(time.perf_counter() - t)
                spent.append(inside.seconds - before)
    step = statistics.median(times)
    return cache, {"method": spec, "context": ids.shape[1], "prefill_s": round(prefill, 2),
                   "step_ms": round(1000 * step, 2), "tokens_per_s": round(1 / step, 2),
                   "inside_ms": round(1000 * statistics.median(spent), 2),
                   "inside_share": round(sum(spent) / sum(times), 4)}


def run_meta(model: Any | None, args: Any) -> dict[str, Any]:
    """What a benchmark run was: model, threads, versions, git hash (taken when the run starts), machine, the load
    average at the start, args. ``model`` None: a benchmark of kvlab's own tensors on the CPU, no model."""
    meta = {"model": args.model} if model is not None else {}
    return {**meta, "threads": torch.get_num_threads(), "versions": versions(), "git_hash": git_hash(),
            "machine": machine("cpu" if model is None else str(model.device)), "load_avg_start": load_average(),
            "args": {k: str(v) for k, v in vars(args).items()}}


def load_average() -> list[float] | None:
    """The machine's load over the last 1, 5 and 15 minutes (None where the OS does not say): up to about 1 while
    one pinned benchmark runs alone, 2 or more beside another job, which shares the memory bus and moves every
    timing."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def write(stem: Path, rows: list[dict], table: str, meta: dict[str, Any]) -> None:
    """``stem``.json (rows + :func:`run_meta`, with the load average at the end of the run) and ``stem``.md (the
    table)."""
    meta = {**meta, "load_avg_end": load_average()}
    write_json_atomic(stem.with_suffix(".json"), {"meta": meta, "rows": rows})
    write_text_atomic(stem.with_suffix(".md"), table + "\n")


def positive_ints(text: str) -> list[int]:
    """An argparse ``type``: comma-separated positive integers (``4096,16384``); a ValueError is argparse's one-line
    usage error."""
    values = [int(c) for c in text.split(",")]
    if min(values) < 1:
        raise ValueError(text)
    return values


def left_padded(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids (n,)`` as three left-padded rows, its first ``n``, ``3n/4`` and ``n/2`` tokens: ``(3, n)`` ids (padding
    0) and their attention mask."""
    n = ids.shape[0]
    mask = torch.zeros(3, n, dtype=torch.long, device=ids.device)
    rows = torch.zeros_like(mask, dtype=ids.dtype)
    for i, length in enumerate((n, 3 * n // 4, n // 2)):
        rows[i, n - length:], mask[i, n - length:] = ids[:length], 1
    return rows, mask


def run_script(main: Callable[[], None], script: str) -> None:
    """Run a benchmark's ``main``: what only the model or its profile can say once loaded (an unknown model, a budget
    its heads cannot take) is one line on stderr naming ``script`` (its ``__file__``) and exit status 2."""
    try:
        main()
    except KvlabError as exc:
        print(f"{Path(script).name}: error: {exc}", file=sys.stderr)
        sys.exit(2)
