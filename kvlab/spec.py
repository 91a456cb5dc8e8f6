"""Spec strings: ``name:key=value,key=value`` names a method (or any registered object) and its settings.

    >>> parse_spec("streaming:sinks=4,window=1020")
    ('streaming', {'sinks': '4', 'window': '1020'})

Values stay strings here; the registry coerces them to the dataclass field types.
"""

from __future__ import annotations

from kvlab.errors import KvlabError


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Split ``name:k=v,...`` into the name and a dict of raw string values."""
    if not isinstance(spec, str) or not spec.strip():
        raise KvlabError("empty method spec; expected 'name' or 'name:key=value,...'")
    name, _, rest = spec.strip().partition(":")
    params: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise KvlabError(f"bad setting '{part}' in spec '{spec}'; expected key=value")
        if key.strip() in params:
            raise KvlabError(f"setting '{key.strip()}' given twice in spec '{spec}'")
        params[key.strip()] = value.strip()
    return name.strip(), params


def format_spec(name: str, params: dict[str, object]) -> str:
    """The inverse of :func:`parse_spec` (keys in the given order)."""
    if not params:
        return name
    return name + ":" + ",".join(f"{k}={v}" for k, v in params.items())


def without_profile(spec: str) -> str:
    """``spec`` without its ``profile=PATH`` setting (a file that the runs name elsewhere), every other setting kept
    in order: a short label for tables and figures."""
    name, params = parse_spec(spec)
    return format_spec(name, {k: v for k, v in params.items() if k != "profile"})
