"""The inputs both libraries see in a side-by-side run: token ids (and the text, for reading), made by
:mod:`kvlab.compare.kvpress` and sent to kvpress's worker by :mod:`kvlab.compare.kvpress_driver`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class QASample:
    """A question about a context; ``*_ids`` are what both libraries feed (the text is for reading)."""

    context: str
    question: str
    answer: str
    context_ids: list[int]
    question_ids: list[int]


@dataclass
class PplSample:
    """A context to prefill (and compress) and the continuation scored on the compressed cache."""

    context_ids: list[int]
    continuation_ids: list[int]
