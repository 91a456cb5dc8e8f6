"""Every ```python block of the README runs and does what it says.

A block that loads ``kvlab.load("smollm2-135m")`` runs on the real model (skipped with the pull command when
it is not in the cache), with ``max_new_tokens`` cut down for speed, and must print a real answer. A block
that registers a method runs against a copy of the registry, and the method it adds must then compress a
tiny model's cache.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch

import kvlab
from kvlab.methods import registry

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```$", README.read_text(), flags=re.M | re.S)
REAL = 'kvlab.load("smollm2-135m")'
NEW_TOKENS = 24


def run_block(code: str) -> dict:
    namespace = {"__name__": "readme_block"}
    # dont_inherit: the block runs as the README shows it, without this file's ``from __future__`` imports
    exec(compile(code, str(README), "exec", dont_inherit=True), namespace)  # noqa: S102 - the README's own code
    return namespace


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 2 and any(REAL in b for b in BLOCKS) and any("register_method" in b for b in BLOCKS)


@pytest.mark.real
@pytest.mark.parametrize("code", [b for b in BLOCKS if REAL in b], ids=lambda b: b.splitlines()[0][:30])
def test_real_model_block_prints_an_answer(code, capsys):
    from kvlab.models import cache_root, is_pulled

    if not is_pulled("smollm2-135m"):
        pytest.skip(f"real model 'smollm2-135m' is not in the cache {cache_root()}; "
                    "run: kvlab models pull smollm2-135m")
    fast, n = re.subn(r"max_new_tokens=\d+", f"max_new_tokens={NEW_TOKENS}", code)
    assert n, "the block generates without max_new_tokens"
    namespace = run_block(fast)
    printed = capsys.readouterr().out.strip().splitlines()
    answer = "\n".join(printed[:-1])
    assert len(re.findall(r"[A-Za-z]{2,}", answer)) >= 5, f"no answer: {printed}"  # words, not an empty story
    now, peak, full = map(int, printed[-1].split())
    assert 0 < now <= peak <= full
    assert namespace["out"].shape[1] > namespace["inputs"].input_ids.shape[1]


@pytest.mark.parametrize("code", [b for b in BLOCKS if "register_method" in b], ids=lambda b: b.splitlines()[0][:30])
def test_method_block_registers_a_working_method(code, tiny_llama, monkeypatch):
    registry.names()  # the built-ins first, so the copy below holds them
    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))  # the registry is clean for other tests
    before = set(kvlab.methods())
    run_block(code)
    added = set(kvlab.methods()) - before
    assert len(added) == 1, "the block must add exactly one method (and not take a built-in's name)"
    name = added.pop()
    model = copy.deepcopy(tiny_llama)
    cache = kvlab.make_cache(model, f"{name}:budget=6")
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for start in range(0, 20, 4):
            model(ids[:, start:start + 4], past_key_values=cache)
    assert all(k <= 6 + 4 for layer in cache.kept_tokens() for k in layer)
    assert cache.nbytes() < cache.full_nbytes()
