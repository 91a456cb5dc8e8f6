"""No method reads a value back from the device in a decode step (on a GPU each read stalls the queue).

A decode step of every registered method, lossless and tight, over enough steps to quantize blocks, evict and
compact, runs under a dispatch mode that records every operation whose result the host must wait for: a
scalar read (``.item()``, ``bool(t)``, ``int(t)``) and the operations whose output shape depends on the values.
On this CPU those are cheap; the test proves the step would not wait on a GPU either.
"""

from __future__ import annotations

import copy

import pytest
import torch
from decode_probe import decode_under, kvlab_frame
from torch.utils._python_dispatch import TorchDispatchMode

from kvlab.cache import make_cache
from method_table import LOSSLESS, TIGHT

HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
              torch.ops.aten.masked_select.default, torch.ops.aten._unique2.default, torch.ops.aten.unique_dim.default,
              torch.ops.aten.unique_consecutive.default}
PREFILL, STEPS = 20, 40


class HostReads(TorchDispatchMode):
    """Records where (the innermost kvlab frame) each operation of :data:`HOST_READS` ran."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            frame = kvlab_frame()
            self.found.append(f"{func} at {frame.f_code.co_filename}:{frame.f_lineno}" if frame else str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("padded", [False, True], ids=["batch1", "padded"])
@pytest.mark.parametrize("table", ["lossless", "tight"])
@pytest.mark.parametrize("name", sorted(LOSSLESS))
def test_a_decode_step_reads_nothing_back_from_the_device(tiny_llama, tmp_path, name, table, padded):
    """Padded: a left-padded batch of two (the prompt's mask is read once, at prefill; the decode steps' new
    tokens are real, so they pass no mask, as transformers' own sdpa mask would find nothing to mask)."""
    specs = LOSSLESS if table == "lossless" else TIGHT
    if name not in specs:
        pytest.skip(f"{name} has no {table} spec (nothing to evict)")
    model = copy.deepcopy(tiny_llama)
    cache = make_cache(model, specs[name](PREFILL, tmp_path, model))  # sized for the prompt: decode steps evict
    ids = torch.randint(0, 256, (2 if padded else 1, PREFILL), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :5] = 0
    reads = HostReads()
    decode_under(reads, model, cache, ids, mask, STEPS)
    assert not reads.found, f"{len(reads.found)} reads, first: {reads.found[0]}"
