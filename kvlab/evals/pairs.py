"""Sentence pairs for translation: the local newstest2014, two aligned text files, a JSON list, or WMT14.

``load_pairs(data, src, tgt)`` accepts:

* ``newstest2014`` — ``translation/newstest2014.{src,tgt}`` in the local data folder (``$KVLAB_DATA`` or
  ``../shared/data``), else WMT14's test split through the ``datasets`` library when a hub is reachable;
* ``SRC_FILE,TGT_FILE`` — two files with one sentence per line, aligned by line;
* ``PATH.json`` — a JSON list of objects with one key per language, e.g. ``{"en": ..., "fr": ...}``.

Pairs with a blank side are dropped (alignment is kept). A KvlabError for files of different lengths
(both counts given), no pairs at all, or a missing file.
"""

from __future__ import annotations

import json
from pathlib import Path

from kvlab.data import data_dir
from kvlab.errors import KvlabError

BUILTIN = ("newstest2014",)


def load_pairs(data: str, src: str, tgt: str, max_samples: int | None = None) -> list[tuple[str, str]]:
    """``[(source sentence, reference translation)]``, at most ``max_samples`` from the start."""
    if data == "newstest2014":
        pairs = _newstest(src, tgt)
    elif "," in data:
        src_file, tgt_file = (p.strip() for p in data.split(",", 1))
        pairs = _two_files(Path(src_file), Path(tgt_file))
    elif data.endswith(".json"):
        pairs = _json_pairs(Path(data), src, tgt)
    else:
        raise KvlabError(f"translation data '{data}' must be newstest2014, SRC_FILE,TGT_FILE or a .json list of pairs")
    pairs = [(s.strip(), t.strip()) for s, t in pairs if s.strip() and t.strip()]
    if not pairs:
        raise KvlabError(f"translation data '{data}' holds no sentence pairs (empty text)")
    return pairs[:max_samples] if max_samples else pairs


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise KvlabError(f"translation file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise KvlabError(f"{path} is not UTF-8 text") from None
    if not text.strip():
        raise KvlabError(f"translation file {path} is empty")
    return text.splitlines()


def _two_files(src: Path, tgt: Path) -> list[tuple[str, str]]:
    a, b = _read_lines(src), _read_lines(tgt)
    if len(a) != len(b):
        raise KvlabError(f"translation files differ in length: {src} has {len(a)} lines, {tgt} has {len(b)}")
    return list(zip(a, b))


def _json_pairs(path: Path, src: str, tgt: str) -> list[tuple[str, str]]:
    if not path.is_file():
        raise KvlabError(f"translation file {path} does not exist")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
        return [(str(r[src]), str(r[tgt])) for r in rows]
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
        raise KvlabError(f"{path}: expected a JSON list of {{\"{src}\": ..., \"{tgt}\": ...}} ({exc})") from None
    except KeyError as exc:
        raise KvlabError(f"{path}: a pair has no {exc} key (languages {src}->{tgt})") from None


def _newstest(src: str, tgt: str) -> list[tuple[str, str]]:
    folder = data_dir()
    if folder is not None:
        a, b = (folder / "translation" / f"newstest2014.{lang}" for lang in (src, tgt))
        if a.is_file() and b.is_file():
            return _two_files(a, b)
    other = tgt if src == "en" else src
    try:
        import datasets
    except ImportError:
        raise KvlabError("newstest2014 needs a local data folder ($KVLAB_DATA with translation/newstest2014.*) "
                         "or the datasets library (pip install 'kvlab[hub]'); or pass --data SRC_FILE,TGT_FILE") from None
    try:
        rows = datasets.load_dataset("wmt/wmt14", f"{other}-en", split="test")
    except Exception as exc:  # offline, no such pair, ...: one line, what to do
        raise KvlabError(f"could not get WMT14 {other}-en through datasets ({type(exc).__name__}); "
                         f"pass --data SRC_FILE,TGT_FILE or set $KVLAB_DATA") from None
    return [(r["translation"][src], r["translation"][tgt]) for r in rows]
