"""HAQ-KV and quant: quantized storage (positions, page-level eviction, bytes), specs, and the cache on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from kvlab.cache import make_cache
from kvlab.errors import KvlabError
from kvlab.kv import Rotary, Segment
from kvlab.kv_quant import QuantGroup, QuantSegment
from kvlab.methods import build
from kvlab.methods.h2o import H2O
from kvlab.methods.streaming_llm import StreamingLLM
from kvlab.quant import fake_quantize
from profiles import round_robin_profile

D = 8
INV_FREQ = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))


def _rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Reference RoPE (rotate_half convention) at absolute positions ``pos (n,)``."""
    ang = pos.float()[:, None] * INV_FREQ
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
    return x * cos + torch.cat((-x[..., D // 2:], x[..., : D // 2]), -1) * sin


def _feed(seg, k0: torch.Tensor, v: torch.Tensor, chunk: int) -> None:
    """Append pre-RoPE keys ``k0 (B, h, T, D)`` rotated at their true positions, a chunk at a time."""
    for s in range(0, k0.shape[2], chunk):
        e = min(k0.shape[2], s + chunk)
        seg.compress()
        seg.append(_rope(k0[:, :, s:e], torch.arange(s, e)), v[:, :, s:e])


def _seg(scorer, budget, bits=8, group_size=4, residual=4, heads=(0, 1), rotary=True) -> QuantSegment:
    group = QuantGroup(heads=heads, budget=budget, scorer=scorer or StreamingLLM(), bits=bits,
                       group_size=group_size, residual=residual)
    return QuantSegment(group, Rotary(INV_FREQ) if rotary else None)


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
    dense = Segment(QuantGroup(heads=(0, 1), budget=None, scorer=StreamingLLM()), Rotary(INV_FREQ), True)
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
    keys, values = seg._dequantized_body()
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
    pre = torch.cat(seg._dequantized_body()[:1] + (seg.rkeys,), dim=2)[0, 0]  # (n, D) stored pre-RoPE keys
    assert torch.allclose(seg.keys[0, 0], _rope(pre, torch.arange(203 - n, 203)), atol=1e-5)
    q0 = torch.randn(D, generator=g)
    ours = _rope(q0[None], torch.tensor([203])) @ seg.keys[0, 0].T
    literal = _rope(q0[None], torch.tensor([n])) @ _rope(pre, torch.arange(n)).T
    assert torch.allclose(ours, literal, atol=1e-4)
    # the sinks' block is the first one kept, and really holds tokens 0..3 (keys close to k0 up to 8-bit error)
    assert torch.allclose(pre[:4], k0[0, 0, :4], atol=0.05)


# -- storage: page-level eviction ----------------------------------------------------------------
def test_h2o_keeps_each_heads_heaviest_blocks_and_the_residual():
    seg = _seg(H2O(budget=12, recent=2, reindex=True), budget=12)
    seg.append(torch.randn(1, 2, 16, D, generator=torch.Generator().manual_seed(3)), _token_values(16))
    assert (seg.body_length, seg.residual_length) == (12, 4)
    scores = torch.zeros(1, 2, 16)
    scores[0, 0, [0, 9]] = 5.0  # head 0: blocks 0 and 2 are heaviest
    scores[0, 1, [5, 6]] = 2.0  # head 1: block 1, then block 2 beats block 0 by its sum
    scores[0, 1, 10] = 1.0
    seg.scores = scores.clone()
    seg.compress()  # room for (12 - 4) // 4 = 2 blocks
    kept = seg.values[0, :, :, 0]
    assert kept[0].tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15]
    assert kept[1].tolist() == [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    assert torch.equal(seg.scores, scores.gather(2, kept.long()[None]))


def test_blocks_kept_round_up_to_the_budget():
    """Recency: with 7 residual tokens and budget 9, ceil(2 / 4) = 1 block stays, the newest: a sliding
    window of 9 tokens stays whole (rounding down would keep 7)."""
    seg = _seg(StreamingLLM(sinks=0, window=9), budget=9)
    seg.append(torch.randn(1, 2, 19, D, generator=torch.Generator().manual_seed(4)), _token_values(19))
    assert (seg.body_length, seg.residual_length) == (12, 7)
    assert seg.length_after_compress() == 11
    seg.compress()
    assert seg.values[0, 0, :, 0].tolist() == list(range(8, 19))


def test_sinks_block_takes_the_first_place():
    seg = _seg(StreamingLLM(sinks=1, window=14), budget=15)
    seg.append(torch.randn(1, 2, 19, D, generator=torch.Generator().manual_seed(4)), _token_values(19))
    seg.compress()  # two blocks of room: the sinks' block and the newest
    assert seg.values[0, 1, :, 0].tolist() == [0, 1, 2, 3, 8, 9, 10, 11, *range(12, 19)]


def test_forced_blocks_are_kept_past_the_budget():
    seg = _seg(H2O(budget=12, recent=12, reindex=True), budget=9)  # the 12 recent tokens reach blocks 1 and 2 of the body
    seg.append(torch.randn(1, 2, 19, D, generator=torch.Generator().manual_seed(4)), _token_values(19))
    seg.scores[..., :4] = 10.0  # block 0 is the heaviest, but only one block fits and two are forced
    seg.compress()
    assert seg.values[0, 0, :, 0].tolist() == list(range(4, 19))


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
        assert parts[bits]["scales"] == 2 * 2 * (2 * 2 * (body // 4) * D + 2 * 2 * body * (D // 4))  # fp16 scale + zero
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
                                          ("haq:budget=512,bits=8/4/2", "needs profile")])
def test_bad_settings(bad, message):
    with pytest.raises(KvlabError, match=message):
        build(bad)


@pytest.mark.parametrize("spec", ["haq:budget=300,profile=p.json,bits=8/4/2,group_size=16,residual=8,local=0.5",
                                  "haq:budget=64,profile=p.json,bits=4", "quant:bits=2,group_size=64,residual=0"])
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
            assert isinstance(seg, Segment if seg.group.bits == 16 else QuantSegment)
            seen.add(type(seg))
    assert seen == {Segment, QuantSegment}


def test_budget_below_the_residual_is_refused(llama, tmp_path):
    spec = f"haq:budget=16,profile={round_robin_profile(llama, tmp_path)},bits=8/4/2,recent=2,sinks=1"
    with pytest.raises(KvlabError, match="fewer than the residual"):
        make_cache(llama, spec)


# -- the cache on tiny models -----------------------------------------------------------------------------
def _logits(model, spec, ids, chunk):
    cache = make_cache(model, spec)
    with torch.no_grad():
        out = torch.cat([model(ids[:, s:s + chunk], past_key_values=cache).logits
                         for s in range(0, ids.shape[1], chunk)], 1)
    return out, cache


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_qwen2", "tiny_gemma3"])
def test_8bit_without_eviction_is_close_to_full_and_fewer_bits_degrade(request, tmp_path, family):
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
        out, cache = _logits(model, f"haq:budget=1000,profile={profile},bits={bits},group_size=4,residual=4", ids, 3)
        errs[bits] = (out - ref).abs().max().item() / ref.std().item()
        for layer in cache.layers:  # sliding layers of gemma are capped by the cache itself
            if layer.info.sliding_window is None:
                assert layer.nbytes() < 2 * layer.seen * layer.info.num_kv_heads * layer.info.head_dim * 4
    assert 1e-5 < errs[8] < 3e-2
    assert 4 * errs[8] < errs[4] < errs[2]


TIGHT = "haq:budget=12,profile={},recent=2,sinks=1,bits=8/4/2,group_size=2,residual=3"


def test_tight_haq_keeps_budget_and_shrinks_bytes(llama, tmp_path):
    spec = TIGHT.format(round_robin_profile(llama, tmp_path))
    ha = spec.replace("haq:", "head-aware:").split(",bits=")[0]
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(8))
    full, _ = _logits(llama, "full", ids, 1)
    out, cache = _logits(llama, spec, ids, 1)
    _, dense = _logits(llama, ha, ids, 1)
    assert (out[:, :4] - full[:, :4]).abs().max() < 1e-4  # nothing quantized or evicted yet
    assert (out[:, -5:] - full[:, -5:]).abs().max() > 1e-3
    for layer in cache.layers:
        for seg in layer.segments:
            assert seg.length <= seg.group.budget + 1 + 1  # + the last token + a block rounded up (G - 1)
    assert cache.nbytes() < dense.nbytes() < cache.full_nbytes()
    assert sum(map(sum, cache.kept_tokens())) <= sum(map(sum, dense.kept_tokens())) + 2 * 2 * 2


def test_grouped_quantized_layout_matches_masked_dense_reference(llama, tmp_path):
    spec = TIGHT.format(round_robin_profile(llama, tmp_path))
    _, cache = _logits(llama, spec, torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(9)), 5)
    layer = cache.layers[1]
    assert len(layer.segments) > 1 and len({s.length for s in layer.segments}) > 1
    kv, g, d = layer.info.num_kv_heads, layer.info.num_heads // layer.info.num_kv_heads, layer.info.head_dim
    query = torch.randn(1, kv * g, 1, d, generator=torch.Generator().manual_seed(1))
    ours = layer.attend(query, d ** -0.5, None)
    per_head = {h: (s.keys[0, i], s.values[0, i]) for s in layer.segments for i, h in enumerate(s.group.heads)}
    longest = max(k.shape[0] for k, _ in per_head.values())
    keys, values = torch.zeros(kv, longest, d), torch.zeros(kv, longest, d)
    valid = torch.zeros(kv, longest, dtype=torch.bool)
    for h, (k, v) in per_head.items():
        keys[h, : k.shape[0]], values[h, : k.shape[0]], valid[h, : k.shape[0]] = k, v, True
    keys, values, valid = (t.repeat_interleave(g, dim=0) for t in (keys, values, valid))
    logits = (query[0] @ keys.transpose(1, 2)) * d ** -0.5
    ref = logits.masked_fill(~valid[:, None], float("-inf")).softmax(-1) @ values
    assert torch.allclose(ours[0], ref, atol=1e-5)


def test_batch_tensors_are_mapped_together_and_not_assigned(llama):
    _, cache = _logits(llama, "quant:bits=4,group_size=4,residual=4", torch.randint(0, 256, (1, 20)), 4)
    seg = cache.layers[1].segments[0]
    keys = seg.keys
    with pytest.raises(KvlabError, match="cannot be reordered"):
        seg.keys = keys.repeat_interleave(2, dim=0)
    seg.map_batch(lambda t: t.repeat_interleave(2, dim=0))
    assert torch.equal(seg.keys[0], keys[0]) and torch.equal(seg.keys[1], keys[0])
    cache.layers[1].reset()
    assert seg.length == 0 and seg.nbytes() == 0
