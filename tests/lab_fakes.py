"""Test-only stand-ins for the lab: a fast deterministic evaluation, a fake model loader, row builders.

The evaluation follows the contract of :mod:`kvlab.evals` (``Params``, ``HIGHER_IS_BETTER``,
``evaluate``) with metrics that depend only on the method spec, the settings and the model name, so the
local and Ray executors must give equal rows. Register it with ``with lab_fakes.registered(): ...`` (through
:func:`kvlab.evals.register_eval`; tests/ is on sys.path under pytest).

A killed-sweep test stops a sweep part-way without depending on timing: with ``$LAB_FAKES_LOG`` and
``$LAB_FAKES_HOLD_AFTER=N`` set, every cell after the first N of the log blocks, having created the file
``$LAB_FAKES_LOG.held``, until the file ``$LAB_FAKES_LOG.go`` exists (or the process is signalled).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvlab.errors import KvlabError
from kvlab.evals import register_eval, unregister_eval
from kvlab.results import make_row
from kvlab.spec import parse_spec

HIGHER_IS_BETTER = {"ppl": False, "nll": False, "tokens_per_s": True, "compression_ratio": True}
LOADS: list[str] = []  # model names loaded in this process, in order
FAMILIES = {"qwen": "qwen2", "gemma": "gemma3_text", "mistral": "mistral"}


@dataclass
class Params:
    data: str = "synthetic"
    tokens: int = 256
    seed: int = 0
    fail_on: str = ""  # evaluate raises for this method name (or the one in $LAB_FAKES_FAIL)

    def __post_init__(self) -> None:
        if self.tokens <= 0:
            raise KvlabError(f"tokens must be positive, got {self.tokens}")


def kept_tokens(method: str, tokens: int) -> int:
    """Tokens the fake method keeps: full keeps all, streaming sinks+window, h2o/others their budget."""
    name, raw = parse_spec(method)
    if name == "full":
        return tokens
    if name == "streaming":
        return min(tokens, int(raw.get("sinks", 4)) + int(raw.get("window", 1020)))
    return min(tokens, int(raw.get("budget", tokens)))


def evaluate(model: Any, tokenizer: Any, method: str, params: Params, *, progress: bool = False) -> dict[str, Any]:
    name, _ = parse_spec(method)
    if name in (params.fail_on, os.environ.get("LAB_FAKES_FAIL")):
        raise RuntimeError(f"synthetic failure of {method}")
    log = os.environ.get("LAB_FAKES_LOG")
    if log:
        with open(log, "a") as fh:
            fh.write(f"{model.name}|{method}|{params.tokens}|{params.seed}\n")
        _hold(Path(log))
    kept = kept_tokens(method, params.tokens)
    frac = kept / params.tokens
    base = 10.0 + len(model.name) % 5 + (1.0 if params.data != "synthetic" else 0.0)
    ppl = base * (1.0 + 0.08 * (1.0 - frac)) + 0.01 * params.seed
    runtime = 1e-4 * params.tokens * (0.5 + 0.5 * frac)
    return {"ppl": ppl, "nll": float(__import__("math").log(ppl)), "tokens": params.tokens, "runtime_s": runtime,
            "tokens_per_s": params.tokens / runtime, "kv_bytes_peak": kept * 1000,
            "kv_bytes_full": params.tokens * 1000,
            "compression_ratio": params.tokens / kept}


def _hold(log: Path, patience_s: float = 600.0) -> None:
    """Block this cell while it comes after the first ``$LAB_FAKES_HOLD_AFTER`` cells of the log, until the
    test creates ``<log>.go``; ``<log>.held`` tells the test that a cell is held (so every earlier row is written)."""
    after = os.environ.get("LAB_FAKES_HOLD_AFTER")
    if after is None or log.read_text().count("\n") <= int(after):
        return
    Path(f"{log}.held").touch()
    deadline = time.monotonic() + patience_s  # a safety net only: the test signals or gives the go-ahead
    while not Path(f"{log}.go").exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no go-ahead ({log}.go) within {patience_s:.0f} s")
        time.sleep(0.01)


@contextmanager
def registered() -> Iterator[None]:
    """The fake evaluation registered as ``"fake"`` while the block runs."""
    register_eval("fake", __name__)
    try:
        yield
    finally:
        unregister_eval("fake")


class FakeConfig:
    def __init__(self, name: str) -> None:
        self.model_type = next((t for k, t in FAMILIES.items() if k in name.lower()), "llama")


class FakeModel:
    def __init__(self, name: str) -> None:
        self.name = name
        self.config = FakeConfig(name)


def load(name: str, device: Any, dtype: Any) -> tuple[FakeModel, object]:
    """The fake loader: ``broken*`` models fail to load."""
    LOADS.append(name)
    if name.startswith("broken"):
        raise OSError(f"cannot load {name}")
    return FakeModel(name), object()


def no_load(name: str, device: Any, dtype: Any) -> tuple[Any, Any]:
    raise AssertionError(f"a model ({name}) was loaded although the config is invalid")


def row(eval_name: str, model: str, method: str, params: dict[str, Any], metrics: dict[str, Any], *,
        hib: dict[str, bool] | None = None, error: str | None = None, model_type: str | None = None) -> dict[str, Any]:
    """A row as the runner writes it, for report and plot tests."""
    config = {"model": model, "method": method, "eval": eval_name, "params": params, "device": "auto", "dtype": "auto"}
    r = make_row(eval_name, config, None if error else metrics, higher_is_better=hib or HIGHER_IS_BETTER, error=error)
    r["model_info"] = {"name": model, "model_type": model_type or FakeConfig(model).model_type}
    return r


def ppl_row(model: str, method: str, tokens: int, *, data: str = "synthetic", seed: int = 0) -> dict[str, Any]:
    """A perplexity row with the fake evaluation's numbers."""
    params = {"data": data, "tokens": tokens, "chunk_size": 16, "seed": seed}
    metrics = evaluate(FakeModel(model), None, method, Params(data=data, tokens=tokens, seed=seed))
    return row("ppl", model, method, params, metrics)


def needle_row(model: str, method: str, length: int, depth: float) -> dict[str, Any]:
    """A needle row: accuracy falls with depth for methods that keep fewer tokens than the context."""
    kept = kept_tokens(method, length)
    accuracy = 1.0 if kept >= length else round(max(0.0, 1.0 - depth) * kept / length + (depth > 0.9) * 0.5, 3)
    return row("needle", model, method, {"length": length, "depth": depth, "seed": 0}, {"accuracy": accuracy},
               hib={"accuracy": True})


def paper_rows() -> list[dict[str, Any]]:
    """Rows of every phase: lengths, budgets, window and sink ablations, three families, needle."""
    rows = []
    for model in ("smollm2-135m", "qwen2.5-0.5b", "gemma3-270m"):
        for method in ("full", "streaming:sinks=4,window=1020", "h2o:budget=1024,recent=256"):
            for tokens in (2000, 10000, 20000):
                rows.append(ppl_row(model, method, tokens, data="pg19"))
    for budget in (256, 512, 2048):
        rows.append(ppl_row("smollm2-135m", f"h2o:budget={budget},recent=128", 10000, data="pg19"))
    for window in (128, 256, 512, 4096):
        rows.append(ppl_row("smollm2-135m", f"streaming:sinks=4,window={window}", 10000, data="pg19"))
    for sinks in (0, 1, 2, 8, 16):
        rows.append(ppl_row("smollm2-135m", f"streaming:sinks={sinks},window=1020", 10000, data="pg19"))
    for method in ("full", "streaming:sinks=4,window=252"):
        for length in (256, 512, 1024):
            for depth in (0.0, 0.5, 1.0):
                rows.append(needle_row("smollm2-135m", method, length, depth))
    return rows
