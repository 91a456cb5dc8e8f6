"""``HeadProfile``: the saved result of head profiling, and the check that it belongs to a model.

The JSON file is byte-identical for the same model, settings and library versions: keys are sorted,
floats rounded to 6 decimals, and there is no timestamp. Grids are ``[layer][kv_head]``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvlab.errors import KvlabError
from kvlab.heads.scores import CLASSES
from kvlab.results import write_text_atomic

SCHEMA = 1
SCORE_NAMES = ("retrieval", "induction", "locality")
_SIGNATURE_PARAMS, _SIGNATURE_VALUES = 32, 8
_SIGNATURE_RTOL, _SIGNATURE_ATOL = 1e-2, 1e-5  # bfloat16 keeps ~3 significant digits


def model_shape(model: Any) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, num_attention_heads) from the model's (text) config."""
    cfg = model.config.get_text_config()
    q_heads = cfg.num_attention_heads
    return cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or q_heads, q_heads


def weights_fingerprint(model: Any) -> str:
    """The exact weights hash, :func:`kvlab.models.fingerprint.fingerprint` (dtype-dependent)."""
    from kvlab.models.fingerprint import fingerprint

    return fingerprint(model)


def signature(model: Any) -> list[list[float]]:
    """A dtype-independent sample of the weights: 8 values at fixed strides from each of 32 weight
    matrices spread over the name-sorted parameters, 6 significant digits. Matches the same checkpoint
    in float32, bfloat16 or float16 within :data:`_SIGNATURE_RTOL`; differs for other weights (even a
    fine-tune of them)."""
    params = [p for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]) if p.dim() >= 2]
    step = max(1, len(params) // _SIGNATURE_PARAMS)
    out: list[list[float]] = []
    for p in params[::step][:_SIGNATURE_PARAMS]:
        flat = p.detach().reshape(-1)
        idx = torch.tensor([i * (flat.numel() - 1) // (_SIGNATURE_VALUES - 1) for i in range(_SIGNATURE_VALUES)],
                           device=flat.device)
        out.append([float(f"{float(v):.6g}") for v in flat[idx].float().cpu()])
    return out


def _signature_matches(a: list[list[float]], b: list[list[float]]) -> bool:
    flat_a, flat_b = [x for row in a for x in row], [x for row in b for x in row]
    return len(a) == len(b) and len(flat_a) == len(flat_b) and all(
        abs(x - y) <= _SIGNATURE_ATOL + _SIGNATURE_RTOL * max(abs(x), abs(y)) for x, y in zip(flat_a, flat_b))


def _dumps(obj: Any, indent: int = 0) -> str:
    """JSON with sorted keys, one line per innermost list (grids stay readable)."""
    pad = "  " * (indent + 1)
    if isinstance(obj, dict) and obj:
        items = [f"{pad}{json.dumps(str(k))}: {_dumps(obj[k], indent + 1)}" for k in sorted(obj)]
        return "{\n" + ",\n".join(items) + "\n" + "  " * indent + "}"
    if isinstance(obj, list) and any(isinstance(x, (list, dict)) for x in obj):
        return "[\n" + ",\n".join(pad + _dumps(x, indent + 1) for x in obj) + "\n" + "  " * indent + "]"
    return json.dumps(obj, sort_keys=True)


@dataclass
class HeadProfile:
    """Scores and classes of every (layer, KV head) of one model; see :mod:`kvlab.heads.profile`.

    ``scores[name][layer][kv_head]`` for name in retrieval / induction / locality (in [0, 1]);
    ``query_head_scores`` the same per query head; ``classes[layer][kv_head]`` in :data:`CLASSES`.
    """

    model: str
    fingerprint: str
    num_layers: int
    num_kv_heads: int
    num_attention_heads: int
    settings: dict[str, Any]
    scores: dict[str, list[list[float]]]
    classes: list[list[str]]
    signature: list[list[float]] = field(default_factory=list)
    dtype: str = "float32"
    query_head_scores: dict[str, list[list[float]]] = field(default_factory=dict)
    copy_accuracy: float | None = None
    versions: dict[str, str] = field(default_factory=dict)
    schema: int = SCHEMA

    def __post_init__(self) -> None:
        grid = (self.num_layers, self.num_kv_heads)
        if sorted(self.scores) != sorted(SCORE_NAMES):
            raise KvlabError(f"head profile scores must be {', '.join(SCORE_NAMES)}, "
                             f"got {', '.join(sorted(self.scores))}")
        for name, rows in [*self.scores.items(), ("classes", self.classes)]:
            if len(rows) != grid[0] or any(len(r) != grid[1] for r in rows):
                raise KvlabError(f"head profile '{name}' is not a {grid[0]} x {grid[1]} (layers x kv heads) grid")
        bad = {c for row in self.classes for c in row} - set(CLASSES)
        if bad:
            raise KvlabError(f"head profile has unknown classes {sorted(bad)}; expected {', '.join(CLASSES)}")
        if self.num_kv_heads < 1 or self.num_attention_heads % self.num_kv_heads:
            raise KvlabError(f"{self.num_attention_heads} attention heads do not group into "
                             f"{self.num_kv_heads} KV heads")

    # -- queries -------------------------------------------------------------------------------
    def class_mask(self, name: str) -> torch.Tensor:
        """(num_layers, num_kv_heads) bool: the heads of class ``name``."""
        if name not in CLASSES:
            raise KvlabError(f"unknown head class '{name}'; choose from: {', '.join(CLASSES)}")
        return torch.tensor([[c == name for c in row] for row in self.classes], dtype=torch.bool)

    def counts(self) -> dict[str, int]:
        """How many KV heads each class has (every class listed, zero included)."""
        flat = [c for row in self.classes for c in row]
        return {name: flat.count(name) for name in CLASSES}

    def score(self, name: str) -> torch.Tensor:
        """(num_layers, num_kv_heads) float tensor of one score."""
        if name not in self.scores:
            raise KvlabError(f"unknown head score '{name}'; choose from: {', '.join(SCORE_NAMES)}")
        return torch.tensor(self.scores[name], dtype=torch.float32)

    # -- matching ------------------------------------------------------------------------------
    def check_matches(self, model: Any) -> None:
        """Raise KvlabError unless this profile was made for ``model`` (same shape, same weights;
        the exact fingerprint when the dtype is the same, the weight signature across dtypes)."""
        shape = model_shape(model)
        mine = (self.num_layers, self.num_kv_heads, self.num_attention_heads)
        redo = "run 'kvlab heads profile --model <this model>' to make one for it"
        if shape != mine:
            raise KvlabError(f"head profile of '{self.model}' is for {mine[0]} layers x {mine[1]} KV heads "
                             f"({mine[2]} query heads), but the model has {shape[0]} x {shape[1]} ({shape[2]}); {redo}")
        if weights_fingerprint(model) == self.fingerprint:
            return
        if self.signature and _signature_matches(signature(model), self.signature):
            return
        raise KvlabError(f"head profile was made for '{self.model}' (weights {self.fingerprint}), not for this "
                         f"model (weights {weights_fingerprint(model)}); {redo}")

    # -- files ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def dumps(self) -> str:
        return _dumps(self.to_dict()) + "\n"

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON atomically (a reader never sees half a file)."""
        path = Path(path)
        if path.is_dir():
            raise KvlabError(f"{path} is a folder; give a file name for the head profile")
        return write_text_atomic(path, self.dumps())

    @classmethod
    def load(cls, path: str | os.PathLike) -> HeadProfile:
        """Read a profile written by :meth:`save`; a missing or malformed file is a KvlabError."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise KvlabError(f"head profile not found: {path} (make one with 'kvlab heads profile')") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise KvlabError(f"cannot read head profile {path}: {exc}") from None
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise KvlabError(f"{path} is not a kvlab head profile (schema {SCHEMA})")
        known = set(cls.__dataclass_fields__)
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except KvlabError:  # __post_init__ said what is wrong (KvlabError is a ValueError too)
            raise
        except (TypeError, AttributeError, ValueError) as exc:
            raise KvlabError(f"head profile {path} is incomplete or malformed: {exc}") from None
