"""Arguments and steps shared by the commands."""

from __future__ import annotations

import argparse
from typing import Any

from kvlab.errors import KvlabError


def add_model_args(p: argparse.ArgumentParser, default: str | None = "smollm2-135m") -> None:
    p.add_argument("--model", default=default, help="alias (see `kvlab models list`), hub id, local folder or .gguf file")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (float32 on CPU)")


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """Validate the device first (a missing CUDA is one line, before any download), then load."""
    from kvlab.device import resolve_device
    from kvlab.models import load

    device = resolve_device(args.device)
    return load(args.model, device=device, dtype=args.dtype)


def check_methods(specs: list[str]) -> list[str]:
    """Build every spec once so that a typo fails before a model is loaded."""
    from kvlab.methods import build

    for spec in specs:
        build(spec)
    return specs


def split_list(value: str, kind: type = str, name: str = "list") -> list:
    """``"a,b,c"`` → ``["a", "b", "c"]`` converted to ``kind`` (a KvlabError names the bad item).

    Method specs contain commas too, so methods are separated by ``;`` or given as repeated flags.
    """
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise KvlabError(f"empty {name}")
    try:
        return [kind(v) for v in items]
    except ValueError:
        raise KvlabError(f"{name} '{value}' must be {kind.__name__} values separated by commas") from None


def split_methods(values: list[str]) -> list[str]:
    """Method specs from repeated ``--method`` flags or one ``;``-separated flag."""
    out = [s.strip() for v in values for s in v.split(";") if s.strip()]
    if not out:
        raise KvlabError("no method given")
    return out
