"""One sample's timed run on kvpress's side, for :mod:`kvlab.compare.kvpress_worker`: the prefill under a press,
what the compressed cache holds, the question and greedy answer (or the scored continuation), peak RSS.

The worker runs in ``.kvpress-venv``, so this module imports only torch, transformers and the standard library
(torch is passed in; never kvlab, never kvpress: a press arrives built). kvlab's own side of the comparison
(:mod:`kvlab.compare.kvlab_runs`) measures peak RSS with the same two functions.
"""

from __future__ import annotations

import contextlib
import math
import re
import resource
import time
from typing import Any


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since the last reset (VmHWM), else since it started."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cache_accounting(model: Any, cache: Any) -> dict[str, Any]:
    """What the cache holds after the compressed prefill, and what it claims to keep.

    ``cache_bytes``: bytes of every key and value tensor the DynamicCache holds (layers x (batch, kv_heads, seq,
    head_dim)). AdaKV keeps the full tensors and masks entries at attention time (``masked_key_indices``), so
    its ``effective_*`` figures (entries not masked) are smaller than what it holds.
    ``kept_tokens``: effective entries per (layer, kv head), averaged; ``held_tokens``: the sequence length held.
    """
    held = held_entries = effective_entries = effective_bytes = 0
    rows = 0
    for idx, layer in enumerate(cache.layers):
        keys, values = layer.keys, layer.values  # (batch, kv_heads, seq, head_dim)
        entries = keys.shape[0] * keys.shape[1] * keys.shape[2]
        attn = model.model.layers[idx].self_attn
        masked = getattr(attn, "masked_key_indices", None)
        n_masked = 0 if masked is None else int(masked[0].numel())
        per_entry = keys.shape[-1] * keys.element_size() + values.shape[-1] * values.element_size()
        held += keys.numel() * keys.element_size() + values.numel() * values.element_size()
        held_entries += entries
        effective_entries += entries - n_masked
        effective_bytes += (entries - n_masked) * per_entry
        rows += keys.shape[0] * keys.shape[1]
    return {"cache_bytes": held, "effective_cache_bytes": effective_bytes,
            "held_tokens": held_entries / max(rows, 1), "kept_tokens": effective_entries / max(rows, 1)}


def clear_masks(model: Any) -> None:
    for layer in model.model.layers:
        if getattr(layer.self_attn, "masked_key_indices", None) is not None:
            layer.self_attn.masked_key_indices = None


def _prefill(torch: Any, model: Any, press: Any, ids: Any, *, logits: bool) -> tuple[Any, Any, float]:
    """Prefill ``ids`` (1, n) into a fresh DynamicCache under the press; return (cache, last logits, seconds)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    _sync(torch, model)
    start = time.perf_counter()
    with press(model) if press is not None else contextlib.nullcontext():
        if logits:
            out = model(input_ids=ids, past_key_values=cache, logits_to_keep=1).logits[0, -1]
        else:
            model.model(input_ids=ids, past_key_values=cache)
            out = None
    _sync(torch, model)
    return cache, out, time.perf_counter() - start


def _sync(torch: Any, model: Any) -> None:
    """Wait for queued kernels, so that wall-clock timings are honest on CUDA."""
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def run_qa(torch: Any, model: Any, tokenizer: Any, press: Any, sample: dict, max_new_tokens: int) -> dict:
    """Compress the context, then greedy-decode the answer to the question on the compressed cache."""
    dev = model.device
    ctx = torch.tensor([sample["context_ids"]], dtype=torch.long, device=dev)
    question = torch.tensor([sample["question_ids"]], dtype=torch.long, device=dev)
    n = ctx.shape[1]
    cache, _, prefill_s = _prefill(torch, model, press, ctx, logits=False)
    acct = cache_accounting(model, cache)
    start = time.perf_counter()
    positions = torch.arange(n, n + question.shape[1], device=dev).unsqueeze(0)
    out = model(input_ids=question, past_key_values=cache, position_ids=positions, logits_to_keep=1)
    _sync(torch, model)
    question_s = time.perf_counter() - start
    stop = model.generation_config.eos_token_id
    stop = set(stop if isinstance(stop, list) else [stop])
    generated = [int(out.logits[0, -1].argmax())]
    position = n + question.shape[1]
    start = time.perf_counter()
    steps = 0
    while len(generated) < max_new_tokens and generated[-1] not in stop:
        out = model(input_ids=torch.tensor([[generated[-1]]], device=dev), past_key_values=cache,
                    position_ids=torch.tensor([[position + steps]], device=dev))
        generated.append(int(out.logits[0, -1].argmax()))  # .item() waits for the step: timings stay honest
        steps += 1
    decode_s = time.perf_counter() - start
    text = tokenizer.decode(generated, skip_special_tokens=True)
    answer = str(sample["answer"])
    contains = re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", text) is not None
    exact = " ".join(text.split()).strip(" .") == answer.strip()
    return {**acct, "context_tokens": n, "prefill_s": prefill_s, "question_s": question_s, "decode_s": decode_s,
            "decode_steps": steps, "decode_tok_s": steps / decode_s if steps and decode_s > 0 else None,
            "generated_tokens": len(generated), "generated_text": text, "answer": answer,
            "contains": contains, "exact_match": exact}


def run_ppl(torch: Any, model: Any, press: Any, sample: dict) -> dict:
    """Compress the context, then score the continuation teacher-forced on the compressed cache."""
    dev = model.device
    ctx = torch.tensor([sample["context_ids"]], dtype=torch.long, device=dev)
    cont = torch.tensor([sample["continuation_ids"]], dtype=torch.long, device=dev)
    n, m = ctx.shape[1], cont.shape[1]
    cache, first, prefill_s = _prefill(torch, model, press, ctx, logits=True)
    acct = cache_accounting(model, cache)
    start = time.perf_counter()
    positions = torch.arange(n, n + m, device=dev).unsqueeze(0)
    logits = model(input_ids=cont, past_key_values=cache, position_ids=positions).logits
    _sync(torch, model)
    score_s = time.perf_counter() - start
    logits = torch.cat([first.unsqueeze(0), logits[0, :-1]], dim=0).float()  # (m, vocab): row i predicts cont[i]
    nll = float(torch.nn.functional.cross_entropy(logits, cont[0], reduction="sum"))
    return {**acct, "context_tokens": n, "prefill_s": prefill_s, "score_s": score_s, "scored_tokens": m,
            "nll_sum": nll, "ppl": math.exp(nll / m)}


def warm_up(torch: Any, model: Any) -> None:
    """One short prefill and decode step, so the first timed sample does not pay one-time costs."""
    from transformers import DynamicCache

    cache = DynamicCache()
    model(input_ids=torch.arange(100, 116, device=model.device).unsqueeze(0), past_key_values=cache)
    model(input_ids=torch.tensor([[100]], device=model.device), past_key_values=cache)
