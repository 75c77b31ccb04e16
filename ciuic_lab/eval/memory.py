"""Memory measurements: peak memory over a block of code, and bytes a model really stores."""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from typing_extensions import Self

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _read_status_kb(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where impossible."""
    if _read_status_kb("VmHWM") is None:
        return False
    try:
        _CLEAR_REFS.write_text("5")  # "5" resets the peak RSS counter (Documentation/filesystems/proc)
    except OSError:
        return False
    return True


class _RssSampler:
    """Max RSS seen by a background thread polling every `interval` seconds (portable fallback)."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self._proc.memory_info().rss)


class PeakMemory:
    """Peak memory while the `with` block runs.

    CUDA: `torch.cuda.max_memory_allocated` after resetting the peak stats (kind
    "cuda_max_allocated": tensors only, the model's stored weights included).
    CPU: the process's peak resident set size over the block (kind "cpu_peak_rss": everything the
    process holds, interpreter and libraries included), from VmHWM reset on entry, or sampled
    every few ms where the counter cannot be reset. `.peak_bytes` is set on exit; `.start_bytes`
    is what was already held on entry (RSS, or allocated CUDA bytes), so `peak_bytes -
    start_bytes` is what the block itself added at its peak.
    """

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.kind = "cuda_max_allocated" if self.device.type == "cuda" else "cpu_peak_rss"
        self.method: str | None = None  # how it was measured: cuda | vmhwm | sampled
        self.peak_bytes: int | None = None
        self.start_bytes: int | None = None
        self._sampler: _RssSampler | None = None

    def __enter__(self) -> Self:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = int(torch.cuda.memory_allocated(self.device))
            self.method = "cuda"
        elif _reset_hwm():
            self.method = "vmhwm"
            # right after the reset VmHWM equals the RSS: read it, not VmRSS, so both ends of
            # the difference come from the same counter
            self.start_bytes = int(_read_status_kb("VmHWM"))
        else:
            self._sampler = _RssSampler()
            self.start_bytes = int(self._sampler.peak)
            self._sampler.start()
            self.method = "sampled"
        return self

    def __exit__(self, *exc) -> None:
        if self.method == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        elif self.method == "vmhwm":
            self.peak_bytes = int(_read_status_kb("VmHWM"))
        else:
            self.peak_bytes = int(self._sampler.stop())
            self._sampler = None


def _storage_key(t: torch.Tensor) -> tuple:
    if t.device.type == "meta":  # meta tensors all report data_ptr 0
        return ("meta", id(t))
    return (t.device.type, t.device.index, t.untyped_storage().data_ptr(), t.data_ptr(),
            t.numel(), t.dtype)


def stored_bytes(model: torch.nn.Module) -> int:
    """Bytes of every unique parameter and persistent buffer (what a checkpoint would hold).

    Tied or shared tensors are counted once. Non-persistent buffers (e.g. rotary `inv_freq`) are
    caches recomputed at load time and are not counted.
    """
    seen: set[tuple] = set()
    total = 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if t is None:
            return
        key = _storage_key(t)
        if key in seen:
            return
        seen.add(key)
        total += t.numel() * t.element_size()

    for p in model.parameters():
        add(p)
    for mod in model.modules():
        for name, b in mod._buffers.items():
            if name not in mod._non_persistent_buffers_set:
                add(b)
    return total
