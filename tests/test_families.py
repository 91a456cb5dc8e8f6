"""Every supported family, on a tiny random config built with AutoConfig.for_model: the lossless cache equals
transformers' DynamicCache (eager attention where the family has no sdpa), a tight budget evicts and holds
fewer bytes, and what kvlab cannot do exactly is refused before any forward pass."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from kvlab.cache import make_cache
from kvlab.errors import KvlabError

SMALL = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
             vocab_size=256, max_position_embeddings=1024)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 128}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256}

FAMILIES = {
    "llama3-scaling": ("llama", dict(rope_parameters=LLAMA3)),
    "qwen2-yarn": ("qwen2", dict(rope_parameters=YARN)),
    "qwen3": ("qwen3", dict(head_dim=16)),
    "mistral": ("mistral", dict(head_dim=16, sliding_window=12)),
    "phi3": ("phi3", dict(pad_token_id=0)),
    "gemma2": ("gemma2", dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=16, attn_logit_softcapping=5.0,
                              final_logit_softcapping=30.0)),
    "smollm3": ("smollm3", dict(no_rope_layers=[1, 1, 1, 0], pad_token_id=0)),
}
REFUSED = {
    "gpt_oss": ("gpt_oss", dict(head_dim=16, num_local_experts=2, num_experts_per_tok=1), "learned sinks"),
    "cohere": ("cohere", {}, "interleaved RoPE"),
    "dynamic-ntk": ("llama", dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
                    "change at run time"),
    "phi3-longrope": ("phi3", dict(pad_token_id=0, max_position_embeddings=4096, original_max_position_embeddings=1024,
                                   rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                    "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}),
                      "change at run time"),
}
SEQ = 40


def _model(kind: str, extra: dict, attn: str | None = None) -> torch.nn.Module:
    attn = attn or ("eager" if kind == "gemma2" else "sdpa")  # Gemma-2 (soft-capping) has no sdpa in transformers
    config = AutoConfig.for_model(kind, **{**SMALL, **extra})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32).eval()


def _logits(model, cache, ids, chunk):
    with torch.no_grad():
        return torch.cat([model(ids[:, s:s + chunk], past_key_values=cache).logits for s in range(0, ids.shape[1], chunk)], 1)


@pytest.mark.parametrize("chunk", [1, 7])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lossless_equals_dynamic_cache(family, chunk):
    kind, extra = FAMILIES[family]
    ids = torch.randint(0, 256, (1, SEQ), generator=torch.Generator().manual_seed(1))
    ref_model = _model(kind, extra)
    ref = _logits(ref_model, DynamicCache(config=ref_model.config), ids, chunk)
    model = _model(kind, extra)
    for spec in ("full", f"streaming:sinks=4,window={SEQ}", f"h2o:budget={SEQ},recent=4"):
        out = _logits(model, make_cache(model, spec), ids, chunk)
        assert (out - ref).abs().max() <= 1e-4, spec


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tight_budget_evicts_and_holds_fewer_bytes(family):
    kind, extra = FAMILIES[family]
    model = _model(kind, extra)
    ids = torch.randint(0, 256, (1, SEQ), generator=torch.Generator().manual_seed(2))
    full = make_cache(model, "full")
    ref = _logits(model, full, ids, 1)
    for spec in ("streaming:sinks=2,window=6", "h2o:budget=8,recent=3"):
        cache = make_cache(model, spec)
        out = _logits(model, cache, ids, 1)
        assert torch.isfinite(out).all() and (out[:, -5:] - ref[:, -5:]).abs().max() > 1e-3
        assert cache.nbytes() < full.nbytes()


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_what_cannot_be_exact_is_refused_before_any_forward_pass(family):
    kind, extra, reason = REFUSED[family]
    model = _model(kind, extra, "eager")
    with pytest.raises(KvlabError, match=reason) as err:
        make_cache(model, "full")
    assert "\n" not in str(err.value) and "cannot compress the KV cache of" in str(err.value)


def test_layers_without_rope_are_never_rotated():
    from kvlab.cache import rotaries

    kind, extra = FAMILIES["smollm3"]
    assert [r is None for r in rotaries(_model(kind, extra))] == [False, False, False, True]


@pytest.mark.parametrize("family", ["llama3-scaling", "gemma2", "smollm3"])
def test_layers_share_one_rotary_per_set_of_frequencies(family):
    """One cos/sin table per model (a 32-layer model at 64k positions would otherwise hold 32 of them)."""
    from kvlab.cache import rotaries

    kind, extra = FAMILIES[family]
    rots = [r for r in rotaries(_model(kind, extra)) if r is not None]
    assert len(rots) >= 2 and len({id(r) for r in rots}) == 1
