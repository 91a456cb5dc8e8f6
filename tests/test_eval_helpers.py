"""Helpers shared by the evaluation tests: byte-level tokenizers for the tiny random models (vocab 256),
with and without a chat template, and an ASCII filler text. (No tests here.)"""

from __future__ import annotations

from types import SimpleNamespace

import torch

FILLER = "\n".join(
    f"Paragraph {i}. The quick brown fox number {i} jumps over the lazy dog. "
    f"It then rests under tree {i % 7} and thinks about the river.\n" for i in range(400))


class ByteTokenizer:
    """One token per UTF-8 byte; no chat template, no BOS."""

    chat_template = None
    bos_token = None
    eos_token_id = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def __call__(self, text: str, return_tensors: str | None = None, add_special_tokens: bool = False):
        ids = self.encode(text)
        return SimpleNamespace(input_ids=torch.tensor([ids]) if return_tensors == "pt" else ids)


class ChatByteTokenizer(ByteTokenizer):
    """A byte tokenizer with a trivial chat template: ``<u>content</u><a>``."""

    chat_template = "<u>{{ content }}</u><a>"

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False):
        text = "".join(f"<u>{m['content']}</u>" for m in messages) + ("<a>" if add_generation_prompt else "")
        return self.encode(text) if tokenize else text
