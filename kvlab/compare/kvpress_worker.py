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

This module builds the presses and speaks the protocol; one sample's run and its measurements (timings, cache
bytes, peak RSS) are :mod:`kvlab.compare.kvpress_measure`, which it imports as a sibling file when run as a script.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import sys
import time
from typing import Any

if __package__:  # imported by kvlab as kvlab.compare.kvpress_worker
    from kvlab.compare.kvpress_measure import cache_accounting  # noqa: F401 - importable from here, as before
    from kvlab.compare.kvpress_measure import clear_masks, peak_rss_bytes, reset_peak_rss, run_ppl, run_qa, warm_up
else:  # run as a script by .kvpress-venv's python, which has no kvlab: this folder is sys.path[0] until main()
    from kvpress_measure import clear_masks, peak_rss_bytes, reset_peak_rss, run_ppl, run_qa, warm_up

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
                    warm_up(torch, model)
                    warmed.add(attn)
                for i, sample in enumerate(request["samples"]):
                    clear_masks(model)
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
            clear_masks(model)
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
