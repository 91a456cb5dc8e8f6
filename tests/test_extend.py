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


def test_a_method_with_fixed_scores_evicts_as_if_it_scored_every_step(tiny_llama, monkeypatch):
    """A method of another package declares its scores fixed at arrival (``fixed_scores``, ``arrival_scores``): the
    storage keeps them, and the cache keeps exactly the tokens, and gives exactly the logits, of the same method
    scoring every kept key at every step (chunks, then slot steps)."""
    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))

    @dataclass
    class FirstChannel(kvlab.Method):
        budget: int = 8
        name = "first-channel"
        order_free = True

        def capacity(self):
            return self.budget

        def arrival_scores(self, keys):  # (B, h, q, D) -> (B, h, q)
            return keys[..., 0].float()

        def score(self, seg):
            return seg.scores if seg.scores is not None else self.arrival_scores(seg.stored()[0])

    @dataclass
    class Fixed(FirstChannel):
        name = "first-channel-fixed"
        fixed_scores = True

    kvlab.register_method(FirstChannel)
    kvlab.register_method(Fixed)
    model = copy.deepcopy(tiny_llama)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(2))
    logits, kept = {}, {}
    for name in ("first-channel", "first-channel-fixed"):
        cache = kvlab.make_cache(model, f"{name}:budget=8")
        with torch.no_grad():
            out = [model(ids[:, :12], past_key_values=cache).logits]
            out += [model(ids[:, t:t + 1], past_key_values=cache).logits for t in range(12, 40)]
        logits[name] = torch.cat(out, dim=1)
        segs = [seg for layer in cache.layers for seg in layer.segments]
        assert all((seg.scores is not None) == (name == "first-channel-fixed") for seg in segs)
        kept[name] = [seg.stored_state()[2].sort(dim=-1).values for seg in segs]  # true positions kept
    assert all(torch.equal(a, b) for a, b in zip(kept["first-channel"], kept["first-channel-fixed"]))
    assert torch.equal(logits["first-channel"], logits["first-channel-fixed"])
