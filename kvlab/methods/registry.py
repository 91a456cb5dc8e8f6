"""The one registry of methods: the CLI, configs, the lab and the tests resolve names here.

    >>> build("streaming:sinks=4,window=1020")
    StreamingLLM(sinks=4, window=1020)

A new method is a dataclass in its own file plus one ``register`` call (or one line below).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from kvlab.errors import KvlabError, did_you_mean, unknown
from kvlab.methods.base import Method
from kvlab.spec import parse_spec

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Add a Method subclass under its ``name`` (usable as a class decorator)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method name '{cls.name}' is already taken by {METHODS[cls.name].__name__}")
    METHODS[cls.name] = cls
    return cls


def names() -> list[str]:
    _load_builtins()
    return sorted(METHODS)


def get(name: str) -> type[Method]:
    _load_builtins()
    if name not in METHODS:
        raise unknown("method", name, METHODS)
    return METHODS[name]


def build(spec: str) -> Method:
    """Parse ``name:key=value,...`` and build the method, coercing values to the field types."""
    name, raw = parse_spec(spec)
    cls = get(name)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            valid = ", ".join(fields) or "none"
            raise KvlabError(f"method '{name}' has no setting '{key}'{did_you_mean(key, fields)}; its settings: {valid}")
        kwargs[key] = _coerce(name, key, value, hints[key])
    return cls(**kwargs)


def _coerce(method: str, key: str, value: str, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):  # e.g. str | None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    try:
        if hint is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if hint is int:
            return int(value)
        if hint is float:
            return float(value)
        return value
    except ValueError:
        raise KvlabError(f"method '{method}': {key}={value!r} is not a valid {getattr(hint, '__name__', hint)}") from None


_BUILTINS = (
    "kvlab.methods.full:Full",
    "kvlab.methods.streaming_llm:StreamingLLM",
    "kvlab.methods.h2o:H2O",
    "kvlab.methods.head_aware:HeadAware",
    "kvlab.methods.haq:HAQ",
    "kvlab.methods.quant:Quant",
    "kvlab.methods.snapkv:SnapKV",
    "kvlab.methods.pyramidkv:PyramidKV",
    "kvlab.methods.tova:TOVA",
    "kvlab.methods.knorm:KNorm",
    "kvlab.methods.keydiff:KeyDiff",
    "kvlab.methods.duo:Duo",
)


def _load_builtins() -> None:
    if all(entry.rsplit(":", 1)[1] in {c.__name__ for c in METHODS.values()} for entry in _BUILTINS):
        return
    import importlib

    for entry in _BUILTINS:
        module, cls = entry.split(":")
        register(getattr(importlib.import_module(module), cls))
