"""kvpress (NVIDIA) on the same model, inputs and questions as kvlab: the evaluation ``kvpress``.

kvpress 0.5.5 needs transformers < 5.3, so it lives in its own venv (``make kvpress-env`` builds
``.kvpress-venv``) and runs :mod:`kvlab.compare.kvpress_worker` as a subprocess: kvlab renders and tokenizes
every input here, sends the token ids (and the text) as one JSON request, and reads back one JSON line per
(press, ratio, sample). Both libraries therefore see identical ids, from the same model folder.

This module makes the samples (:mod:`kvlab.compare.samples`) and holds the evaluation; the venv and the
subprocess are :mod:`kvlab.compare.kvpress_driver`, the answer lines as metrics and rows
:mod:`kvlab.compare.kvpress_results` (their public names, and the samples', are importable from here too).

    samples = passkey_samples(tokenizer, n=3, context_tokens=1024)
    results = run_kvpress("/path/model", "qa", samples, ["SnapKVPress", "AdaKVPress(SnapKVPress)"], [0.5])
    rows = to_rows(results, {"model": "smollm2-135m"})

``results`` holds one dict per (press, ratio): ``press``, ``ratio``, ``task``, ``error`` and ``metrics``
(accuracy, prefill_s, decode_tok_s, cache_bytes — what the cache really holds; for AdaKV that is the full
tensors, its masked-out entries counted in ``effective_cache_bytes`` / ``kept_tokens`` — and peak_rss_bytes).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvlab.compare.kvpress_driver import PROTOCOL, build_request, kvpress_python, run_worker  # noqa: F401
from kvlab.compare.kvpress_results import HIGHER_IS_BETTER, aggregate, summarize, to_rows  # noqa: F401
from kvlab.compare.samples import PplSample, QASample  # noqa: F401 - importable from here, as before
from kvlab.errors import KvlabError

PRESSES = ("StreamingLLMPress", "SnapKVPress", "PyramidKVPress", "TOVAPress", "ObservedAttentionPress",
           "ExpectedAttentionPress", "AdaKVPress(SnapKVPress)", "KnormPress", "KeyDiffPress")
TASKS = ("passkey", "ppl")
PASSKEY_QUESTION = "What is the pass key?"


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
