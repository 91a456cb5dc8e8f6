"""Methods from other packages: a distribution's ``kvlab.methods`` entry points work like built-ins."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kvlab
from kvlab.cli.main import main
from kvlab.methods import registry

PLUGIN = '''
from dataclasses import dataclass

import kvlab


@dataclass
class Oldest(kvlab.Method):
    """Keep the oldest tokens (a throw-away method)."""

    budget: int = 8
    name = "oldest"
    reindex = False  # original positions: no re-rotation, no originals held

    def __post_init__(self):
        if self.budget < 1:
            raise kvlab.KvlabError(f"budget must be a positive integer, got {self.budget}")

    def capacity(self):
        return self.budget

    def score(self, seg):
        return -seg.order.float()
'''


def make_plugin(root: Path, entries: str = "oldest = mypkg:Oldest\nbroken = mypkg.broken:Nope\n") -> Path:
    """A package with no installer: its module and a ``.dist-info`` folder, to put on ``PYTHONPATH``."""
    (root / "mypkg").mkdir()
    (root / "mypkg" / "__init__.py").write_text(PLUGIN)
    (root / "mypkg" / "broken.py").write_text("import not_a_module_anywhere\n")
    info = root / "mypkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mypkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[kvlab.methods]\n{entries}")
    return root


@pytest.fixture()
def plugin(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))  # keep the registry clean for other tests
    monkeypatch.syspath_prepend(str(make_plugin(tmp_path)))
    yield tmp_path
    for mod in ("mypkg", "mypkg.broken"):
        sys.modules.pop(mod, None)


def test_outside_method_is_listed_with_its_package_and_builds(plugin, tiny_llama):
    assert "oldest" in kvlab.methods()
    assert "mypkg" not in sys.modules  # listed without importing the plugin
    described = registry.describe()
    assert described["oldest"] == "mypkg" and described["snapkv"] == "kvlab"
    model = copy.deepcopy(tiny_llama)
    cache = kvlab.make_cache(model, "oldest:budget=6")
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 20)), past_key_values=cache)
        model(torch.randint(0, 256, (1, 1)), past_key_values=cache)
    assert all(k == 6 + 1 for layer in cache.kept_tokens() for k in layer)
    from kvlab.compare.kvlab_runs import method_spec

    assert method_spec("oldest", 50) == "oldest:budget=50"  # kvlab compare places it at kvpress's kept tokens


def test_broken_plugin_and_bad_spec_are_one_line_exit_2(plugin, capsys):
    for spec, message in (("broken:budget=4", "method 'broken' of package 'mypkg' (mypkg.broken:Nope) failed to import"),
                          ("oldest:budget=0", "budget must be a positive integer"),
                          ("oldest:bugdet=4", "did you mean 'budget'")):
        code = main(["ppl", "--method", spec, "--output", str(plugin / "r.json")])
        err = capsys.readouterr().err
        assert code == 2 and message in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.real
def test_outside_method_runs_from_kvlab_ppl(smollm2, tmp_path):
    (tmp_path / "plugin").mkdir()
    root = make_plugin(tmp_path / "plugin", "oldest = mypkg:Oldest\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "kvlab.cli.main", "ppl", "--method", "oldest:budget=32", "--tokens", "64",
                           "--chunk-size", "16", "--output", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["method"].startswith("oldest")
    assert result["kv_bytes_peak"] < result["kv_bytes_full"]
