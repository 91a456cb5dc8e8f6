"""Probe inputs (needle copy, repeated random tokens, natural text) and a forward pass that keeps
only the attention rows of chosen queries.

The haystack and the natural text come from Python's own ``pydoc_data.topics`` (present with every
Python), so no data set is needed; all randomness comes from ``random.Random(seed)``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from kvlab.errors import KvlabError

# Needle words: common, concrete, mostly one token each, unrelated to the Python docs of the haystack.
WORDS = ("apple", "river", "candle", "tiger", "garden", "violin", "planet", "copper", "forest", "harbor",
         "lemon", "marble", "needle", "orange", "pencil", "rabbit", "saddle", "tomato", "valley", "window",
         "anchor", "basket", "castle", "dragon", "engine", "falcon", "ginger", "helmet", "island", "jacket",
         "kettle", "ladder", "meadow", "napkin", "oyster", "pepper", "quartz", "rocket", "silver", "tunnel",
         "walrus", "yellow", "zebra", "banana", "cherry", "donkey", "feather", "guitar", "hammer", "jungle",
         "lantern", "mirror", "parrot", "pillow", "sunset", "thunder", "velvet", "whistle", "blanket", "compass")

INTRO = " The secret code is:"
QUESTION = "\n\nQuestion: What is the secret code mentioned in the text above?\nAnswer: The secret code is:"


def haystack_text() -> str:
    """Natural English text: the Python documentation topics, in a fixed order (about 460k characters)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (any Hugging Face tokenizer, or one with ``encode``)."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def special_prefix(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before a text by default (e.g. ``[bos]``, or none)."""
    return list(tokenizer.encode("", add_special_tokens=True))


def text_ids(tokenizer: Any, text: str, rng: random.Random, length: int) -> list[int]:
    """``length`` token ids of natural text starting at a random character offset of ``text``."""
    chars = 12 * length + 64
    if len(text) <= chars:
        raise KvlabError(f"a context of {length} tokens is too long for the built-in text; use a shorter one")
    offset = rng.randrange(len(text) - chars)
    ids = encode(tokenizer, text[offset:offset + chars])
    if len(ids) < length:
        raise KvlabError(f"could not cut {length} tokens of text (got {len(ids)}); use a shorter context")
    return ids[:length]


@dataclass(frozen=True)
class Probe:
    """One forward input and the queries to keep.

    ``input_ids``: (1, T). ``query_pos``: (Q,) positions whose attention rows are scored.
    ``target_pos``: (Q,) needle positions being copied (retrieval probes only).
    ``target_ids``: (Q,) the token each query should predict (retrieval probes only).
    """

    input_ids: torch.Tensor
    query_pos: torch.Tensor
    target_pos: torch.Tensor | None = None
    target_ids: torch.Tensor | None = None


def needle_probe(tokenizer: Any, text: str, rng: random.Random, *, context_len: int, depth: float,
                 needle_words: int) -> Probe:
    """A haystack of ``context_len`` text tokens with " The secret code is: w1 ... wK." at ``depth``
    (0..1), a question, and the needle teacher-forced as the answer. The needle ids are tokenized once
    and reused, so the answer tokens are exactly the context's needle tokens.
    """
    hay = text_ids(tokenizer, text, rng, context_len)
    needle = encode(tokenizer, " " + " ".join(rng.sample(WORDS, needle_words)))
    cut = int(depth * context_len)
    before = special_prefix(tokenizer) + hay[:cut] + encode(tokenizer, INTRO)
    context = before + needle + encode(tokenizer, ".\n") + hay[cut:] + encode(tokenizer, QUESTION)
    ids = context + needle
    k = len(needle)
    query_pos = torch.arange(len(context) - 1, len(context) - 1 + k)  # the query whose output is needle[j]
    target_pos = torch.arange(len(before), len(before) + k)
    return Probe(torch.tensor([ids]), query_pos, target_pos, torch.tensor(needle))


def repeat_probe(tokenizer: Any, rng: random.Random, *, period: int, vocab_size: int) -> Probe:
    """Random ordinary tokens r (length ``period``) as prefix + r + r; queries are the second copy."""
    specials = set(getattr(tokenizer, "all_special_ids", None) or [])
    tokens: list[int] = []
    while len(tokens) < period:
        t = rng.randrange(vocab_size)
        if t not in specials:
            tokens.append(t)
    prefix = special_prefix(tokenizer)
    start = len(prefix) + period
    return Probe(torch.tensor([prefix + tokens + tokens]), torch.arange(start, start + period))


def text_probe(tokenizer: Any, text: str, rng: random.Random, *, length: int, first_query: int) -> Probe:
    """``length`` tokens of natural text (with the special prefix); queries from ``first_query`` on."""
    prefix = special_prefix(tokenizer)
    ids = prefix + text_ids(tokenizer, text, rng, length - len(prefix))
    return Probe(torch.tensor([ids]), torch.arange(first_query, len(ids)))


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    found = {m.layer_idx: m for name, m in model.named_modules()
             if name.endswith("self_attn") and isinstance(getattr(m, "layer_idx", None), int)}
    layers = model.config.get_text_config().num_hidden_layers
    if sorted(found) != list(range(layers)):
        raise KvlabError(f"{type(model).__name__}: found self-attention modules for layers {sorted(found)[:5]}..., "
                         f"expected {layers}; head profiling supports decoder-only transformers models")
    return [found[i] for i in range(layers)]


@contextmanager
def eager_attention(model: Any) -> Iterator[None]:
    """Run ``model`` with eager attention (which returns probabilities), restoring its setting after."""
    before = model.config._attn_implementation
    if before != "eager":
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if before != "eager":
            model.set_attn_implementation(before)


Reducer = Callable[[torch.Tensor], torch.Tensor]


def run_probe(model: Any, probe: Probe, reduce: Reducer, logits_to_keep: int = 1
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass; for each layer, ``reduce`` gets the float32 rows ``(Hq, Q, T)`` of the probe's
    queries as soon as the layer has run, so only a layer's attention is alive at a time.

    Returns ``(stacked reductions (layers, ...), logits of the last logits_to_keep positions (1, n, V))``.
    """
    modules = attention_modules(model)
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and probe.input_ids.shape[-1] > limit:
        raise KvlabError(f"a probe of {probe.input_ids.shape[-1]} tokens exceeds the model's {limit} positions; "
                         f"lower the context or sample lengths")
    results: list[torch.Tensor | None] = [None] * len(modules)
    device = next(model.parameters()).device
    query_pos = probe.query_pos.to(device)

    def hook_for(layer: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise KvlabError(f"layer {layer} returned no attention probabilities; head profiling needs "
                                 f"attn_implementation='eager'")
            results[layer] = reduce(weights[0].index_select(1, query_pos).float())  # (Hq, Q, T) -> ...
        return hook

    handles = [m.register_forward_hook(hook_for(i)) for i, m in enumerate(modules)]
    try:
        with eager_attention(model), torch.inference_mode():
            out = model(input_ids=probe.input_ids.to(device), use_cache=False, logits_to_keep=logits_to_keep)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([r for r in results if r is not None]), out.logits
