"""kvpress side by side: the worker protocol, its errors and its accounting, without kvpress (a fake worker),
and the real worker in ``.kvpress-venv`` on SmolLM2 (marked ``real``; skipped when the venv is absent)."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from kvlab.compare import kvpress as kp
from kvlab.compare import kvpress_worker as worker
from kvlab.errors import KvlabError

REPO_ROOT = Path(__file__).resolve().parent.parent
KVPRESS_VENV = REPO_ROOT / ".kvpress-venv"



class CharTokenizer:
    """One token per character (code point mod 256); no chat template."""

    chat_template = None
    bos_token = "^"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) % 256 for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(int(i)) for i in ids)

    def __call__(self, text: str, return_tensors: str = "pt", add_special_tokens: bool = False):
        return types.SimpleNamespace(input_ids=torch.tensor([self.encode(text)]))


def _qa(n: int = 2, length: int = 100) -> list[kp.QASample]:
    return [kp.QASample("c", "q?", "12345", list(range(length + i)), [1, 2, 3]) for i in range(n)]


def _fake_model(folder: Path):
    return types.SimpleNamespace(name_or_path=str(folder), config=types.SimpleNamespace(_name_or_path=str(folder)),
                                 device=torch.device("cpu"), dtype=torch.float32)


# --- the kvlab side, against the fake worker ---------------------------------------------------------

def test_qa_round_trip_aggregates_per_press_and_ratio(fake):
    results = kp.run_kvpress(fake.model_dir, "qa", _qa(), ["full", "SnapKVPress", "AdaKVPress"], [0.25, 0.5])
    assert [(r["press"], r["ratio"]) for r in results] == [
        ("none", 0.0), ("SnapKVPress", 0.25), ("SnapKVPress", 0.5), ("AdaKVPress", 0.25), ("AdaKVPress", 0.5)]
    snap = results[2]["metrics"]
    assert snap["accuracy"] == 0.5                      # sample 0 right, sample 1 wrong
    assert snap["decode_tok_s"] == pytest.approx(12 / 2.0)  # (4 + 8) steps over 2 s, not a mean of rates
    assert snap["peak_rss_bytes"] == 2000
    assert snap["kept_tokens"] == pytest.approx((50 + 50) / 2)
    assert snap["prefill_tok_s"] == pytest.approx((100 + 101) / 1.5)
    ada = results[4]["metrics"]
    assert ada["cache_bytes"] == pytest.approx(8 * 100.5)      # AdaKV holds every entry ...
    assert ada["effective_cache_bytes"] == pytest.approx(8 * 50)  # ... and claims to keep half
    assert "kvpress 9.9" in snap["note"]
    sent = json.loads(fake.request.read_text())
    assert sent["protocol"] == kp.PROTOCOL and sent["model_dir"] == str(fake.model_dir)
    assert sent["presses"][0] == "none" and sent["samples"][1]["context_ids"] == list(range(101))


def test_ppl_round_trip(fake):
    samples = [kp.PplSample(list(range(50)), list(range(10))), kp.PplSample(list(range(50)), list(range(10)))]
    (res,) = kp.run_kvpress(fake.model_dir, "ppl", samples, ["StreamingLLMPress"], [0.5])
    assert res["metrics"]["nll"] == pytest.approx(30 / 20)
    assert res["metrics"]["ppl"] == pytest.approx(math.exp(1.5))
    assert "accuracy" not in res["metrics"]


def test_press_error_line_becomes_a_failed_result_and_others_run(fake):
    results = kp.run_kvpress(fake.model_dir, "qa", _qa(), ["Broken", "KnormPress"], [0.5])
    assert results[0]["error"].startswith("AssertionError") and results[0]["metrics"] == {}
    assert results[1]["error"] is None and results[1]["metrics"]["samples"] == 2
    rows = kp.to_rows(results, {"model": "m"})
    assert [r["status"] for r in rows] == ["failed", "ok"]
    assert rows[1]["eval"] == "kvpress" and rows[1]["config"]["method"] == "KnormPress"
    assert rows[1]["config"]["ratio"] == 0.5 and rows[1]["versions"]["kvpress"] == "9.9"
    assert rows[0]["id"] != rows[1]["id"]


def test_exit_2_line_becomes_kvlab_error(fake):
    with pytest.raises(KvlabError, match=r"^kvpress: unknown press 'Unknown'; kvpress 9.9 has: none, KnormPress$"):
        kp.run_kvpress(fake.model_dir, "qa", _qa(), ["Unknown"], [0.5])


def test_crash_and_missing_done_are_kvlab_errors(fake):
    with pytest.raises(KvlabError, match=r"exit 1\): RuntimeError: boom"):
        kp.run_kvpress(fake.model_dir, "qa", _qa(), ["Crash"], [0.5])
    with pytest.raises(KvlabError, match="worker failed"):
        kp.run_kvpress(fake.model_dir, "qa", _qa(), ["NoDone"], [0.5])


def test_protocol_mismatch_is_kvlab_error(fake, monkeypatch):
    monkeypatch.setenv("FAKE_PROTOCOL", "99")
    with pytest.raises(KvlabError, match="protocol 99"):
        kp.run_kvpress(fake.model_dir, "qa", _qa(), ["KnormPress"], [0.5])


def test_timeout_kills_the_worker(fake):
    with pytest.raises(KvlabError, match="timed out after 1 s"):
        kp.run_kvpress(fake.model_dir, "qa", _qa(), ["Sleep"], [0.5], timeout_s=1)


def test_missing_venv_names_the_make_target(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLAB_KVPRESS_VENV", str(tmp_path / "nowhere"))
    with pytest.raises(KvlabError, match=r"kvpress environment not found: run `make kvpress-env`"):
        kp.run_kvpress(tmp_path, "qa", _qa(), ["KnormPress"], [0.5])
    with pytest.raises(KvlabError, match="make kvpress-env"):
        kp.evaluate(_fake_model(tmp_path), CharTokenizer(), "KnormPress", kp.Params())


def test_evaluate_sends_kvlabs_own_ids_and_returns_one_cells_metrics(fake):
    tok = CharTokenizer()
    params = kp.Params(samples=2, context_tokens=300, ratio=0.25)
    metrics = kp.evaluate(_fake_model(fake.model_dir), tok, "SnapKVPress", params)
    assert metrics["accuracy"] == 0.5 and metrics["samples"] == 2
    sent = json.loads(fake.request.read_text())
    expected = kp.passkey_samples(tok, 2, 300, seed=0)
    assert [s["context_ids"] for s in sent["samples"]] == [s.context_ids for s in expected]
    assert sent["presses"] == ["SnapKVPress"] and sent["ratios"] == [0.25] and sent["task"] == "qa"
    assert sent["threads"] == torch.get_num_threads()
    ppl = kp.evaluate(_fake_model(fake.model_dir), tok, "SnapKVPress",
                      kp.Params(task="ppl", samples=2, context_tokens=100, continuation_tokens=20))
    assert ppl["scored_tokens"] == 40
    with pytest.raises(KvlabError, match="kvpress Broken at ratio 0.5 failed: AssertionError"):
        kp.evaluate(_fake_model(fake.model_dir), tok, "Broken", kp.Params(samples=1, context_tokens=100))


def test_passkey_samples_are_deterministic_and_hold_the_key():
    tok = CharTokenizer()
    a, b = kp.passkey_samples(tok, 3, 500, seed=1), kp.passkey_samples(tok, 3, 500, seed=1)
    assert [s.context_ids for s in a] == [s.context_ids for s in b]
    assert [s.answer for s in a] != [s.answer for s in kp.passkey_samples(tok, 3, 500, seed=2)]
    for s in a:
        assert f"The pass key is {s.answer}." in s.context and s.answer not in s.question
        assert 480 <= len(s.context_ids) <= 560 and s.context.startswith("^")
        assert s.question == "What is the pass key?\n"
    depths = [s.context.index("The pass key is") / len(s.context) for s in a]
    assert depths == sorted(depths) and depths[0] < 0.5 < depths[-1]


def test_render_qa_splits_the_chat_template_after_the_context():
    class Chat(CharTokenizer):
        chat_template = "x"

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            return f"<user>{messages[0]['content']}</user><assistant>"

    head, tail = kp.render_qa(Chat(), "CONTEXT", "Q?")
    assert head == "<user>CONTEXT" and tail == "Q?</user><assistant>"


def test_model_folder_and_params_validation(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert kp.model_folder(_fake_model(tmp_path)) == tmp_path.resolve()
    with pytest.raises(KvlabError, match="not a folder with a config.json"):
        kp.model_folder(_fake_model(tmp_path / "missing"))
    with pytest.raises(KvlabError, match="unknown kvpress task 'needle'"):
        kp.Params(task="needle")
    with pytest.raises(KvlabError, match="ratio must be in"):
        kp.Params(ratio=1.0)
    with pytest.raises(KvlabError, match="compression ratio must be in"):
        kp.build_request(tmp_path, "qa", _qa(), ["KnormPress"], [1.5])


# --- the worker itself, in this venv (no kvpress needed) ------------------------------------------------

WORKER_FILES = ("kvpress_worker", "kvpress_measure")  # what .kvpress-venv's python runs: the script and its sibling


@pytest.mark.parametrize("name", WORKER_FILES)
def test_worker_imports_only_torch_transformers_kvpress_stdlib_and_its_sibling(name):
    tree = ast.parse((Path(worker.__file__).parent / f"{name}.py").read_text())
    modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    kvlab = {m for m in modules if m.startswith("kvlab")}  # only under `if __package__:`, i.e. imported by kvlab
    assert kvlab <= {f"kvlab.compare.{f}" for f in WORKER_FILES}, kvlab
    allowed = {"torch", "transformers", "kvpress", "__future__", *WORKER_FILES} | set(sys.stdlib_module_names)
    assert {m.split(".")[0] for m in modules - kvlab} <= allowed, modules - kvlab


def test_worker_runs_as_a_script_from_any_folder_without_kvlab(tmp_path):
    """Its sibling module is found next to the script, not in the working folder; without site-packages (-S)
    kvlab cannot be imported, as in .kvpress-venv."""
    proc = subprocess.run([sys.executable, "-S", worker.__file__], input=json.dumps({"protocol": 7}),
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2 and "protocol 7 is not supported" in proc.stderr, proc.stderr


def _fake_kvpress():
    class ScorerPress:
        def __init__(self, compression_ratio: float = 0.0):
            self.compression_ratio = compression_ratio

    class KnormPress(ScorerPress):
        pass

    class SnapKVPress(ScorerPress):
        pass

    class AdaKVPress:
        def __init__(self, press):
            self.press = press

    class CriticalKVPress(ScorerPress):  # needs another press, not a ratio: not offered
        def __init__(self, press):
            self.press = press

    return types.SimpleNamespace(__all__=["ScorerPress", "KnormPress", "SnapKVPress", "AdaKVPress", "CriticalKVPress"],
                                 ScorerPress=ScorerPress, KnormPress=KnormPress, SnapKVPress=SnapKVPress,
                                 AdaKVPress=AdaKVPress, CriticalKVPress=CriticalKVPress)


def test_worker_builds_presses_by_name():
    kvp = _fake_kvpress()
    assert worker.build_press(kvp, "none", 0.5) is None
    knorm = worker.build_press(kvp, "KnormPress", 0.25)
    assert type(knorm).__name__ == "KnormPress" and knorm.compression_ratio == 0.25
    ada = worker.build_press(kvp, "AdaKVPress", 0.5)
    assert type(ada.press).__name__ == "SnapKVPress" and ada.press.compression_ratio == 0.5
    assert type(worker.build_press(kvp, "AdaKVPress(KnormPress)", 0.5).press).__name__ == "KnormPress"
    with pytest.raises(worker.BadRequest, match=r"unknown press 'CriticalKVPress'; kvpress .* has: none, AdaKVPress, "
                                                r"AdaKVPress\(<scorer>\), KnormPress, SnapKVPress$"):
        worker.build_press(kvp, "CriticalKVPress", 0.5)
    with pytest.raises(worker.BadRequest, match="unknown press 'KnormPress\\(SnapKVPress\\)'"):
        worker.build_press(kvp, "KnormPress(SnapKVPress)", 0.5)


def test_worker_accounts_held_and_effective_bytes():
    keys = torch.zeros(1, 2, 10, 4)  # (batch, kv_heads, seq, head_dim) float32: 16 bytes per entry each
    cache = types.SimpleNamespace(layers=[types.SimpleNamespace(keys=keys, values=keys.clone()) for _ in range(2)])
    masked = (torch.zeros(6, dtype=torch.long), torch.zeros(6, dtype=torch.long), torch.arange(6))
    attns = [types.SimpleNamespace(masked_key_indices=masked), types.SimpleNamespace(masked_key_indices=None)]
    model = types.SimpleNamespace(model=types.SimpleNamespace(layers=[types.SimpleNamespace(self_attn=a) for a in attns]))
    acct = worker.cache_accounting(model, cache)
    assert acct["cache_bytes"] == 2 * 2 * 20 * 16             # 2 layers x (keys + values) x 20 entries x 16 B
    assert acct["effective_cache_bytes"] == (40 - 6) * 32
    assert acct["held_tokens"] == 10 and acct["kept_tokens"] == pytest.approx((40 - 6) / 4)


@pytest.mark.parametrize("request_text, message", [
    ("not json", "kvpress-worker: "),
    (json.dumps({"protocol": 1, "model_dir": "/nowhere", "task": "qa", "samples": [], "presses": []}),
     "model folder '/nowhere' has no config.json"),
    (json.dumps({"protocol": 1, "model_dir": "/", "task": "chat", "samples": [], "presses": []}), "unknown task 'chat'"),
    (json.dumps({"protocol": 7}), "protocol 7 is not supported"),
    (json.dumps({"protocol": 1, "model_dir": "/", "task": "qa", "samples": [], "presses": [], "dtype": "int8"}),
     "dtype 'int8' is not supported"),
])
def test_worker_bad_request_exits_2_with_one_line(request_text, message):
    proc = subprocess.run([sys.executable, worker.__file__], input=request_text, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_worker_imports_kvpress_itself_not_its_kvlab_neighbour(tmp_path):
    """Run as a script, the worker's folder (which holds kvlab's kvpress.py) must not shadow kvpress."""
    (tmp_path / "config.json").write_text("{}")
    request = {"protocol": 1, "model_dir": str(tmp_path), "task": "qa", "presses": ["none"], "samples": []}
    proc = subprocess.run([sys.executable, worker.__file__], input=json.dumps(request), capture_output=True,
                          text=True, timeout=120, cwd=Path(worker.__file__).parent)
    assert proc.returncode == 2, proc.stderr  # this venv has no kvpress: one line naming the make target
    assert "No module named 'kvpress'" in proc.stderr and "run `make kvpress-env`" in proc.stderr


# --- the real thing ---------------------------------------------------------------------------------------

needs_venv = pytest.mark.skipif(not (KVPRESS_VENV / "bin" / "python").exists(),
                                reason="no .kvpress-venv: run `make kvpress-env`")


@pytest.mark.real
@needs_venv
def test_real_worker_on_smollm2(smollm2, monkeypatch):
    monkeypatch.setenv("KVLAB_KVPRESS_VENV", str(KVPRESS_VENV))
    model, tok = smollm2
    samples = kp.passkey_samples(tok, 2, 256, seed=0)
    results = kp.run_kvpress(kp.model_folder(model), "qa", samples, ["none", "StreamingLLMPress", "AdaKVPress"],
                             [0.5], max_new_tokens=16, threads=1, timeout_s=900)
    by = {r["press"]: r for r in results}
    assert all(r["error"] is None for r in results), [r["error"] for r in results]
    cfg = model.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    for r in results:
        for s in r["samples"]:
            kept = s["context_tokens"] if r["press"] == "none" else int(s["context_tokens"] * 0.5)
            assert s["kept_tokens"] == kept
            held = s["context_tokens"] if r["press"] in ("none", "AdaKVPress") else kept
            assert s["cache_bytes"] == held * per_token
            assert s["prefill_s"] > 0 and s["peak_rss_bytes"] > 100 * 2**20
    assert by["none"]["metrics"]["accuracy"] == 1.0  # SmolLM2 finds the key in 256 tokens with the full cache
    assert by["AdaKVPress"]["metrics"]["effective_cache_bytes"] < by["AdaKVPress"]["metrics"]["cache_bytes"]
    with pytest.raises(KvlabError, match=r"unknown press 'NoSuchPress'; kvpress 0\.5\.5 has: .*StreamingLLMPress"):
        kp.run_kvpress(kp.model_folder(model), "qa", samples[:1], ["NoSuchPress"], [0.5])
