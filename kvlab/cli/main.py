"""Entry point of the ``kvlab`` console script.

Each sub-command lives in its own module under ``kvlab.cli`` and exposes ``register(subparsers)``;
commands set ``func(args) -> int``. A :class:`~kvlab.errors.KvlabError` becomes one line on stderr
and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from kvlab.errors import KvlabError

# One module per command group; each defines register(subparsers).
COMMAND_MODULES = (
    "kvlab.cli.demo",
    "kvlab.cli.ppl",
    "kvlab.cli.generate",
    "kvlab.cli.models",
    "kvlab.cli.heads",
    "kvlab.cli.evals",
    "kvlab.cli.ruler",
    "kvlab.cli.lab",
    "kvlab.cli.compare",
    "kvlab.cli.doctor",
)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``kvlab: error: ...``) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvlab", description="KV-cache compression for Hugging Face causal LMs, and a lab to compare methods.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KvlabError as exc:
        print(f"kvlab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
