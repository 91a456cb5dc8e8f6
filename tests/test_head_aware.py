"""Head-aware budgets: budget arithmetic, the grouped layout against a masked dense reference, ablations."""

from __future__ import annotations

import copy

import pytest
import torch

from kvlab.cache import make_cache
from kvlab.errors import KvlabError
from kvlab.heads import HeadProfile
from kvlab.methods import build
from kvlab.methods.head_aware import share
from profiles import round_robin_profile
from references import masked_dense_attention


@pytest.fixture()
def llama(tiny_llama):
    return copy.deepcopy(tiny_llama)


def _fill(model, spec, n=40, chunk=5):
    cache = make_cache(model, spec)
    ids = torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for s in range(0, n, chunk):
            model(ids[:, s:s + chunk], past_key_values=cache)
    return cache


def _budgets(model, spec):
    """(classes, budgets) of every (layer, KV head) under ``spec``, after the profile is checked against ``model``."""
    m = build(spec)
    m.prepare(model)
    return m.layout(HeadProfile.load(m.profile))


def test_mean_budget_over_the_model_equals_budget(llama, tmp_path):
    path = round_robin_profile(llama, tmp_path, offset=2)
    classes, b = _budgets(llama, f"head-aware:budget=100,profile={path},recent=8")
    n = sum(map(len, b))
    assert 100 * n - n < sum(map(sum, b)) <= 100 * n
    # retrieval (weight 2) gets 5x what local (0.4) gets: this profile's localities are all equal
    flat = {c: x for row_c, row_b in zip(classes, b) for c, x in zip(row_c, row_b)}
    assert abs(flat["retrieval"] / flat["local"] - 5) < 0.2


def test_scope_layer_keeps_every_layers_mean(llama, tmp_path):
    _, b = _budgets(llama, f"head-aware:budget=100,profile={round_robin_profile(llama, tmp_path)},scope=layer")
    assert all(100 * len(row) - len(row) < sum(row) <= 100 * len(row) for row in b)


def test_local_heads_share_by_locality(llama, tmp_path):
    path = round_robin_profile(llama, tmp_path, offset=1, locality=lambda layer, head: 0.9 if layer == 0 else 0.3)
    classes, b = _budgets(llama, f"head-aware:budget=100,profile={path},recent=8")
    local = {i: x for i, (row_c, row_b) in enumerate(zip(classes, b)) for c, x in zip(row_c, row_b) if c == "local"}
    assert set(local) == {0, 1}
    assert abs(local[1] / local[0] - (1 - 0.3 + 0.05) / (1 - 0.9 + 0.05)) < 0.1  # need = 1 - locality + 0.05
    _, even = _budgets(llama, f"head-aware:budget=100,profile={path},recent=8,spread=even")
    plain = round_robin_profile(llama, tmp_path, offset=1)  # the same classes, localities all 0
    assert even == _budgets(llama, f"head-aware:budget=100,profile={plain},recent=8")[1]


def test_share_is_proportional_above_the_floors():
    assert share(100, [1, 1, 2], [0, 0, 0]) == [25, 25, 50]
    got = share(100, [1, 10, 10], [20, 1, 1])  # the first head is lifted to its floor, the others share the rest
    assert got == [20, 40, 40]
    assert sum(share(101, [1, 1, 1], [1, 1, 1])) <= 101
    with pytest.raises(KvlabError, match="cannot give"):
        share(10, [1, 1], [6, 6])


def test_grouped_layout_matches_masked_dense_reference(llama, tmp_path):
    spec = f"head-aware:budget=8,profile={round_robin_profile(llama, tmp_path)},recent=2,sinks=1,retrieval=1.5,local=0.5"
    cache = _fill(llama, spec)
    layer = cache.layers[0]
    assert len(layer.segments) > 1 and len({s.length for s in layer.segments}) > 1
    kv, g, d = layer.info.num_kv_heads, layer.info.num_heads // layer.info.num_kv_heads, layer.info.head_dim
    query = torch.randn(1, kv * g, 1, d, generator=torch.Generator().manual_seed(1))
    ours = layer.attend(query, d ** -0.5, None)
    # dense reference: every head padded to the longest, padding masked out
    ref = masked_dense_attention(layer, query)
    assert torch.allclose(ours[0], ref, atol=1e-5)


def test_memory_is_the_sum_of_per_head_budgets(llama, tmp_path):
    spec = f"head-aware:budget=8,profile={round_robin_profile(llama, tmp_path)},recent=2,sinks=1,retrieval=1.5,local=0.5"
    cache = _fill(llama, spec, chunk=1)
    for layer, kept in zip(cache.layers, cache.kept_tokens()):
        assert layer.nbytes() - layer.source_nbytes() == sum(kept) * 2 * layer.info.head_dim * 4
        assert len(set(kept)) > 1  # heads really hold different numbers of tokens
        assert layer.nbytes() < max(kept) * len(kept) * 2 * layer.info.head_dim * 4


def test_shuffled_labels_keep_counts_and_change_assignment(llama, tmp_path):
    path = round_robin_profile(llama, tmp_path)
    real, shuffled = build(f"head-aware:budget=64,profile={path}"), build(f"head-aware:budget=64,profile={path},assign=shuffled,seed=3")
    real.prepare(llama)
    shuffled.prepare(llama)
    flat = lambda m: [c for row in m._classes for c in row]  # noqa: E731
    assert sorted(flat(real)) == sorted(flat(shuffled))
    assert flat(real) != flat(shuffled)


def test_uniform_gives_every_head_the_budget(llama, tmp_path):
    _, b = _budgets(llama, f"head-aware:budget=64,profile={round_robin_profile(llama, tmp_path)},assign=uniform")
    assert {x for row in b for x in row} == {64}


def test_profile_of_another_model_is_refused(llama, tiny_qwen2, tmp_path):
    spec = f"head-aware:budget=64,profile={round_robin_profile(tiny_qwen2, tmp_path)}"
    with pytest.raises(KvlabError, match="profile"):
        make_cache(llama, spec)


@pytest.mark.parametrize("bad, message", [
    ("head-aware:budget=64", "needs profile"),
    ("head-aware:budget=64,profile=p.json,retrievl=2", "did you mean 'retrieval'"),
    ("head-aware:budget=64,profile=p.json,local=0", "must be > 0"),
    ("head-aware:budget=64,profile=p.json,assign=random", "assign must be"),
    ("head-aware:budget=64,profile=p.json,scope=global", "scope must be one of model, layer"),
    ("head-aware:budget=64,profile=p.json,spread=flat", "spread must be one of locality, even"),
    ("head-aware:budget=64,profile=p.json,retrieve=snap", "retrieve must be one of h2o, keydiff"),
])
def test_bad_specs(bad, message):
    with pytest.raises(KvlabError, match=message):
        build(bad)


def test_shares_that_cannot_meet_the_budget(llama, tmp_path):
    spec = f"head-aware:budget=1,profile={round_robin_profile(llama, tmp_path)},sinks=4,recent=0"
    with pytest.raises(KvlabError, match="cannot give .* heads their minimum"):
        make_cache(llama, spec)


def test_retrieval_heads_by_key_difference(llama, tmp_path):
    """``retrieve=keydiff``: retrieval heads keep their most distinctive keys (KeyDiff) plus the recent window;
    the layout is the same, the attention exact over what is kept, and a lossless budget keeps everything."""
    from kvlab.methods.keydiff import KeyDiff

    path = round_robin_profile(llama, tmp_path)
    spec = f"head-aware:budget=8,profile={path},recent=2,sinks=1,retrieval=1.5,local=0.5,retrieve=keydiff"
    cache = _fill(llama, spec)
    kinds = {seg.group.label: type(seg.group.scorer) for layer in cache.layers for seg in layer.segments}
    assert kinds["retrieval"] is KeyDiff and kinds["induction"] is not KeyDiff
    assert cache.kept_tokens() == _fill(llama, spec.replace(",retrieve=keydiff", "")).kept_tokens()
    layer = cache.layers[0]
    kv, g, d = layer.info.num_kv_heads, layer.info.num_heads // layer.info.num_kv_heads, layer.info.head_dim
    query = torch.randn(1, kv * g, 1, d, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(layer.attend(query, d ** -0.5, None)[0], masked_dense_attention(layer, query), atol=1e-5)
    full, lossless = _fill(llama, "full", n=12), _fill(llama, f"head-aware:budget=64,profile={path},retrieve=keydiff", n=12)
    assert lossless.kept_tokens() == full.kept_tokens()
