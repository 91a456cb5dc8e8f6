"""``fingerprint(model)``: a short, stable hash of a model's weights.

sha256 over every parameter, in name order (tied weights counted once, as ``named_parameters`` gives them):
its name, dtype and shape, then its raw bytes. By default only a deterministic sample of each tensor's
elements is hashed — ``SAMPLE`` elements at a fixed stride over the flattened tensor (all of them when the
tensor is smaller) — so a 0.5B model hashes in well under a second. Two different checkpoints (or two random
initialisations) differ in nearly every element and so in the sample; a change to a single element can
escape the sample, for which ``full=True`` hashes every byte (about 3 s per 500 MB here).

The fingerprint is the same across loads of the same checkpoint on any device, and differs when the dtype
differs (the bytes do). Buffers (rotary frequencies, masks) are derived from the config and not hashed.
"""

from __future__ import annotations

import hashlib

import torch

SAMPLE = 4096


def _sample(t: torch.Tensor, full: bool) -> torch.Tensor:
    """(numel,) -> (<= SAMPLE,) elements at a fixed stride, contiguous on CPU."""
    flat = t.detach().reshape(-1)
    if not full and flat.numel() > SAMPLE:
        flat = flat[:: flat.numel() // SAMPLE][:SAMPLE]
    return flat.contiguous().cpu()


def fingerprint(model: torch.nn.Module, *, full: bool = False) -> str:
    """16 hex digits of sha256 over the parameters' names, dtypes, shapes and (sampled) bytes."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        digest.update(f"{name}|{param.dtype}|{tuple(param.shape)}\n".encode())
        if param.device.type == "meta":
            continue
        data = _sample(param, full)
        digest.update(data.view(torch.uint8).numpy())  # a buffer: no copy
    return digest.hexdigest()[:16]
