"""The kvpress side of the kvlab/kvpress comparison: a script run with ``.kvpress-venv/bin/python``.

It imports only torch, transformers, kvpress and the standard library (never kvlab: kvpress 0.5.5 needs
transformers < 5.3, kvlab a newer one). kvlab (:mod:`kvlab.compare.kvpress`) writes one JSON request on
stdin (or names a request file as the first argument); the worker answers on stdout with JSON lines:

* ``{"type": "hello", ...}``  versions, model class, load time;
* ``{"type": "result", ...}`` one per (press, ratio, sample): timings, cache bytes, kept tokens, peak RSS and
  either the answer check (``task="qa"``) or the teacher-forced NLL of a continuation (``task="ppl"``);
* ``{"type": "error", "press", "ratio", "error"}`` when a press fails; the other presses still run;
* ``{"type": "done", "runtime_s"}`` last.

Exit code 2 with one line on stderr for a bad request (unknown press: the line lists the presses it has).

Both tasks are question-agnostic, as in kvpress's ``KVPressTextGenerationPipeline``: the context is prefilled
(and compressed) under ``with press(model):`` before the question is seen; the question and the answer then
run on the compressed cache, with positions continuing from the uncompressed context length.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import re
import resource
import sys
import time
from typing import Any

PROTOCOL = 1
EXIT_BAD_REQUEST = 2
EAGER_PRESSES = ("ObservedAttentionPress",)  # they read the attention weights, which only eager returns


class BadRequest(Exception):
    """A request the worker cannot run: reported on one stderr line, exit code 2."""


def available_presses(kvpress: Any) -> list[str]:
    """Press names this worker can build with only a compression ratio (plus ``none`` and AdaKV wrappers)."""
    scorers = []
    for name in kvpress.__all__:
        cls = getattr(kvpress, name)
        if inspect.isclass(cls) and issubclass(cls, kvpress.ScorerPress) and cls is not kvpress.ScorerPress:
            if "compression_ratio" in inspect.signature(cls).parameters:
                scorers.append(name)
    return ["none", "AdaKVPress", "AdaKVPress(<scorer>)", *sorted(scorers)]


def build_press(kvpress: Any, name: str, ratio: float) -> Any:
    """``none`` -> None; ``AdaKVPress`` = ``AdaKVPress(SnapKVPress)``; ``AdaKVPress(X)``; or a scorer press."""
    if name == "none":
        return None
    match = re.fullmatch(r"\s*(\w+)\s*(?:\(\s*(\w*)\s*\))?\s*", name)
    have = available_presses(kvpress)
    if match is None:
        raise BadRequest(f"unknown press '{name}'; kvpress {_version('kvpress')} has: {', '.join(have)}")
    outer, inner = match.group(1), match.group(2)
    if outer == "AdaKVPress":
        return kvpress.AdaKVPress(build_press(kvpress, inner or "SnapKVPress", ratio))
    if inner is not None or outer not in have:
        raise BadRequest(f"unknown press '{name}'; kvpress {_version('kvpress')} has: {', '.join(have)}")
    return getattr(kvpress, outer)(compression_ratio=ratio)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


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


def _clear_masks(model: Any) -> None:
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


def _warm_up(torch: Any, model: Any) -> None:
    """One short prefill and decode step, so the first timed sample does not pay one-time costs."""
    from transformers import DynamicCache

    cache = DynamicCache()
    model(input_ids=torch.arange(100, 116, device=model.device).unsqueeze(0), past_key_values=cache)
    model(input_ids=torch.tensor([[100]], device=model.device), past_key_values=cache)


def _validate(request: Any) -> dict:
    if not isinstance(request, dict):
        raise BadRequest("the request must be a JSON object")
    if request.get("protocol") != PROTOCOL:
        raise BadRequest(f"protocol {request.get('protocol')!r} is not supported; this worker speaks {PROTOCOL}")
    for key in ("model_dir", "task", "samples", "presses"):
        if key not in request:
            raise BadRequest(f"the request has no '{key}'")
    if request["task"] not in ("qa", "ppl"):
        raise BadRequest(f"unknown task '{request['task']}'; choose from: ppl, qa")
    if str(request.get("device", "cpu")) != "cpu" and not str(request["device"]).startswith("cuda"):
        raise BadRequest(f"device '{request['device']}' is not supported by the worker; use cpu or cuda")
    if str(request.get("dtype", "float32")) not in ("float32", "float16", "bfloat16"):
        raise BadRequest(f"dtype '{request['dtype']}' is not supported; use float32, float16 or bfloat16")
    if not os.path.isfile(os.path.join(str(request["model_dir"]), "config.json")):
        raise BadRequest(f"model folder '{request['model_dir']}' has no config.json")
    need = ("context_ids", "question_ids", "answer") if request["task"] == "qa" else ("context_ids", "continuation_ids")
    for i, sample in enumerate(request["samples"]):
        missing = [k for k in need if k not in sample]
        if missing:
            raise BadRequest(f"sample {i} has no {', '.join(missing)}")
    return request


def serve(request: dict, emit: Any) -> None:
    """Run the request, calling ``emit(record)`` for every answer line."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import kvpress
    except ImportError as exc:
        raise BadRequest(f"kvpress cannot be imported by {sys.executable} ({exc}); run `make kvpress-env`") from exc

    started = time.perf_counter()
    ratios = [float(r) for r in request.get("ratios", [0.5])]
    runs = [(name, 0.0 if name == "none" else r) for name in request["presses"]
            for r in ([0.0] if name == "none" else ratios)]
    presses = {run: build_press(kvpress, *run) for run in runs}  # unknown names fail before the model loads
    if request.get("threads"):
        torch.set_num_threads(int(request["threads"]))
    torch.manual_seed(int(request.get("seed", 0)))
    dtype = getattr(torch, str(request.get("dtype", "float32")))
    device = str(request.get("device", "cpu"))
    load_start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(request["model_dir"], dtype=dtype,
                                                              attn_implementation="sdpa").to(device).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(request["model_dir"])
    emit({"type": "hello", "protocol": PROTOCOL, "kvpress": _version("kvpress"), "transformers": transformers.__version__,
          "torch": torch.__version__, "model_class": type(model).__name__, "threads": torch.get_num_threads(),
          "load_s": time.perf_counter() - load_start})
    warmed: set[str] = set()
    for (name, ratio), press in presses.items():
        attn = "eager" if any(e in name for e in EAGER_PRESSES) else "sdpa"
        if model.config._attn_implementation != attn:
            model.set_attn_implementation(attn)
        try:
            with torch.inference_mode():
                if attn not in warmed and request.get("warmup", True):
                    _warm_up(torch, model)
                    warmed.add(attn)
                for i, sample in enumerate(request["samples"]):
                    _clear_masks(model)
                    reset = reset_peak_rss()
                    if request["task"] == "qa":
                        record = run_qa(torch, model, tokenizer, press, sample, int(request.get("max_new_tokens", 16)))
                    else:
                        record = run_ppl(torch, model, press, sample)
                    emit({"type": "result", "press": name, "ratio": ratio, "sample": i, "attn_implementation": attn,
                          **record, "peak_rss_bytes": peak_rss_bytes(), "peak_rss_scope": "sample" if reset else "process"})
        except Exception as exc:  # noqa: BLE001 - one failing press is reported and the others still run
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            emit({"type": "error", "press": name, "ratio": ratio, "error": f"{type(exc).__name__}: {text}".rstrip(": ")})
        finally:
            _clear_masks(model)
    emit({"type": "done", "runtime_s": time.perf_counter() - started})


def main(argv: list[str]) -> int:
    # This file sits next to kvlab's kvpress.py: drop its folder from the path so `import kvpress` is kvpress.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    out = sys.stdout
    sys.stdout = sys.stderr  # anything a library prints must not corrupt the answer lines

    def emit(record: dict) -> None:
        out.write(json.dumps(record) + "\n")
        out.flush()

    try:
        if len(argv) > 1:
            with open(argv[1]) as fh:
                request = json.load(fh)
        else:
            request = json.load(sys.stdin)
        serve(_validate(request), emit)
    except (BadRequest, json.JSONDecodeError, OSError) as exc:  # a bad request or a missing file
        print(f"kvpress-worker: {exc}", file=sys.stderr)
        return EXIT_BAD_REQUEST
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
