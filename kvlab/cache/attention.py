"""kvlab's attention implementation (``"kvlab"``) and its mask function, registered with transformers.

The mask of a forward pass through a kvlab cache covers only its new tokens: None unless one of them is
padding (then their ``(B, q)`` validity), so no ``q x n`` mask is ever built. The attention function hands a
tagged layer the query; any other cache falls through to transformers' sdpa.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvlab.cache.layer import tagged_layer
from kvlab.errors import KvlabError

ATTN_NAME = "kvlab"


def kvlab_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
               attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """The mask of a forward pass through a kvlab cache, which covers only the ``q`` new tokens: None
    when none of them is padding, else their validity ``(B, q)`` bool (one check per forward pass, as
    transformers' sdpa mask makes). Any other cache gets transformers' sdpa mask."""
    if kv_length != q_length or kv_offset != q_offset or attention_mask is None:
        return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                         kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)
    valid = attention_mask[:, kv_offset:kv_offset + q_length].bool()
    if valid.shape[-1] < q_length:  # a mask shorter than the input: the rest is real
        valid = torch.nn.functional.pad(valid, (0, q_length - valid.shape[-1]), value=True)
    return None if bool(valid.all()) else valid


def kvlab_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    sliding_window: int | None = None, softcap: float | None = None, **kwargs
                    ) -> tuple[torch.Tensor, None]:
    """transformers attention function: the tagged layer computes, anything else goes to sdpa."""
    layer = tagged_layer(key)
    if layer is None:
        if softcap is not None:
            raise KvlabError("kvlab's attention with another cache cannot soft-cap logits; use a kvlab cache, or "
                             "model.set_attn_implementation('eager')")
        if attention_mask is not None and attention_mask.dim() == 2:  # a prefill: kvlab_mask gave the padding
            q = query.shape[-2]
            causal = torch.ones(q, q, dtype=torch.bool, device=query.device).tril()
            attention_mask = causal & attention_mask[:, None, None, :]
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, sliding_window=sliding_window, **kwargs)
    valid = None
    if attention_mask is not None:  # (B, q) from kvlab_mask; a 4D mask's diagonal says the same
        valid = attention_mask if attention_mask.dim() == 2 else attention_mask[:, 0].diagonal(dim1=-2, dim2=-1)
        valid = valid.bool()
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = layer.attend(query, scale, sliding_window or layer.info.sliding_window, softcap, valid)
    return out.transpose(1, 2).contiguous(), None


def use_kvlab_attention(model: PreTrainedModel) -> None:
    """Register and select the ``"kvlab"`` attention implementation (sdpa for any other cache)."""
    AttentionInterface.register(ATTN_NAME, kvlab_attention)
    AttentionMaskInterface.register(ATTN_NAME, kvlab_mask)
    if model.config._attn_implementation != ATTN_NAME:
        model.set_attn_implementation(ATTN_NAME)
