"""Small pieces the evaluations share: position limits, the settings of a token stream, the row config of one cell."""

from __future__ import annotations

import dataclasses
from typing import Any

from kvlab.errors import KvlabError
from kvlab.methods import Method, build


@dataclasses.dataclass
class StreamParams:
    """A stream of ``tokens`` tokens of ``data`` (pydoc | wikitext-2 | wikitext-103 | pg19 | PATH) fed through
    the cache ``chunk_size`` tokens per forward pass (1 = exact token-by-token streaming). Evaluations subclass
    it with their own defaults."""

    data: str = "pydoc"
    tokens: int = 2048
    chunk_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.tokens < 2:
            raise KvlabError(f"tokens must be at least 2, got {self.tokens}")
        if self.chunk_size < 1:
            raise KvlabError(f"chunk_size must be at least 1, got {self.chunk_size}")


def max_positions(model: Any) -> int | None:
    """The model's trained maximum position (``max_position_embeddings``), None when it has none."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if value else None


def position_note(model: Any, method: str | Method, tokens: int) -> str | None:
    """Why ``tokens`` positions cannot run under ``method`` on ``model`` (None when they can).

    A method that re-indexes kept tokens (``Method.reindex``) keeps every distance inside its cache, so it
    runs past the model's maximum position; any other method (the full cache) is not applicable there.
    """
    m = build(method) if isinstance(method, str) else method
    limit = max_positions(model)
    if limit is None or tokens <= limit or m.reindex:
        return None
    return (f"not applicable: {tokens} tokens exceed the model's {limit} positions and '{m.name}' "
            f"does not re-index positions")


def cell_config(model_name: str, method: str, eval_name: str, params: Any, *, device: str = "auto",
                dtype: str = "auto") -> dict[str, Any]:
    """The row config of one cell, in the lab's shape (so a CLI row and a lab row share an id)."""
    return {"model": model_name, "method": method, "eval": eval_name, "params": dataclasses.asdict(params),
            "device": device, "dtype": dtype}
