"""The work of a decode step, counted: operations per layer beyond transformers' own cache, kept from growing.

On a GPU at batch 1 a decode step is bound by kernel launches (several microseconds each, times the layers).
Each method's decode step on the tiny Llama runs under a dispatch mode that counts the operations that are not
views (about one kernel each on a GPU; allocations are not counted), over 32 steps in the steady state of a tight
budget (evicting, quantizing, compacting). The same steps with transformers' ``DynamicCache`` are subtracted, so
only the cache's own work is left; divided by the layers. Each method has a ceiling, its count when it was last
changed plus 5%. A change that adds work to a step fails here: make it cheaper, or raise the ceiling in the same
commit and say why. ``bench/bench_decode.py`` reports the Python-level calls of a real model's step.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache

from kvlab.cache import make_cache
from method_table import LOSSLESS, TIGHT

PREFILL, STEPS = 20, 32
NOT_KERNELS = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default}
# operations per layer per decode step beyond DynamicCache's, at the TIGHT specs (full, quant: lossless)
CEILING = {"full": 1.2, "quant": 52.1, "streaming": 4.5, "h2o": 16.1, "head-aware": 31.9, "haq": 258.3,
           "snapkv": 31.4, "pyramidkv": 31.4, "tova": 28.2, "adakv": 68.7, "knorm": 14.6, "keydiff": 36.6,
           "duo": 4.3}


class Ops(TorchDispatchMode):
    """Counts the dispatched operations that are not views or allocations."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func not in NOT_KERNELS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _per_step(model: torch.nn.Module, cache) -> float:
    ids = torch.randint(0, 256, (1, PREFILL), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        token = model(ids, past_key_values=cache).logits[:, -1:].argmax(-1)
        ops = Ops()
        with ops:
            for _ in range(STEPS):
                token = model(token, past_key_values=cache).logits[:, -1:].argmax(-1)
    return ops.count / STEPS


@pytest.fixture(scope="module")
def plain_ops(tiny_llama) -> float:
    model = copy.deepcopy(tiny_llama)
    return _per_step(model, DynamicCache(config=model.config))


def test_every_method_has_a_ceiling():
    assert set(CEILING) == set(LOSSLESS), "add the new method's count to CEILING"


@pytest.mark.parametrize("name", sorted(LOSSLESS))
def test_a_decode_step_does_no_more_work_than_its_ceiling(tiny_llama, tmp_path, plain_ops, name):
    model = copy.deepcopy(tiny_llama)
    spec = (TIGHT.get(name) or LOSSLESS[name])(PREFILL, tmp_path, model)
    per_layer = (_per_step(model, make_cache(model, spec)) - plain_ops) / model.config.num_hidden_layers
    assert per_layer <= CEILING[name], (f"{name}: {per_layer:.1f} operations per layer per decode step beyond "
                                        f"DynamicCache's, ceiling {CEILING[name]}")
