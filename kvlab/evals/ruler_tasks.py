"""RULER's synthetic tasks (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context
Language Models?"), as NVIDIA/RULER's ``scripts/synthetic.yaml`` defines them, built locally.

A :class:`Task` is one row of that table; :func:`build` turns it into the text of one sample with ``n``
haystack units (sentences, words, distractor needles or list entries; :func:`kvlab.evals.ruler` searches
``n`` so that the prompt has the requested number of tokens)::

    niah_single_1/2/3     one key, one value; haystack noise / essay / essay; value number / number / uuid
    niah_multikey_1       4 keys in an essay, one asked
    niah_multikey_2/3     the haystack is made of distractor needles (word keys / uuid keys and values)
    niah_multivalue       one key with 4 values, all asked
    niah_multiquery       4 keys, all asked
    vt                    variable tracking: 1 chain of 4 hops in noise, after one worked example
    cwe                   common words: 10 words x30 among words x3, a numbered list, after one example
    fwe                   frequent words: coded words drawn from a Zipf law (alpha 2); the 3 most frequent

Word lists (keys, common words) come from the ``wonderwords`` package, as in RULER. The "essay" haystack is
the filler text given (pydoc, PG-19, WikiText or a file), whitespace-normalized into words as RULER does
with Paul Graham's essays. Each part is ``(context, question, answer_prefix, answers)``: the context is
what is prefilled (and compressed) before the question is seen.
"""

from __future__ import annotations

import math
import random
import re
import string
import uuid
from dataclasses import dataclass
from functools import lru_cache

NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER's 40 insertion depths (percent)


@dataclass(frozen=True)
class Task:
    """One synthetic task. ``kind``: niah | vt | cwe | fwe; ``max_new_tokens``: RULER's tokens_to_generate.

    niah: ``haystack`` noise | essay | needle, ``key``/``value`` numbers | words | uuids, ``keys`` needles
    (``values`` each), ``queries`` of them asked. vt: ``chains`` of ``hops``. cwe: ``num_cw`` common words
    repeated ``freq_cw`` times among others repeated ``freq_ucw`` times. fwe: Zipf exponent ``alpha``."""

    kind: str
    max_new_tokens: int
    haystack: str = "essay"
    key: str = "words"
    value: str = "numbers"
    keys: int = 1
    values: int = 1
    queries: int = 1
    chains: int = 1
    hops: int = 4
    freq_cw: int = 30
    freq_ucw: int = 3
    num_cw: int = 10
    alpha: float = 2.0

    @property
    def uses_filler(self) -> bool:
        return self.haystack == "essay" and self.kind == "niah"


TASKS: dict[str, Task] = {
    "niah_single_1": Task("niah", 128, haystack="noise"),
    "niah_single_2": Task("niah", 128),
    "niah_single_3": Task("niah", 128, value="uuids"),
    "niah_multikey_1": Task("niah", 128, keys=4),
    "niah_multikey_2": Task("niah", 128, haystack="needle"),
    "niah_multikey_3": Task("niah", 128, haystack="needle", key="uuids", value="uuids"),
    "niah_multivalue": Task("niah", 128, values=4),
    "niah_multiquery": Task("niah", 128, keys=4, queries=4),
    "vt": Task("vt", 30, haystack="noise"),
    "cwe": Task("cwe", 120),
    "fwe": Task("fwe", 50),
}

Parts = tuple[str, str, str, list[str]]  # (context, question, answer prefix, expected strings)


def min_units(task: Task) -> int:
    """The fewest haystack units a sample of ``task`` can have (fwe: enough words for answers 1-3 to occur)."""
    if task.kind == "fwe":
        return math.ceil(zeta(task.alpha) * 4 ** task.alpha)
    if task.kind == "cwe":
        return task.num_cw + 1
    return 1


def max_units(task: Task) -> int | None:
    """The most haystack units a sample of ``task`` can have (None: no limit; the filler wraps around)."""
    if task.kind == "cwe":
        nouns, adjectives, verbs = word_lists()
        return len(set(nouns + adjectives + verbs)) - 40  # the worked example takes 40 others
    return None


def build(task: Task, n: int, seed: str, filler: list[str], length: int) -> Parts:
    """One sample of ``task`` with ``n`` haystack units; deterministic in ``seed`` (a string). The needles and
    answers do not depend on ``n`` (only where they land does), so the length search keeps the same sample."""
    rng = random.Random(seed)
    if task.kind == "niah":
        return _niah(task, n, rng, filler, seed)
    if task.kind == "vt":
        return _vt(task, n, rng)
    if task.kind == "cwe":
        return _cwe(task, n, rng, length)
    return _fwe(task, n, rng, length)


@lru_cache(maxsize=1)
def word_lists() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(nouns, adjectives, verbs) of ``wonderwords``, one-word entries only, sorted."""
    try:
        from wonderwords import RandomWord
    except ImportError:  # a dependency of kvlab: only a broken install lacks it
        from kvlab.errors import KvlabError

        raise KvlabError("RULER's word lists need the wonderwords package: pip install wonderwords") from None
    words = RandomWord()
    return tuple(tuple(sorted(set(words.filter(include_categories=[c], exclude_with_spaces=True))))
                 for c in ("noun", "adjective", "verb"))


def zeta(alpha: float, terms: int = 10_000) -> float:
    """Riemann zeta(alpha) for alpha > 1: a partial sum plus its Euler-Maclaurin tail."""
    n = terms
    return sum(k ** -alpha for k in range(1, n)) + n ** (1 - alpha) / (alpha - 1) + n ** -alpha / 2


def _random(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    nouns, adjectives, _ = word_lists()
    return f"{rng.choice(adjectives)}-{rng.choice(nouns)}"


def _weave(units: list[str], inserts: list[tuple[float, str]]) -> list[tuple[bool, str]]:
    """Units with each insert placed before unit ``int(depth * len(units))``; ``(is_insert, text)`` pieces."""
    at: dict[int, list[str]] = {}
    for depth, text in sorted(inserts, key=lambda t: t[0]):
        at.setdefault(min(int(depth * len(units)), len(units)), []).append(text)
    out: list[tuple[bool, str]] = []
    for i in range(len(units) + 1):
        out += [(True, t) for t in at.get(i, [])]
        if i < len(units):
            out.append((False, units[i]))
    return out


def _noise_text(n: int, inserts: list[tuple[float, str]]) -> str:
    """``n`` noise sentences with the inserts on lines of their own."""
    units = [NOISE[i % len(NOISE)] for i in range(n)]
    text = "".join(f"\n{t}\n" if ins else f"{t} " for ins, t in _weave(units, inserts))
    return re.sub(r" *\n *", "\n", text).strip()


def _essay_text(n: int, inserts: list[tuple[float, str]], filler: list[str], start: int) -> str:
    """``n`` filler words from ``start`` (wrapping around), cut into sentences; inserts between sentences."""
    words = [filler[(start + i) % len(filler)] for i in range(n)]
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(words).strip())
    return " ".join(t for _, t in _weave(sentences, inserts))


def _sentence_start(words: list[str], start: int, reach: int = 200) -> int:
    """The first word after ``start`` that follows a sentence end (``start`` itself when none is near)."""
    for i in range(start, start + reach):
        if words[(i - 1) % len(words)][-1:] in ".!?":
            return i % len(words)
    return start


def _niah(task: Task, n: int, rng: random.Random, filler: list[str], seed: str) -> Parts:
    needle = "One of the special magic {v} for {k} is: {x}."
    keys: list[str] = []
    while len(keys) < max(task.keys, task.queries):
        k = _random(task.key, rng)
        keys += [] if k in keys else [k]
    values = [[_random(task.value, rng) for _ in range(task.values)] for _ in keys]
    needles = [needle.format(v=task.value, k=k, x=x) for k, vs in zip(keys, values) for x in vs]
    depths = [d / 100 for d in rng.sample(DEPTHS, len(needles))]
    asked = sorted(rng.sample(range(len(keys)), task.queries))
    inserts = list(zip(depths, needles))
    if task.haystack == "noise":
        context = _noise_text(n, inserts)
    elif task.haystack == "essay":
        context = _essay_text(n, inserts, filler, _sentence_start(filler, rng.randrange(len(filler))))
    else:  # distractor needles, drawn from their own stream so that n more units extend the same list
        hay = random.Random(seed + ":haystack")
        units = []
        while len(units) < n:
            k = _random(task.key, hay)
            if k not in keys:
                units.append(needle.format(v=task.value, k=k, x=_random(task.value, hay)))
        context = "\n".join(t for _, t in _weave(units, inserts))
    query = keys[asked[0]] if len(asked) == 1 else ", ".join(keys[i] for i in asked[:-1]) + f", and {keys[asked[-1]]}"
    intro = f"Some special magic {task.value} are hidden within the following text. Make sure to memorize it. " \
            f"I will quiz you about the {task.value} afterwards.\n"
    question = f"What are all the special magic {task.value} for {query} mentioned in the provided text?"
    prefix = f"The special magic {task.value} for {query} mentioned in the provided text are"
    if task.queries * task.values == 1:  # RULER's singular wording
        one = task.value[:-1]
        intro = intro.replace("Some", "A").replace(f" {task.value} are", f" {one} is").replace(
            f"the {task.value}", f"the {one}")
        question = question.replace("are all", "is").replace(f"magic {task.value}", f"magic {one}")
        prefix = prefix.replace(f"magic {task.value}", f"magic {one}")[:-len(" are")] + " is"
    return intro + context + "\n", question, prefix, [x for i in asked for x in values[i]]


def _chains(task: Task, rng: random.Random) -> tuple[list[list[str]], list[list[str]]]:
    """``chains`` lists of ``hops + 1`` distinct 5-letter variable names, and their assignment statements."""
    names: list[str] = []
    while len(names) < task.chains * (task.hops + 1):
        v = "".join(rng.choices(string.ascii_uppercase, k=5))
        names += [] if v in names else [v]
    groups = [names[i:i + task.hops + 1] for i in range(0, len(names), task.hops + 1)]
    statements = [[f"VAR {g[0]} = {rng.randint(10000, 99999)}"]
                  + [f"VAR {g[j + 1]} = VAR {g[j]}" for j in range(task.hops)] for g in groups]
    return groups, statements


def _vt_parts(task: Task, n: int, rng: random.Random) -> Parts:
    groups, statements = _chains(task, rng)
    inserts = [(d, s) for chain in statements for d, s in zip(sorted(rng.random() for _ in chain), chain)]
    value = statements[0][0].split("= ")[-1]
    context = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n" + \
              _noise_text(n, inserts) + "\n"
    question = f"Question: Find all variables that are assigned the value {value} in the text above."
    prefix = f"Answer: According to the chain(s) of variable assignment in the text above, {task.hops + 1} " \
             f"variables are assigned the value {value}, they are:"
    return context, question, prefix, groups[0]


def _vt(task: Task, n: int, rng: random.Random) -> Parts:
    """The sample after one worked example (RULER's one-shot variable tracking)."""
    ex_context, ex_question, ex_prefix, ex_answer = _vt_parts(task, 40, random.Random(rng.random()))
    context, question, prefix, answer = _vt_parts(task, n, rng)
    example = f"{ex_context}{ex_question} {ex_prefix} {' '.join(ex_answer)}\n\n"
    return example + context, question, prefix, answer


def _cwe_list(words: list[str], num_cw: int, freq_cw: int, freq_ucw: int, rng: random.Random) -> tuple[str, list[str]]:
    common = words[:num_cw]
    entries = common * freq_cw + words[num_cw:] * freq_ucw
    rng.shuffle(entries)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(entries)), common


def _cwe(task: Task, n: int, rng: random.Random, length: int) -> Parts:
    nouns, adjectives, verbs = word_lists()
    pool = sorted(set(nouns + adjectives + verbs))
    if n > len(pool) - 40:  # the example takes the last 40
        raise ValueError(f"cwe: {n} distinct words asked, {len(pool) - 40} available")
    rng.shuffle(pool)
    small = length < 4096  # RULER: fewer repetitions below 4k tokens
    ex_list, ex_common = _cwe_list(pool[-20:] if small else pool[-40:], task.num_cw, 3 if small else 10,
                                   1 if small else 3, rng)
    words_list, common = _cwe_list(pool[:n], task.num_cw, 6 if small else task.freq_cw, 1 if small else task.freq_ucw,
                                   rng)
    intro = "Below is a numbered list of words. In these words, some appear more often than others. " \
            "Memorize the ones that appear most often.\n"
    question = f"Question: What are the {task.num_cw} most common words in the above list?"
    prefix = f"Answer: The top {task.num_cw} words that appear most often in the list are:"
    example = f"{intro}{ex_list}\n{question} {prefix} " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_common))
    return f"{example}\n{intro}{words_list}\n", question, prefix, common


def _fwe(task: Task, n: int, rng: random.Random, length: int) -> Parts:
    size = max(length // 50, 8)  # RULER's vocabulary: a coded word per 50 tokens
    vocab: set[str] = set()
    while len(vocab) < size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))
    ranked = sorted(vocab)
    rng.shuffle(ranked)
    ranked[0] = "..."  # the most frequent "word" is noise
    z = zeta(task.alpha)
    text = [w for k, w in enumerate(ranked, 1) for _ in range(int(n * k ** -task.alpha / z))]
    random.Random(rng.random()).shuffle(text)
    context = "Read the following coded text and track the frequency of each coded word. Find the three most " \
              f"frequently appeared coded words. {' '.join(text)}\n"
    question = "Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most " \
               "frequently appeared words in the above coded text?"
    prefix = "Answer: According to the coded text above, the three most frequently appeared words are:"
    return context, question, prefix, ranked[1:4]
