"""``kvlab doctor``: each check finds its problem and names the fix; only FAIL makes the exit code 1."""

from __future__ import annotations

import json
import urllib.error

import pytest

import kvlab.cli.main as cli_main
from kvlab import doctor
from kvlab.doctor import FAIL, INFO, OK, WARN, Check
from kvlab.models import ALIASES


def test_python_version():
    assert doctor.check_python((3, 11, 7)).status == OK
    old = doctor.check_python((3, 9, 1))
    assert old.status == FAIL and "3.10+" in old.detail and old.fix


def test_transformers_outside_the_supported_range(monkeypatch):
    assert doctor.check_transformers().status == OK  # the venv has a supported version
    real = doctor.metadata.version
    monkeypatch.setattr(doctor.metadata, "version", lambda name: "5.30.0" if name == "transformers" else real(name))
    check = doctor.check_transformers()
    assert check.status == FAIL and "5.30.0 is outside the supported range" in check.detail
    assert check.fix.startswith("pip install 'transformers") and "5.24" in check.fix


def test_disk_space(tmp_path):
    assert doctor.check_disk(tmp_path / "not" / "yet", min_free_gb=0.0).status == OK
    low = doctor.check_disk(tmp_path, min_free_gb=1e12)
    assert low.status == FAIL and "KVLAB_CACHE" in low.fix


def test_hub_offline_reachable_and_unreachable(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert doctor.check_hub().status == INFO
    monkeypatch.delenv("HF_HUB_OFFLINE")
    seen = []
    assert doctor.check_hub(head=lambda url, timeout: seen.append((url, timeout)) or 200).status == OK
    from huggingface_hub import constants

    assert seen == [(constants.ENDPOINT, 3.0)]

    def unreachable(url, timeout):
        raise urllib.error.URLError("Name or service not known")

    down = doctor.check_hub(head=unreachable)
    assert down.status == WARN and "unreachable" in down.detail and "HF_HUB_OFFLINE=1" in down.fix


def fake_cache(root, alias: str, content: bytes, recorded: bytes):
    """A converted alias folder whose manifest records the sha256 of ``recorded``."""
    import hashlib

    folder = root / alias / "hf"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(content)
    manifest = {"alias": alias, "gguf_sha256": ALIASES[alias].sha256,
                "files": {"model.safetensors": hashlib.sha256(recorded).hexdigest()}}
    (folder / "kvlab.json").write_text(json.dumps(manifest))


def test_model_cache_checksums(tmp_path):
    empty = doctor.check_cache(str(tmp_path))
    assert [c.status for c in empty] == [INFO] and "kvlab models pull" in empty[0].fix
    fake_cache(tmp_path, "smollm2-135m", b"weights", b"weights")
    fake_cache(tmp_path, "qwen2.5-0.5b", b"weights, bit-flipped", b"weights")
    checks = {c.name: c for c in doctor.check_cache(str(tmp_path))}
    assert checks["model cache"].status == OK
    assert checks["model smollm2-135m"].status == OK
    bad = checks["model qwen2.5-0.5b"]
    assert bad.status == FAIL and "does not match its recorded sha256" in bad.detail
    assert "kvlab models pull qwen2.5-0.5b" in bad.fix
    quick = {c.name: c.status for c in doctor.check_cache(str(tmp_path), verify=False)}
    assert quick["model qwen2.5-0.5b"] == INFO


def test_kvpress_venv_absent_is_information_only(monkeypatch, tmp_path):
    monkeypatch.setenv("KVLAB_KVPRESS_VENV", str(tmp_path / "no-venv"))
    check = doctor.check_kvpress()
    assert check.status == INFO and "kvpress-env" in check.fix


def test_a_check_that_crashes_is_reported_not_raised(monkeypatch):
    def broken():
        raise RuntimeError("kaputt")

    monkeypatch.setattr(doctor, "check_torch", broken)
    monkeypatch.setattr(doctor, "check_hub", lambda timeout: Check("hub", INFO, "offline"))
    monkeypatch.setattr(doctor, "check_kvpress", lambda: Check("kvpress", INFO, "absent"))
    checks = doctor.run_checks(verify=False)
    assert any(c.status == FAIL and "RuntimeError: kaputt" in c.detail for c in checks)


@pytest.mark.parametrize("status, code", [(OK, 0), (WARN, 0), (FAIL, 1)])
def test_exit_code_and_fixes_on_the_command_line(monkeypatch, capsys, status, code):
    checks = [Check("python", OK, "3.11"), Check("thing", status, "detail", "do this")]
    monkeypatch.setattr(doctor, "run_checks", lambda **kw: checks)
    monkeypatch.setattr(cli_main, "COMMAND_MODULES", ("kvlab.cli.doctor",))
    assert cli_main.main(["doctor", "--quick"]) == code
    out = capsys.readouterr().out
    assert f"{status:<5} thing: detail" in out and "fix: do this" in out
    assert ("1 problem(s)" in out) == (status == FAIL)
