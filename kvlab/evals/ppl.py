"""Streaming perplexity: feed a text through model + compressed cache and score every next token."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from tqdm.auto import tqdm

from kvlab.cache import make_cache
from kvlab.data import load_text, tokenize
from kvlab.device import synchronize
from kvlab.evals.common import StreamParams
from kvlab.stream import nll_stream

HIGHER_IS_BETTER = {"ppl": False, "nll": False, "tokens_per_s": True, "kv_bytes_peak": False,
                    "compression_ratio": True, "runtime_s": False}


@dataclass
class Params(StreamParams):
    """The stream scored (:class:`~kvlab.evals.common.StreamParams`): ``tokens`` tokens of ``data``,
    ``chunk_size`` per forward pass."""


def evaluate(model, tokenizer, method: str, params: Params, *, progress: bool = False) -> dict:
    """Perplexity of ``params.tokens`` tokens of ``params.data`` under ``method``; one row's metrics."""
    ids = tokenize(tokenizer, load_text(params.data), params.tokens, name=f"data '{params.data}'").to(model.device)
    cache = make_cache(model, method)
    bar = tqdm(total=ids.shape[1], desc=method, unit="tok", disable=not progress, leave=False)
    synchronize(model.device)
    start = time.perf_counter()
    nll = nll_stream(model, cache, ids, params.chunk_size, on_chunk=bar.update)
    synchronize(model.device)
    runtime = time.perf_counter() - start
    bar.close()
    mean = float(nll.mean())
    full = cache.full_nbytes()
    return {
        "ppl": math.exp(mean),
        "nll": mean,
        "tokens": int(ids.shape[1]),
        "runtime_s": runtime,
        "tokens_per_s": ids.shape[1] / runtime,
        "kv_bytes_peak": cache.peak_nbytes,
        "kv_bytes_full": full,
        "compression_ratio": 1.0 - cache.peak_nbytes / full,
    }
