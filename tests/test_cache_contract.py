"""The contract every registered method keeps, on tiny random Llama, Qwen2 and Gemma-3 models."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from kvlab.cache import make_cache
from kvlab.methods import names
from method_table import LOSSLESS, TIGHT, TIGHT_BUDGET

SEQ = 30
FAMILIES = ["tiny_llama", "tiny_qwen2", "tiny_gemma3"]


@pytest.fixture()
def llama(tiny_llama):
    """make_cache switches a model's attention implementation: work on a copy of the shared fixture."""
    return copy.deepcopy(tiny_llama)


def _model(request, family):
    return copy.deepcopy(request.getfixturevalue(family))


def _ids(seed: int = 0, n: int = SEQ) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, n), generator=g)


def _chunked_logits(model, cache, ids, chunk):
    with torch.no_grad():
        return torch.cat([model(ids[:, s:s + chunk], past_key_values=cache).logits for s in range(0, ids.shape[1], chunk)], 1)


def test_table_covers_registry():
    assert set(LOSSLESS) == set(names()), "add every registered method to tests/method_table.py"
    assert set(TIGHT) <= set(names())


# bf16: the reference and kvlab round differently (kernels, block order); 1/16 of a logit is a few bf16 ulps here
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 6e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(LOSSLESS))
@pytest.mark.parametrize("chunk", [1, 7, SEQ])
def test_lossless_budget_reproduces_full_cache(request, tmp_path, family, method, chunk, dtype):
    model = _model(request, family).to(dtype)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids, past_key_values=DynamicCache(config=model.config)).logits.float()
    cache = make_cache(model, LOSSLESS[method](SEQ, tmp_path, model))
    out = _chunked_logits(model, cache, ids, chunk).float()
    assert (out - ref).abs().max().item() <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(TIGHT))
@pytest.mark.parametrize("chunk", [1, 5])
def test_tight_budget_is_kept_and_accounted(request, tmp_path, family, method, chunk, dtype):
    model = _model(request, family).to(dtype)
    ids = _ids(1)
    cache = make_cache(model, TIGHT[method](SEQ, tmp_path, model))
    logits = _chunked_logits(model, cache, ids, chunk)
    assert torch.isfinite(logits).all()
    budget = TIGHT_BUDGET[method]
    last = SEQ - (SEQ - 1) // chunk * chunk  # size of the last chunk
    for layer, kept in zip(cache.layers, cache.kept_tokens()):
        assert all(k <= budget + last for k in kept), kept
        per_token = 2 * layer.info.head_dim * torch.empty((), dtype=dtype).element_size()  # key + value
        if all(seg.group.bits == 16 for seg in layer.segments):
            assert layer.nbytes() - layer.source_nbytes() == sum(kept) * per_token
            assert layer.source_nbytes() <= 4 * layer.info.num_kv_heads * per_token // 2  # the sinks' original keys
        else:  # quantized groups: packed codes + scales + a full-precision residual, less than dense float32
            assert 0 < layer.nbytes() < sum(kept) * 2 * layer.info.head_dim * 4
    assert cache.seen_tokens == SEQ
    assert cache.nbytes() < cache.full_nbytes()
    assert cache.peak_nbytes >= cache.nbytes()


@pytest.mark.parametrize("method", sorted(TIGHT))
def test_tight_budget_changes_logits(llama, tmp_path, method):
    """Eviction must actually happen: a tight budget cannot give the full cache's logits."""
    ids = _ids(2)
    full = _chunked_logits(llama, make_cache(llama, "full"), ids, 1)
    tight = _chunked_logits(llama, make_cache(llama, TIGHT[method](SEQ, tmp_path, llama)), ids, 1)
    assert (full[:, :4] - tight[:, :4]).abs().max() < 1e-4  # identical until a budget (>= 4 in TIGHT) is exceeded
    assert (full[:, -5:] - tight[:, -5:]).abs().max() > 1e-3


@pytest.mark.parametrize("method", sorted(LOSSLESS))
def test_generate_with_cache_matches_full(llama, tmp_path, method):
    ids = _ids(3, 12)
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))  # no padding
    ref = llama.generate(ids, **kwargs)
    cache = make_cache(llama, LOSSLESS[method](40, tmp_path, llama))
    out = llama.generate(ids, past_key_values=cache, **kwargs)
    assert torch.equal(out, ref)
    assert cache.seen_tokens == ids.shape[1] + 9  # the last generated token is never fed


def test_streaming_generation_runs_past_max_positions(llama):
    """StreamingLLM keeps memory flat for a stream longer than the model's 1024 positions."""
    cache = make_cache(llama, "streaming:sinks=4,window=60")
    ids = _ids(4, 1100)
    logits = _chunked_logits(llama, cache, ids, 50)
    assert torch.isfinite(logits).all()
    assert max(max(k) for k in cache.kept_tokens()) <= 64 + 50
