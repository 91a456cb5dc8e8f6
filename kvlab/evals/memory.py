"""KV-cache memory at a sequence length: exact bytes held by the cache, and the process's peak memory.

One cell streams ``tokens`` tokens of ``data`` through the method's cache, ``chunk_size`` tokens per
forward pass, and reports

* ``kv_bytes`` — what the cache holds at the end (kept keys and values, all layers);
* ``kv_bytes_peak`` — the most it held after any forward pass (budget + one chunk for a bounded cache);
* ``kv_bytes_full`` — what a full cache holds for the same tokens (computed, so it is known even where
  the full cache cannot run), and ``mem_reduction_pct = 100 * (1 - kv_bytes_peak / kv_bytes_full)``;
* ``peak_mem_bytes`` / ``peak_mem_delta_bytes`` — the process's peak memory during the cell and what the
  cell added to the memory in use when it started (see :mod:`kvlab.evals.peakmem`; RSS on CPU, so it
  includes activations and allocator slack; ``torch.cuda.max_memory_allocated`` on CUDA).

Past the model's maximum position a method that does not re-index positions (the full cache) is not
applicable: its metrics are None, with a ``note``; ``kv_bytes_full`` is still given.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from kvlab.cache import make_cache
from kvlab.families import layer_infos
from kvlab.data import load_text, tokenize
from kvlab.evals.common import StreamParams, position_note
from kvlab.evals.peakmem import PeakMemory
from kvlab.stream import feed

HIGHER_IS_BETTER = {"kv_bytes": False, "kv_bytes_peak": False, "mem_reduction_pct": True, "peak_mem_bytes": False,
                    "peak_mem_delta_bytes": False, "runtime_s": False}


@dataclass
class Params(StreamParams):
    """``tokens``: sequence length streamed; ``data``: pydoc | pg19 | wikitext-2 | PATH; ``chunk_size``: tokens
    per forward."""

    tokens: int = 2000
    chunk_size: int = 256


def full_kv_bytes(model, tokens: int, chunk_size: int) -> int:
    """Peak bytes a full cache holds while ``tokens`` tokens are fed ``chunk_size`` at a time, in the model's
    dtype: full-attention layers hold every token; sliding-window layers at most ``window - 1`` plus the
    chunk being processed, so their peak can come before the last forward pass."""
    elsize = torch.empty((), dtype=model.dtype).element_size()
    infos = layer_infos(model)
    peak = 0
    for start in range(0, tokens, chunk_size):
        seen = min(tokens, start + chunk_size)
        kept = [seen if i.sliding_window is None else min(seen, i.sliding_window - 1 + seen - start) for i in infos]
        peak = max(peak, sum(2 * n * i.num_kv_heads * i.head_dim * elsize for n, i in zip(kept, infos)))
    return peak


def load_ids(tokenizer, data: str, length: int) -> torch.Tensor:
    """``(1, length)`` ids of the start of ``data`` (a KvlabError saying how many tokens it has if too short)."""
    return tokenize(tokenizer, load_text(data), length, name=f"data '{data}'")


def evaluate(model, tokenizer, method: str, params: Params, *, progress: bool = False) -> dict:
    """KV and process memory of ``method`` after ``params.tokens`` tokens; one row's metrics."""
    ids = load_ids(tokenizer, params.data, params.tokens).to(model.device)
    full = full_kv_bytes(model, params.tokens, params.chunk_size)
    note = position_note(model, method, params.tokens)
    if note:
        return {"kv_bytes": None, "kv_bytes_peak": None, "kv_bytes_full": full, "mem_reduction_pct": None,
                "peak_mem_bytes": None, "peak_mem_delta_bytes": None, "tokens": params.tokens, "note": note}
    with torch.no_grad():  # every weight resident and every kernel initialized before the baseline
        model(input_ids=ids[:, :8], use_cache=False, logits_to_keep=1)
    bar = tqdm(total=params.tokens, desc=f"memory {method}", unit="tok", disable=not progress, leave=False)
    start = time.perf_counter()
    with PeakMemory(model.device) as mem:
        cache = make_cache(model, method)
        feed(model, cache, ids, params.chunk_size, on_chunk=bar.update)
        kv_now, kv_peak = cache.nbytes(), cache.peak_nbytes
        kept = max(max(layer) for layer in cache.kept_tokens())
        del cache
    bar.close()
    return {"kv_bytes": kv_now, "kv_bytes_peak": kv_peak, "kv_bytes_full": full,
            "mem_reduction_pct": 100.0 * (1.0 - kv_peak / full), "kept_tokens_max": kept,
            "peak_mem_bytes": mem.peak_bytes, "peak_mem_delta_bytes": mem.delta_bytes, "peak_mem_how": mem.how,
            "tokens": params.tokens, "runtime_s": time.perf_counter() - start}
