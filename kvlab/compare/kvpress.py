"""kvpress (NVIDIA) on the same model, inputs and questions as kvlab: the evaluation ``kvpress``.

kvpress 0.5.5 needs transformers < 5.3, so it lives in its own venv (``make kvpress-env`` builds
``.kvpress-venv``) and runs :mod:`kvlab.compare.kvpress_worker` as a subprocess: kvlab renders and tokenizes
every input here, sends the token ids (and the text) as one JSON request, and reads back one JSON line per
(press, ratio, sample). Both libraries therefore see identical ids, from the same model folder.

    samples = passkey_samples(tokenizer, n=3, context_tokens=1024)
    results = run_kvpress("/path/model", "qa", samples, ["SnapKVPress", "AdaKVPress(SnapKVPress)"], [0.5])
    rows = to_rows(results, {"model": "smollm2-135m"})

``results`` holds one dict per (press, ratio): ``press``, ``ratio``, ``task``, ``error`` and ``metrics``
(accuracy, prefill_s, decode_tok_s, cache_bytes — what the cache really holds; for AdaKV that is the full
tensors, its masked-out entries counted in ``effective_cache_bytes`` / ``kept_tokens`` — and peak_rss_bytes).
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvlab.errors import KvlabError
from kvlab.results import make_row

PROTOCOL = 1
WORKER = Path(__file__).with_name("kvpress_worker.py")
DEFAULT_VENV = Path(__file__).resolve().parents[2] / ".kvpress-venv"
PRESSES = ("StreamingLLMPress", "SnapKVPress", "PyramidKVPress", "TOVAPress", "ObservedAttentionPress",
           "ExpectedAttentionPress", "AdaKVPress(SnapKVPress)", "KnormPress", "KeyDiffPress")
TASKS = ("passkey", "ppl")
HIGHER_IS_BETTER = {"accuracy": True, "exact_match": True, "ppl": False, "nll": False, "prefill_s": False,
                    "prefill_tok_s": True, "decode_tok_s": True, "cache_bytes": False,
                    "effective_cache_bytes": False, "peak_rss_bytes": False}
PASSKEY_QUESTION = "What is the pass key?"


@dataclass
class QASample:
    """A question about a context; ``*_ids`` are what both libraries feed (the text is for reading)."""

    context: str
    question: str
    answer: str
    context_ids: list[int]
    question_ids: list[int]


@dataclass
class PplSample:
    """A context to prefill (and compress) and the continuation scored on the compressed cache."""

    context_ids: list[int]
    continuation_ids: list[int]


@dataclass
class Params:
    """``task``: passkey | ppl; ``ratio``: kvpress compression ratio (fraction of the context evicted);
    ``samples`` of ``context_tokens`` each; ppl scores ``continuation_tokens`` of ``data`` after each context;
    ``timeout_s`` bounds the whole worker run."""

    task: str = "passkey"
    ratio: float = 0.5
    samples: int = 3
    context_tokens: int = 1024
    continuation_tokens: int = 256
    data: str = "pydoc"
    max_new_tokens: int = 16
    seed: int = 0
    timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise KvlabError(f"unknown kvpress task '{self.task}'; choose from: {', '.join(TASKS)}")
        if not 0.0 <= self.ratio < 1.0:
            raise KvlabError(f"ratio must be in [0, 1) (the fraction of the context kvpress evicts), got {self.ratio}")
        for name in ("samples", "context_tokens", "continuation_tokens", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise KvlabError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.context_tokens < 64:
            raise KvlabError(f"context_tokens must be at least 64, got {self.context_tokens}")
        if self.timeout_s <= 0:
            raise KvlabError(f"timeout_s must be positive, got {self.timeout_s}")


def kvpress_python(venv: str | os.PathLike | None = None) -> Path:
    """The kvpress venv's python: ``venv``, else ``$KVLAB_KVPRESS_VENV``, else ``.kvpress-venv`` in the checkout."""
    root = Path(venv or os.environ.get("KVLAB_KVPRESS_VENV") or DEFAULT_VENV)
    python = root / "bin" / "python"
    if not python.exists():
        raise KvlabError(f"kvpress environment not found: run `make kvpress-env` (no {python})")
    return python


def model_folder(model: Any) -> Path:
    """The local Hugging Face folder a loaded model came from, so the worker loads the same files."""
    config = getattr(model, "config", None)
    names = [getattr(model, "name_or_path", None), getattr(config, "_name_or_path", None)]
    for name in filter(None, names):
        if (Path(name) / "config.json").is_file():
            return Path(name).resolve()
    raise KvlabError(f"kvpress runs the model from its local folder, but this model was loaded from "
                     f"'{next(filter(None, names), '?')}', which is not a folder with a config.json")


def render_qa(tokenizer: Any, context: str, question: str) -> tuple[str, str]:
    """Context and question text as kvpress's pipeline renders them: the chat template (when the tokenizer has
    one) is split after the context, so the question and the assistant header come after the compression."""
    if getattr(tokenizer, "chat_template", None) is None:
        return (getattr(tokenizer, "bos_token", None) or "") + context, question + "\n"
    separator = "#" * (len(context) + 10)
    text = tokenizer.apply_chat_template([{"role": "user", "content": context + separator}],
                                         add_generation_prompt=True, tokenize=False)
    head, suffix = text.split(separator)
    return head, question + suffix


def passkey_samples(tokenizer: Any, n: int, context_tokens: int, seed: int = 0) -> list[QASample]:
    """``n`` pass-key contexts of about ``context_tokens`` tokens of pydoc filler, the key at depths spread evenly.

    Deterministic in (``seed``, sample index). A stand-in until kvlab's needle generator is shared here.
    """
    from kvlab.data import pydoc_text

    paragraphs = [p for p in pydoc_text().split("\n\n") if p.strip()]
    samples = []
    for i in range(n):
        rng = random.Random(f"passkey:{seed}:{i}")
        key = str(rng.randint(10000, 99999))
        intro = "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        budget = context_tokens - len(tokenizer.encode(intro + needle, add_special_tokens=False))
        at, chunk = rng.randrange(len(paragraphs)), []
        while len(tokenizer.encode("\n\n".join(chunk), add_special_tokens=False)) < budget:
            chunk += [paragraphs[(at + j) % len(paragraphs)] for j in range(4)]
            at += 4
        filler = tokenizer.decode(tokenizer.encode("\n\n".join(chunk), add_special_tokens=False)[:max(budget, 0)])
        target = int(len(filler) * (i + 0.5) / n)  # the key goes on its own line, at the line break nearest the depth
        breaks = [b for b in (filler.rfind("\n", 0, target), filler.find("\n", target)) if b >= 0] or [target]
        cut = min(breaks, key=lambda b: abs(b - target))
        context = f"{intro}{filler[:cut]}\n{needle}\n{filler[cut:].lstrip(chr(10))}\n\n"
        head, tail = render_qa(tokenizer, context, PASSKEY_QUESTION)
        samples.append(QASample(context=head, question=tail, answer=key,
                                context_ids=tokenizer.encode(head, add_special_tokens=False),
                                question_ids=tokenizer.encode(tail, add_special_tokens=False)))
    return samples


def ppl_samples(tokenizer: Any, n: int, context_tokens: int, continuation_tokens: int,
                data: str = "pydoc") -> list[PplSample]:
    """``n`` consecutive, non-overlapping (context, continuation) windows from the start of ``data``."""
    from kvlab.data import load_text, tokenize

    span = context_tokens + continuation_tokens
    ids = tokenize(tokenizer, load_text(data), n * span, name=f"data '{data}'")[0].tolist()
    return [PplSample(ids[i * span:i * span + context_tokens], ids[i * span + context_tokens:(i + 1) * span])
            for i in range(n)]


def build_request(model_dir: str | os.PathLike, task: str, samples: Sequence[QASample | PplSample],
                  presses: Sequence[str], ratios: Sequence[float], *, device: str = "cpu", dtype: str = "float32",
                  seed: int = 0, max_new_tokens: int = 16, threads: int | None = None) -> dict[str, Any]:
    """The worker's JSON request (``task``: "qa" or "ppl"; "full" is accepted for the press "none")."""
    if task not in ("qa", "ppl"):
        raise KvlabError(f"unknown worker task '{task}'; choose from: ppl, qa")
    if not presses or not samples:
        raise KvlabError("the kvpress comparison needs at least one press and one sample")
    for ratio in ratios:
        if not 0.0 <= float(ratio) < 1.0:
            raise KvlabError(f"kvpress compression ratio must be in [0, 1), got {ratio}")
    return {"protocol": PROTOCOL, "model_dir": str(model_dir), "task": task, "device": str(device), "dtype": dtype,
            "seed": seed, "max_new_tokens": max_new_tokens, "threads": threads,
            "presses": ["none" if p == "full" else p for p in presses], "ratios": [float(r) for r in ratios],
            "samples": [asdict(s) for s in samples]}


def run_worker(request: dict[str, Any], *, python: str | os.PathLike, timeout_s: float = 1800.0,
               script: str | os.PathLike | None = None,
               on_record: Callable[[dict], None] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run the worker (``script``, default :data:`WORKER`) on ``request``; return its hello and result/error lines.

    Exit code 2 (a bad request, e.g. a press kvpress lacks) becomes a KvlabError with the worker's line;
    a crash, a missing ``done`` line or the timeout (the worker is killed) too.
    """
    timed_out = threading.Event()
    lines: list[dict[str, Any]] = []
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([str(python), str(script or WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=err, text=True)

        def kill() -> None:
            timed_out.set()
            proc.kill()

        timer = threading.Timer(timeout_s, kill)
        timer.start()
        try:
            try:
                proc.stdin.write(json.dumps(request))
                proc.stdin.close()
            except BrokenPipeError:
                pass
            for line in proc.stdout:
                record = _parse(line)
                if record is not None:
                    lines.append(record)
                    if on_record is not None:
                        on_record(record)
            code = proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err.seek(0)
        last = next((ln.strip() for ln in reversed(err.read().splitlines()) if ln.strip()), "")
    if timed_out.is_set():
        raise KvlabError(f"kvpress worker timed out after {timeout_s:g} s and was stopped")
    if code == 2:
        raise KvlabError(f"kvpress: {last.removeprefix('kvpress-worker: ')}")
    if code != 0 or not lines or lines[-1].get("type") != "done":
        raise KvlabError(f"kvpress worker failed (exit {code}): {last or 'no output'}")
    hello = next((r for r in lines if r.get("type") == "hello"), None)
    if hello is None or hello.get("protocol") != PROTOCOL:
        raise KvlabError(f"kvpress worker speaks protocol {None if hello is None else hello.get('protocol')}, "
                         f"kvlab expects {PROTOCOL}")
    return hello, [r for r in lines if r.get("type") in ("result", "error")]


def _parse(line: str) -> dict[str, Any] | None:
    line = line.strip()
    if not line.startswith("{"):
        return None  # a stray print from a library
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and "type" in record else None


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


def run_kvpress(model_dir: str | os.PathLike, task: str, samples: Sequence[QASample | PplSample],
                presses: Sequence[str] = PRESSES, ratios: Sequence[float] = (0.5,), *, device: str = "cpu",
                dtype: str = "float32", seed: int = 0, max_new_tokens: int = 16, threads: int | None = None,
                timeout_s: float = 1800.0, venv: str | os.PathLike | None = None,
                on_record: Callable[[dict], None] | None = None) -> list[dict[str, Any]]:
    """Run kvpress on ``samples`` for every press x ratio ("none": once, full cache); see :func:`summarize`."""
    python = kvpress_python(venv)
    request = build_request(model_dir, task, samples, presses, ratios, device=device, dtype=dtype, seed=seed,
                            max_new_tokens=max_new_tokens, threads=threads)
    hello, records = run_worker(request, python=python, timeout_s=timeout_s, on_record=on_record)
    return summarize(hello, records, task)


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


def evaluate(model: Any, tokenizer: Any, method: str, params: Params, *, progress: bool = False) -> dict[str, Any]:
    """kvpress's press ``method`` (e.g. "SnapKVPress", "AdaKVPress(SnapKVPress)", "none") at ``params.ratio``
    on ``model``'s own folder; one row's metrics. A press that fails in kvpress is a KvlabError."""
    import torch

    python = kvpress_python()  # before any sample is built: a missing env is the first thing to say
    folder = model_folder(model)
    if params.task == "passkey":
        samples: list = passkey_samples(tokenizer, params.samples, params.context_tokens, params.seed)
    else:
        samples = ppl_samples(tokenizer, params.samples, params.context_tokens, params.continuation_tokens, params.data)
    request = build_request(folder, "qa" if params.task == "passkey" else "ppl", samples, [method], [params.ratio],
                            device=str(getattr(model, "device", "cpu")), seed=params.seed,
                            dtype=str(getattr(model, "dtype", torch.float32)).replace("torch.", ""),
                            max_new_tokens=params.max_new_tokens, threads=torch.get_num_threads())
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=params.samples, desc=f"kvpress {method}", leave=False)
    try:
        hello, records = run_worker(request, python=python, timeout_s=params.timeout_s,
                                    on_record=(lambda r: bar.update(r["type"] == "result")) if bar else None)
    finally:
        if bar is not None:
            bar.close()
    (result,) = summarize(hello, records, request["task"])
    if result["error"]:
        raise KvlabError(f"kvpress {result['press']} at ratio {result['ratio']:g} failed: {result['error']}")
    return result["metrics"]
