"""The work of a decode step, counted: the operations kvlab issues per layer, kept from growing.

On a GPU at batch 1 a decode step is bound by kernel launches (several microseconds each, times the layers).
Each method's decode steps on the tiny Llama run under a dispatch mode that counts the operations issued from
kvlab's own code (a kvlab frame on the stack: the cache's update and attention, not the model's layers) that are
not views (about one kernel each on a GPU; allocations are not counted), over 32 steps in the steady state of a
tight budget (evicting, quantizing, compacting), divided by the steps and the layers. Each method has a ceiling,
its count when it was last changed plus 5%. A change that adds work to a step fails here: make it cheaper, or
raise the ceiling in the same commit and say why. ``bench/bench_decode.py`` reports the Python-level calls of a
real model's whole step.
"""

from __future__ import annotations

import copy

import pytest
import torch
from decode_probe import decode_under, kvlab_frame
from torch.utils._python_dispatch import TorchDispatchMode

from kvlab.cache import make_cache
from method_table import LOSSLESS, TIGHT

PREFILL, STEPS = 20, 32
NOT_KERNELS = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default}
# operations kvlab issues per layer per decode step, at the TIGHT specs (full, quant: lossless)
# (snapkv, pyramidkv, adakv, knorm: +2 a step since a slot step carries the time order along in three kernels
# instead of sorting the positions again, one operation here but a sort: 1-3% less time per step on SmolLM2, in
# docs/BENCHMARKS.md under "Slot steps carry the time order along"; snapkv, pyramidkv, adakv: then about 4.8 fewer
# a segment, since a slot step ranks the scores in the time order they were pooled in, not scattered back; and
# with tova, one fewer, since a slot step no longer zeroes the victim's observed score, replaced whole just after;
# keydiff: about 9 fewer, its cosine normalizing the anchor once, in place; adakv: 43 to 26.6, its one-head
# segments ranking, writing and attending as one set, kvlab/storage/slotsets.py; knorm: 17.9 to 19.0, the norm of the
# new key and its write into the slot instead of the norms of every kept key, each kept from its arrival:
# one more small kernel, a pass over the cache less, 1-7% less time per step on SmolLM2 at 4k, budget 1,024;
# keydiff: 22.2 to 24.3, the new key's two norms and their write into the slot instead of two norms of every kept
# key, each kept from its arrival: two more small kernels, two passes over the cache less, the same bits)
CEILING = {"full": 4.4, "quant": 50.0, "streaming": 7.7, "h2o": 18.3, "head-aware": 31.4, "haq": 245.3,
           "snapkv": 22.2, "pyramidkv": 22.2, "tova": 13.1, "adakv": 27.9, "knorm": 20.0, "keydiff": 25.5,
           "duo": 6.4}


class Ops(TorchDispatchMode):
    """Counts the dispatched operations, not views or allocations, issued from kvlab's code."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func not in NOT_KERNELS and kvlab_frame() is not None:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _per_layer_step(model: torch.nn.Module, spec: str) -> float:
    ids = torch.randint(0, 256, (1, PREFILL), generator=torch.Generator().manual_seed(0))
    ops = Ops()
    decode_under(ops, model, make_cache(model, spec), ids, None, STEPS)
    return ops.count / STEPS / model.config.num_hidden_layers


def test_every_method_has_a_ceiling():
    assert set(CEILING) == set(LOSSLESS), "add the new method's count to CEILING"


@pytest.mark.parametrize("name", sorted(LOSSLESS))
def test_a_decode_step_does_no_more_work_than_its_ceiling(tiny_llama, tmp_path, name):
    model = copy.deepcopy(tiny_llama)
    per_layer = _per_layer_step(model, (TIGHT.get(name) or LOSSLESS[name])(PREFILL, tmp_path, model))
    assert per_layer <= CEILING[name], (f"{name}: kvlab issues {per_layer:.1f} operations per layer per decode "
                                        f"step, ceiling {CEILING[name]}")
