"""Head-aware budgets: budget arithmetic, the grouped layout against a masked dense reference, ablations."""

from __future__ import annotations

import copy

import pytest
import torch

from kvlab.cache import make_cache
from kvlab.errors import KvlabError
from kvlab.methods import build
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


def test_mean_budget_per_layer_equals_budget(llama, tmp_path):
    m = build(f"head-aware:budget=100,profile={round_robin_profile(llama, tmp_path, offset=2)}")
    m.prepare(llama)
    for classes in m._classes:
        b = m.budgets(classes)
        total = sum(b[c] for c in classes)
        assert 100 * len(classes) - len(classes) < total <= 100 * len(classes)
    # retrieval (weight 2) gets 8x what local (0.25) gets in a layer that has both
    mixed = next(c for c in m._classes if "retrieval" in c and "local" in c)
    b = m.budgets(mixed)
    assert abs(b["retrieval"] / b["local"] - 8) < 0.2


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
        assert layer.nbytes() == sum(kept) * 2 * layer.info.head_dim * 4
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


def test_uniform_gives_every_class_the_budget(llama, tmp_path):
    m = build(f"head-aware:budget=64,profile={round_robin_profile(llama, tmp_path)},assign=uniform")
    m.prepare(llama)
    assert all(set(m.budgets(c).values()) == {64} for c in m._classes)


def test_profile_of_another_model_is_refused(llama, tiny_qwen2, tmp_path):
    spec = f"head-aware:budget=64,profile={round_robin_profile(tiny_qwen2, tmp_path)}"
    with pytest.raises(KvlabError, match="profile"):
        make_cache(llama, spec)


@pytest.mark.parametrize("bad, message", [
    ("head-aware:budget=64", "needs profile"),
    ("head-aware:budget=64,profile=p.json,retrievl=2", "did you mean 'retrieval'"),
    ("head-aware:budget=64,profile=p.json,local=0", "must be > 0"),
    ("head-aware:budget=64,profile=p.json,assign=random", "assign must be"),
])
def test_bad_specs(bad, message):
    with pytest.raises(KvlabError, match=message):
        build(bad)


def test_shares_that_cannot_meet_the_budget(llama, tmp_path):
    spec = f"head-aware:budget=4,profile={round_robin_profile(llama, tmp_path)},sinks=4,recent=0"
    with pytest.raises(KvlabError, match="local heads get"):
        make_cache(llama, spec)
