"""Exact sinks: the first tokens a quantized segment ever sees, kept apart in full precision, never evicted.

A group whose scorer always keeps the first tokens (StreamingLLM's attention sinks, its ``sinks``) can keep them
unquantized (``QuantGroup.exact_sinks``): they take a large share of every query's attention, so their
quantization error would reach every output. On SmolLM2 (pydoc, 2048 tokens, budget 512, ``haq`` bits 8/4/2)
exact sinks on the 2-bit local heads bring perplexity from +11.9% to +6.4% of the full cache's, for 2 KiB per
head. KVQuant (Hooper et al. 2024) and IntactKV (Liu et al. 2024) keep the first token's KV in full precision
for the same reason. Layout::

    keys     (B, h, s, D)  float32, before RoPE (un-rotated from their true positions 0..s-1: exact)
    values   (B, h, s, D)  the model's dtype

They are rotated at every read, from these exact keys, to wherever the segment puts them (frame positions when it
re-indexes), in float32 and rounded once: never rotated step after step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvlab.storage.rope import Rotary, pass_through


class ExactSinks:
    """Up to ``count`` first tokens in full precision (see the module docstring); ``rotary`` None: no RoPE."""

    def __init__(self, count: int, rotary: Rotary | None):
        self.count, self.rotary = count, rotary
        self.clear()

    def clear(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self._prepared: torch.Tensor | None = None  # the keys made ready for Rotary.shift_range_by

    def start(self, key_states: torch.Tensor) -> None:
        """Empty tensors shaped like ``key_states (B, h, q, D)``."""
        b, h, _, d = key_states.shape
        self.keys = key_states.new_empty(b, h, 0, d, dtype=torch.float32)
        self.values = key_states.new_empty(b, h, 0, d)

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def take(self, key_states: torch.Tensor, value_states: torch.Tensor, seen: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep the tokens of ``key_states``, ``value_states (B, h, q, D)`` (true positions ``seen..``) that are among
        the first ``count`` ever seen; return the others."""
        s = max(0, min(self.count - seen, key_states.shape[-2]))
        if not s:  # every later token (each decode step): nothing to slice
            return key_states, value_states
        sink = key_states[:, :, :s]
        sink = sink.float() if self.rotary is None else self.rotary.shift_range(sink, seen, -1, torch.float32)
        self.keys = torch.cat((self.keys, sink), dim=2)
        self.values = torch.cat((self.values, value_states[:, :, :s]), dim=2)
        self._prepared = None
        return key_states[:, :, s:], value_states[:, :, s:]

    def rotate_into(self, out: torch.Tensor, start: int) -> None:
        """Write the keys, key ``i`` rotated to position ``start + i``, into ``out (B, h, s, D)``: two kernels from
        the exact keys made ready once (:meth:`Rotary.shift_range_by`, bit for bit :meth:`Rotary.shift_range`)."""
        if self._prepared is None:
            self._prepared = self.rotary.prepare(self.keys)
        self.rotary.shift_range_by(self._prepared, start, self.rotary.rotated(out))
        pass_through(self.keys, out, 2 * self.rotary.inv_freq.shape[0])

    def nbytes(self) -> int:
        """Bytes of the exact keys and the values."""
        return sum(t.nbytes for t in (self.keys, self.values) if t is not None)

    def reserved_nbytes(self) -> int:
        """The keys made ready for rotation, kept beside them once read (twice the rotated channels, float32)."""
        return self._prepared.nbytes if self._prepared is not None else 0

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``fn`` (a batch-axis reorder / repeat / select) to the keys and values."""
        if self.keys is not None:
            self.keys, self.values = fn(self.keys), fn(self.values)
        self._prepared = None
