"""User-facing errors: the CLI prints the message on one line and exits with code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class KvlabError(ValueError):
    """An error caused by the user's input or environment, with a message that says what to do.

    It is a ``ValueError``, so Python code that catches bad values catches it too.

    The CLI catches it, prints ``kvlab: error: <message>`` on stderr and exits with code 2,
    without a traceback and without writing a partial result.
    """


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest choice, or ``""`` when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown(kind: str, name: str, choices: Iterable[str]) -> KvlabError:
    """A KvlabError for an unknown name, listing the valid ones and the closest match."""
    choices = sorted(choices)
    return KvlabError(f"unknown {kind} '{name}'{did_you_mean(name, choices)}; choose from: {', '.join(choices)}")
