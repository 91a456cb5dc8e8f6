"""Text sources for evaluations: built-in, the shared data folder, the hub (``datasets``), or a file.

``load_text(name)`` accepts:

* ``pydoc`` — Python's ``pydoc_data.topics``: natural English present on every machine;
* ``wikitext-2`` / ``wikitext-103`` (same test split) and ``pg19`` (one test book) — read from a local
  data folder when one is present (``$KVLAB_DATA``, else ``../shared/data`` beside the checkout), else
  through the ``datasets`` library (``pip install kvlab[hub]``) when the hub is reachable;
* a path to a ``.txt`` file, or a ``.jsonl`` / ``.json`` file of ``{"text": ...}`` rows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kvlab.errors import KvlabError, did_you_mean

BUILTIN = ("pydoc", "wikitext-2", "wikitext-103", "pg19")
_LOCAL = {"wikitext-2": "wikitext2/wiki.test.raw", "wikitext-103": "wikitext2/wiki.test.raw", "pg19": "pg19/10321.txt"}
_HUB = {"wikitext-2": ("wikitext", "wikitext-2-raw-v1"), "wikitext-103": ("wikitext", "wikitext-103-raw-v1"),
        "pg19": ("emozilla/pg19-test", None)}


def data_dir() -> Path | None:
    """The local data folder: ``$KVLAB_DATA``, else ``../shared/data`` next to the repository, if present."""
    env = os.environ.get("KVLAB_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    return next((p for p in candidates if p.is_dir()), None)


def pydoc_text() -> str:
    """Python's own documentation topics, joined in a fixed order (~465k characters)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def load_text(name: str) -> str:
    """The whole text of a data source (see the module docstring)."""
    if name == "pydoc":
        text = pydoc_text()
    elif name in _LOCAL:
        text = _local_or_hub(name)
    else:
        path = Path(name)
        if not path.exists():
            hint = did_you_mean(name, BUILTIN)
            raise KvlabError(f"data '{name}' is neither a file nor one of {', '.join(BUILTIN)}{hint}")
        text = _read_file(path)
    if not text.strip():
        raise KvlabError(f"data '{name}' is empty")
    return text


def _read_file(path: Path) -> str:
    if path.is_dir():
        raise KvlabError(f"data path {path} is a folder; give a .txt or .jsonl file")
    if path.suffix in (".jsonl", ".json"):
        try:
            raw = path.read_text(encoding="utf-8")
            rows = json.loads(raw) if path.suffix == ".json" else [json.loads(l) for l in raw.splitlines() if l.strip()]
            return "".join(r["text"] for r in rows)
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise KvlabError(f"{path}: expected rows of {{\"text\": ...}} ({exc})") from None
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise KvlabError(f"{path} is not UTF-8 text") from None


def _local_or_hub(name: str) -> str:
    folder = data_dir()
    if folder is not None and (folder / _LOCAL[name]).exists():
        return (folder / _LOCAL[name]).read_text(encoding="utf-8")
    try:
        import datasets
    except ImportError:
        raise KvlabError(f"data '{name}' needs a local data folder ($KVLAB_DATA) or the datasets library "
                         f"(pip install 'kvlab[hub]'); or pass --data PATH") from None
    repo, config = _HUB[name]
    try:
        rows = datasets.load_dataset(repo, config, split="test")
    except Exception as exc:  # offline, no such dataset, ...: one line, what to do
        raise KvlabError(f"could not get '{name}' through datasets ({type(exc).__name__}); "
                         f"set HF_ENDPOINT/HF_HUB_OFFLINE, $KVLAB_DATA, or pass --data PATH") from None
    return "".join(rows["text"])


def tokenize(tokenizer, text: str, tokens: int | None, *, name: str = "text"):
    """``(1, tokens)`` ids of the start of ``text``; a KvlabError when the text is too short."""
    import torch

    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    if tokens is not None:
        if tokens < 2:
            raise KvlabError(f"--tokens must be at least 2, got {tokens}")
        if ids.shape[1] < tokens:
            raise KvlabError(f"{name} has only {ids.shape[1]} tokens; asked for {tokens}")
        ids = ids[:, :tokens]
    return ids.to(torch.long)
