"""The wait-k read/write policy over a decoder-only model, with two position schemes.

A *stream* holds the model's state for one sentence; the policy reads source words and writes target
words through it:

* :class:`BatchStream` — one cache and one running index: tokens are numbered in the order they arrive
  (instruction, k source words, assistant header, a target word, a source word, ...), each attending to
  everything before it. The next target token after a read is predicted from the read's last token.
* :class:`GroupStream` — GPE: a source part (instruction and source words, positions 0..S-1, attending
  only to the source) and a target part (assistant header and target words, positions phi..) in a
  :class:`~kvlab.evals.groupcache.TargetCache`. To let the next target word see a word read since, the
  last target token is taken back (:meth:`TargetCache.pop_last`) and fed again after the read, so every
  target token's keys and values are computed once, with the source read when it is kept.

:func:`translate` runs wait-k (Ma et al. 2019, STACL): read ``k`` words, then alternate one written target
word and one read source word; once the source is exhausted, write to the end. A target word ends where
the next token starts with whitespace; an end-of-sequence token or a line break ends the translation
once the whole source is read (before that, it ends the write step early and the next word is read).
``k >= number of source words`` is the offline (full-sentence) translation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from kvlab.cache import KVCache, make_cache
from kvlab.evals.groupcache import TargetCache


class Stream(Protocol):
    peak_nbytes: int

    def read(self, ids: list[int]) -> None: ...
    def write(self, ids: list[int]) -> torch.Tensor: ...
    def next_logits(self) -> torch.Tensor: ...
    def end_word(self, more_source: bool) -> None: ...


def _forward(model: Any, ids: list[int], cache: Any, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    inp = torch.tensor([ids], device=model.device)
    with torch.no_grad():
        out = model(input_ids=inp, past_key_values=cache, position_ids=position_ids, use_cache=True, logits_to_keep=1)
    return out.logits[0, -1]


class BatchStream:
    """One cache over the interleaved stream (positions = arrival order)."""

    def __init__(self, model: Any, method: str):
        self.model, self.cache = model, make_cache(model, method)
        self.logits: torch.Tensor | None = None
        self.peak_nbytes = 0

    def _feed(self, ids: list[int]) -> torch.Tensor:
        self.logits = _forward(self.model, ids, self.cache)
        self.peak_nbytes = max(self.peak_nbytes, self.cache.peak_nbytes)
        return self.logits

    read = write = _feed

    def next_logits(self) -> torch.Tensor:
        return self.logits

    def end_word(self, more_source: bool) -> None:
        pass


class GroupStream:
    """Source and target parts, each compressed by its own cache (GPE positions, target from ``phi``)."""

    def __init__(self, model: Any, method: str, phi: int = 0):
        self.model, self.phi = model, phi
        self.source: KVCache = make_cache(model, method)
        self.cache = TargetCache(self.source, make_cache(model, method))
        self.logits: torch.Tensor | None = None
        self.pending: list[int] = []
        self.last: int | None = None
        self.peak_nbytes = 0

    def read(self, ids: list[int]) -> None:
        _forward(self.model, ids, self.source)
        self.peak_nbytes = max(self.peak_nbytes, self.cache.nbytes())

    def write(self, ids: list[int]) -> torch.Tensor:
        pos = self.cache.position_ids(len(ids), self.phi, self.model.device)
        self.logits = _forward(self.model, ids, self.cache, pos)
        self.peak_nbytes = max(self.peak_nbytes, self.cache.nbytes())
        self.last, self.pending = ids[-1], []
        return self.logits

    def next_logits(self) -> torch.Tensor:
        return self.write(self.pending) if self.pending else self.logits

    def end_word(self, more_source: bool) -> None:
        if more_source and not self.pending and self.last is not None:
            self.cache.pop_last()
            self.pending = [self.last]


@dataclass
class Output:
    """One translated sentence: target ``tokens`` and, per written word, its ``delays`` (source words read)."""

    tokens: list[int] = field(default_factory=list)
    words: list[list[int]] = field(default_factory=list)
    delays: list[int] = field(default_factory=list)


def translate(stream: Stream, tokenizer: Any, head: list[int], words: list[list[int]], tail: list[int], k: int,
              eos: set[int], *, max_words: int | None = None, max_word_tokens: int = 12) -> Output:
    """Wait-k over ``words`` (token ids of each source word); ``head`` is the instruction before the source,
    ``tail`` what precedes the target (the assistant header). See the module docstring."""
    max_words = max_words if max_words is not None else 2 * len(words) + 10
    out = Output()
    read = min(k, len(words))  # the instruction and the first k words arrive before any write: one forward
    stream.read(head + [t for w in words[:read] for t in w])
    stream.write(tail)
    while len(out.delays) < max_words:
        logits, word, finished = stream.next_logits(), [], False
        while True:
            tok = int(logits.argmax())
            added = _added_text(tokenizer, word, tok)
            if tok in eos or "\n" in added:
                finished = read >= len(words)
                break
            if word and added[:1].isspace():
                break
            word.append(tok)
            logits = stream.write([tok])
            if len(word) >= max_word_tokens:
                break
        if word:
            out.words.append(word)
            out.tokens += word
            out.delays.append(read)
        if finished:
            break
        more = read < len(words)
        stream.end_word(more)
        if more:
            stream.read(words[read])
            read += 1
        elif not word:  # nothing left to read and nothing written: stop
            break
    return out


def _added_text(tokenizer: Any, word: list[int], tok: int) -> str:
    """The text ``tok`` adds after ``word`` (decoding in context keeps SentencePiece's leading spaces)."""
    if not word:
        return tokenizer.decode([tok])
    before = tokenizer.decode(word)
    after = tokenizer.decode(word + [tok])
    return after[len(before):] if after.startswith(before) else tokenizer.decode([tok])
