"""HAQ-KV and quant: quantized storage (positions, token-level eviction, bytes), specs, and the cache on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from kvlab.cache import make_cache
from kvlab.errors import KvlabError
from kvlab.storage import QuantGroup, Rotary, RowSplit
from kvlab.storage.dense import Segment
from kvlab.storage.codes import PER_TOKEN, QuantBody
from kvlab.storage.quantized import QuantSegment
from kvlab.methods import LayerInfo, build
from kvlab.methods.h2o import H2O
from kvlab.methods.streaming_llm import StreamingLLM
from kvlab.quant import fake_quantize
from profiles import round_robin_profile
from references import D, INV_FREQ, masked_dense_attention
from references import feed as _feed
from references import rope as _rope


def _seg(scorer, budget, bits=8, group_size=4, residual=4, heads=(0, 1), rotary=True,
         exact_sinks=False, rope="pre") -> QuantSegment:
    group = QuantGroup(heads=heads, budget=budget, scorer=scorer or StreamingLLM(), bits=bits,
                       group_size=group_size, residual=residual, exact_sinks=exact_sinks, rope=rope)
    return QuantSegment(group, Rotary(INV_FREQ) if rotary else None)


def _residual_pre_rope(seg: QuantSegment) -> torch.Tensor:
    """The residual's keys before RoPE: it stores them as handed over, rotated at their true positions."""
    return seg.rotary.shift_range(seg.rkeys, seg.seen - seg.residual_length, sign=-1)


def _token_values(n: int, heads: int = 2) -> torch.Tensor:
    """Values whose every channel holds the token's index: per-token groups restore them exactly."""
    return torch.arange(float(n)).view(1, 1, n, 1).expand(1, heads, n, D).clone()


@pytest.fixture()
def llama(tiny_llama):
    return copy.deepcopy(tiny_llama)


# -- storage: positions -------------------------------------------------------------------------
def test_residual_holding_everything_is_the_dense_segment():
    g = torch.Generator().manual_seed(0)
    k0, v = torch.randn(1, 2, 20, D, generator=g), torch.randn(1, 2, 20, D, generator=g)
    seg = _seg(None, None, residual=20)
    dense = Segment(QuantGroup(heads=(0, 1), budget=None, scorer=StreamingLLM()), Rotary(INV_FREQ))
    _feed(seg, k0, v, 3)
    _feed(dense, k0, v, 3)
    assert seg.body_length == 0
    assert torch.allclose(seg.keys, dense.keys, atol=1e-5) and torch.equal(seg.values, dense.values)


def test_body_holds_the_quantized_pre_rope_keys_and_values():
    g = torch.Generator().manual_seed(1)
    k0, v = torch.randn(1, 2, 19, D, generator=g), torch.randn(1, 2, 19, D, generator=g)
    seg = _seg(None, None, bits=8, group_size=4, residual=4)
    _feed(seg, k0, v, 5)
    assert (seg.body_length, seg.residual_length) == (12, 7)  # 19 - 12 < residual + group_size
    keys, values = seg.body.dequantize()
    assert torch.allclose(keys, fake_quantize(k0[:, :, :12], 8, axis=2, group_size=4), atol=1e-5)
    assert torch.allclose(values, fake_quantize(v[:, :, :12], 8, axis=3, group_size=4), atol=1e-5)
    assert not torch.allclose(keys, k0[:, :, :12], atol=1e-5)  # it really is quantized


@pytest.mark.parametrize("chunk", [1, 5])
def test_kept_keys_sit_at_frame_positions_without_drift(chunk):
    """After many evictions, key i of n sits at seen - n + i exactly: q at true position P sees the
    same logits as q at cache position n against the kept keys at 0..n-1 (literal re-indexing)."""
    g = torch.Generator().manual_seed(2)
    k0, v = torch.randn(1, 1, 203, D, generator=g), torch.randn(1, 1, 203, D, generator=g)
    seg = _seg(StreamingLLM(sinks=2, window=10), budget=12, heads=(0,))
    _feed(seg, k0, v, chunk)
    seg.compress()
    n = seg.length
    pre = torch.cat(seg.body.dequantize()[:1] + (_residual_pre_rope(seg),), dim=2)[0, 0]  # (n, D) pre-RoPE keys
    assert torch.allclose(seg.keys[0, 0], _rope(pre, torch.arange(203 - n, 203)), atol=1e-5)
    q0 = torch.randn(D, generator=g)
    ours = _rope(q0[None], torch.tensor([203])) @ seg.keys[0, 0].T
    literal = _rope(q0[None], torch.tensor([n])) @ _rope(pre, torch.arange(n)).T
    assert torch.allclose(ours, literal, atol=1e-4)
    # the sinks are the first two kept (keys close to k0 up to 8-bit error), then the window
    assert torch.allclose(pre[:2], k0[0, 0, :2], atol=0.05) and n == 12


@pytest.mark.parametrize("scorer, exact_sinks", [(StreamingLLM(sinks=2, window=10), True),
                                                 (H2O(budget=12, recent=2, reindex=False), False)])
def test_post_rope_body_holds_the_rotated_keys_and_reads_them_unrotated(scorer, exact_sinks):
    """rope=post (KIVI): the body stores the keys as handed over (rotated at their true positions), a read
    dequantizes them and rotates nothing but the exact sinks, which sit where the dense segment puts them."""
    g = torch.Generator().manual_seed(11)
    k0, v = torch.randn(1, 2, 40, D, generator=g), _token_values(40)
    seg = _seg(scorer, budget=12, exact_sinks=exact_sinks, rope="post")
    _feed(seg, k0, v, 3)
    seg.compress()
    s, t = seg.sink_length, seg.body_length
    assert seg.body.kpos is None and t > 0  # no positions: keys carry their rotation
    kept = seg.values[0, :, :, 0].long()  # true positions of the kept tokens, per head
    body = kept[:, s:s + t]
    rotated = _rope(k0[0], torch.arange(40))  # (2, 40, D): what the model handed over
    assert torch.equal(seg.keys[:, :, s:s + t], seg.body.dequantize()[0])  # read as stored
    for h in range(2):
        assert torch.allclose(seg.keys[0, h, s:s + t], rotated[h, body[h]], atol=0.05)  # 8-bit of the rotated keys
    if exact_sinks:  # StreamingLLM: the same tokens as the dense segment, the sinks re-indexed
        dense = Segment(QuantGroup(heads=(0, 1), budget=12, scorer=scorer), Rotary(INV_FREQ))
        _feed(dense, k0, v, 3)
        dense.compress()
        assert kept[0].tolist() == dense.values[0, 0, :, 0].tolist() == [0, 1, *range(30, 40)]
        assert torch.allclose(seg.keys[:, :, :s], dense.keys[:, :, :s], atol=1e-5)  # sinks exact at frame positions
        assert torch.allclose(seg.keys, dense.keys, atol=0.05)  # the body at its true = frame positions


@pytest.mark.parametrize("scorer, exact_sinks", [(H2O(budget=8, recent=2, reindex=True), False),
                                                 (StreamingLLM(sinks=2, window=6), False)])
def test_post_rope_refuses_to_reindex_what_it_cannot_place(scorer, exact_sinks):
    with pytest.raises(KvlabError, match="rope=post keeps each quantized key at the position"):
        _seg(scorer, budget=8, exact_sinks=exact_sinks, rope="post")
    _seg(scorer, budget=None, exact_sinks=exact_sinks, rope="post")  # nothing evicted: nothing moves


# -- storage: token-level eviction -----------------------------------------------------------------
def test_streaming_keeps_the_same_tokens_as_the_dense_segment():
    g = torch.Generator().manual_seed(3)
    k0, v = torch.randn(1, 2, 40, D, generator=g), _token_values(40)
    seg = _seg(StreamingLLM(sinks=2, window=8), budget=10)
    dense = Segment(QuantGroup(heads=(0, 1), budget=10, scorer=StreamingLLM(sinks=2, window=8)), Rotary(INV_FREQ))
    _feed(seg, k0, v, 3)
    _feed(dense, k0, v, 3)
    seg.compress()
    dense.compress()
    assert seg.values[0, 0, :, 0].tolist() == dense.values[0, 0, :, 0].tolist() == [0, 1, *range(32, 40)]


def test_window_bodies_read_their_scale_rows_by_views_bit_for_bit():
    """Blocks added whole and only the oldest tokens dropped (a positional window): token i uses key-scale row
    (i + lead) // G, read by views; bit for bit the per-token row index, before and after compaction."""
    g = torch.Generator().manual_seed(12)
    body = QuantBody(2, 4, positions=False)
    body.start(1, 2, D, torch.device("cpu"))
    body.add(torch.randn(1, 2, 12, D, generator=g), torch.randn(1, 2, 12, D, generator=g), 0)
    for drop, new in [(1, 0), (2, 4), (3, 0), (4, 8), (6, 0)]:
        before = body.reserved_nbytes()
        per_token = sum(getattr(body, n).nbytes for n in PER_TOKEN if getattr(body, n) is not None) // body.length
        body.keep_last(body.length - drop)  # views: the dropped tokens stay allocated, and counted, until...
        assert body.reserved_nbytes() - before == drop * per_token
        if new:  # ... the next block's concatenation frees them
            body.add(torch.randn(1, 2, new, D, generator=g), torch.randn(1, 2, new, D, generator=g), 0)
            assert body.reserved_nbytes() == 0
        for _ in range(2):  # then again once the dead rows are compacted
            general = copy.copy(body)
            general.lead = None
            assert body.lead is not None
            assert all(torch.equal(a, b) for a, b in zip(body.dequantize(), general.dequantize()))
            body.compact()
    assert body.kscale.shape[2] == -(-(body.length + body.lead) // 4) and body.lead < 4
    body.keep(torch.tensor([[[0, 2, 5], [1, 3, 4]]]))  # chosen one by one: the row index says
    assert body.lead is None


def test_a_decode_steps_compaction_uses_the_count_sent_the_compaction_before():
    """Per-token choices (H2O): a lazy compaction reads no count from the device. It compacts the rows there were
    at the previous compaction down to the count sent then (a row dead then is dead now), newer rows later. The
    tokens read the same bits throughout, and two lazy compactions in a row end where a waiting one does. A beam
    reorder between compactions (rows of the batch swapped and repeated) keeps the count a bound."""
    g = torch.Generator().manual_seed(13)
    body = QuantBody(2, 4, positions=False)
    body.start(2, 2, D, torch.device("cpu"))
    body.add(torch.randn(2, 2, 16, D, generator=g), torch.randn(2, 2, 16, D, generator=g), 0)
    shrunk = False
    for step in range(6):
        keep = torch.sort(torch.rand(2, 2, body.length, generator=g).argsort(-1)[..., :body.length // 2 + 2]).values
        body.keep(keep)
        if step == 3:
            body.map_batch(lambda t: t[[1, 1]])
        body.add(torch.randn(2, 2, 4, D, generator=g), torch.randn(2, 2, 4, D, generator=g), 0, check=False)
        before = body.dequantize()
        waited, rows = copy.deepcopy(body), body.kscale.shape[2]
        waited.compact()
        body.compact(wait=False)
        shrunk = shrunk or body.kscale.shape[2] < rows
        assert all(torch.equal(a, b) for a, b in zip(before, body.dequantize()))
        assert all(torch.equal(a, b) for a, b in zip(before, waited.dequantize()))
        assert body.kscale.shape[2] >= waited.kscale.shape[2]
    assert shrunk  # the lazy compactions did drop rows
    body.compact(wait=False)  # nothing changed since the last one: now as compact as a waiting compaction
    assert body.kscale.shape[2] == waited.kscale.shape[2]
    assert all(torch.equal(a, b) for a, b in zip(before, body.dequantize()))


def test_a_decode_steps_float16_overflow_is_reported_by_the_next_block_without_waiting():
    """A block quantized in a decode step (``check=False``) is not read back then; the next block (or
    :meth:`QuantBody.check`) reports it, from a flag already on the host. A prefill block reports at once."""
    body = QuantBody(4, 4, positions=False)
    body.start(1, 1, D, torch.device("cpu"))
    huge = torch.full((1, 1, 4, D), 1e6)
    huge[..., 0, :] = -1e6
    body.add(huge, torch.zeros(1, 1, 4, D), 0, check=False)  # no error yet
    with pytest.raises(KvlabError, match="float32"):
        body.add(torch.zeros(1, 1, 4, D), torch.zeros(1, 1, 4, D), 0, check=False)
    body.add(huge, torch.zeros(1, 1, 4, D), 0, check=False)
    with pytest.raises(KvlabError, match="float32"):
        body.check()
    with pytest.raises(KvlabError, match="float32"):
        body.add(huge, torch.zeros(1, 1, 4, D), 0)


@pytest.mark.parametrize("reindex", [True, False])
def test_exact_sinks_stay_full_precision_at_their_positions(reindex):
    """The first tokens ever seen are kept apart, unquantized, never evicted, and counted."""
    g = torch.Generator().manual_seed(9)
    k0, v = torch.randn(1, 2, 40, D, generator=g), _token_values(40)
    scorer = StreamingLLM(sinks=2, window=10, reindex=reindex)
    seg, plain = _seg(scorer, budget=12, bits=2, exact_sinks=True), _seg(scorer, budget=12, bits=2)
    dense = Segment(QuantGroup(heads=(0, 1), budget=12, scorer=scorer), Rotary(INV_FREQ))
    for s in (seg, plain, dense):
        _feed(s, k0, v, 3)
        s.compress()
    assert (seg.sink_length, seg.length) == (2, 12)
    assert seg.body.lead is not None and plain.body.lead is None  # a window body; quantized sinks are chosen
    assert seg.values[0, 0, :, 0].tolist() == dense.values[0, 0, :, 0].tolist() == [0, 1, *range(30, 40)]
    # the sinks' keys are exact at their positions (frame 0, 1 or true 0, 1: the same here); at 2 bits, far off
    assert torch.allclose(seg.keys[:, :, :2], dense.keys[:, :, :2], atol=1e-5)
    assert not torch.allclose(plain.keys[:, :, :2], dense.keys[:, :, :2], atol=1e-2)
    # (sinks + residual) x heads x (K, V) x float32
    assert seg.nbytes_parts()["residual"] == (2 + seg.residual_length) * 2 * 2 * D * 4


def test_h2o_evicts_single_tokens_per_head_and_keeps_what_stays_exact():
    seg = _seg(H2O(budget=8, recent=2), budget=8)
    g = torch.Generator().manual_seed(4)
    seg.append(torch.randn(1, 2, 16, D, generator=g), _token_values(16))
    assert (seg.body_length, seg.residual_length, seg.body.kscale.shape[2]) == (12, 4, 3)
    before = seg.body.dequantize()[0]
    scores = torch.zeros(1, 2, 16)
    scores[0, 0, [0, 1, 10, 11]] = 1.0  # head 0: two tokens of block 0, two of block 2
    scores[0, 1, [4, 5, 6, 7]] = 1.0  # head 1: block 1 only
    seg.scores = scores.clone()
    seg.compress()  # room for 8 - 4 = 4 body tokens
    kept = seg.values[0, :, :, 0].long()
    assert kept.tolist() == [[0, 1, 10, 11, 12, 13, 14, 15], [4, 5, 6, 7, 12, 13, 14, 15]]
    assert torch.equal(seg.scores, scores.gather(2, kept[None]))
    assert seg.body.kscale.shape[2] == 2  # head 0 uses 2 rows (blocks 0 and 2); head 1 one (+ 1 of padding)
    assert seg.body.kblock[0].tolist() == [[0, 0, 1, 1], [0, 0, 0, 0]]
    after = seg.body.dequantize()[0]
    assert torch.equal(after, before.gather(2, kept[None, :, :4, None].expand(1, 2, 4, D)))  # codes still valid
    # the next block gets a fresh row and dequantizes like a block quantized on its own
    oldest = _residual_pre_rope(seg)  # tokens 12..15, pre-RoPE: the next block
    seg.append(torch.randn(1, 2, 4, D, generator=g), _token_values(4))
    assert (seg.body_length, seg.body.kscale.shape[2]) == (8, 3)
    assert seg.body.kblock[0, :, 4:].tolist() == [[2] * 4] * 2
    fresh = fake_quantize(oldest, 8, axis=2, group_size=4)
    assert torch.allclose(seg.body.dequantize()[0][:, :, 4:], fresh, atol=1e-6)


def test_without_reindexing_kept_keys_keep_their_true_positions():
    g = torch.Generator().manual_seed(10)
    k0 = torch.randn(1, 2, 30, D, generator=g)
    seg = _seg(H2O(budget=10, recent=2, reindex=False), budget=10)
    _feed(seg, k0, _token_values(30), 30)
    seg.scores = torch.rand(1, 2, 30, generator=g)
    seg.compress()
    kept = seg.values[0, :, :, 0].long()  # (2, 10) true positions, different per head
    assert kept[0].tolist() != kept[1].tolist() and kept[0, -4:].tolist() == list(range(26, 30))
    pre = torch.cat((seg.body.dequantize()[0], _residual_pre_rope(seg)), dim=2)[0]  # (2, 10, D)
    for h in range(2):
        assert torch.allclose(seg.keys[0, h], _rope(pre[h], kept[h]), atol=1e-5)
        assert torch.allclose(pre[h], k0[0, h, kept[h]], atol=0.05)


def test_scores_accumulate_attention_mass():
    seg = _seg(H2O(budget=100, recent=1, reindex=True), budget=None, heads=(0,), group_size=2, residual=1)
    g = torch.Generator().manual_seed(5)
    seg.append(torch.randn(1, 1, 6, D, generator=g), torch.randn(1, 1, 6, D, generator=g))
    seg.attend(torch.randn(1, 2, 6, D, generator=g), D ** -0.5, None)
    assert seg.body_length == 4
    assert torch.allclose(seg.scores.sum(), torch.tensor(6.0), atol=1e-5)
    assert seg.scores[0, 0, 0] > seg.scores[0, 0, 5]


# -- storage: bytes ---------------------------------------------------------------------------------
def test_nbytes_counts_codes_scales_and_residual():
    g = torch.Generator().manual_seed(6)
    k, v = torch.randn(2, 2, 45, D, generator=g), torch.randn(2, 2, 45, D, generator=g)
    parts = {}
    for bits in (8, 4, 2):
        seg = _seg(None, None, bits=bits, group_size=4, residual=8)
        seg.append(k, v)
        parts[bits] = seg.nbytes_parts()
        body, res = seg.body_length, seg.residual_length
        assert (body, res) == (36, 9)
        assert parts[bits]["codes"] == 2 * (2 * 2 * body * D) * bits // 8
        # fp16 scale + zero per key block and channel, per value token and channel group; int16 row per token
        assert parts[bits]["scales"] == 2 * 2 * (2 * 2 * (body // 4) * D + 2 * 2 * body * (D // 4)) + 2 * 2 * 2 * body
        assert parts[bits]["residual"] == 2 * 2 * 2 * res * D * 4
        assert seg.nbytes() == sum(parts[bits].values())
    assert parts[4]["codes"] * 2 == parts[8]["codes"] and parts[2]["codes"] * 2 == parts[4]["codes"]
    assert parts[4]["scales"] == parts[8]["scales"]


# -- methods and specs --------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["bits=8/3/2", "bits=8/4", "bits=16/8/4/2", "bits=x", "bits=1"])
def test_bad_bits_spec(bad):
    with pytest.raises(KvlabError, match="bits must be"):
        build(f"haq:budget=512,profile=p.json,{bad}")


@pytest.mark.parametrize("bad, message", [("quant:bits=3", "bits must be one of 2, 4, 8, 16"),
                                          ("quant:bits=4,group_size=0", "group_size must be"),
                                          ("haq:budget=512,profile=p.json,residual=-1", "residual must be"),
                                          ("haq:budget=512,bits=8/4/2", "needs profile"),
                                          ("haq:budget=512,profile=p.json,rope=after", "rope must be pre or post"),
                                          ("quant:bits=4,rope=x", "rope must be pre or post"),
                                          ("haq:budget=512,profile=p.json,rope=post,exact_sinks=0", "needs exact_sinks")])
def test_bad_settings(bad, message):
    with pytest.raises(KvlabError, match=message):
        build(bad)


@pytest.mark.parametrize("spec", ["haq:budget=300,profile=p.json,bits=8/4/2,group_size=16,residual=8,local=0.5",
                                  "haq:budget=64,profile=p.json,bits=4", "quant:bits=2,group_size=64,residual=0",
                                  "haq:budget=64,profile=p.json,rope=post", "quant:bits=4,rope=post"])
def test_spec_round_trips(spec):
    m = build(spec)
    again = build(m.spec())
    assert again == m and again.spec() == m.spec()


def test_bits_map_classes_in_order():
    m = build("haq:budget=64,profile=p.json,bits=8/16/2")
    assert [m.bits(c) for c in ("retrieval", "induction", "local")] == [8, 16, 2]
    assert build("haq:budget=64,profile=p.json,bits=4").bits("induction") == 4


def test_haq_plans_each_class_at_its_width(llama, tmp_path):
    spec = f"haq:budget=64,profile={round_robin_profile(llama, tmp_path)},bits=8/16/2,group_size=8,residual=8"
    cache = make_cache(llama, spec)
    widths = {"retrieval": 8, "induction": 16, "local": 2}
    seen = set()
    for layer in cache.layers:
        for seg in layer.segments:
            assert seg.group.bits == widths[seg.group.label]
            kind = type(seg.batch) if isinstance(seg, RowSplit) else type(seg)  # quantized: one storage per row if padded
            assert kind is (Segment if seg.group.bits == 16 else QuantSegment)
            seen.add(kind)
    assert seen == {Segment, QuantSegment}


def test_residual_shrinks_to_fit_a_small_budget_and_group_size_must_fit(llama, tmp_path):
    profile = round_robin_profile(llama, tmp_path)
    m = build(f"haq:budget=64,profile={profile},bits=8,group_size=8,residual=32,recent=8")
    m.prepare(llama)
    groups = {g.label: g for g in m.plan(LayerInfo(index=1, num_layers=2, num_kv_heads=2, num_heads=4, head_dim=16))}
    assert groups["local"].budget == 23 and groups["local"].residual == 23 - 4 - 8 + 1  # 4 x 64 x 0.4 / 4.4
    assert (groups["local"].exact_sinks, groups["induction"].exact_sinks) == (True, False)  # local heads only
    m = build(f"haq:budget=64,profile={profile},bits=8,group_size=8,residual=32,recent=8,exact_sinks=0")
    m.prepare(llama)
    groups = {g.label: g for g in m.plan(LayerInfo(index=1, num_layers=2, num_kv_heads=2, num_heads=4, head_dim=16))}
    assert (groups["local"].exact_sinks, groups["local"].residual) == (False, 23 - 8 + 1)
    assert groups["induction"].residual == 32
    with pytest.raises(KvlabError, match=r"exact sinks \+ group_size - 1"):
        make_cache(llama, f"haq:budget=16,profile={profile},bits=8/4/2,recent=2,sinks=1")


@pytest.mark.parametrize("rope", ["pre", "post"])
def test_scored_heads_reindex_only_when_keys_are_rotated_at_read_time(llama, tmp_path, rope):
    m = build(f"haq:budget=64,profile={round_robin_profile(llama, tmp_path)},bits=8/4/2,group_size=8,rope={rope}")
    m.prepare(llama)
    groups = {g.label: g for i in range(2)
              for g in m.plan(LayerInfo(index=i, num_layers=2, num_kv_heads=2, num_heads=4, head_dim=16))}
    assert {g.rope for g in groups.values()} == {rope}
    assert groups["local"].scorer.reindex  # StreamingLLM: only its exact sinks move
    assert groups["retrieval"].scorer.reindex == groups["induction"].scorer.reindex == (rope == "pre")


# -- the cache on tiny models -----------------------------------------------------------------------------
def _logits(model, spec, ids, chunk):
    cache = make_cache(model, spec)
    with torch.no_grad():
        out = torch.cat([model(ids[:, s:s + chunk], past_key_values=cache).logits
                         for s in range(0, ids.shape[1], chunk)], 1)
    return out, cache


@pytest.mark.parametrize("rope", ["pre", "post"])
@pytest.mark.parametrize("family", ["tiny_llama", "tiny_qwen2", "tiny_gemma3"])
def test_8bit_without_eviction_is_close_to_full_and_fewer_bits_degrade(request, tmp_path, family, rope):
    """8 bits: every element is off by at most scale/2 = range/510 of its group (a group of 4 tokens
    spans ~2 standard deviations), so each stored key/value moves by < 0.5% of its spread; through two
    to four quantized layers the logits move by a few times that: the bound is 3% of their standard
    deviation (measured 0.3-1.9%, the most on Gemma-3 once its sliding layers are quantized too).
    4 bits have a step 255/15 = 17x coarser (the error must grow > 4x; measured 13-18x); 2 bits coarser still."""
    model = copy.deepcopy(request.getfixturevalue(family))
    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = model(ids, past_key_values=DynamicCache(config=model.config)).logits
    profile = round_robin_profile(model, tmp_path)
    errs = {}
    for bits in (8, 4, 2):
        spec = f"haq:budget=1000,profile={profile},bits={bits},group_size=4,residual=4,rope={rope}"
        out, cache = _logits(model, spec, ids, 3)
        errs[bits] = (out - ref).abs().max().item() / ref.std().item()
        for layer in cache.layers:  # sliding layers of gemma are capped by the cache itself
            if layer.info.sliding_window is None:
                assert layer.nbytes() < 2 * layer.seen * layer.info.num_kv_heads * layer.info.head_dim * 4
    assert 1e-5 < errs[8] < 3e-2
    assert 4 * errs[8] < errs[4] < errs[2]


TIGHT = "haq:budget=12,profile={},recent=2,sinks=1,bits=8/4/2,group_size=2,residual=3"


@pytest.mark.parametrize("rope", ["pre", "post"])
def test_tight_haq_keeps_budget_and_shrinks_bytes(llama, tmp_path, rope):
    spec = TIGHT.format(round_robin_profile(llama, tmp_path)) + f",rope={rope}"
    ha = spec.replace("haq:", "head-aware:").split(",bits=")[0]
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(8))
    full, _ = _logits(llama, "full", ids, 1)
    out, cache = _logits(llama, spec, ids, 1)
    _, dense = _logits(llama, ha, ids, 1)
    assert (out[:, :4] - full[:, :4]).abs().max() < 1e-4  # nothing quantized or evicted yet
    assert (out[:, -5:] - full[:, -5:]).abs().max() > 1e-3
    assert cache.kept_tokens() == dense.kept_tokens()  # token-level eviction: the same counts as head-aware
    assert cache.nbytes() < dense.nbytes() < cache.full_nbytes()


def test_grouped_quantized_layout_matches_masked_dense_reference(llama, tmp_path):
    spec = TIGHT.format(round_robin_profile(llama, tmp_path))
    _, cache = _logits(llama, spec, torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(9)), 5)
    layer = cache.layers[1]
    assert len(layer.segments) > 1 and len({s.length for s in layer.segments}) > 1
    kv, g, d = layer.info.num_kv_heads, layer.info.num_heads // layer.info.num_kv_heads, layer.info.head_dim
    query = torch.randn(1, kv * g, 1, d, generator=torch.Generator().manual_seed(1))
    ours = layer.attend(query, d ** -0.5, None)
    ref = masked_dense_attention(layer, query)
    assert torch.allclose(ours[0], ref, atol=1e-5)


def test_batch_tensors_are_mapped_together_and_not_assigned(llama):
    _, cache = _logits(llama, "quant:bits=4,group_size=4,residual=4", torch.randint(0, 256, (1, 20)), 4)
    seg = cache.layers[1].segments[0]
    keys = seg.keys
    with pytest.raises(AttributeError):  # storage is reordered through map_batch only
        seg.keys = keys.repeat_interleave(2, dim=0)
    seg.map_batch(lambda t: t.repeat_interleave(2, dim=0))
    assert torch.equal(seg.keys[0], keys[0]) and torch.equal(seg.keys[1], keys[0])
    cache.layers[1].reset()
    assert seg.length == 0 and seg.nbytes() == 0
