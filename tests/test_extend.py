"""The README's promise: a new method is one small dataclass that overrides one thing."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

import kvlab
from kvlab.methods import registry


def test_readme_knorm_example(tiny_llama, monkeypatch):
    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))  # keep the registry clean for other tests

    @kvlab.register_method
    @dataclass
    class KeyNorm(kvlab.Method):
        budget: int = 512
        name = "my-knorm"

        def capacity(self):
            return self.budget

        def score(self, seg):
            return -seg.keys.norm(dim=-1)

    assert "my-knorm" in kvlab.methods()
    model = copy.deepcopy(tiny_llama)
    cache = kvlab.make_cache(model, "my-knorm:budget=6")
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for s in range(0, 20, 4):
            model(ids[:, s:s + 4], past_key_values=cache)
    assert all(k == 6 + 4 for layer in cache.kept_tokens() for k in layer)
    # the next eviction keeps exactly the 6 smallest-norm keys of the 10 held now
    seg = cache.layers[0].segments[0]
    norms = seg.keys.norm(dim=-1)
    expected = norms.topk(6, largest=False).values.sort().values
    seg.compress()
    assert torch.allclose(seg.keys.norm(dim=-1).sort().values, expected)


def test_registering_a_taken_name_fails(monkeypatch):
    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))

    @dataclass
    class Other(kvlab.Method):
        name = "streaming"

    registry.names()
    with pytest.raises(ValueError, match="already taken"):
        kvlab.register_method(Other)


def test_a_registered_full_cache_is_the_reference_of_tables(monkeypatch):
    """``is_reference`` (the row tables and figures compare against) asks the registry, and hears of a method
    registered after it was first asked."""
    from kvlab.methods.full import Full

    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))
    registry.is_reference.cache_clear()
    assert registry.is_reference("full") and not registry.is_reference("streaming")
    assert not registry.is_reference("exact-cache")  # unknown: no reference, no error

    @dataclass
    class Exact(Full):
        name = "exact-cache"

    kvlab.register_method(Exact)
    assert registry.is_reference("exact-cache")
    monkeypatch.undo()
    registry.is_reference.cache_clear()  # the registry without it again
