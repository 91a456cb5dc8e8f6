"""``load(name_or_path)``: one entry point for every way a model reaches kvlab.

Resolution order of ``name_or_path``:

1. a built-in alias (``kvlab models list``): pulled on first use, then read from the safetensors cache;
2. an existing folder with a ``config.json`` (a Hugging Face model folder);
3. a ``.gguf`` file: converted once into the cache, keyed by its sha256 (slow the first time);
4. ``org/name``: a hub id, through ``from_pretrained`` (``source="hf"``; ``HF_ENDPOINT`` and
   ``HF_HUB_OFFLINE`` are honoured by the hub library) or ModelScope (``source="modelscope"``).

Anything else without a '/' is an unknown alias ("did you mean ...").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from kvlab.device import resolve_device, resolve_dtype
from kvlab.errors import KvlabError, unknown
from kvlab.models.aliases import ALIASES
from kvlab.models.store import converted_gguf, is_pulled, model_dir, pull

SOURCES = ("hf", "modelscope")
QUANTIZATIONS = ("4bit", "8bit")
_ID_ATTR = "kvlab_model_id"  # stored on model.config, read back by model_id()


def model_id(model: Any) -> str:
    """The name a model was loaded by (alias, path or hub id); ``config.name_or_path`` for other models."""
    config = getattr(model, "config", None)
    return str(getattr(config, _ID_ATTR, None) or getattr(config, "name_or_path", "") or type(model).__name__)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _offline() -> bool:
    """Hub offline mode, read from the environment now (the hub library reads it once at import)."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(f and f.strip().upper() in {"1", "ON", "YES", "TRUE"} for f in flags)


def _quantization_config(quantization: str | None, device: torch.device, dtype: torch.dtype) -> Any:
    if quantization is None:
        return None
    if quantization not in QUANTIZATIONS:
        raise unknown("quantization", quantization, QUANTIZATIONS)
    if device.type != "cuda":
        raise KvlabError(f"quantization='{quantization}' uses bitsandbytes, which needs a CUDA device; "
                         f"this run is on {device.type}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise KvlabError(f"quantization='{quantization}' needs bitsandbytes: pip install bitsandbytes") from exc
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def _check_attention(name: str) -> None:
    from transformers import AttentionInterface

    valid = {"eager", *AttentionInterface().valid_keys()}
    if name not in valid and "/" not in name:  # 'org/kernel' names are hub kernels, checked by transformers
        raise unknown("attention implementation", name, valid)


def _from_pretrained(where: str | Path, kwargs: dict[str, Any], **extra: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(where, **extra)
    model = AutoModelForCausalLM.from_pretrained(where, **kwargs, **extra)
    return model, tokenizer


def _load_local(folder: Path, kwargs: dict[str, Any]) -> tuple[Any, Any]:
    try:
        return _from_pretrained(folder, kwargs)
    except OSError as exc:
        raise KvlabError(f"cannot load the model folder {folder}: {_first_line(exc)}") from exc


def _load_hub(repo_id: str, kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """From the local hub cache when it is there; otherwise online, after a quick reachability probe."""
    try:
        return _from_pretrained(repo_id, kwargs, local_files_only=True)
    except OSError:
        pass
    advice = "run with network, set HF_ENDPOINT to a mirror, or pass a local folder or .gguf file"
    if _offline():
        raise KvlabError(f"model '{repo_id}' is not in the local cache and HF_HUB_OFFLINE is set; {advice}")
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        huggingface_hub.model_info(repo_id, timeout=5)  # one request, no retries: fails in ~1 s when offline
    except GatedRepoError as exc:
        raise KvlabError(f"model '{repo_id}' is gated: accept its licence on the hub and log in "
                         "(hf auth login), or pass a local folder") from exc
    except RepositoryNotFoundError as exc:
        raise KvlabError(f"model '{repo_id}' was not found on the hub (a typo, or a private model?)") from exc
    except Exception as exc:  # connection refused, DNS, timeout, proxy: the HTTP client's own error types
        raise KvlabError(f"model '{repo_id}' is not in the local cache and the hub cannot be reached "
                         f"({_first_line(exc)}); {advice}") from exc
    try:
        return _from_pretrained(repo_id, kwargs)
    except OSError as exc:
        raise KvlabError(f"could not load '{repo_id}' from the hub: {_first_line(exc)}") from exc


def _modelscope_folder(repo_id: str, cache_dir: str | Path | None) -> Path:
    try:
        from modelscope import snapshot_download
    except ImportError as exc:
        raise KvlabError("source='modelscope' needs the modelscope package: pip install kvlab[modelscope]") from exc
    target = str(Path(cache_dir).expanduser() / "modelscope") if cache_dir else None
    try:
        return Path(snapshot_download(repo_id, cache_dir=target))
    except Exception as exc:  # modelscope raises its own HTTP and not-found errors
        raise KvlabError(f"could not download '{repo_id}' from ModelScope: {_first_line(exc)}") from exc


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or "\\" in name


def _classify(name: str) -> str:
    """"alias", "gguf", "folder" or "hub" for a stripped name; a KvlabError for anything else."""
    path = Path(name).expanduser()
    if name in ALIASES:
        return "alias"
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise KvlabError(f"GGUF file not found: {path}")
        with open(path, "rb") as fh:
            if fh.read(4) != b"GGUF":
                raise KvlabError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
        return "gguf"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise KvlabError(f"{path} is a folder without config.json, not a Hugging Face model folder")
        return "folder"
    if path.exists():
        raise KvlabError(f"{path} is a file but not a .gguf; pass a model folder, a .gguf file, an alias or a hub id")
    if _looks_like_path(name):
        raise KvlabError(f"no such model folder or file: {path}")
    if "/" not in name:
        err = unknown("model", name, ALIASES)
        raise KvlabError(f"{err}; or give a local folder, a .gguf file or a hub id 'org/name'")
    return "hub"


def load(name_or_path: str, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
         attn_implementation: str = "sdpa", source: str = "hf", quantization: str | None = None,
         cache_dir: str | Path | None = None) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, in eval mode, on ``device``, in ``dtype``.

    ``device``/``dtype``: see :func:`kvlab.device.resolve_device` / :func:`~kvlab.device.resolve_dtype`
    (float32 on CPU by default). ``quantization``: "4bit" or "8bit" through bitsandbytes, CUDA only.
    ``cache_dir``: the kvlab cache (default ``$KVLAB_CACHE`` or ``~/.cache/kvlab``). Returns
    ``(model, tokenizer)``; :func:`model_id` gives back the name it was loaded by.
    """
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise KvlabError("empty model name; give an alias (kvlab models list), a folder, a .gguf file or a hub id")
    name = name_or_path.strip()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if source not in SOURCES:
        raise unknown("model source", source, SOURCES)
    kind = _classify(name)  # name errors first: they need no heavy import
    _check_attention(attn_implementation)
    quant = _quantization_config(quantization, dev, dt)
    kwargs: dict[str, Any] = {"dtype": dt, "attn_implementation": attn_implementation}
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": dev})

    path = Path(name).expanduser()
    if kind == "alias":
        folder = model_dir(name, cache_dir) if is_pulled(name, cache_dir) else pull(name, cache_dir)
        model, tokenizer = _load_local(folder, kwargs)
    elif kind == "gguf":
        model, tokenizer = _load_local(converted_gguf(path, cache_dir), kwargs)
    elif kind == "folder":
        model, tokenizer = _load_local(path, kwargs)
    elif source == "modelscope":
        model, tokenizer = _load_local(_modelscope_folder(name, cache_dir), kwargs)
    else:
        model, tokenizer = _load_hub(name, kwargs)

    model.eval()
    if quant is None:
        model.to(dev)
    setattr(model.config, _ID_ATTR, name)
    return model, tokenizer
