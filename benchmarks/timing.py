"""Timing, copy bandwidth and peak memory, on a CUDA device or (smoke mode) on the CPU.

On CUDA: ``triton.testing.do_bench`` with the median (it times each call with CUDA events and
clears the L2 cache before every call), after explicit warm-up calls so that compilation and
autotuning stay out of do_bench's own run-time estimate. On the CPU (smoke mode only): the median
of a few ``time.perf_counter`` measurements; those numbers are not performance figures.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


class Timer:
    """Median time of a callable on ``device`` in milliseconds."""

    def __init__(self, device: torch.device, warmup_calls: int = 2, cpu_repeats: int = 3,
                 warmup_ms: float = 25.0, rep_ms: float = 100.0):
        self.device = device
        self.warmup_calls = warmup_calls
        self.cpu_repeats = cpu_repeats
        self.warmup_ms = warmup_ms
        self.rep_ms = rep_ms

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return (f"triton.testing.do_bench(warmup={self.warmup_ms:g} ms, rep={self.rep_ms:g} ms, "
                    f"return_mode='median'): CUDA events around each call, L2 cleared before each call; "
                    f"{self.warmup_calls} explicit warm-up calls first")
        return f"CPU smoke: median of {self.cpu_repeats} time.perf_counter runs (not a performance figure)"

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def median_ms(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup_calls):
            fn()
        self.synchronize()
        if self.device.type == "cuda":
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"))
        times = []
        for _ in range(self.cpu_repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)


def copy_bandwidth(timer: Timer, nbytes: int) -> dict:
    """Device-to-device copy of ``nbytes`` (one ``dst.copy_(src)``), bytes read + written counted.

    Returns {"bytes": 2 * nbytes, "time_ms", "gbps"}. The source holds random bytes (never zeros).
    """
    numel = max(1, nbytes // 4)
    gen = torch.Generator(device=timer.device).manual_seed(0)
    src = torch.randint(-2**31, 2**31 - 1, (numel,), dtype=torch.int32, device=timer.device, generator=gen)
    dst = torch.empty_like(src)
    ms = timer.median_ms(lambda: dst.copy_(src))
    moved = 2 * src.numel() * src.element_size()
    return {"bytes": moved, "time_ms": ms, "gbps": moved / (ms * 1e-3) / 1e9}


def peak_memory_bytes(device: torch.device, fn: Callable[[], object]) -> int | None:
    """Peak bytes allocated by one call of ``fn`` above what was allocated before it (CUDA only;
    None elsewhere). The call's results are kept until the peak is read, so outputs, saved tensors
    and gradients all count."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return int(peak)


def l2_cache_bytes(device: torch.device) -> int | None:
    """The device's L2 size, or None off CUDA (or where torch does not report it)."""
    if device.type != "cuda":
        return None
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", None)
