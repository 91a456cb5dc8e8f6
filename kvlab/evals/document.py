"""Long-document streaming translation: consecutive sentence pairs stream as ONE document through ONE cache.

The research plan's Phase 1. Sentence-level translation (:mod:`kvlab.evals.translate`) never fills a cache;
here the document grows to ``tokens`` tokens (2,000-20,000) and the method's cache has to compress it:

* The document is the data's consecutive pairs from the start, taken until the source tokens (each word as
  it is fed) plus the reference's tokens reach ``params.tokens`` (:func:`build_document`).
* Sentence ``i`` is read, then translated, in the same cache as sentences ``0..i-1`` and their translations
  (``k=0``: the whole sentence is read first; ``k>=1``: wait-k inside the sentence, :func:`kvlab.evals.waitk.translate`).
* ``positions="batch"``: one stream in arrival order, a chat conversation (the instruction and the first
  sentence in the first user turn, each translation an assistant turn, each further sentence a user turn).
  ``positions="group"`` (GPE): the source part is the English document (sentences one per line after the
  instruction), the target part the French one (translations one per line after the assistant header);
  each part is compressed by its own cache (:class:`~kvlab.evals.waitk.GroupStream`).

Metrics: corpus BLEU and chrF of all sentences, BLEU/chrF of the sentences that reach into the last quarter of
the document (where compression has bitten) and into the first, AL/LAAL (source words, per sentence),
``kv_bytes_peak`` against ``kv_bytes_full`` (what a full cache holds for the tokens fed, computed), the
KV bytes after each sentence (``kv_bytes_trace``), tokens fed per second. A method that does not re-index
positions (the full cache) past the model's maximum position is not applicable (metrics None and a
``note``, as in ``kvlab memory``; ``kv_bytes_full`` is still given).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from kvlab.errors import KvlabError
from kvlab.evals.common import position_note
from kvlab.evals.memory import full_kv_bytes
from kvlab.evals.pairs import load_pairs
from kvlab.evals.simul import corpus_scores
from kvlab.evals.translate import LANGUAGES, POSITIONS, prompt_parts, source_words
from kvlab.evals.waitk import BatchStream, GroupStream, Output, translate
from kvlab.stream import eos_ids

HIGHER_IS_BETTER = {"bleu": True, "chrf": True, "bleu_last_quarter": True, "chrf_last_quarter": True,
                    "bleu_first_quarter": True, "al": False, "laal": False, "kv_bytes_peak": False,
                    "mem_reduction_pct": True, "tokens_per_s": True, "runtime_s": False}


@dataclass
class Params:
    """``tokens``: document length (source + reference tokens); ``k``: 0 reads each sentence whole before
    translating it, ``k>=1`` is wait-k inside the sentence; ``positions``: batch | group; ``phi``: first target
    position in group mode; ``data``: newstest2014 | SRC_FILE,TGT_FILE | PATH.json; ``max_word_tokens``:
    tokens at most in one written word."""

    tokens: int = 2000
    k: int = 0
    positions: str = "batch"
    phi: int = 0
    src_lang: str = "en"
    tgt_lang: str = "fr"
    data: str = "newstest2014"
    max_word_tokens: int = 12
    seed: int = 0

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise KvlabError(f"tokens (document length) must be at least 1, got {self.tokens}")
        if self.k < 0:
            raise KvlabError(f"k must be 0 (read each sentence whole) or a wait-k value >= 1, got {self.k}")
        if self.positions not in POSITIONS:
            raise KvlabError(f"unknown positions '{self.positions}'; choose from: {', '.join(POSITIONS)}")
        if self.phi < 0:
            raise KvlabError(f"phi must be >= 0, got {self.phi}")
        if self.positions == "batch":
            self.phi = 0
        if self.src_lang == self.tgt_lang:
            raise KvlabError(f"source and target language are both '{self.src_lang}'")
        if self.max_word_tokens < 1:
            raise KvlabError(f"max_word_tokens must be at least 1, got {self.max_word_tokens}")


@dataclass
class Document:
    """Consecutive pairs; ``offsets[i]``: document tokens before sentence ``i``; ``tokens``: the whole count."""

    pairs: list[tuple[str, str]]
    offsets: list[int] = field(default_factory=list)
    tokens: int = 0
    reference_tokens: int = 0


def build_document(tokenizer: Any, params: Params) -> Document:
    """The first consecutive pairs of ``params.data`` whose source (as fed, word by word) and reference tokens
    reach ``params.tokens``; a KvlabError if the whole data is shorter."""
    doc = Document(pairs=[])
    for src, ref in load_pairs(params.data, params.src_lang, params.tgt_lang):
        n_ref = len(tokenizer.encode(ref, add_special_tokens=False))
        doc.pairs.append((src, ref))
        doc.offsets.append(doc.tokens)
        doc.tokens += sum(map(len, source_words(tokenizer, src))) + n_ref
        doc.reference_tokens += n_ref
        if doc.tokens >= params.tokens:
            return doc
    raise KvlabError(f"translation data '{params.data}' has only {doc.tokens} tokens in {len(doc.pairs)} pairs; "
                     f"a document of {params.tokens} tokens needs more")


def turn_text(tokenizer: Any, src_lang: str) -> str:
    """What comes between an assistant's translation and the next source sentence in a conversation (its end
    of turn and the next user header); for a base model, ``"\\n\\nEnglish:"``."""
    src = LANGUAGES.get(src_lang, src_lang)
    if not getattr(tokenizer, "chat_template", None):
        return f"\n\n{src}:"
    marks = ["\u2063" * 3 + c * 12 for c in "#%&"]
    chat = [{"role": "user", "content": "x" + marks[0]}, {"role": "assistant", "content": marks[1]},
            {"role": "user", "content": marks[2]}]
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    return text.split(marks[1], 1)[1].split(marks[2], 1)[0]


class Pieces:
    """The token ids fed around each sentence: ``(head, words, tail)`` of sentence ``i``."""

    def __init__(self, tokenizer: Any, params: Params):
        enc = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
        head, tail = prompt_parts(tokenizer, params.src_lang, params.tgt_lang)
        self.tokenizer, self.group = tokenizer, params.positions == "group"
        self.head, self.tail, self.newline = enc(head), enc(tail), enc("\n")
        self.turn_text = turn_text(tokenizer, params.src_lang)
        self.turn = enc(self.turn_text)

    def __call__(self, i: int, sentence: str) -> tuple[list[int], list[list[int]], list[int]]:
        words = source_words(self.tokenizer, sentence)
        if i == 0:
            return self.head, words, self.tail
        first = sentence.split()[0]
        if not self.group:  # a new user turn (its first word starts a line if the header ends one), the assistant's
            if self.turn_text[-1:].isspace():
                words[0] = self.tokenizer.encode(first, add_special_tokens=False)
            return self.turn, words, self.tail
        # one sentence per line in each part: the first word starts a line
        return [], [self.tokenizer.encode("\n" + first, add_special_tokens=False), *words[1:]], self.newline


def _caches(stream: BatchStream | GroupStream) -> list[Any]:
    """The stream's caches: the source and target parts (group positions) or the one cache (batch)."""
    source = getattr(stream, "source", None)
    return [source, stream.cache.target] if source is not None else [stream.cache]


def _seen(stream: BatchStream | GroupStream) -> tuple[int, int]:
    """(source, target) tokens in the caches' positions (batch: everything counts as source)."""
    caches = _caches(stream)
    return caches[0].seen_tokens, sum(c.seen_tokens for c in caches[1:])


def _planned_positions(doc: Document, pieces: Pieces, params: Params) -> int:
    """The largest position the document should reach (the reference's length stands for the output's)."""
    prompt = len(pieces.head) + len(pieces.tail) + (len(doc.pairs) - 1) * (
        len(pieces.newline) * 2 if pieces.group else len(pieces.turn) + len(pieces.tail))
    if not pieces.group:
        return doc.tokens + prompt
    source = doc.tokens - doc.reference_tokens + len(pieces.head) + len(doc.pairs)
    return max(source, params.phi + doc.reference_tokens + len(pieces.tail) + len(doc.pairs))


def _full_bytes(model: Any, source: int, target: int) -> int:
    """What full caches would hold for these tokens (one per part in group mode), computed, in the model's dtype."""
    return sum(full_kv_bytes(model, n, 1) for n in (source, target) if n)


def _quarter(hyps: list[str], refs: list[str], keep: list[bool]) -> dict[str, float | None]:
    import sacrebleu

    h = [x for x, k in zip(hyps, keep) if k]
    r = [x for x, k in zip(refs, keep) if k]
    if not h:
        return {"bleu": None, "chrf": None}
    return {"bleu": sacrebleu.corpus_bleu(h, [r]).score, "chrf": sacrebleu.corpus_chrf(h, [r]).score}


def run_document(stream: BatchStream | GroupStream, tokenizer: Any, doc: Document, pieces: Pieces, k: int,
                 eos: set[int], *, max_word_tokens: int = 12, progress: bool = False
                 ) -> tuple[list[Output], list[list[int]]]:
    """Read and translate each sentence in turn through ``stream`` (``k=0``: the whole sentence first);
    the outputs, and ``[tokens seen, KV bytes held]`` after each sentence."""
    outs, trace = [], []
    for i, (src, _) in enumerate(tqdm(doc.pairs, desc=f"document {doc.tokens} tok", disable=not progress,
                                      leave=False)):
        head, words, tail = pieces(i, src)
        outs.append(translate(stream, tokenizer, head, words, tail, len(words) if k == 0 else k, eos,
                              max_word_tokens=max_word_tokens))
        trace.append([sum(_seen(stream)), stream.cache.nbytes()])
    return outs, trace


def evaluate(model, tokenizer, method: str, params: Params, *, progress: bool = False) -> dict:
    """Translate one document of ``params.tokens`` tokens under ``method``; one row's metrics."""
    doc = build_document(tokenizer, params)
    pieces = Pieces(tokenizer, params)
    planned = _planned_positions(doc, pieces, params)
    note = position_note(model, method, planned)
    base = {"sentences": len(doc.pairs), "doc_tokens": doc.tokens, "max_position": planned}
    if note:
        src = doc.tokens - doc.reference_tokens
        full = _full_bytes(model, planned, 0) if not pieces.group else _full_bytes(model, src, doc.reference_tokens)
        return {**base, "bleu": None, "chrf": None, "bleu_last_quarter": None, "al": None, "laal": None,
                "kv_bytes_peak": None, "kv_bytes_full": full, "mem_reduction_pct": None, "tokens_per_s": None,
                "note": note}
    stream = GroupStream(model, method, params.phi) if pieces.group else BatchStream(model, method)
    start = time.perf_counter()
    outs, trace = run_document(stream, tokenizer, doc, pieces, params.k, eos_ids(model, tokenizer),
                               max_word_tokens=params.max_word_tokens, progress=progress)
    runtime = time.perf_counter() - start
    hyps = [tokenizer.decode(o.tokens, skip_special_tokens=True).strip() for o in outs]
    delays, out_tokens = [o.delays for o in outs], sum(len(o.tokens) for o in outs)
    refs, sources = [t for _, t in doc.pairs], [s for s, _ in doc.pairs]
    scores = corpus_scores(hyps, refs, delays, sources)
    ends = doc.offsets[1:] + [doc.tokens]  # a quarter: the sentences that reach into it
    last = _quarter(hyps, refs, [e > 0.75 * doc.tokens for e in ends])
    first = _quarter(hyps, refs, [o < 0.25 * doc.tokens for o in doc.offsets])
    seen_src, seen_tgt = _seen(stream)
    full = sum(c.full_nbytes() for c in _caches(stream))
    return {**scores, **base, "bleu_last_quarter": last["bleu"], "chrf_last_quarter": last["chrf"],
            "bleu_first_quarter": first["bleu"], "stream_tokens": seen_src + seen_tgt, "target_tokens": out_tokens,
            "kv_bytes_peak": stream.peak_nbytes, "kv_bytes": stream.cache.nbytes(), "kv_bytes_full": full,
            "mem_reduction_pct": 100.0 * (1.0 - stream.peak_nbytes / full), "kv_bytes_trace": trace,
            "runtime_s": runtime, "tokens_per_s": (seen_src + seen_tgt) / runtime,
            "target_tokens_per_s": out_tokens / runtime, "hypotheses": hyps}
