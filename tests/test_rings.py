"""Ring steps of several segments of a layer taken as one (storage/rings.py): the very bits each segment
writes stepping alone, dropped as soon as a segment does anything else."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvlab.cache import make_cache
from kvlab.methods.streaming_llm import StreamingLLM
from kvlab.storage import Group, RingSet, Rotary
from kvlab.storage import rings as rings_module
from kvlab.storage.dense import Segment
from profiles import round_robin_profile
from references import D, INV_FREQ
from references import rope as _rope

HEADS = ((0,), (1, 2), (3,))  # three segments of one layer, windows of different lengths
WINDOWS = (4, 7, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_shift_each_is_shift_by_of_each_head(dtype):
    """One gather of cos/sin rows for every head's own delta gives the bits of rotating each head alone,
    inside and beyond the table."""
    rotary = Rotary(INV_FREQ)
    keys = torch.randn(2, 4, 3, D, generator=torch.Generator().manual_seed(2)).to(dtype)
    prepared = rotary.prepare(keys)
    for deltas in ([0, 1, 1000, 65_535], [70_000, 3, 65_536, 12]):
        pair = rotary.pairs_each(torch.tensor(deltas), max(deltas))
        ahead = rotary.pairs_each(torch.tensor([deltas, deltas[::-1]]), max(deltas))  # several steps' rows at once
        assert torch.equal(ahead[0], pair) and torch.equal(ahead[1], pair.flip(1))
        got = rotary.shift_each(prepared, pair).to(dtype)
        assert torch.equal(rotary.shift_each(prepared, ahead)[0].to(dtype), got)  # several steps' rotations at once
        for h, delta in enumerate(deltas):
            alone = torch.zeros_like(keys[:, h:h + 1])
            rotary.shift_by(prepared[:, :, h:h + 1], delta, rotary.rotated(alone))
            assert torch.equal(got[:, h:h + 1], alone)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_shift_at_each_is_shift_at_of_each_step(dtype):
    """Several steps' rotations of keys that each move by their own delta (a padded batch's ring set plans them
    ahead): the bits of :meth:`Rotary.shift_at` for each step, inside and beyond the table."""
    rotary = Rotary(INV_FREQ)
    g = torch.Generator().manual_seed(4)
    keys = torch.randn(3, 2, 2, D, generator=g).to(dtype)
    prepared = rotary.prepare(keys)
    for top in (1000, 70_000):
        delta = torch.randint(0, top + 1, (4, 3, 2, 2), generator=g)
        got = rotary.shift_at_each(prepared, delta, top).to(dtype)
        for a in range(4):
            alone = torch.zeros_like(keys)
            rotary.shift_at(prepared, delta[a], top, rotary.rotated(alone))
            assert torch.equal(got[a], alone)


def _segments(sinks: int, dtype: torch.dtype, rotary: Rotary) -> list[Segment]:
    return [Segment(Group(heads=h, budget=sinks + w, scorer=StreamingLLM(sinks=sinks, window=w)), rotary)
            for h, w in zip(HEADS, WINDOWS)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sinks", [0, 2])
@pytest.mark.parametrize("ahead", [5, rings_module.AHEAD])
@pytest.mark.parametrize("apart", [None, 1])  # 1: the middle segment steps on its own, the set takes heads 0 and 3
def test_a_ring_set_writes_what_each_segment_writes_alone(dtype, sinks, ahead, apart, monkeypatch):
    monkeypatch.setattr(rings_module, "AHEAD", ahead)  # 5: the set plans its slots and rows again and again
    g = torch.Generator().manual_seed(7)
    total = 60
    pos = torch.arange(total)
    keys = _rope(torch.randn(2, 4, total, D, generator=g), pos).to(dtype)
    values = torch.randn(2, 4, total, D, generator=g).to(dtype)
    rotary = Rotary(INV_FREQ)
    alone, together = _segments(sinks, dtype, rotary), _segments(sinks, dtype, rotary)
    for segs in (alone, together):
        for seg, h in zip(segs, HEADS):
            seg.push(keys[:, list(h), :12], values[:, list(h), :12])
    rings, used = None, 0
    for t in range(12, 50):
        k, v = keys[:, :, t:t + 1], values[:, :, t:t + 1]
        for seg, h in zip(alone, HEADS):
            seg.push(k[:, list(h)], v[:, list(h)])
        if rings is None or not rings.intact():
            rings = RingSet.of([s for j, s in enumerate(together) if j != apart], least=2)
        if rings is not None:
            rings.step(k, v)
            used += 1
        for seg, h in zip(together, HEADS):
            if rings is None or seg not in rings.members:
                seg.push(k[:, list(h)], v[:, list(h)])
        query = torch.randn(2, 8, 1, D, generator=g).to(dtype)
        for a, b, h in zip(alone, together, HEADS):
            q = query[:, 2 * h[0]:2 * (h[-1] + 1)]
            assert torch.equal(a.attend(q, 0.5, None), b.attend(q, 0.5, None))
    assert used >= 35 and rings.intact() and all(seg._head for seg in together)  # the rings really turned
    assert len(rings.segments) == (3 if apart is None else 2)
    assert sum(seg.nbytes() for seg in together) == sum(seg.nbytes() for seg in alone)  # the views: the same bytes
    for a, b in zip(alone, together):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values) and torch.equal(a.age, b.age)
    assert not rings.intact()  # reading in time order gave the segments tensors of their own
    for segs in (alone, together):  # a chunk of three: every segment steps on its own again
        for seg, h in zip(segs, HEADS):
            seg.push(keys[:, list(h), 50:53], values[:, list(h), 50:53])
    for a, b in zip(alone, together):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_a_segment_stepping_alone_breaks_the_set():
    rotary = Rotary(INV_FREQ)
    segs = _segments(2, torch.float32, rotary)
    keys = _rope(torch.randn(1, 4, 20, D), torch.arange(20))
    for seg, h in zip(segs, HEADS):
        seg.push(keys[:, list(h), :12], keys[:, list(h), :12])
    for t in (12, 13):  # evicting down to the budget, then the first ring turn: each segment's own
        assert RingSet.of(segs, least=2) is None
        for seg, h in zip(segs, HEADS):
            seg.push(keys[:, list(h), t:t + 1], keys[:, list(h), t:t + 1])
    assert RingSet.of(segs, least=4) is None  # fewer ready segments than a set needs
    rings = RingSet.of(segs, least=2)
    assert rings is not None and rings.intact()
    rings.step(keys[:, :, 14:15], keys[:, :, 14:15])
    assert rings.intact()
    segs[1].push(keys[:, [1, 2], 15:16], keys[:, [1, 2], 15:16])  # its own ring step, in its view
    assert not rings.intact()
    for seg, h in zip(segs, HEADS):
        seg.push(keys[:, list(h), 16:17], keys[:, list(h), 16:17])
    rings = RingSet.of(segs, least=2)  # the one that stepped alone has seen one token more: left out
    assert rings is not None and rings.segments == [segs[0], segs[2]] and rings.intact()
    segs[0].group = dataclasses.replace(segs[0].group, budget=None)  # the cache stops evicting: it grows from now on
    assert not rings.intact()


def _local_windows(tmp_path, dtype: torch.dtype) -> tuple[torch.nn.Module, str]:
    """A random Llama of 2 layers and 4 KV heads, and a head-aware spec whose every head is local, each with a
    window of its own."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                         intermediate_size=128, vocab_size=256, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype).eval()
    path = round_robin_profile(model, tmp_path, classes=lambda layer, head: "local",
                               locality=lambda layer, head: 0.1 + 0.2 * head)
    return model, f"head-aware:budget=10,profile={path},sinks=2,recent=2"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_aware_steps_its_local_windows_as_one_set(tmp_path, dtype):
    """Head-aware's local heads of a layer each have their own window; their decode steps go as one set (36
    steps: the set plans its steps again and again) and the logits are those of stepping every group alone, bit
    for bit, in float32 and bf16; a chunk drops the sets."""
    model, spec = _local_windows(tmp_path, dtype)
    ids = torch.randint(0, 256, (1, 60), generator=torch.Generator().manual_seed(3))
    logits, caches = [], []
    for sets in (True, False):
        cache = make_cache(model, spec)
        assert all(len({s.group.budget for s in layer.segments}) == 4 for layer in cache.layers)
        out = []
        with torch.no_grad():
            out.append(model(ids[:, :20], past_key_values=cache).logits)
            for layer in cache.layers:
                layer._ringable = layer._ringable and sets
            for t in range(20, 56):
                out.append(model(ids[:, t:t + 1], past_key_values=cache).logits)
                if sets and t > 21:
                    assert all(layer._rings is not None for layer in cache.layers)
                    for layer in cache.layers:  # the set's float32 sink copies are counted beside the bytes held
                        own = sum(seg.reserved_nbytes() for seg in layer.segments)
                        rings = layer._rings  # and the next steps' slots and rotated sinks
                        planned = rings._prepared.nbytes + rings._slots.nbytes + rings._rotated.nbytes
                        assert layer.reserved_nbytes() == own + planned > own
            out.append(model(ids[:, 56:60], past_key_values=cache).logits)
            assert all(layer._rings is None for layer in cache.layers)
            out.append(model(ids[:, 59:60], past_key_values=cache).logits)
        logits.append(torch.cat(out, 1))
        caches.append(cache)
    assert torch.equal(logits[0], logits[1])
    assert caches[0].nbytes() == caches[1].nbytes() and caches[0].kept_tokens() == caches[1].kept_tokens()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_padded_batch_steps_its_local_windows_as_one_set(tmp_path, dtype):
    """Left-padded rows of 40, 25 and 12 tokens: once the rows hold no padding, head-aware's local windows step as
    one set, each row's positions counting its own real tokens and its sinks moving to its own frame; the logits,
    keys and positions are those of stepping every window alone, bit for bit."""
    model, spec = _local_windows(tmp_path, dtype)
    g = torch.Generator().manual_seed(3)
    ids, steps = torch.randint(1, 256, (3, 40), generator=g), torch.randint(1, 256, (3, 30), generator=g)
    first = torch.ones(3, 40, dtype=torch.long)
    first[1, :15], first[2, :28] = 0, 0
    logits, caches = [], []
    for sets in (True, False):
        cache = make_cache(model, spec)
        cache.use_sets(sets)
        mask, out, used = first, [], 0
        with torch.no_grad():
            out.append(model(ids, attention_mask=mask, past_key_values=cache).logits[:, -1:])
            for t in range(steps.shape[1]):
                mask = torch.cat((mask, mask.new_ones(3, 1)), dim=1)
                out.append(model(steps[:, t:t + 1], attention_mask=mask, past_key_values=cache).logits)
                used += all(layer._rings is not None for layer in cache.layers)
        assert used >= 25 if sets else used == 0
        logits.append(torch.cat(out, 1))
        caches.append(cache)
    assert torch.equal(logits[0], logits[1])
    for la, lb in zip(caches[0].layers, caches[1].layers):
        for a, b in zip(la.segments, lb.segments):
            assert a._head  # the rings really turned
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
            assert torch.equal(a._pos, b._pos) and torch.equal(a._real, b._real)
