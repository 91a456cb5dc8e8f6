"""A cell worker: loads one model once and runs cells on it, turning each into a row.

The same :class:`CellWorker` runs in the driver process (local executor) and inside a Ray actor
(Ray executor), so a cell gives the same row either way. Everything it needs travels in a picklable
:class:`WorkerSpec`: the model loader (a parameter, so tests inject a fake one) and the module path of
each evaluation (so a worker process resolves the same evaluations as the driver).
"""

from __future__ import annotations

import gc
import importlib
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

from kvlab.device import resolve_device, resolve_dtype
from kvlab.errors import KvlabError
from kvlab.lab.config import Cell
from kvlab.results import make_row

#: ``loader(name, device, dtype) -> (model, tokenizer)``
Loader = Callable[[str, torch.device, torch.dtype], tuple[Any, Any]]


def default_loader(name: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """Load a model by alias, hub id or path through :func:`kvlab.models.load`."""
    from kvlab.models import load

    return load(name, device=device, dtype=dtype)


@dataclass
class WorkerSpec:
    """What a worker needs besides its cells: how to load models and where each evaluation lives."""

    loader: Loader = default_loader
    eval_paths: dict[str, str] = field(default_factory=dict)  # eval name -> module path


class CellWorker:
    """Runs the cells of one model (and device/dtype), loading the model on the first cell only.

    A model that fails to load turns each of its cells into a failed row carrying the load error.
    """

    def __init__(self, model: str, device: str, dtype: str, spec: WorkerSpec) -> None:
        self.model_name, self.device_name, self.dtype_name, self.spec = model, device, dtype, spec
        self._model: Any = None
        self._tokenizer: Any = None
        self._load_error: str | None = None
        self._info: dict[str, Any] = {}
        self._evals: dict[str, ModuleType] = {}

    def _ensure_loaded(self, device: torch.device) -> None:
        if self._model is not None or self._load_error is not None:
            return
        start = time.perf_counter()
        try:
            dtype = resolve_dtype(None if self.dtype_name == "auto" else self.dtype_name, device)
            self._model, self._tokenizer = self.spec.loader(self.model_name, device, dtype)
        except Exception as exc:  # noqa: BLE001 - any load failure becomes failed rows, the sweep goes on
            self._load_error = f"loading model '{self.model_name}' failed: {_describe(exc)}"
            return
        config = getattr(self._model, "config", None)
        params = getattr(self._model, "parameters", None)
        self._info = {"name": self.model_name, "model_type": getattr(config, "model_type", None),
                      "parameters": sum(p.numel() for p in params()) if callable(params) else None,
                      "dtype": str(dtype).replace("torch.", ""), "load_s": round(time.perf_counter() - start, 3)}

    def _eval_module(self, name: str) -> ModuleType:
        if name not in self._evals:
            if name in self.spec.eval_paths:
                self._evals[name] = importlib.import_module(self.spec.eval_paths[name])
            else:
                from kvlab.evals import get_eval

                self._evals[name] = get_eval(name)
        return self._evals[name]

    def run(self, cell: Cell) -> dict[str, Any]:
        """Run one cell; return its complete row (status "failed" with the error if anything raised)."""
        device = resolve_device(None if cell.device == "auto" else cell.device)
        self._ensure_loaded(device)
        start = time.perf_counter()
        metrics: dict[str, Any] = {}
        higher: dict[str, bool] = {}
        error = notes = None
        if self._load_error is not None:
            error = self._load_error
        else:
            try:
                module = self._eval_module(cell.eval)
                higher = dict(getattr(module, "HIGHER_IS_BETTER", {}))
                params = module.Params(**cell.params)
                torch.manual_seed(int(cell.params.get("seed", 0)))
                metrics = _clean(module.evaluate(self._model, self._tokenizer, cell.method, params, progress=False))
            except Exception as exc:  # noqa: BLE001 - a failing cell is stored as a failed row
                error = _describe(exc)
                if not isinstance(exc, KvlabError):
                    notes = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-6:])
        row = make_row(cell.eval, cell.config(), metrics, higher_is_better=higher,
                       runtime_s=time.perf_counter() - start, error=error, device=str(device),
                       row_id=cell.id, notes=notes)
        row["model_info"] = dict(self._info)
        return row

    def close(self) -> None:
        """Free the model (and the CUDA cache) before the next model loads."""
        on_cuda = self._model is not None and str(getattr(self._model, "device", "")).startswith("cuda")
        self._model = self._tokenizer = None
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _clean(metrics: Any) -> dict[str, Any]:
    """Metrics as plain JSON values (numpy/torch scalars become floats, NaN/inf become None)."""
    if not isinstance(metrics, dict):
        raise TypeError(f"evaluate() must return a dict of metrics, got {type(metrics).__name__}")
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        elif hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
            try:
                value = value.item()
            except (TypeError, ValueError):
                pass
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[str(key)] = value
    return out
