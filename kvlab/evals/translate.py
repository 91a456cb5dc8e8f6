"""Streaming (simultaneous) translation with wait-k, batch or group positions, and a compressed cache.

As in the GPE paper (Tong et al., ACL Findings 2025): the source arrives word by word, the model writes
one target word per write step under wait-k; ``positions="batch"`` numbers every token in arrival order,
``positions="group"`` numbers the source and the target in two groups (target from ``phi``) and lets the
source attend only to itself (see :mod:`kvlab.evals.waitk` and :mod:`kvlab.evals.groupcache`). The
method compresses the source and target parts separately in group mode, the one stream in batch mode.
``mode="offline"`` reads the whole sentence first: the full-sentence upper bound.

Metrics: corpus BLEU and chrF (sacrebleu), AL and LAAL in source words (:mod:`kvlab.evals.simul`).
The prompt is the tokenizer's chat template (an instruction, then the source words; the target follows
the assistant header) or, for a base model, ``"<instruction> English: <words>\\nFrench:"``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from kvlab.errors import KvlabError
from kvlab.evals.pairs import load_pairs
from kvlab.evals.simul import corpus_scores
from kvlab.evals.waitk import BatchStream, GroupStream, translate
from kvlab.stream import eos_ids

HIGHER_IS_BETTER = {"bleu": True, "chrf": True, "al": False, "laal": False, "kv_bytes_peak": False, "runtime_s": False}
MODES = ("waitk", "offline")
POSITIONS = ("batch", "group")
LANGUAGES = {"en": "English", "fr": "French", "de": "German", "es": "Spanish", "it": "Italian", "pt": "Portuguese",
             "nl": "Dutch", "cs": "Czech", "pl": "Polish", "ru": "Russian", "ro": "Romanian", "tr": "Turkish",
             "fi": "Finnish", "et": "Estonian", "hi": "Hindi", "zh": "Chinese", "ja": "Japanese", "ko": "Korean",
             "ar": "Arabic", "uk": "Ukrainian"}


@dataclass
class Params:
    """``mode``: waitk | offline; ``k``: source words read before the first write; ``positions``: batch | group;
    ``phi``: first target position in group mode; ``data``: newstest2014 | SRC_FILE,TGT_FILE | PATH.json;
    ``max_samples``: sentences (from the start); ``max_word_tokens``: tokens at most in one written word.
    Offline cells store ``k=0`` and ``positions="batch"`` (they read everything, in one group)."""

    mode: str = "waitk"
    k: int = 3
    positions: str = "group"
    phi: int = 0
    src_lang: str = "en"
    tgt_lang: str = "fr"
    data: str = "newstest2014"
    max_samples: int = 50
    max_word_tokens: int = 12
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise KvlabError(f"unknown translation mode '{self.mode}'; choose from: {', '.join(MODES)}")
        if self.positions not in POSITIONS:
            raise KvlabError(f"unknown positions '{self.positions}'; choose from: {', '.join(POSITIONS)}")
        if self.mode == "offline":
            self.k, self.positions, self.phi = 0, "batch", 0
        elif self.k < 1:
            raise KvlabError(f"k must be at least 1 (source words read before the first write), got {self.k}")
        if self.phi < 0:
            raise KvlabError(f"phi must be >= 0, got {self.phi}")
        if self.src_lang == self.tgt_lang:
            raise KvlabError(f"source and target language are both '{self.src_lang}'")
        for name in ("max_samples", "max_word_tokens"):
            if getattr(self, name) < 1:
                raise KvlabError(f"{name} must be at least 1, got {getattr(self, name)}")


def prompt_parts(tokenizer: Any, src_lang: str, tgt_lang: str) -> tuple[str, str]:
    """``(head, tail)``: the text before the first source word and the text between source and target."""
    src, tgt = LANGUAGES.get(src_lang, src_lang), LANGUAGES.get(tgt_lang, tgt_lang)
    instruction = f"Translate the following {src} text into {tgt}. Reply with the {tgt} translation only.\n\n{src}:"
    if not getattr(tokenizer, "chat_template", None):
        return (getattr(tokenizer, "bos_token", None) or "") + instruction, f"\n{tgt}:"
    separator = "\u2063" * 3 + "#" * 12
    text = tokenizer.apply_chat_template([{"role": "user", "content": instruction + separator}],
                                         add_generation_prompt=True, tokenize=False)
    head, tail = text.split(separator)
    return head, tail


def source_words(tokenizer: Any, sentence: str) -> list[list[int]]:
    """Token ids of each whitespace-separated source word, each with its leading space."""
    return [tokenizer.encode(" " + w, add_special_tokens=False) for w in sentence.split()]


def evaluate(model, tokenizer, method: str, params: Params, *, progress: bool = False) -> dict:
    """Translate ``params.max_samples`` sentences under ``method``; one row's metrics."""
    pairs = load_pairs(params.data, params.src_lang, params.tgt_lang, params.max_samples)
    head_text, tail_text = prompt_parts(tokenizer, params.src_lang, params.tgt_lang)
    head = tokenizer.encode(head_text, add_special_tokens=False)
    tail = tokenizer.encode(tail_text, add_special_tokens=False)
    eos = eos_ids(model, tokenizer)
    hyps, delays, peak, out_tokens = [], [], 0, 0
    start = time.perf_counter()
    for src, _ in tqdm(pairs, desc=f"translate {params.mode} {params.positions} k={params.k}", disable=not progress,
                       leave=False):
        words = source_words(tokenizer, src)
        stream = GroupStream(model, method, params.phi) if params.positions == "group" else BatchStream(model, method)
        k = len(words) if params.mode == "offline" else params.k
        out = translate(stream, tokenizer, head, words, tail, k, eos, max_word_tokens=params.max_word_tokens)
        hyps.append(tokenizer.decode(out.tokens, skip_special_tokens=True).strip())
        delays.append(out.delays)
        peak = max(peak, stream.peak_nbytes)
        out_tokens += len(out.tokens)
    runtime = time.perf_counter() - start
    scores = corpus_scores(hyps, [t for _, t in pairs], delays, [s for s, _ in pairs])
    return {**scores, "samples": len(pairs), "target_words": sum(len(d) for d in delays) / len(pairs),
            "kv_bytes_peak": peak, "runtime_s": runtime, "target_tokens_per_s": out_tokens / runtime,
            "hypotheses": hyps}
