"""Decode steps under a dispatch mode: the helpers of tests/test_host_sync.py and tests/test_step_ops.py."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kvlab

KVLAB = str(Path(kvlab.__file__).parent)


def kvlab_frame(depth: int = 2):
    """The innermost frame (from ``depth`` up the caller's stack) in kvlab's own code, or None."""
    frame = sys._getframe(depth)
    while frame is not None and not frame.f_code.co_filename.startswith(KVLAB):
        frame = frame.f_back
    return frame


def decode_under(mode: TorchDispatchMode, model: torch.nn.Module, cache, ids: torch.Tensor,
                 mask: torch.Tensor | None, steps: int) -> None:
    """Prefill ``ids`` (with ``mask``) outside ``mode``, then greedy-decode ``steps`` tokens inside it."""
    with torch.no_grad():
        token = model(ids, attention_mask=mask, past_key_values=cache).logits[:, -1:].argmax(-1)
        with mode:
            for _ in range(steps):
                token = model(token, past_key_values=cache).logits[:, -1:].argmax(-1)
