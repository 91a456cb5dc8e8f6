"""Evaluations: one module each, one registry, one contract.

Every evaluation module defines

* ``Params`` — a dataclass of its settings (validated in ``__post_init__`` with KvlabError);
* ``HIGHER_IS_BETTER`` — ``{metric: bool}`` for the metrics that have a direction;
* ``evaluate(model, tokenizer, method: str, params: Params, *, progress: bool = False) -> dict``
  — runs ONE cell (one model, one method spec, one parameter point) and returns its metrics
  (numbers, or None for "not applicable" with a ``"note"`` string metric saying why).

The CLI commands and the lab's runner both go through :func:`get_eval`, so a row written by
``kvlab ppl --output`` and a row written by ``kvlab run`` have the same shape
(see :mod:`kvlab.results`).
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType
from typing import Any

from kvlab.errors import KvlabError, unknown

# name -> module path; modules are imported only when used.
EVALS: dict[str, str] = {
    "ppl": "kvlab.evals.ppl",
    "needle": "kvlab.evals.needle",
    "ruler": "kvlab.evals.ruler",
    "memory": "kvlab.evals.memory",
    "latency": "kvlab.evals.latency",
    "translate": "kvlab.evals.translate",
    "translate_document": "kvlab.evals.document",
    "kvpress": "kvlab.compare.kvpress",
}


def register_eval(name: str, module: str) -> None:
    """Register the evaluation module at import path ``module`` under ``name`` (for plug-ins and tests).

    The module follows the contract above; it is imported only when used. A name already taken by
    another module is a KvlabError.
    """
    if EVALS.get(name, module) != module:
        raise KvlabError(f"evaluation '{name}' is already registered as {EVALS[name]}")
    EVALS[name] = module


def unregister_eval(name: str) -> None:
    """Remove the evaluation registered under ``name`` (nothing happens if there is none)."""
    EVALS.pop(name, None)


def get_eval(name: str) -> ModuleType:
    """The evaluation module registered under ``name`` (KvlabError with a suggestion if unknown)."""
    if name not in EVALS:
        raise unknown("evaluation", name, EVALS)
    return importlib.import_module(EVALS[name])


def make_params(name: str, values: dict[str, Any]) -> Any:
    """Build the evaluation's ``Params`` from a plain dict; an unknown key names the closest valid one."""
    module = get_eval(name)
    fields = {f.name for f in dataclasses.fields(module.Params)}
    for key in values:
        if key not in fields:
            raise unknown(f"setting for evaluation '{name}'", key, fields)
    try:
        return module.Params(**values)
    except TypeError as exc:
        raise KvlabError(f"evaluation '{name}': {exc}") from exc
