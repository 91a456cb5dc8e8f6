"""The one registry of methods: the CLI, configs, the lab and the tests resolve names here.

    >>> build("streaming:sinks=4,window=1020")
    StreamingLLM(sinks=4, window=1020)

A new method is a dataclass in its own file plus one ``register`` call (or one line below).

Methods from other packages: an installed distribution declares them in the ``kvlab.methods``
entry-point group (``name = module:Class``, the name being the method's ``name``). Their names are
listed without importing anything; a plugin is imported the first time its method is built, and a
plugin that fails to import is one line naming its package. :func:`describe` says which package
each method comes from.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from importlib import metadata
from typing import Any

from kvlab.errors import KvlabError, did_you_mean, unknown
from kvlab.methods.base import Method
from kvlab.spec import parse_spec

METHODS: dict[str, type[Method]] = {}
GROUP = "kvlab.methods"  # the entry-point group of methods from other packages


def register(cls: type[Method]) -> type[Method]:
    """Add a Method subclass under its ``name`` (usable as a class decorator)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method name '{cls.name}' is already taken by {METHODS[cls.name].__name__}")
    METHODS[cls.name] = cls
    is_reference.cache_clear()
    return cls


def names() -> list[str]:
    """Every method's name: kvlab's, those registered in Python, and other packages' (not imported)."""
    _load_builtins()
    return sorted(set(METHODS) | set(_plugins()))


def describe() -> dict[str, str]:
    """``{name: package}`` for every method: ``kvlab`` for the built-ins, a distribution's name for an
    entry point, the top-level module for a method registered in Python."""
    _load_builtins()
    out = {n: cls.__module__.split(".")[0] for n, cls in METHODS.items()}
    out.update({n: _dist_name(ep) for n, ep in _plugins().items() if n not in METHODS})
    return dict(sorted(out.items()))


def get(name: str) -> type[Method]:
    _load_builtins()
    if name not in METHODS:
        plugins = _plugins()
        if name not in plugins:
            raise unknown("method", name, set(METHODS) | set(plugins))
        _load_plugin(plugins[name])
    return METHODS[name]


@functools.lru_cache(maxsize=None)
def is_reference(name: str) -> bool:
    """Whether ``name`` is the registry's full cache (keeps every token, exactly): the reference every other method
    is compared with in tables and figures. An alias or subclass of it counts too. Asked once per name (tables ask
    it of every row; an unknown name reads the installed packages' entry points), until :func:`register` changes
    the registry."""
    from kvlab.methods.full import Full

    try:
        return issubclass(get(str(name)), Full)
    except KvlabError:
        return False


def _plugins() -> dict[str, metadata.EntryPoint]:
    """The ``kvlab.methods`` entry points of installed distributions, by name (first one wins)."""
    found: dict[str, metadata.EntryPoint] = {}
    for ep in metadata.entry_points(group=GROUP):
        found.setdefault(ep.name, ep)
    return found


def _dist_name(ep: metadata.EntryPoint) -> str:
    return ep.dist.name if ep.dist is not None else ep.value.split(":")[0].split(".")[0]


def _load_plugin(ep: metadata.EntryPoint) -> None:
    where = f"method '{ep.name}' of package '{_dist_name(ep)}' ({ep.value})"
    try:
        cls = ep.load()
    except Exception as exc:  # a plugin's own bug: one line, not a traceback
        raise KvlabError(f"{where} failed to import: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise KvlabError(f"{where} is not a kvlab.Method subclass")
    if cls.name != ep.name:
        raise KvlabError(f"{where}: the class is named '{cls.name}', not '{ep.name}'")
    if METHODS.get(ep.name) is not cls:
        register(cls)


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
    "kvlab.methods.adakv:AdaKV",
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
