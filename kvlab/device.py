"""Device and dtype resolution: passed in explicitly everywhere, never global."""

from __future__ import annotations

import torch

from kvlab.errors import KvlabError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/"auto" picks CUDA when present, else CPU; an unavailable device is a KvlabError."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise KvlabError(f"unknown device '{device}'; use cpu, cuda, cuda:N or auto") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KvlabError(f"--device {device} was asked for but CUDA is not available on this machine; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise KvlabError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise KvlabError("--device mps was asked for but MPS is not available; use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/"auto": float32 on CPU (exact comparisons), bfloat16 on CUDA where supported, else float16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise KvlabError(f"unknown dtype '{dtype}'; choose from: {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so that wall-clock timings are honest on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HostCopy:
    """A small device tensor copied to host memory without waiting for the device: its value is read later
    (:meth:`ints`), once the copy is done, so a decode step never stalls on it. On CUDA the copy goes to pinned
    memory behind an event; elsewhere it is a copy made now. Reading it never dispatches a tensor read."""

    def __init__(self, t: torch.Tensor):
        if t.device.type == "cuda":
            self._host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self._host.copy_(t, non_blocking=True)
            self._done: torch.cuda.Event | None = torch.cuda.Event()
            self._done.record()
        else:
            self._host, self._done = t.detach().to("cpu", copy=True), None

    def ints(self) -> list[int]:
        """The values, flattened (waits for the copy only if it is not done yet)."""
        if self._done is not None and not self._done.query():  # only if the device is that far behind
            self._done.synchronize()
        return [int(v) for v in self._host.numpy().reshape(-1)]
