"""A layer's one-head segments (Ada-KV's per-head budgets) take their slot steps and attention as one set
(kvlab/storage/slotsets.py): the same tokens kept as by each segment's own steps, the logits within float rounding,
the same bytes; and anything but a plain decode step drops the set without losing a token."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kvlab.cache import make_cache
from kvlab.storage import SlotSet

# budgets 8 and 12 split unevenly over the heads by Ada-KV (the shorter heads' rows of the set's table start with
# padding); kernel 3 and 5 pool over time neighbours
SPECS = ["adakv:budget=8,window=3,kernel=3", "adakv:budget=12,window=2,kernel=5,floor=0.5"]


def _model(family: str = "llama", kv_heads: int = 3, **extra) -> torch.nn.Module:
    """A random model of 2 layers with ``kv_heads`` KV heads (so a layer's heads get unequal budgets)."""
    config = AutoConfig.for_model(family, hidden_size=32 * kv_heads, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=2 * kv_heads, num_key_value_heads=kv_heads, head_dim=16,
                                  vocab_size=256,
                                  max_position_embeddings=1024, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def _run(model: torch.nn.Module, spec: str, sets: bool, ids: torch.Tensor, between=None) -> tuple:
    """A 24-token prefill then one token at a time to the end of ``ids (B, n)``, the layers' slot sets on or off;
    ``between(cache, t)`` runs before step ``t``. Returns the cache and the logits of every pass ``(passes, B, V)``."""
    cache = make_cache(model, spec)
    out = []
    with torch.no_grad():
        out.append(model(ids[:, :24], past_key_values=cache).logits[:, -1])
        cache.use_sets(sets)
        t = 24
        while t < ids.shape[1]:
            q = between(cache, t) if between else 1
            out.append(model(ids[:, t:t + q], past_key_values=cache).logits[:, -1])
            t += q
    return cache, torch.stack(out).float()


def _same_tokens(a, b) -> None:
    """Every segment of every layer keeps the same tokens (as sets: the slots hold them in any order)."""
    assert a.kept_tokens() == b.kept_tokens()
    for la, lb in zip(a.layers, b.layers):
        for sa, sb in zip(la.segments, lb.segments):
            assert torch.equal(sa.age.sort(-1).values, sb.age.sort(-1).values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("spec", SPECS)
def test_a_slot_set_keeps_what_each_head_keeps_alone(spec, dtype):
    model = _model().to(dtype)
    ids = torch.randint(0, 256, (2, 70), generator=torch.Generator().manual_seed(3))
    together, logits = _run(model, spec, True, ids)
    alone, reference = _run(model, spec, False, ids)
    assert all(isinstance(layer._slots, SlotSet) for layer in together.layers)  # the sets really stepped
    assert all(layer._slots is None for layer in alone.layers)
    assert any(len(set(kept)) > 1 for kept in together.kept_tokens())  # heads holding different numbers of tokens
    _same_tokens(together, alone)
    assert (logits - reference).abs().max() <= (1e-5 if dtype == torch.float32 else 1e-2)
    assert together.nbytes() == alone.nbytes()  # the set holds the segments' own tensors, moved
    for layer in together.layers:
        rows = layer._slots.table
        off = 0
        for i, seg in enumerate(layer.segments):  # the set's time order is each head's
            n = seg.length
            assert torch.equal(rows[:, i, rows.shape[-1] - n:] - off, seg._pos.argsort(dim=-1)[:, 0])
            assert torch.equal(seg.time_index, seg._pos.argsort(dim=-1))  # and the segment's, sorted anew
            off += n
        assert layer.reserved_nbytes() >= layer._slots.reserved_nbytes() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_more_heads_than_flat_heads_attend_head_by_head_on_a_cpu(dtype, monkeypatch):
    """4 KV heads: on a CPU the set ranks and writes as one, but each head attends with its segment's own call, so the
    logits are those of each head's own steps bit for bit; with one call for all (a GPU's way), within rounding."""
    from kvlab.storage import slotsets

    model = _model(kv_heads=4).to(dtype)
    ids = torch.randint(0, 256, (2, 60), generator=torch.Generator().manual_seed(6))
    alone, reference = _run(model, SPECS[0], False, ids)
    for flat, tol in ((slotsets.FLAT_HEADS, 0.0), (4, 1e-5 if dtype == torch.float32 else 1e-2)):
        monkeypatch.setattr(slotsets, "FLAT_HEADS", flat)
        together, logits = _run(model, SPECS[0], True, ids)
        assert all(isinstance(layer._slots, SlotSet) for layer in together.layers)
        _same_tokens(together, alone)
        assert (logits - reference).abs().max() <= tol


def test_anything_but_a_decode_step_drops_the_set():
    """A chunk of three tokens and a beam reorder between set steps: the segments step on their own there (copying,
    then slot steps), and a new set forms after; the same tokens as without sets throughout."""
    model = _model()
    ids = torch.randint(0, 256, (2, 60), generator=torch.Generator().manual_seed(4))

    def between(cache, t):
        if t == 40:
            cache.reorder_cache(torch.tensor([1, 0]))
        return 3 if t == 32 else 1

    together, logits = _run(model, SPECS[0], True, ids, between)
    alone, reference = _run(model, SPECS[0], False, ids, between)
    assert all(isinstance(layer._slots, SlotSet) for layer in together.layers)
    _same_tokens(together, alone)
    assert (logits - reference).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_padded_batch_steps_as_a_set_once_its_rows_hold_no_padding(dtype):
    """Left-padded rows of 30, 12 and 5 tokens, budget 8: the short row's padding goes first, in the heads' own slot
    steps; then the layer steps as a set, each row's positions counting its own real tokens. The same tokens and
    positions as without sets."""
    model = _model().to(dtype)
    g = torch.Generator().manual_seed(5)
    ids, steps = torch.randint(1, 256, (3, 30), generator=g), torch.randint(1, 256, (3, 24), generator=g)
    mask = torch.ones(3, 30, dtype=torch.long)
    mask[1, :18], mask[2, :25] = 0, 0
    runs = []
    for sets in (True, False):
        cache = make_cache(model, SPECS[0])
        cache.use_sets(sets)
        with torch.no_grad():
            out = [model(ids, attention_mask=mask, past_key_values=cache).logits[:, -1]]
            for t in range(steps.shape[1]):
                mask = torch.cat((mask, mask.new_ones(3, 1)), dim=1)
                out.append(model(steps[:, t:t + 1], attention_mask=mask, past_key_values=cache).logits[:, -1])
        mask = mask[:, :30]
        runs.append((cache, torch.stack(out).float()))
    (together, logits), (alone, reference) = runs
    assert all(isinstance(layer._slots, SlotSet) for layer in together.layers)
    _same_tokens(together, alone)
    for la, lb in zip(together.layers, alone.layers):
        for sa, sb in zip(la.segments, lb.segments):
            assert torch.equal(sa._pos.sort(-1).values, sb._pos.sort(-1).values)  # each row's own count
            assert torch.equal(sa._real, sb._real)
    assert (logits - reference).abs().max() <= (1e-5 if dtype == torch.float32 else 1e-2)


def test_a_set_attends_with_gemma2s_soft_cap_on_its_global_layers():
    """Gemma-2: the global layer steps as a set, with the logits' soft cap; the sliding layer (its heads capped to
    the window) does not."""
    model = _model("gemma2", attn_logit_softcapping=5.0, sliding_window=16, layer_types=["sliding_attention",
                                                                                         "full_attention"])
    ids = torch.randint(0, 256, (1, 60), generator=torch.Generator().manual_seed(5))
    together, logits = _run(model, SPECS[1], True, ids)
    alone, reference = _run(model, SPECS[1], False, ids)
    assert together.layers[0]._slots is None and isinstance(together.layers[1]._slots, SlotSet)
    _same_tokens(together, alone)
    assert (logits - reference).abs().max() <= 1e-5


def test_only_one_head_segments_of_a_scores_only_scorer_form_sets():
    model = copy.deepcopy(_model())
    for spec, possible in (("adakv:budget=8,window=2", True), ("adakv:budget=8,window=2,kernel=1", False),
                           ("snapkv:budget=8,window=2", False), ("h2o:budget=8,recent=2", False)):
        cache = make_cache(model, spec)
        with torch.no_grad():
            model(torch.randint(0, 256, (1, 4)), past_key_values=cache)
        assert cache.layers[0]._slotable is possible, spec
