"""Hand-built head profiles for contract tests: classes assigned round-robin, real fingerprints."""

from __future__ import annotations

from pathlib import Path

from kvlab.heads import CLASSES, HeadProfile
from kvlab.heads.store import model_shape, signature, weights_fingerprint


def round_robin_profile(model, folder: Path, offset: int = 0, locality=None, classes=None) -> str:
    """Write a profile whose class of (layer, head) is CLASSES[(layer + head + offset) % 3] (or ``classes(layer,
    head)``) and whose locality is ``locality(layer, head)`` (default 0); return its path."""
    layers, kv, q = model_shape(model)
    custom, pick = classes is not None, classes or (lambda i, h: CLASSES[(i + h + offset) % 3])
    classes = [[pick(i, h) for h in range(kv)] for i in range(layers)]
    zeros = [[0.0] * kv for _ in range(layers)]
    prof = HeadProfile(model="tiny", fingerprint=weights_fingerprint(model), num_layers=layers, num_kv_heads=kv,
                       num_attention_heads=q, settings={}, classes=classes, signature=signature(model),
                       scores={"retrieval": zeros, "induction": zeros,
                               "locality": [[locality(i, h) if locality else 0.0 for h in range(kv)]
                                            for i in range(layers)]})
    path = folder / f"profile-{offset}{'-loc' if locality else ''}{'-cls' if custom else ''}.json"
    prof.save(path)
    return str(path)
