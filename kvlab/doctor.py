"""``kvlab doctor``: is this machine ready? Each check says ok, info, warn or FAIL, and how to fix it.

Checks: Python; torch and CUDA; transformers inside the range kvlab supports; the optional kvpress
venv; free disk where models are cached; the model cache and the checksums of every cached model;
the Hugging Face hub (reachable, or offline mode on). Only FAIL makes the exit code non-zero; a warning
names something that will fail later only if you use it (e.g. a hub id while the hub is unreachable).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

OK, INFO, WARN, FAIL = "ok", "info", "warn", "FAIL"
MIN_PYTHON = (3, 10)
MIN_FREE_GB = 5.0
REBUILD_KVPRESS = "rm -rf .kvpress-venv && make kvpress-env"


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok, info, warn or FAIL
    detail: str
    fix: str = ""

    def __str__(self) -> str:
        return f"{self.status:<5} {self.name}: {self.detail}" + (f"\n      fix: {self.fix}" if self.fix else "")


def check_python(version: tuple[int, ...] = tuple(sys.version_info[:3])) -> Check:
    text = ".".join(map(str, version))
    if version[:2] < MIN_PYTHON:
        return Check("python", FAIL, f"{text} at {sys.executable}; kvlab needs {'.'.join(map(str, MIN_PYTHON))}+",
                     "install Python 3.10 or newer and recreate the venv")
    return Check("python", OK, f"{text} at {sys.executable}")


def check_torch() -> Check:
    try:
        import torch
    except ImportError as exc:
        return Check("torch", FAIL, f"not importable ({exc})",
                     "pip install torch (the CPU build: pip install torch==2.13.0)")
    if torch.cuda.is_available():
        gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        return Check("torch", OK, f"{torch.__version__}, CUDA {torch.version.cuda}: {gpus}")
    built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    return Check("torch", OK, f"{torch.__version__} ({built}); no CUDA device, models run on the CPU")


def supported_range(package: str = "transformers") -> str | None:
    """The version range kvlab's metadata declares for ``package`` (e.g. ``<5.24,>=5.20``)."""
    from packaging.requirements import Requirement

    for text in metadata.requires("kvlab") or []:
        req = Requirement(text)
        if req.name == package and req.marker is None:
            return str(req.specifier)
    return None


def check_transformers() -> Check:
    from packaging.specifiers import SpecifierSet

    try:
        installed = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return Check("transformers", FAIL, "not installed", "pip install -e . (installs the supported transformers)")
    wanted = supported_range()
    if wanted and installed not in SpecifierSet(wanted):
        return Check("transformers", FAIL, f"{installed} is outside the supported range {wanted} (the cache API "
                     "changes inside 5.x)", f"pip install 'transformers{wanted}'")
    return Check("transformers", OK, f"{installed} (supported: {wanted or 'any'})")


def check_kvpress() -> Check:
    from kvlab.compare.kvpress import kvpress_python
    from kvlab.errors import KvlabError

    try:
        python = kvpress_python()
    except KvlabError:
        return Check("kvpress", INFO, "no kvpress venv (.kvpress-venv); optional, only the kvpress comparison needs it",
                     "make kvpress-env")
    probe = "import importlib.metadata as m; print(m.version('kvpress'), m.version('transformers'))"
    try:
        out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return Check("kvpress", FAIL, f"venv at {python.parent.parent} does not run ({exc})", REBUILD_KVPRESS)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        return Check("kvpress", FAIL, f"venv at {python.parent.parent} has no kvpress ({last})", REBUILD_KVPRESS)
    kvpress, transformers = out.stdout.split()
    return Check("kvpress", OK, f"kvpress {kvpress} with transformers {transformers} in {python.parent.parent}")


def check_disk(path: Path, min_free_gb: float = MIN_FREE_GB) -> Check:
    existing = next(p for p in [path, *path.parents] if p.exists())
    free = shutil.disk_usage(existing).free / 1e9
    if free < min_free_gb:
        return Check("disk", FAIL, f"{free:.1f} GB free at {existing} (models need up to a few GB each)",
                     f"free some space, or point KVLAB_CACHE at a disk with {min_free_gb:.0f}+ GB free")
    return Check("disk", OK, f"{free:.0f} GB free at {existing}")


def check_cache(cache_dir: str | None = None, verify: bool = True) -> list[Check]:
    from kvlab.models import ALIASES, cache_root, cached_models, verify_problems

    root = cache_root(cache_dir)
    found = cached_models(cache_dir)
    if not found:
        return [Check("model cache", INFO, f"{root} holds no model yet; aliases are pulled on first use",
                      "kvlab models pull smollm2-135m")]
    checks = [Check("model cache", OK, f"{root}: {', '.join(m.name for m in found)} "
                                       f"({sum(m.size_bytes for m in found) / 1e9:.1f} GB)")]
    for model in found:
        if model.name not in ALIASES:
            source = model.manifest.get("gguf_source", "?")
            checks.append(Check(f"model {model.name}", INFO, f"converted from {source}; not an alias, not re-checked"))
        elif not verify:
            checks.append(Check(f"model {model.name}", INFO, "checksums not checked (--quick)"))
        else:
            problems = verify_problems(model.name, cache_dir)
            checks.append(Check(f"model {model.name}", FAIL, "; ".join(problems),
                                f"rm -rf {model.path.parent} && kvlab models pull {model.name}") if problems
                          else Check(f"model {model.name}", OK, f"{model.size_bytes / 1e6:,.0f} MB, checksums match"))
    return checks


def _head(url: str, timeout: float) -> int:
    request = urllib.request.Request(url, method="HEAD")
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - the configured hub endpoint
        return response.status


def check_hub(timeout: float = 3.0, head: Callable[[str, float], int] = _head) -> Check:
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if offline:
        return Check("hub", INFO, "offline mode (HF_HUB_OFFLINE): hub ids are not downloaded; aliases, local folders "
                                  "and models already in the hub cache work")
    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    try:
        status = head(endpoint, timeout)
    except urllib.error.HTTPError as exc:  # an HTTP answer still means the endpoint is reachable
        status = exc.code
    except (OSError, ValueError) as exc:
        return Check("hub", WARN, f"{endpoint} unreachable ({getattr(exc, 'reason', exc)}); loading a hub id will fail",
                     "export HF_HUB_OFFLINE=1 to use aliases and local folders only, or set HF_ENDPOINT to a mirror")
    return Check("hub", OK, f"{endpoint} reachable (HTTP {status})")


def run_checks(*, verify: bool = True, cache_dir: str | None = None, hub_timeout: float = 3.0) -> list[Check]:
    """Every check, in order; each failure of a check itself becomes a FAIL with the error."""
    from kvlab.models import cache_root

    steps: list[Callable[[], Check | list[Check]]] = [
        check_python, check_torch, check_transformers, check_kvpress,
        lambda: check_disk(cache_root(cache_dir)),
        lambda: check_cache(cache_dir, verify),
        lambda: check_hub(hub_timeout),
    ]
    checks: list[Check] = []
    for step in steps:
        try:
            result = step()
        except Exception as exc:  # noqa: BLE001 - a broken check is itself a finding
            name = getattr(step, "__name__", "check").replace("check_", "")
            result = Check(name, FAIL, f"{type(exc).__name__}: {exc}")
        checks.extend(result if isinstance(result, list) else [result])
    return checks
