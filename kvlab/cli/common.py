"""Arguments and steps shared by the commands: one convention for every command (see the README's
"CLI conventions"): results into ``--out DIR`` (rows and a figure), methods through a repeatable ``--method``
(or one ``;``-separated list), progress bars on a terminal only and never with ``--no-progress``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kvlab.errors import KvlabError


def add_model_args(p: argparse.ArgumentParser, default: str | None = "smollm2-135m") -> None:
    p.add_argument("--model", default=default, help="alias (see `kvlab models list`), hub id, local folder or .gguf file")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (float32 on CPU)")


def add_method_arg(p: argparse.ArgumentParser, default: str | None, *, extra: str = "") -> None:
    """``--method SPEC`` (alias ``--methods``), repeatable or one ``;``-separated list; read with :func:`methods_of`."""
    p.add_argument("--method", "--methods", dest="method", action="append", metavar="SPEC",
                   help=f"method spec(s): repeat the flag, or separate with ';'{extra} (default {default!r})")
    p.set_defaults(default_method=default)


def methods_of(args: argparse.Namespace) -> list[str]:
    """The method specs given (or the command's default), each built once so that a typo fails early."""
    given = args.method or ([args.default_method] if args.default_method else [])
    return check_methods(split_specs(given))


def add_out_arg(p: argparse.ArgumentParser, default: str) -> None:
    """``--out DIR``: the folder of the command's rows (``DIR/rows/<id>.json``) and figure."""
    p.add_argument("--out", default=None, metavar="DIR", help=f"output folder: rows and figure (default {default})")


def add_progress_arg(p: argparse.ArgumentParser, *, quiet_alias: bool = False) -> None:
    """``--no-progress`` (and ``--quiet``, its older name, where a command had it); read with :func:`progress_on`."""
    names = ["--no-progress", *(["--quiet"] if quiet_alias else [])]
    p.add_argument(*names, dest="no_progress", action="store_true",
                   help="no progress bars or progress lines (they are shown on a terminal only)")


def progress_on(args: argparse.Namespace) -> bool:
    """Progress bars: on a terminal, unless ``--no-progress``."""
    return not getattr(args, "no_progress", False) and sys.stderr.isatty()


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


def split_specs(values: list[str]) -> list[str]:
    """Method specs from repeated flags, ``;`` or commas: ``full,streaming:sinks=4,window=1020`` is two specs,
    because a comma-separated item that is a ``key=value`` (no ``:`` before its ``=``) continues the spec before it."""
    out: list[str] = []
    for spec in split_methods(values):
        for item in (i.strip() for i in spec.split(",")):
            if not item:
                continue
            starts_spec = "=" not in item or (":" in item and item.index(":") < item.index("="))
            if starts_spec or not out:
                out.append(item)
            else:
                out[-1] += "," + item
    return out
