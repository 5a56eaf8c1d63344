"""Memory-bandwidth probe: the ceiling an optimizer step (a streaming read-modify-write) can reach.

Counts read + write bytes, so ``b.copy_(a)`` of N bytes moves 2N bytes, the same way optimizer bytes are counted.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import torch

__all__ = ["llc_bytes", "measure_bandwidth"]

kMiB = 1 << 20
kCpuBufferBytes = 256 * kMiB


def llc_bytes() -> int:
    """Size of the largest CPU cache level reported by sysfs (0 when unknown)."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = os.listdir(base)
    except OSError:
        return 0
    for entry in entries:
        try:
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip().upper()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * mult)
    return best


def _summary(samples_s: list[float], moved: int) -> dict[str, float]:
    gbs = sorted(moved / s / 1e9 for s in samples_s)
    return {"median_gbs": statistics.median(gbs), "best_gbs": gbs[-1]}


def measure_bandwidth(
    device: str | torch.device = "cpu", *, nbytes: int | None = None, repeats: int = 10, progress: Any = None
) -> dict[str, Any]:
    """Measure copy (``b.copy_(a)``) and in-place update (``a.mul_(x)``) bandwidth on ``device`` in GB/s.

    CPU: two fp32 buffers of ``max(256 MiB, 4 x LLC)`` each, all torch threads, wall-clock timing.
    CUDA: device-to-device ``b.copy_(a)`` and ``a.mul_(x)`` timed with CUDA events, buffers of
    ``min(1 GiB, free/8)``. Returns medians and bests; ``gbs`` (the reference for "% of bandwidth") is the
    best repetition of either measurement. ``progress``: optional object with ``reset(total)`` and ``update()``.
    """
    dev = torch.device(device)
    if nbytes is None:
        if dev.type == "cuda":
            free, _ = torch.cuda.mem_get_info(dev)
            nbytes = max(16 * kMiB, min(1 << 30, free // 8))
        else:
            nbytes = max(kCpuBufferBytes, 4 * llc_bytes())
    n = nbytes // 4
    a = torch.empty(n, dtype=torch.float32, device=dev).fill_(1.0)
    b = torch.zeros_like(a)
    moved = 2 * n * 4
    copy_s: list[float] = []
    update_s: list[float] = []
    if dev.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def timed(fn) -> float:
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
    else:

        def timed(fn) -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

    def do_copy() -> None:
        b.copy_(a)

    def do_update() -> None:
        a.mul_(1.0000001)

    if progress is not None:
        progress.reset(2 + repeats)
    for _ in range(2):  # warm-up: first touch, clocks, kernel load
        do_copy()
        do_update()
        if progress is not None:
            progress.update()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    for _ in range(repeats):
        copy_s.append(timed(do_copy))
        update_s.append(timed(do_update))
        if progress is not None:
            progress.update()
    copy = _summary(copy_s, moved)
    update = _summary(update_s, moved)
    return {
        "device": str(dev),
        "buffer_bytes": n * 4,
        "threads": torch.get_num_threads() if dev.type == "cpu" else None,
        "repeats": repeats,
        "copy_gbs": copy["median_gbs"],
        "copy_best_gbs": copy["best_gbs"],
        "update_gbs": update["median_gbs"],
        "update_best_gbs": update["best_gbs"],
        # The machine's bandwidth is what it can sustain, so the reference is the best repetition (as STREAM
        # reports); a median on a shared machine understates it and puts optimizers above 100%.
        "gbs": max(copy["best_gbs"], update["best_gbs"]),
        "method": ("cuda events" if dev.type == "cuda" else "wall clock") + ", b.copy_(a) and a.mul_(x)",
    }
