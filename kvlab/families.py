"""Which model families kvlab's cache reproduces exactly, read from a model's config before any forward pass.

Supported: decoder-only models whose attention is softmax attention over RoPE-rotated keys (or no
position encoding at all in some layers), full or sliding-window, with grouped-query heads and optional
logit soft-capping: Llama (incl. Llama-3.x ``llama3`` rope scaling), Qwen2/2.5, Qwen3 (q/k norms),
Mistral, Phi-3, Gemma-2/3, SmolLM2/3 (``no_rope_layers``), YaRN and linear scaling. A static rope
scaling only changes the frequencies (and, for YaRN, an attention factor that a stored key already
carries), so re-rotating a key stays exact.

Refused, in one line naming the model and the reason (:func:`check_supported`):

* RoPE whose frequencies change at run time (``dynamic`` NTK, ``longrope``): a stored key's rotation
  could not be reproduced;
* interleaved RoPE (GPT-J style pairs: Cohere, GLM, GPT-J, CodeGen): kvlab rotates half-split pairs;
* learned attention sinks (GPT-OSS): an extra logit per head outside the cache;
* chunked, linear or state-space layers (Llama-4, hybrids), ALiBi biases, latent attention (DeepSeek MLA).
"""

from __future__ import annotations

from typing import Any

from kvlab.errors import KvlabError
from kvlab.storage import LayerInfo

RUNTIME_ROPE = ("dynamic", "longrope")
INTERLEAVED = ("cohere", "cohere2", "glm", "glm4", "chatglm", "gptj", "codegen")
LEARNED_SINKS = ("gpt_oss",)
ALIBI = ("bloom", "mpt", "falcon", "baichuan")
LAYER_KINDS = ("full_attention", "sliding_attention")


def _rope_types(cfg: Any) -> set[str]:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    dicts = [params] if "rope_type" in params or "type" in params else [p for p in params.values() if isinstance(p, dict)]
    return {str(d.get("rope_type", d.get("type", "default"))) for d in dicts}


def unsupported_reason(config: Any) -> str | None:
    """Why kvlab cannot reproduce this model's attention exactly, or None."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    kind = getattr(cfg, "model_type", "")
    runtime = _rope_types(cfg) & set(RUNTIME_ROPE)
    if runtime:
        return f"its RoPE frequencies change at run time (rope_type={sorted(runtime)[0]})"
    if kind in INTERLEAVED:
        return "it uses interleaved RoPE (GPT-J-style channel pairs), which kvlab does not re-rotate"
    if kind in LEARNED_SINKS:
        return "its attention has learned sinks (an extra logit per head outside the cache)"
    if kind in ALIBI or getattr(cfg, "alibi", False):
        return "it adds ALiBi position biases to the attention logits"
    if getattr(cfg, "kv_lora_rank", None):
        return "it uses multi-head latent attention (compressed keys with a separate RoPE part)"
    other = sorted(set(layer_kinds(cfg)) - set(LAYER_KINDS))
    if other:
        return f"it has {other[0]} layers (kvlab handles full and sliding-window attention)"
    if getattr(cfg, "is_encoder_decoder", False):
        return "it is an encoder-decoder model"
    return None


def check_supported(model: Any) -> None:
    """Raise a one-line :class:`KvlabError` naming the model and the reason if kvlab cannot serve it exactly."""
    reason = unsupported_reason(model.config)
    if reason is not None:
        name = getattr(model.config, "name_or_path", "") or getattr(model.config, "model_type", "this model")
        raise KvlabError(f"kvlab cannot compress the KV cache of {name} exactly: {reason}")


def layer_kinds(cfg: Any) -> list[str]:
    """Every layer's attention kind: the config's ``layer_types``; else sliding everywhere when the config has
    a sliding window (Mistral), else full."""
    n = cfg.num_hidden_layers
    types = getattr(cfg, "layer_types", None)
    if types:
        return list(types)
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    return ["sliding_attention" if window else "full_attention"] * n


def rope_layers(cfg: Any) -> list[bool]:
    """Whether each layer rotates its keys: ``no_rope_layers`` (SmolLM3, Llama-4) marks those that do with 1."""
    flags = getattr(cfg, "no_rope_layers", None)
    return [bool(f) for f in flags] if flags else [True] * cfg.num_hidden_layers


def layer_infos(model: Any) -> list[LayerInfo]:
    """Shapes of every attention layer, from the model's (text) config."""
    cfg = model.config.get_text_config()
    n = cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    window = getattr(cfg, "sliding_window", None)
    return [LayerInfo(index=i, num_layers=n, num_kv_heads=kv, num_heads=heads, head_dim=head_dim,
                      sliding_window=window if kind == "sliding_attention" else None)
            for i, kind in enumerate(layer_kinds(cfg))]
