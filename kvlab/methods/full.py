"""The full cache: nothing is evicted. The reference every other method is measured against."""

from __future__ import annotations

from dataclasses import dataclass

from kvlab.methods.base import Method


@dataclass
class Full(Method):
    """Keep every token (a plain dynamic cache, with kvlab's byte accounting)."""

    name = "full"
    reindex = False
