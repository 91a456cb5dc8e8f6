"""Shared fixtures: tiny random models (fast, no files), real models (from the kvlab cache), shared data.

The tiny models are seeded, float32, sdpa attention, in eval mode, and shared by the whole session:
a test that changes one (weights, attention implementation) must work on a ``copy.deepcopy``.
Real-model fixtures return ``(model, tokenizer)`` from :func:`kvlab.models.load` and skip with the pull
command when the model is not in the cache (``make test`` pulls them first).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_VOCAB = 256


def _tiny(config, seed: int) -> torch.nn.Module:
    """A random causal LM from ``config``, seeded locally (the global RNG is left untouched)."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_llama() -> torch.nn.Module:
    """Random Llama: 2 layers, hidden 64, 4 query / 2 kv heads (head_dim 16), vocab 256."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=TINY_VOCAB, max_position_embeddings=1024)
    return _tiny(config, seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2() -> torch.nn.Module:
    """Random Qwen2 (q/k/v biases): 2 layers, hidden 64, 4 query / 2 kv heads, vocab 256."""
    from transformers import Qwen2Config

    config = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=TINY_VOCAB, max_position_embeddings=1024)
    return _tiny(config, seed=1)


@pytest.fixture(scope="session")
def tiny_gemma3() -> torch.nn.Module:
    """Random Gemma3 text model: 4 layers alternating sliding (window 8) / full attention, 4 q / 2 kv heads."""
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=16, query_pre_attn_scalar=16, intermediate_size=128, vocab_size=TINY_VOCAB,
                              max_position_embeddings=1024, sliding_window=8,
                              layer_types=["sliding_attention", "full_attention"] * 2)
    return _tiny(config, seed=2)


def _real(alias: str):
    from kvlab.models import cache_root, is_pulled, load

    if not is_pulled(alias):
        pytest.skip(f"real model '{alias}' is not in the cache {cache_root()}; run: kvlab models pull {alias}")
    return load(alias, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct, float32 on CPU."""
    return _real("smollm2-135m")


@pytest.fixture(scope="session")
def qwen():
    """(model, tokenizer) of Qwen2.5-Coder-0.5B-Instruct, float32 on CPU."""
    return _real("qwen2.5-0.5b")


@pytest.fixture(scope="session")
def gemma3():
    """(model, tokenizer) of Gemma-3-270M (base), float32 on CPU."""
    return _real("gemma3-270m")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real data folder (../shared/data from the repo root); never copied into the repo."""
    path = REPO_ROOT.parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} is absent")
    return path


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A fake kvpress venv and worker (:mod:`fake_kvpress`) that kvlab's comparison code will drive."""
    from fake_kvpress import install

    return install(tmp_path, monkeypatch)
