"""Arithmetic of the storage on hand-built tensors: eviction choices, re-indexing, masks."""

from __future__ import annotations

import copy

import pytest
import torch

from kvlab.errors import KvlabError
from kvlab.methods.base import Group
from kvlab.storage import Rotary, in_time, keep_indices
from kvlab.storage.attention import MASK_BYTES, attend, block_mask, block_rows
from kvlab.storage.dense import Segment
from kvlab.methods.h2o import H2O
from kvlab.methods.streaming_llm import StreamingLLM
from references import D, INV_FREQ
from references import feed as _feed
from references import rope as _rope


@pytest.mark.parametrize("chunk", [1, 3])
def test_streaming_keeps_sinks_and_window_and_reindexes(chunk):
    g = torch.Generator().manual_seed(0)
    k0, v = torch.randn(1, 2, 40, D, generator=g), torch.randn(1, 2, 40, D, generator=g)
    seg = Segment(Group(heads=(0, 1), budget=6, scorer=StreamingLLM(sinks=2, window=4)), Rotary(INV_FREQ))
    _feed(seg, k0, v, chunk)
    seg.compress()
    kept = [0, 1, 36, 37, 38, 39]
    assert torch.equal(seg.values, v[:, :, kept])  # values are never touched
    # the key at cache index i sits at frame position seen - n + i
    frame = torch.arange(40 - 6, 40)
    assert torch.allclose(seg.keys, _rope(k0[:, :, kept], frame), atol=1e-5)


@pytest.mark.parametrize("sinks", [0, 2])
def test_decode_steps_turn_a_ring_in_place_and_read_back_in_time_order(sinks):
    """One token in, the oldest window token out: written in its slot (no copy), sinks re-rotated; attention
    over the ring as stored equals attention over time order; a later chunk unrolls it first."""
    g = torch.Generator().manual_seed(5)
    k0, v = torch.randn(1, 2, 46, D, generator=g), torch.randn(1, 2, 46, D, generator=g)
    seg = Segment(Group(heads=(0, 1), budget=sinks + 4, scorer=StreamingLLM(sinks=sinks, window=4)),
                  Rotary(INV_FREQ))
    seg.push(_rope(k0[:, :, :10], torch.arange(10)), v[:, :, :10])
    buffer = None
    for t in range(10, 40):
        seg.push(_rope(k0[:, :, t:t + 1], torch.tensor([t])), v[:, :, t:t + 1])
        buffer = seg.stored()[0] if t == 11 else buffer
    assert seg._head != 0 and seg.stored()[0] is buffer  # turned in place since step 2
    query = torch.randn(1, 2, 1, D, generator=g)
    ours = seg.attend(query, 0.5, None)
    assert seg._head != 0  # attention read the ring as stored
    kept = [*range(sinks), *range(35, 40)]
    expected_keys = _rope(k0[:, :, kept], torch.arange(40 - len(kept), 40))
    assert torch.allclose(seg.keys, expected_keys, atol=1e-5) and torch.equal(seg.values, v[:, :, kept])
    assert seg._head == 0  # reading keys unrolled it
    reference = torch.nn.functional.scaled_dot_product_attention(query, expected_keys, v[:, :, kept], scale=0.5)
    assert torch.allclose(ours, reference, atol=1e-5)
    for t in range(40, 43):  # turn again, then a chunk of three: the general path sees time order
        seg.push(_rope(k0[:, :, t:t + 1], torch.tensor([t])), v[:, :, t:t + 1])
    assert seg._head != 0
    seg.push(_rope(k0[:, :, 43:46], torch.arange(43, 46)), v[:, :, 43:46])
    kept = [*range(sinks), *range(39, 46)]
    assert torch.equal(seg.values, v[:, :, kept])
    assert torch.allclose(seg.keys, _rope(k0[:, :, kept], torch.arange(46 - len(kept), 46)), atol=1e-5)


def test_batch_reorder_of_a_turned_ring_keeps_each_rows_time_order():
    g = torch.Generator().manual_seed(6)
    k0, v = torch.randn(2, 1, 20, D, generator=g), torch.randn(2, 1, 20, D, generator=g)
    seg = Segment(Group(heads=(0,), budget=6, scorer=StreamingLLM(sinks=2, window=4)), Rotary(INV_FREQ))
    seg.push(_rope(k0[:, :, :8], torch.arange(8)), v[:, :, :8])
    for t in range(8, 20):
        seg.push(_rope(k0[:, :, t:t + 1], torch.tensor([t])), v[:, :, t:t + 1])
    assert seg._head != 0
    seg.map_batch(lambda x: x.flip(0))  # beam search's reorder: rows swapped
    kept = [0, 1, 15, 16, 17, 18, 19]
    assert torch.equal(seg.values, v.flip(0)[:, :, kept])


def test_frame_distances_equal_literal_reindexing():
    """q at true position P against frame keys == q at cache position n against keys at 0..n-1."""
    g = torch.Generator().manual_seed(1)
    k0 = torch.randn(1, 1, 25, D, generator=g)
    q0 = torch.randn(D, generator=g)
    seg = Segment(Group(heads=(0,), budget=7, scorer=StreamingLLM(sinks=3, window=4)), Rotary(INV_FREQ))
    _feed(seg, k0, torch.zeros_like(k0), 1)
    seg.compress()
    kept = [0, 1, 2, 21, 22, 23, 24]
    ours = _rope(q0[None], torch.tensor([25])) @ seg.keys[0, 0].T
    literal = _rope(q0[None], torch.tensor([7])) @ _rope(k0[0, 0, kept], torch.arange(7)).T
    assert torch.allclose(ours, literal, atol=1e-4)


def test_h2o_keeps_recent_and_heaviest_per_head():
    seg = Segment(Group(heads=(0, 1), budget=4, scorer=H2O(budget=4, recent=2)), None)
    seg.push(torch.zeros(1, 2, 7, D), torch.arange(7.0).view(1, 1, 7, 1).expand(1, 2, 7, D).clone())
    seg.scores = torch.tensor([[[5.0, 0.1, 3.0, 0.2, 4.0, 0.0, 0.0], [0.0, 9.0, 0.0, 8.0, 0.0, 0.0, 0.0]]])
    seg.compress()
    assert seg.values[0, 0, :, 0].tolist() == [0, 4, 5, 6]
    assert seg.values[0, 1, :, 0].tolist() == [1, 3, 5, 6]
    assert seg.scores.shape == (1, 2, 4)


def test_h2o_pooling_keeps_a_heavy_hitters_neighbours():
    """pool=3: a token ranks by the max score within one token of it, so the span around the heaviest token
    (a number's digits) stays whole where plain H2O keeps the heavy tokens scattered."""
    scores = torch.tensor([[[0.0, 0.1, 9.0, 0.2, 0.0, 3.0, 0.0, 2.5, 0.0, 0.0]]])
    kept = {}
    for pool in (1, 3):
        seg = Segment(Group(heads=(0,), budget=5, scorer=H2O(budget=5, recent=2, pool=pool)), None)
        seg.push(torch.zeros(1, 1, 10, D), torch.arange(10.0).view(1, 1, 10, 1).expand(1, 1, 10, D).clone())
        seg.scores = scores.clone()
        seg.compress()
        kept[pool] = seg.values[0, 0, :, 0].tolist()
        assert torch.equal(seg.scores, scores[..., [int(i) for i in kept[pool]]])  # pooling ranks, never rewrites
    assert kept[1] == [2, 5, 7, 8, 9]
    assert kept[3] == [1, 2, 3, 8, 9]
    with pytest.raises(KvlabError, match="odd"):
        H2O(budget=5, recent=2, pool=4)


def test_scores_accumulate_attention_mass():
    """Every query spreads probability 1 over the keys: the accumulated scores sum to the query count."""
    seg = Segment(Group(heads=(0,), budget=None, scorer=H2O(budget=100, recent=1)), None)
    g = torch.Generator().manual_seed(2)
    seg.push(torch.randn(1, 1, 5, D, generator=g), torch.randn(1, 1, 5, D, generator=g))
    seg.attend(torch.randn(1, 2, 5, D, generator=g), D ** -0.5, None)  # GQA: 2 query heads
    assert torch.allclose(seg.scores.sum(), torch.tensor(5.0), atol=1e-5)
    assert seg.scores[0, 0, 0] > seg.scores[0, 0, 4]  # causal: the first key is seen by every query


def test_keep_indices_sorted_in_time():
    s = torch.tensor([0.5, 9.0, float("inf"), 1.0, 7.0])
    assert keep_indices(s, 3).tolist() == [1, 2, 4]


@pytest.mark.parametrize("shape", [(9,), (1, 1, 40), (2, 3, 300), (1, 2, 1700)])
def test_keeping_all_but_one_token_keeps_what_top_k_keeps(shape):
    """A decode step's eviction (``budget = n - 1``) takes every index but the one the top-k leaves out, without
    sorting: the same indices as the top-k sorted in time, tied scores included, on a strided score too."""
    g = torch.Generator().manual_seed(3)
    s = torch.randint(0, 4, (*shape[:-1], shape[-1] + 5), generator=g).float()[..., 5:]  # many ties, not contiguous
    n = shape[-1]
    expect = s.topk(n - 1, dim=-1, sorted=False).indices.sort(dim=-1).values
    assert torch.equal(keep_indices(s, n - 1), expect)


@pytest.mark.parametrize("visible, window", [(0, None), (3, None), (0, 5)])
def test_observed_queries_probabilities_alone_equal_the_full_eager_pass(visible, window):
    """A scorer reading the last ``observed`` queries' attention (SnapKV, TOVA) gets their probabilities from
    those queries alone, and every output from the plain path: the same as one eager pass over all queries."""
    g = torch.Generator().manual_seed(5)
    q, n = 12, 16
    query, keys, values = (torch.randn(1, 4, q, D, generator=g), torch.randn(1, 2, n, D, generator=g),
                           torch.randn(1, 2, n, D, generator=g))
    kw = dict(scaling=D ** -0.5, visible=visible, window=window)
    out, received = attend(query, keys, values, need_probs=True, observed=3, **kw)
    eager, _ = attend(query, keys, values, need_probs=True, **kw)
    mask = block_mask(0, q, q, n, visible=visible, window=window, device=query.device)
    logits = (query.view(1, 2, 2, q, D) @ keys[:, :, None].transpose(-1, -2)) * D ** -0.5
    probs = logits.masked_fill(~mask, float("-inf")).softmax(-1)  # (1, h, g, q, n)
    assert torch.allclose(out, eager, atol=1e-5)
    assert torch.allclose(received, probs[:, :, :, -3:].mean(2).sum(2), atol=1e-6)


@pytest.fixture
def calls(monkeypatch) -> list[int]:
    """The query length of every sdpa call kvlab's attention makes while the test runs."""
    from kvlab.storage import attention

    seen: list[int] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                        lambda q, *a, **kw: seen.append(q.shape[2]) or sdpa(q, *a, **kw))
    return seen


def test_a_chunk_over_a_long_cache_takes_sdpa_blocks_sized_by_its_mask(calls):
    """sdpa keeps no logits, so a chunk over a long cache goes in blocks sized by the one mask every head shares
    (in the query's dtype), not by float32 logits of every head: 512 queries over 16k float32 keys in one call
    (blocks sized like logits made it 37 calls of 14 queries, 1.5x slower). A padded batch (a mask per row and
    head) and the eager path (probabilities) keep logit-sized blocks. Each way gives the same outputs."""
    g = torch.Generator().manual_seed(0)
    q, n = 64, 8192
    query = torch.randn(1, 36, q, 8, generator=g)  # 36 query heads: 8 MiB of logits hold 7 queries over 8192 keys
    keys, values = torch.randn(1, 12, n, 8, generator=g), torch.randn(1, 12, n, 8, generator=g)
    out, _ = attend(query, keys, values, scaling=0.5)
    assert calls == [q]
    assert block_rows(1, n, MASK_BYTES, 2) == 2048  # bf16: twice the rows of float32
    calls.clear()
    valid = torch.ones(1, 12, n, dtype=torch.bool)
    padded, _ = attend(query, keys, values, scaling=0.5, valid=valid)
    assert calls == [7] * 9 + [1]
    assert torch.allclose(out, padded, atol=1e-6)
    eager, received = attend(query, keys, values, scaling=0.5, need_probs=True)
    assert torch.allclose(out, eager, atol=1e-5) and received.shape == (1, 12, n)


@pytest.mark.parametrize("need_probs", [False, True])
def test_a_per_row_padding_mask_is_shared_by_every_head(calls, need_probs):
    """Padding the same for every head of a row (``valid (B, 1, n)``) gives what the per-head mask gives, and sdpa
    takes it as one mask per row, in blocks sized by that mask: one call here where per-head masks take ten."""
    g = torch.Generator().manual_seed(1)
    q, n = 64, 4096
    query = torch.randn(2, 36, q, 8, generator=g)
    keys, values = torch.randn(2, 12, n, 8, generator=g), torch.randn(2, 12, n, 8, generator=g)
    valid = torch.ones(2, 1, n, dtype=torch.bool)
    valid[1, :, :300] = False  # the second row is left-padded
    per_row, got = attend(query, keys, values, scaling=0.5, valid=valid, need_probs=need_probs)
    assert calls == ([] if need_probs else [q])
    per_head, want = attend(query, keys, values, scaling=0.5, valid=valid.expand(2, 12, n), need_probs=need_probs)
    assert torch.allclose(per_row, per_head, atol=1e-6)
    assert got is None if not need_probs else torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("scorer, shared", [(None, True), (StreamingLLM(sinks=2, window=6), True),
                                            (H2O(budget=8, recent=2), False)])
def test_a_padded_segment_masks_rows_until_a_scorer_chooses_per_head(scorer, shared):
    """The full cache and a positional scorer keep the same tokens in every head of a row, so attention gets one
    mask per row; a per-head scorer's first eviction makes the masks per head again."""
    g = torch.Generator().manual_seed(2)
    seg = Segment(Group(heads=(0, 1), budget=None if scorer is None else 8, scorer=scorer or StreamingLLM()),
                  Rotary(INV_FREQ))
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :5] = False
    seg.push(torch.randn(2, 2, 12, D, generator=g), torch.randn(2, 2, 12, D, generator=g), valid)
    seg.attend(torch.randn(2, 2, 12, D, generator=g), D ** -0.5, None)
    seg.push(torch.randn(2, 2, 4, D, generator=g), torch.randn(2, 2, 4, D, generator=g))  # evicts, if bounded
    assert seg._rows_valid is shared
    seen = []
    import kvlab.storage.dense as dense
    original = dense.attend
    try:
        dense.attend = lambda *a, **kw: seen.append(kw["valid"].shape[1]) or original(*a, **kw)
        seg.attend(torch.randn(2, 2, 4, D, generator=g), D ** -0.5, None)
    finally:
        dense.attend = original
    assert seen == [1 if shared else 2]


def test_mask_causal_and_sliding():
    m = block_mask(0, 3, 3, 6)
    assert m.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    w = block_mask(0, 2, 2, 6, window=3)
    assert w.tolist() == [[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]]
    assert block_mask(0, 1, 1, 6).all()  # one query sees every key (attention then needs no mask)


def _slot_and_copy_runs(model: torch.nn.Module, spec: str) -> tuple[list, list[torch.Tensor]]:
    """The same 12-token prefill and 28 decode steps through two caches of ``spec``: one whose segments write
    decode steps into slots, one whose segments copy. Returns both caches and their logits ``(1, 40, vocab)``
    float32, in that order."""
    from kvlab.cache import make_cache

    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(11))
    caches, logits = [], []
    for slots in (True, False):
        cache = make_cache(model, spec)
        for layer in cache.layers:
            for seg in layer.segments:
                seg.slots = slots and seg.slots
        with torch.no_grad():
            logits.append(torch.cat([model(ids[:, :12], past_key_values=cache).logits] +
                                    [model(ids[:, t:t + 1], past_key_values=cache).logits for t in range(12, 40)],
                                    1).float())
        caches.append(cache)
    return caches, logits


@pytest.mark.parametrize("spec", ["h2o:budget=8,recent=3", "h2o:budget=8,recent=3,pool=3", "tova:budget=8",
                                  "tova:budget=8,shared=1", "snapkv:budget=8,window=3,kernel=3",
                                  "snapkv:budget=8,window=3,kernel=1",
                                  "pyramidkv:budget=8,window=3,kernel=3", "adakv:budget=8,window=3,kernel=3",
                                  "knorm:budget=8", "knorm:budget=8,recent=2", "keydiff:budget=8"])
def test_slot_writes_keep_what_copying_keeps(tiny_llama, spec):
    """A decode step of an order-free scorer writes the new token into the evicted slot: the same tokens are
    kept, with the same scores, as by the copying eviction, and the logits agree (pooling scorers read their
    time neighbours through ``time_index``)."""
    caches, logits = _slot_and_copy_runs(copy.deepcopy(tiny_llama), spec)
    assert (logits[0] - logits[1]).abs().max() < 1e-5
    for slotted, copied in zip(caches[0].layers[1].segments, caches[1].layers[1].segments):
        assert slotted._scrambled  # the slots were really used
        assert slotted.time_index is not None and copied.time_index is None
        # the time order carried along by the slot steps (for the scorers that read it) is the sort of the positions
        assert torch.equal(slotted.time_index, slotted._pos.argsort(dim=-1))
        # what a slot step ranks: the scores in time order, which pooling scorers compute as such
        scorer = slotted.group.scorer
        assert torch.equal(scorer.score_in_time(slotted), in_time(slotted, scorer.score(slotted)))
        values = slotted.values  # read in time order (the slots are sorted back by true position)
        assert torch.equal(slotted.age, copied.age)  # the same tokens kept
        assert torch.allclose(values, copied.values, atol=1e-5)
        if copied.scores is not None:
            assert torch.allclose(slotted.scores, copied.scores, atol=1e-5)


@pytest.mark.parametrize("spec", ["h2o:budget=8,recent=3,pool=3", "tova:budget=8", "snapkv:budget=8,window=3,kernel=3",
                                  "adakv:budget=8,window=3,kernel=3", "knorm:budget=8", "keydiff:budget=8"])
def test_slot_writes_keep_what_copying_keeps_in_bf16(tiny_llama, spec):
    """The same in bf16: slot steps keep the very tokens the copying steps keep; the logits differ by bf16's
    rounding of attention summed over another key order, at most a few ulps."""
    caches, logits = _slot_and_copy_runs(copy.deepcopy(tiny_llama).to(torch.bfloat16), spec)
    assert (logits[0] - logits[1]).abs().max() <= 1e-2
    for slotted, copied in zip(caches[0].layers[1].segments, caches[1].layers[1].segments):
        assert slotted._scrambled
        kept = slotted.age.sort(-1).values  # the slots in any order: compare the sets of kept tokens
        assert torch.equal(kept, copied.age.expand_as(kept).sort(-1).values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("spec", ["h2o:budget=8,recent=3", "h2o:budget=8,recent=3,pool=3", "tova:budget=8",
                                  "snapkv:budget=8,window=3,kernel=3", "adakv:budget=8,window=2,kernel=3",
                                  "knorm:budget=8", "keydiff:budget=8"])
def test_slot_writes_in_a_padded_batch_keep_what_copying_keeps(tiny_llama, spec, dtype):
    """A left-padded batch (rows of 30, 12 and 5 tokens) decoding 24 steps: slot steps write over a row's padding
    while it holds some (the row grows), then over its lowest token, and keep the very tokens the copying steps
    keep; attention never reads the padding left in the slots."""
    from kvlab.cache import make_cache

    model = copy.deepcopy(tiny_llama).to(dtype)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 256, (3, 30), generator=g)
    mask = torch.ones(3, 30, dtype=torch.long)
    mask[1, :18], mask[2, :25] = 0, 0
    steps = torch.randint(1, 256, (3, 24), generator=g)
    caches, logits = [], []
    for slots in (True, False):
        cache = make_cache(model, spec)
        with torch.no_grad():
            out = [model(ids, attention_mask=mask, past_key_values=cache).logits[:, -1:]]
            m = mask
            for t in range(steps.shape[1]):
                m = torch.cat((m, torch.ones(3, 1, dtype=torch.long)), 1)
                for layer in cache.layers:
                    for seg in layer.segments:
                        seg.slots = slots and seg.slots
                out.append(model(steps[:, t:t + 1], attention_mask=m, past_key_values=cache).logits)
        caches.append(cache)
        logits.append(torch.cat(out, 1).float())
    assert (logits[0] - logits[1]).abs().max() <= (1e-5 if dtype == torch.float32 else 1e-2)
    for slotted, copied in zip(caches[0].layers[1].segments, caches[1].layers[1].segments):
        assert slotted._scrambled and slotted._valid is not None  # slot steps ran in the padded batch
        assert torch.equal(slotted.time_index, slotted._time_key().argsort(dim=-1))  # the carried order
        kept = [seg._time_key().sort(-1).values for seg in (slotted, copied)]  # real positions, padding as -1
        assert torch.equal(*kept)  # the same real tokens kept, per row and head


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("spec", ["streaming:sinks=2,window=6", "streaming:sinks=0,window=8"])
def test_a_padded_batch_turns_a_ring_once_its_rows_hold_no_padding(tiny_llama, spec, dtype):
    """A left-padded batch (rows of 30, 12 and 5 tokens, budget 8) decoding 24 steps: the copying steps evict the
    padding the short row still holds, then every step is a ring step, the same slot in every row, each row's
    positions counting its own real tokens and its sinks moved to its own frame. The first layer's keys (sinks
    re-rotated included), values and positions are bit for bit those of copying steps; the logits differ by
    attention summed over another key order."""
    from kvlab.cache import make_cache

    model = copy.deepcopy(tiny_llama).to(dtype)
    g = torch.Generator().manual_seed(5)
    ids, steps = torch.randint(1, 256, (3, 30), generator=g), torch.randint(1, 256, (3, 24), generator=g)
    mask = torch.ones(3, 30, dtype=torch.long)
    mask[1, :18], mask[2, :25] = 0, 0
    caches, logits, turns = [], [], []
    for ring in (True, False):
        cache = make_cache(model, spec)
        seg = cache.layers[0].segments[0]
        if ring:  # count the first layer's ring steps
            seg._turn = lambda key, value, turn=seg._turn: bool(turns.append(turn(key, value)) or turns[-1])
        else:
            for layer in cache.layers:
                for seg in layer.segments:
                    seg._turn = lambda key, value: False
        with torch.no_grad():
            out, m = [model(ids, attention_mask=mask, past_key_values=cache).logits[:, -1:]], mask
            for t in range(steps.shape[1]):
                m = torch.cat((m, torch.ones(3, 1, dtype=torch.long)), 1)
                out.append(model(steps[:, t:t + 1], attention_mask=m, past_key_values=cache).logits)
        caches.append(cache)
        logits.append(torch.cat(out, 1).float())
    assert (logits[0] - logits[1]).abs().max() <= (1e-5 if dtype == torch.float32 else 1e-2)
    turned, copied = caches[0].layers[0].segments[0], caches[1].layers[0].segments[0]
    assert turned._valid is not None and turned._pad_held == 0 and turned._masks is None  # padded, none held
    # steps 1-4 copy (the prefill's eviction, then the short row's 3 slots of padding leave one a step), the 20 others
    # turn the ring
    assert turns == [True] * 20 and turned._head and not copied._head
    for name in ("keys", "values", "age"):
        assert torch.equal(getattr(turned, name), getattr(copied, name)), name
    assert turned._real.flatten().tolist() == [54, 36, 29]


@pytest.mark.parametrize("spec", ["h2o:budget=8,recent=3,pool=3", "snapkv:budget=8,window=3,kernel=3",
                                  "tova:budget=8", "knorm:budget=8"])
def test_padded_slot_steps_hand_over_to_chunks_and_padding_steps(tiny_llama, spec):
    """In a padded batch (rows of 30, 12 and 5 tokens, budget 8), slot steps mixed with steps whose token is
    padding in one row (while that row still holds padding, so a slot step later leaves padding in the last slot)
    and a chunk of 5 tokens: the same logits as copying steps throughout (but at the padding queries)."""
    from kvlab.cache import make_cache

    g = torch.Generator().manual_seed(3)
    ids, new = torch.randint(1, 256, (3, 30), generator=g), torch.randint(1, 256, (3, 40), generator=g)
    mask = torch.ones(3, 30, dtype=torch.long)
    mask[1, :18], mask[2, :25] = 0, 0
    plan = [1, (2,), 1, 1, 5, 1, (1,), 1, 1, 1]  # tokens per forward pass; (row,): one token, padding in that row
    logits = []
    for slots in (True, False):
        model, m, t = copy.deepcopy(tiny_llama), mask, 0
        cache = make_cache(model, spec)
        with torch.no_grad():
            out = [model(ids, attention_mask=mask, past_key_values=cache).logits[:, -1:]]
            for q in plan:
                for layer in cache.layers:
                    for seg in layer.segments:
                        seg.slots = slots and seg.slots
                real = torch.ones(3, q if isinstance(q, int) else 1, dtype=torch.long)
                if not isinstance(q, int):
                    real[q[0]] = 0
                m = torch.cat((m, real), 1)
                out.append(model(new[:, t:t + real.shape[1]], attention_mask=m, past_key_values=cache).logits[:, -1:])
                t += real.shape[1]
        logits.append(torch.cat(out, 1))
    diff = (logits[0] - logits[1]).abs()
    for i, q in enumerate(plan):
        if not isinstance(q, int):
            diff[q[0], 1 + i] = 0  # a padding query's logits
    assert diff.max() < 1e-5


def test_growing_keys_and_values_append_into_spare_room_and_release_it_on_eviction():
    """A segment that only grows writes each step into room behind its keys (no copy of the cache), holds
    exactly what concatenation would hold, reserves at most an eighth plus ROOM tokens, and frees it on eviction."""
    from kvlab.storage.inplace import ROOM

    g = torch.Generator().manual_seed(11)
    k, v = torch.randn(1, 2, 300, D, generator=g), torch.randn(1, 2, 300, D, generator=g)
    seg = Segment(Group(heads=(0, 1), budget=250, scorer=H2O(budget=250, recent=10)), Rotary(INV_FREQ))
    seg.push(k[:, :, :40], v[:, :, :40])
    buffers = set()
    for t in range(40, 250):  # decode steps while the budget is not reached: no eviction yet
        seg.push(k[:, :, t:t + 1], v[:, :, t:t + 1])
        buffers.add(seg._room["_k"].data_ptr())
        assert seg.reserved_nbytes() <= 2 * 2 * (seg.length // 8 + ROOM) * D * 4
    assert torch.equal(seg.keys, k[:, :, :250]) and torch.equal(seg.values, v[:, :, :250])
    assert len(buffers) <= 5  # reallocated a few times in 210 steps, not at every step
    assert seg.nbytes() == 2 * 2 * 250 * D * 4  # the kept tokens only
    for t in (250, 251):  # the budget is reached: steps evict (here in place, in a slot); the room is released
        seg.push(k[:, :, t:t + 1], v[:, :, t:t + 1])
    assert seg.reserved_nbytes() == 0 and not seg._room and seg.length == 251
