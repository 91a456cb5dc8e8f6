"""Needle-in-a-haystack samples: natural filler text, needles at chosen depths, a question.

    samples = make_samples(tokenizer, length=4000, depths=[0, 50, 100], seed=0)
    samples[0].context   # rendered text fed (and compressed) BEFORE the question is seen
    samples[0].question  # rendered text fed after it: question, chat-template assistant header, answer prefix
    samples[0].answer    # "48213": graded by the first number of the greedy answer (:func:`is_correct`)

Two variants:

* ``passkey`` — one random 5-digit pass key (Mohtashami & Jaggi 2023, "Landmark Attention");
* ``multikey`` — ``keys`` needles "One of the special magic numbers for <key> is: <7 digits>.", the one
  asked about at the requested depth and ``keys - 1`` distractor keys at random depths (RULER's MK-NIAH,
  Hsieh et al. 2024); it separates methods that keep "some number" from those that keep the right one.

``length`` is the number of tokens of ``context`` (chat header, instruction, filler and needles; the
exact count is in :attr:`Sample.context_tokens`, within a few tokens of ``length``). Everything is
deterministic in ``seed``: the filler window depends on (seed, length, sample index) only, so every
depth of one sample shares its haystack; the keys depend on the depth as well.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from kvlab.errors import KvlabError

VARIANTS = ("passkey", "multikey")
MIN_FILLER = 16  # filler tokens a sample needs at least

_PASSKEY = {
    "intro": "There is an important piece of information hidden inside a lot of irrelevant text. "
             "Find it and memorize it. I will quiz you about it.\n\n",
    "needle": "The pass key is {value}. Remember it. {value} is the pass key.",
    "question": "What is the pass key?",
    "prefix": "The pass key is",
}
_MULTIKEY = {
    "intro": "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
             "I will quiz you about the numbers afterwards.\n\n",
    "needle": "One of the special magic numbers for {key} is: {value}.",
    "question": "What is the special magic number for {key} mentioned in the provided text?",
    "prefix": "The special magic number for {key} mentioned in the provided text is",
}
_ADJECTIVES = ("amber", "brave", "calm", "dusty", "eager", "fuzzy", "giant", "hollow", "icy", "jolly", "kind",
               "lively", "misty", "noisy", "odd", "proud", "quiet", "rapid", "silent", "tidy", "upbeat", "vivid",
               "windy", "young", "zesty", "bitter", "crisp", "gentle", "humble", "loyal")
_NOUNS = ("anchor", "badger", "candle", "dragon", "engine", "falcon", "garden", "harbor", "island", "jacket",
          "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quartz", "river", "saddle", "tiger",
          "violin", "walnut", "yacht", "zebra", "barrel", "cactus", "dolphin", "feather", "glacier", "helmet")
_NICE_END = re.compile(r"[.!?:;]\s*$|\n\s*$")


@dataclass(frozen=True)
class Sample:
    """One needle question. ``context`` + ``question`` is the whole prompt; the split is where the
    question-agnostic setting compresses. ``depth`` is the requested depth (percent of the filler),
    ``needle_depth`` where the asked-about needle really starts (same scale)."""

    context: str
    question: str
    answer: str
    depth: float
    needle_depth: float
    context_tokens: int
    variant: str = "passkey"


def check_depths(depths: list[float]) -> None:
    bad = [d for d in depths if not 0 <= d <= 100]
    if bad:
        raise KvlabError(f"depths must be between 0 and 100 (percent), got {bad[0]:g}")


def render(tokenizer: Any, context: str, question: str) -> tuple[str, str]:
    """Split the prompt where the question starts: ``(head, tail)``. With a chat template the user
    turn is ``context + question`` and the tail ends with the assistant header; without one the head
    starts with the BOS text. (The same rendering as kvpress's pipeline, so both see identical text.)"""
    if not getattr(tokenizer, "chat_template", None):
        return (getattr(tokenizer, "bos_token", None) or "") + context, question + "\n"
    separator = "\u2063" * 3 + "#" * 12  # cannot occur in the context
    text = tokenizer.apply_chat_template([{"role": "user", "content": context + separator}],
                                         add_generation_prompt=True, tokenize=False)
    head, tail = text.split(separator)
    return head, question + tail


def is_correct(generated: str, answer: str) -> bool:
    """Exact match of the first number in the generated text with the answer."""
    match = re.search(r"\d+", generated.replace(",", ""))
    return match is not None and match.group(0) == answer


def grade(generated: str, answer: str) -> tuple[bool, bool]:
    """``(contains, exact_match)`` of a generated text, the rule of kvpress's side of ``kvlab compare`` (its
    worker, which cannot import kvlab, repeats it): the answer as a whole word anywhere; the whole text,
    spaces collapsed and outer dots dropped, equal to the answer."""
    contains = re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", generated) is not None
    return contains, " ".join(generated.split()).strip(" .") == answer.strip()


def make_samples(tokenizer: Any, length: int, depths: list[float], seed: int = 0, *, data: str = "pydoc",
                 variant: str = "passkey", keys: int = 4, n: int = 1, text: str | None = None) -> list[Sample]:
    """``n`` samples per depth (sample-major order) of about ``length`` context tokens.

    ``data`` names the filler (see :func:`kvlab.data.load_text`; ``text`` overrides it). A KvlabError
    when a depth is outside 0-100, the variant is unknown, or the text is too short for ``length``.
    """
    check_depths(list(depths))
    if variant not in VARIANTS:
        raise KvlabError(f"unknown needle variant '{variant}'; choose from: {', '.join(VARIANTS)}")
    if variant == "multikey" and not 2 <= keys <= len(_ADJECTIVES):
        raise KvlabError(f"multikey needs between 2 and {len(_ADJECTIVES)} keys, got {keys}")
    if n < 1:
        raise KvlabError(f"samples per depth must be at least 1, got {n}")
    if text is None:
        from kvlab.data import load_text

        text = load_text(data)
    ids = tokenizer.encode(text, add_special_tokens=False)
    out = []
    for i in range(n):
        for depth in depths:
            rng = random.Random(f"needle:{seed}:{length}:{float(depth)}:{i}")
            out.append(_sample(tokenizer, ids, length, float(depth), variant, keys, rng,
                               random.Random(f"haystack:{seed}:{length}:{i}"), data))
    return out


def _needles(variant: str, keys: int, depth: float, rng: random.Random) -> tuple[list[tuple[float, str]], str, str, str]:
    """``([(depth, needle text)], question, answer prefix, answer)``; the first needle is the asked one."""
    if variant == "passkey":
        value = str(rng.randint(10000, 99999))
        t = _PASSKEY
        return [(depth, t["needle"].format(value=value))], t["question"], t["prefix"], value
    t = _MULTIKEY
    names = rng.sample([f"{a}-{b}" for a in _ADJECTIVES for b in _NOUNS], keys)
    values = [str(v) for v in rng.sample(range(1_000_000, 10_000_000), keys)]
    needles = [(depth, t["needle"].format(key=names[0], value=values[0]))]
    needles += [(rng.uniform(0, 100), t["needle"].format(key=k, value=v)) for k, v in zip(names[1:], values[1:])]
    return needles, t["question"].format(key=names[0]), t["prefix"].format(key=names[0]), values[0]


def _sample(tokenizer: Any, ids: list[int], length: int, depth: float, variant: str, keys: int,
            rng: random.Random, hay_rng: random.Random, data: str) -> Sample:
    needles, question, prefix, answer = _needles(variant, keys, depth, rng)
    intro = (_PASSKEY if variant == "passkey" else _MULTIKEY)["intro"]
    head0, _ = render(tokenizer, intro, question)
    overhead = _count(tokenizer, head0) + sum(_count(tokenizer, f"\n{t}\n") for _, t in needles)
    need = length - overhead
    if need < MIN_FILLER:
        raise KvlabError(f"length {length} is too short: the prompt and needle alone take {overhead} tokens")
    if need > len(ids):
        raise KvlabError(f"data '{data}' has only {len(ids)} tokens; length {length} needs {need} tokens of it")
    start = _line_start(tokenizer, ids, hay_rng.randrange(0, len(ids) - need + 1), need)
    hay = ids[start:start + need]
    # cut the filler at each needle's depth (snapped to a sentence or line end nearby), asked needle first
    cuts = [_snap(tokenizer, hay, round(d / 100 * need)) for d, _ in needles]
    order = sorted(range(len(needles)), key=lambda j: (cuts[j], j))
    body, prev = intro, 0
    for j in order:
        body += tokenizer.decode(hay[prev:cuts[j]])
        body += f"\n{needles[j][1]}\n"
        prev = cuts[j]
    body += tokenizer.decode(hay[prev:])
    head, tail = render(tokenizer, body, question)
    return Sample(context=head, question=tail + prefix, answer=answer, depth=depth,
                  needle_depth=100.0 * cuts[0] / need, context_tokens=_count(tokenizer, head), variant=variant)


def _line_start(tokenizer: Any, ids: list[int], start: int, need: int, reach: int = 64) -> int:
    """Move the filler's start forward to the beginning of a line when one is near (and text remains)."""
    for c in range(max(start, 1), min(start + reach, len(ids) - need + 1)):
        if tokenizer.decode(ids[c - 1:c]).endswith("\n"):
            return c
    return start


def _snap(tokenizer: Any, hay: list[int], cut: int, reach: int = 48) -> int:
    """Move a cut to the nearest token that ends a sentence or a line (within ``reach`` tokens)."""
    if cut <= 0 or cut >= len(hay):
        return max(0, min(cut, len(hay)))
    for delta in range(reach + 1):
        for c in (cut - delta, cut + delta):
            if 0 < c < len(hay) and _NICE_END.search(tokenizer.decode(hay[c - 1:c])):
                return c
    return cut


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))
