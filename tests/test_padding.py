"""Padded batches: a row keeps exactly the tokens it would keep alone, for every registered method."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from kvlab.cache import make_cache
from method_table import LOSSLESS, TIGHT

LENGTHS = (14, 9, 5)  # three prompts, left-padded to 14
# methods whose policy depends on the whole batch by design: Ada-KV gives each head of a layer one budget for
# every row, from the rows' averaged scores (its docstring); a padded batch still runs and keeps its budgets
BATCH_POLICY = {"adakv"}
NEW = 8


def _prompts() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(1, 256, (n,), generator=g) for n in LENGTHS]


def _left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    return ids, mask


def _generate(model, ids, mask, spec):
    cache = make_cache(model, spec) if spec else DynamicCache(config=model.config)
    out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=NEW, do_sample=False,
                         pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1)  # (B, NEW), (B, NEW, vocab)


@pytest.mark.parametrize("budget", ["lossless", "tight"])
@pytest.mark.parametrize("method", sorted(LOSSLESS))
def test_left_padded_batch_equals_each_prompt_alone(tiny_llama, tmp_path, method, budget):
    table = LOSSLESS if budget == "lossless" else TIGHT
    if method not in table:
        pytest.skip(f"{method} has no {budget} setting")
    model = copy.deepcopy(tiny_llama)
    _check_padded(model, table[method](max(LENGTHS) + NEW, tmp_path, model), method in BATCH_POLICY and budget == "tight")


def test_left_padded_head_aware_with_keydiff_retrieval_heads(tiny_llama, tmp_path):
    model = copy.deepcopy(tiny_llama)
    _check_padded(model, TIGHT["head-aware"](max(LENGTHS) + NEW, tmp_path, model) + ",retrieve=keydiff", False)


def _check_padded(model, spec: str, batch_policy: bool) -> None:
    """A left-padded batch through ``generate`` gives each prompt's tokens and logits (1e-4) alone."""
    prompts = _prompts()
    ids, mask = _left_padded(prompts)
    tokens, logits = _generate(model, ids, mask, spec)
    if batch_policy:
        assert torch.isfinite(logits).all()
        return
    for i, p in enumerate(prompts):
        alone_tokens, alone_logits = _generate(model, p[None], torch.ones(1, len(p), dtype=torch.long), spec)
        steps = alone_tokens.shape[1]  # alone, a row may end early (end of sequence); the batch pads it
        assert torch.equal(tokens[i, :steps], alone_tokens[0])
        assert (logits[i, :steps] - alone_logits[0]).abs().max() <= 1e-4


@pytest.mark.parametrize("spec", ["quant:bits=4,group_size=4,residual=4", "quant:bits=2,group_size=2,residual=1",
                                  "quant:bits=4,group_size=4,residual=4,rope=post"])
def test_quantized_padded_rows_quantize_as_alone(tiny_llama, spec):
    """Quantized storage counts a row's real tokens (its key blocks, residual, sinks): a padded batch is stored
    one row at a time, and every row's blocks hold the tokens they hold alone."""
    model = copy.deepcopy(tiny_llama)
    prompts = _prompts()
    ids, mask = _left_padded(prompts)
    tokens, logits = _generate(model, ids, mask, spec)
    for i, p in enumerate(prompts):
        alone_tokens, alone_logits = _generate(model, p[None], torch.ones(1, len(p), dtype=torch.long), spec)
        steps = alone_tokens.shape[1]
        assert torch.equal(tokens[i, :steps], alone_tokens[0])
        assert (logits[i, :steps] - alone_logits[0]).abs().max() <= 1e-4


def test_lossless_padded_batch_equals_plain_transformers(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    ids, mask = _left_padded(_prompts())
    ref_tokens, ref_logits = _generate(model, ids, mask, None)
    tokens, logits = _generate(model, ids, mask, "full")
    assert torch.equal(tokens, ref_tokens) and (logits - ref_logits).abs().max() <= 1e-4


def test_right_padding_in_one_forward_pass_matches_plain_transformers(tiny_llama):
    """Right padding (scoring a batch in one pass): padding is never attended, real tokens match."""
    model = copy.deepcopy(tiny_llama)
    prompts = _prompts()
    width = max(LENGTHS)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, :len(p)], mask[i, :len(p)] = p, 1
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, past_key_values=DynamicCache(config=model.config)).logits
        ours = model(ids, attention_mask=mask, past_key_values=make_cache(model, "h2o:budget=64,recent=4")).logits
    real = mask.bool()
    assert (ours[real] - ref[real]).abs().max() <= 1e-4


@pytest.mark.parametrize("spec", ["full", "streaming:sinks=2,window=10", "h2o:budget=12,recent=3",
                                  "quant:bits=4,group_size=4,residual=4"])
def test_beam_search_and_several_sequences_match_plain_transformers(tiny_llama, spec):
    model = copy.deepcopy(tiny_llama)
    ids, mask = _left_padded(_prompts()[:2])
    kwargs = dict(attention_mask=mask, max_new_tokens=6, pad_token_id=0, do_sample=False)
    lossless = spec == "full"
    beams = model.generate(ids, num_beams=2, num_return_sequences=2, past_key_values=make_cache(model, spec), **kwargs)
    assert beams.shape == (4, ids.shape[1] + 6)
    if lossless:
        ref = model.generate(ids, num_beams=2, num_return_sequences=2, **kwargs)
        assert torch.equal(beams, ref)
