"""Feeding tokens through a model and a cache: the loops every evaluation shares."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from transformers import PreTrainedModel

from kvlab.cache import KVCache


@torch.no_grad()
def feed(model: PreTrainedModel, cache: KVCache, ids: torch.Tensor, chunk_size: int, *,
         keep_last_logits: bool = True, on_chunk: Callable[[int], None] | None = None) -> torch.Tensor | None:
    """Prefill ``ids (1, T)`` through ``cache`` a chunk at a time, compressing between chunks.
    Returns the last position's logits ``(1, vocab)`` (or None)."""
    logits = None
    for start, stop in _chunks(ids.shape[1], chunk_size):
        # logits_to_keep=0 would mean "every position" to transformers: always compute only the last
        out = model(input_ids=ids[:, start:stop], past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1] if keep_last_logits else None
        if on_chunk is not None:
            on_chunk(stop - start)
    return logits


@torch.no_grad()
def nll_stream(model: PreTrainedModel, cache: KVCache, ids: torch.Tensor, chunk_size: int, *,
               on_chunk: Callable[[int], None] | None = None) -> torch.Tensor:
    """Negative log-likelihood of every next token of ``ids (1, T)``, fed a chunk at a time through
    ``cache``: shape ``(T - 1,)``, float64. With ``chunk_size=1`` this is the exact token-by-token
    streaming evaluation of the StreamingLLM paper; larger chunks score a chunk against the cache
    compressed before it (faster, and the cache holds ``budget + chunk`` tokens at its peak)."""
    total = ids.shape[1]
    nll = torch.empty(total - 1, dtype=torch.float64)
    prev = None  # logits of the last position of the previous chunk: predicts this chunk's first token
    for start, stop in _chunks(total, chunk_size):
        chunk = ids[:, start:stop]
        logits = model(input_ids=chunk, past_key_values=cache, use_cache=True).logits[0].float()  # (q, V)
        if prev is not None:
            logits_for = torch.cat((prev[None], logits[:-1]), dim=0)  # predicts chunk[0..q-1]
            targets = chunk[0]
            offset = start - 1
        else:
            logits_for, targets, offset = logits[:-1], chunk[0, 1:], 0
        if targets.numel():
            lp = torch.log_softmax(logits_for, dim=-1).gather(1, targets[:, None].to(logits.device))[:, 0]
            nll[offset: offset + targets.numel()] = -lp.double().cpu()
        prev = logits[-1]
        if on_chunk is not None:
            on_chunk(stop - start)
    return nll


@torch.no_grad()
def greedy(model: PreTrainedModel, cache: KVCache, logits: torch.Tensor, max_new_tokens: int,
           eos_token_ids: set[int] | None = None) -> Iterator[int]:
    """Greedy decoding from the logits ``(1, vocab)`` of the last fed position; yields token ids
    one at a time (each is fed back through ``cache``) until EOS or ``max_new_tokens``."""
    eos = eos_token_ids or set()
    for i in range(max_new_tokens):
        token = int(logits[0].argmax())
        yield token
        if token in eos or i == max_new_tokens - 1:
            return
        step = torch.tensor([[token]], device=logits.device)
        logits = model(input_ids=step, past_key_values=cache, use_cache=True).logits[:, -1]


def eos_ids(model: PreTrainedModel, tokenizer) -> set[int]:
    """Every token id that ends generation for this model."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple, set)) else [value])
    return ids


def _chunks(total: int, size: int) -> Iterator[tuple[int, int]]:
    if size < 1:
        from kvlab.errors import KvlabError

        raise KvlabError(f"chunk size must be >= 1, got {size}")
    for start in range(0, total, size):
        yield start, min(total, start + size)
