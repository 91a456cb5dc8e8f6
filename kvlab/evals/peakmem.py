"""Peak process memory of one block of code: ``with PeakMemory(device) as mem: ...``.

* CUDA: ``torch.cuda.reset_peak_memory_stats`` before, ``max_memory_allocated`` after (exact, tensors only).
* CPU on Linux: the kernel's own high-water mark of resident memory (``VmHWM``), reset for this process
  by writing ``5`` to ``/proc/self/clear_refs`` before the block — exact, and blind to nothing.
* CPU elsewhere (or when the reset is refused): a thread samples the RSS (psutil) every few
  milliseconds; a peak shorter than the interval can be missed.

``peak_bytes`` is the high-water mark during the block, ``baseline_bytes`` the resident (or allocated)
memory when it started; their difference is what the block added on top of the model. Before the
baseline is taken, garbage is collected and glibc is asked to return freed heap memory to the system
(``malloc_trim``), so that a block cannot hide its allocations in memory an earlier block freed. Run
the model once before the first measurement: weights mapped from disk are only resident once touched.
"""

from __future__ import annotations

import gc
import threading
from pathlib import Path

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _status_kb(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Reset this process's peak-RSS counter; False where the kernel does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


def _malloc_trim() -> None:
    """Give glibc's free heap pages back to the kernel (a no-op where there is no glibc)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class PeakMemory:
    """Context manager measuring the peak memory of its block on ``device`` (see the module docstring)."""

    def __init__(self, device: torch.device | str = "cpu", interval_s: float = 0.005):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.baseline_bytes = 0
        self.peak_bytes = 0
        self.how = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def delta_bytes(self) -> int:
        return max(self.peak_bytes - self.baseline_bytes, 0)

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cpu":
            _malloc_trim()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = torch.cuda.memory_allocated(self.device)
            self.how = "cuda_max_memory_allocated"
        elif _reset_hwm():
            self.baseline_bytes = (_status_kb("VmRSS") or 0) * 1024
            self.how = "linux_vmhwm"
        else:
            self.baseline_bytes = self.peak_bytes = _rss()
            self.how = "rss_sampling"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, _rss())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, _rss())
        else:
            self.peak_bytes = (_status_kb("VmHWM") or 0) * 1024
