"""The baselines' own arithmetic on hand-built tensors, and their bad specs at the command line."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from kvlab.cache import make_cache
from kvlab.cli.main import main
from kvlab.methods import build
from kvlab.methods.keydiff import KeyDiff
from kvlab.methods.pyramidkv import layer_budget
from kvlab.methods.snapkv import snap_scores
from profiles import round_robin_profile


@pytest.mark.parametrize("spec, message", [
    ("snapkv:budget=0", "budget must be a positive integer"),
    ("snapkv:budget=16,window=32", "window (32) cannot exceed budget (16)"),
    ("snapkv:kernel=4", "kernel must be an odd number"),
    ("snapkv:windw=4", "did you mean 'window'"),
    ("pyramidkv:budget=0", "budget must be a positive integer"),
    ("pyramidkv:budget=16,window=32", "cannot exceed budget"),
    ("pyramidkv:beta=0.5", "beta must be >= 1"),
    ("tova:budget=0", "budget must be a positive integer"),
    ("tova:recent=4", "has no setting 'recent'"),
    ("knorm:budget=0", "budget must be a positive integer"),
    ("knorm:budget=8,recent=9", "recent (9) cannot exceed budget (8)"),
    ("keydiff:budget=-1", "budget must be a positive integer"),
    ("duo:window=0", "window must be a positive integer"),
    ("duo:window=8", "duo needs profile=FILE"),
    ("duo:profile=p.json,full=heads", "full must be classes among"),
])
def test_bad_spec_is_one_line_exit_2(capsys, tmp_path, spec, message):
    out_file = tmp_path / "r.json"
    code = main(["ppl", "--method", spec, "--output", str(out_file)])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out_file.exists()


def test_pyramid_budgets_fall_linearly_around_the_mean():
    budgets = [layer_budget(512, 32, 20, i, 30) for i in range(30)]
    assert budgets[0] == 32 + round(2 * 480 - 480 / 20) and budgets[-1] == 32 + round(480 / 20)
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))
    assert abs(sum(budgets) / 30 - 512) <= 0.5
    assert [layer_budget(64, 8, 1, i, 4) for i in range(4)] == [64] * 4  # beta=1: uniform


def test_snapkv_pools_and_keeps_the_window():
    s = torch.tensor([[[0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 1.0, 0.0]]])  # (B=1, h=1, n=8)
    out = snap_scores(SimpleNamespace(scores=s, age=torch.arange(7, -1, -1), time_index=None), window=2, kernel=3)
    assert out[0, 0, :6].tolist() == [0.0, 5.0, 5.0, 5.0, 0.0, 1.0]  # each token: the max of its 3 neighbours
    assert torch.isinf(out[0, 0, 6:]).all()
    assert s[0, 0, 1] == 0  # the storage's scores are not modified
    # the same tokens stored in another order (slot writes): neighbours and the window are found in time order
    perm = torch.tensor([[[3, 0, 7, 5, 1, 6, 2, 4]]])  # slot of each token, in time order
    slots = torch.empty_like(s).scatter_(-1, perm, s)
    age = torch.empty(1, 1, 8, dtype=torch.long).scatter_(-1, perm, torch.arange(7, -1, -1).view(1, 1, 8))
    moved = snap_scores(SimpleNamespace(scores=slots, age=age, time_index=perm), window=2, kernel=3)
    assert torch.equal(moved.gather(-1, perm), out)
    assert build("snapkv:budget=64,window=8").observed() == 8
    assert build("pyramidkv:budget=64,window=8").observed() == 8


def test_tova_observes_the_last_query_per_head_or_shared():
    s = torch.tensor([[[1.0, 0.0], [0.0, 3.0]]])  # (B=1, h=2, n=2)
    seg = SimpleNamespace(scores=s)
    assert build("tova:budget=4").observed() == 1
    assert torch.equal(build("tova:budget=4").score(seg), s)
    assert build("tova:budget=4,shared=1").score(seg).tolist() == [[[0.5, 1.5], [0.5, 1.5]]]


def test_keydiff_keeps_the_key_unlike_the_others():
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [1.0, -0.1]])[None, None]  # (1, 1, 4, 2)
    keydiff = build("keydiff:budget=2")
    for scores in (None, keydiff.arrival_scores(keys)):  # norms kept since arrival, or none: the same scores
        seg = SimpleNamespace(stored=lambda: (keys, keys, None), scores=scores)
        assert keydiff.score(seg)[0, 0].argmax().item() == 2


@pytest.mark.parametrize("spec", ["snapkv:budget=8,window=3", "pyramidkv:budget=8,window=2,beta=2", "tova:budget=8",
                                  "knorm:budget=8", "keydiff:budget=8"])
def test_decoding_keeps_the_budget_after_prefill(tiny_llama, spec):
    """Compress at prefill (one pass), then every decode step stays at the budget."""
    model = copy.deepcopy(tiny_llama)
    cache = make_cache(model, spec)
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids, past_key_values=cache)
        for t in range(5):
            model(ids[:, t:t + 1], past_key_values=cache)
            for layer, kept in zip(cache.layers, cache.kept_tokens()):
                assert all(k == layer.segments[0].group.budget + 1 for k in kept), kept
    assert cache.seen_tokens == 29


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_knorm_and_keydiff_keep_each_norm_from_its_arrival(tiny_llama, dtype):
    """KNorm's scores, and the two norms KeyDiff scores each key from, are fixed when a token arrives: the storage
    keeps them through chunks, evictions and slot steps, equal bit for bit to those of the keys it holds; where keys
    move (reindex=1) it keeps none and the keys are scored as held."""
    model = copy.deepcopy(tiny_llama).to(dtype)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    caches = {spec: make_cache(model, spec) for spec in ("knorm:budget=8", "knorm:budget=8,reindex=1",
                                                          "keydiff:budget=8", "keydiff:budget=8,reindex=1")}
    with torch.no_grad():
        for cache in caches.values():
            model(ids[:, :12], past_key_values=cache)
            model(ids[:, 12:20], past_key_values=cache)  # a chunk that evicts
            for t in range(20, 40):  # slot steps
                model(ids[:, t:t + 1], past_key_values=cache)
    for spec, cache in caches.items():
        for seg in (s for layer in cache.layers for s in layer.segments):
            if "reindex" in spec:
                assert seg.scores is None, spec
                continue
            keys = seg.stored()[0]
            if spec.startswith("knorm"):
                assert torch.equal(seg.scores, -torch.linalg.vector_norm(keys, dim=-1, dtype=torch.float32))
            else:
                norm = torch.linalg.vector_norm(keys.float(), dim=-1, keepdim=True).clamp_min(1e-12)
                again = torch.linalg.vector_norm(keys.float() / norm, dim=-1, keepdim=True).clamp_min(1e-8)
                assert torch.equal(seg.scores, torch.cat((norm, again), dim=-1))


@dataclass
class _KeyDiffFromKeys(KeyDiff):
    """KeyDiff scoring every kept key from the keys at every step (its code before it kept the norms)."""

    name = "keydiff-from-keys"
    fixed_scores = False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2])
def test_keydiff_with_kept_norms_keeps_the_tokens_and_logits_of_scoring_from_the_keys(tiny_llama, dtype, rows):
    """The kept norms change no bit: the same tokens kept and the same logits as KeyDiff computing every norm at every
    step, through a chunk that evicts and slot steps, at batch 1 and in a left-padded batch (budget 8, recent 2)."""
    model = copy.deepcopy(tiny_llama).to(dtype)
    ids = torch.randint(1, 256, (rows, 40), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1:, :5] = 0  # the second row left-padded by 5
    logits, kept = {}, {}
    for method in (KeyDiff(budget=8, recent=2), _KeyDiffFromKeys(budget=8, recent=2)):
        cache = make_cache(model, method)
        out = []
        with torch.no_grad():
            for start, stop in ((0, 12), (12, 20), *((t, t + 1) for t in range(20, 40))):
                out.append(model(ids[:, start:stop], attention_mask=mask[:, :stop], past_key_values=cache).logits)
        logits[method.name] = torch.cat(out, dim=1)
        segs = [seg for layer in cache.layers for seg in layer.segments]
        assert all((seg.scores is not None) == (method.name == "keydiff") for seg in segs)
        kept[method.name] = [seg.stored_state()[2].sort(dim=-1).values for seg in segs]  # true positions kept
    assert all(torch.equal(a, b) for a, b in zip(kept["keydiff"], kept["keydiff-from-keys"]))
    assert torch.equal(logits["keydiff"], logits["keydiff-from-keys"])


def test_duo_retrieval_heads_keep_everything(tiny_llama, tmp_path):
    model = copy.deepcopy(tiny_llama)
    cache = make_cache(model, f"duo:profile={round_robin_profile(model, tmp_path)},sinks=2,window=6")
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 20)), past_key_values=cache)
        model(torch.randint(0, 256, (1, 1)), past_key_values=cache)
    for layer, kept in zip(cache.layers, cache.kept_tokens()):
        for seg in layer.segments:
            want = 21 if seg.group.budget is None else 2 + 6 + 1
            assert all(kept[h] == want for h in seg.group.heads), (seg.group.label, kept)
    assert {seg.group.label for layer in cache.layers for seg in layer.segments} == {"retrieval", "streaming"}


def test_compare_places_every_baseline_at_kvpress_kept_tokens(tmp_path):
    from kvlab.compare.kvlab_runs import NEEDS_PROFILE, method_spec

    for name in ("snapkv", "pyramidkv", "tova", "knorm", "keydiff"):
        assert build(method_spec(name, 333)).capacity() == 333, name
    assert method_spec("snapkv", 40) == "snapkv:budget=40,window=40,kernel=5"
    assert method_spec("duo", 100, "p.json") == "duo:profile=p.json,sinks=4,window=96"
    assert method_spec("tova", 100) == "tova:budget=100,shared=1"  # TOVAPress: the mean over all heads
    assert "duo" in NEEDS_PROFILE and "head-aware" in NEEDS_PROFILE and "snapkv" not in NEEDS_PROFILE


def test_criteria_compare_head_aware_with_the_strongest_baseline():
    import lab_fakes
    from kvlab.lab.criteria import FAIL, PASS, check
    from kvlab.lab.frame import rows_frame

    model = "smollm2-135m"
    specs = ("full", "streaming:sinks=4,window=252", "snapkv:budget=256,window=32", "head-aware:budget=256,profile=p.json")
    rows = [lab_fakes.ppl_row(model, m, 1024) for m in specs]
    frame = rows_frame(rows)
    loss = dict(zip(frame["method_name"], frame["quality_loss_pct"]))
    crit = check(frame)[-1]
    assert crit.name.startswith("head-aware vs the strongest baseline") and "snapkv" in crit.detail
    assert crit.status == (PASS if loss["head-aware"] <= min(loss["streaming"], loss["snapkv"]) else FAIL)
    assert len(check(rows_frame(rows[:2]))) == 5  # no head-aware method: no sixth criterion


def test_adakv_shares_the_layer_budget_unevenly_and_frees_the_memory(tiny_llama):
    """Ada-KV: per-head budgets from one pool per layer, decided at the first eviction; the layer holds exactly
    budget x heads tokens (each head in its own tensors), so 25% of the KV costs 25% of the bytes."""
    import copy

    from kvlab.cache import make_cache

    model = copy.deepcopy(tiny_llama)
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(3))
    cache = make_cache(model, "adakv:budget=16,window=4,kernel=3")
    with torch.no_grad():
        model(ids, past_key_values=cache)  # one pass: the scores of its last 4 queries
        cache.compress()
    kept = cache.kept_tokens()
    assert all(sum(layer) == 16 * 2 for layer in kept), kept
    assert any(layer[0] != layer[1] for layer in kept), kept  # adaptive, not uniform
    assert all(min(layer) >= 4 for layer in kept)  # the floor: max(window, 0.2 x budget)
    assert cache.nbytes() <= 0.27 * cache.full_nbytes()
