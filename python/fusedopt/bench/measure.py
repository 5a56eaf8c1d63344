"""Timing for the benchmark harness: interleaved optimizer steps on fresh gradients, the memory check that runs
before anything large is allocated, and the memory-bandwidth probe (the ceiling a streaming step can reach).

Bandwidth counts read + write bytes, so ``b.copy_(a)`` of N bytes moves 2N bytes, as optimizer bytes are counted.
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from .registry import OPTIMIZERS, ImplSpec, build_optimizer, bytes_per_param, kDtypeNames, state_dtype_of
from .workloads import Workload, format_size, make_params

if TYPE_CHECKING:
    from .report import Progress

__all__ = [
    "MemoryError_",
    "Runner",
    "available_memory",
    "check_memory",
    "estimate_bytes",
    "llc_bytes",
    "measure_bandwidth",
    "percentile",
    "run_benchmark",
    "set_threads",
    "time_interleaved",
]


class MemoryError_(RuntimeError):
    """The benchmark would not fit in the memory available; raised before anything large is allocated."""


# --------------------------------------------------------------------------------------------- bandwidth

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


# ------------------------------------------------------------------------------------------------ memory

def available_memory(device: str) -> int:
    """Bytes that can be allocated now: CUDA free memory, or MemAvailable from /proc/meminfo."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def estimate_bytes(specs: Sequence[ImplSpec], opt_name: str, numel: int, dtype: torch.dtype) -> int:
    """Peak bytes for benchmarking ``specs`` side by side on ``numel`` parameters of ``dtype``.

    Per implementation: parameters + gradients + states, plus one state-sized temporary for torch's foreach and
    for-loop paths (sqrt/denominator buffers). Shared: the random-gradient source, and one transient copy of
    parameters + gradients while fusedopt moves them into its flat buffers.
    """
    ps = torch.finfo(dtype).bits // 8
    total = numel * ps  # fresh-gradient source
    total += numel * 2 * ps  # transient flat-buffer copy during fusedopt construction
    for spec in specs:
        ss = torch.finfo(state_dtype_of(spec, dtype)).bits // 8
        total += numel * (2 * ps + ss * OPTIMIZERS[opt_name].states)
        if spec.name in ("torch-foreach", "torch-forloop", "apex-fused-adam"):
            total += numel * ss
    return int(total * 1.05) + (64 << 20)


def check_memory(specs: Sequence[ImplSpec], opt_name: str, workload: Workload, dtype: torch.dtype, device: str) -> int:
    """Raise MemoryError_ (before allocating) when the benchmark would not fit; return the estimate."""
    need = estimate_bytes(specs, opt_name, workload.numel, dtype)
    have = available_memory(device)
    budget = int(have * (0.9 if torch.device(device).type == "cuda" else 0.8))
    if need > budget:
        raise MemoryError_(
            f"{workload.name} ({format_size(workload.numel)} parameters, {kDtypeNames[dtype]}) with "
            f"{len(specs)} implementation(s) of {opt_name} needs about {need / 1e9:.1f} GB but only "
            f"{have / 1e9:.1f} GB is available on {device} (budget {budget / 1e9:.1f} GB); "
            "use a smaller --params or fewer implementations (--impls)"
        )
    return need


# -------------------------------------------------------------------------------------------- measurement

def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of already sorted values, interpolated linearly; NaN when there are none."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass
class Runner:
    """One implementation under test. ``step`` is what gets timed (clipping included); ``params`` are the
    parameters whose ``.grad`` receives each round's gradients (empty for a step meant to find no gradient)."""

    spec: ImplSpec
    params: list[torch.nn.Parameter]
    optimizer: Any
    step: Callable[[], Any]
    bytes_per_param: int
    samples_s: list[float] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _copy_grads(runner: Runner, sources: list[torch.Tensor]) -> None:
    # Re-read p.grad every time: fusedopt may have swapped in views of its flat gradient buffer.
    grads = [p.grad for p in runner.params]
    if not grads:
        return
    try:
        torch._foreach_copy_(grads, sources)
    except (AttributeError, RuntimeError):
        for g, s in zip(grads, sources):
            g.copy_(s)


def time_interleaved(
    runners: Sequence[Runner],
    workload: Workload,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    steps: int = 20,
    warmup: int = 3,
    seed: int = 0,
    progress: Progress | None = None,
) -> None:
    """Run ``warmup + steps`` rounds and append each runner's ``steps`` measured step times to its ``samples_s``.

    Every round draws one fresh random gradient set (outside the timed region) and copies it in place into each
    runner's existing ``.grad`` tensors just before that runner's timed step; the order of runners rotates each
    round so that machine noise and cache state affect all alike.
    """
    dev = torch.device(device)
    source = torch.empty(workload.numel, dtype=dtype, device=dev)
    sources, off = [], 0
    for _, shape in workload.shapes:
        n = math.prod(shape)
        sources.append(source[off : off + n].view(shape))
        off += n
    gen = torch.Generator(device=dev).manual_seed(seed + 1)
    for r in range(warmup + steps):
        source.normal_(generator=gen)
        k = r % len(runners)
        for runner in list(runners[k:]) + list(runners[:k]):
            _copy_grads(runner, sources)
            _sync(dev)
            t0 = time.perf_counter()
            runner.step()
            _sync(dev)
            dt = time.perf_counter() - t0
            if r >= warmup:
                runner.samples_s.append(dt)
            if progress is not None:
                progress.update()


def run_benchmark(
    opt_name: str,
    workload: Workload,
    specs: Sequence[ImplSpec],
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    clip: float | None = None,
    steps: int = 20,
    warmup: int = 3,
    seed: int = 0,
    bandwidth_gbs: float | None = None,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Time ``steps`` optimizer steps of each implementation, interleaved (``time_interleaved``), and return one
    result row each: median, p10 and p90 ms, throughput, GB/s, share of ``bandwidth_gbs``, speed-up over the
    fastest torch.optim flavour. Memory is checked first (``check_memory``)."""
    if steps < 1:
        raise ValueError(f"Invalid steps: {steps} (must be >= 1)")
    dev = torch.device(device)
    check_memory(specs, opt_name, workload, dtype, device)
    runners: list[Runner] = []
    if progress is not None:
        progress.reset(len(specs) + (warmup + steps) * len(specs))
    try:
        for spec in specs:
            params = make_params(workload, device=dev, dtype=dtype, seed=seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt, step, _ = build_optimizer(spec, opt_name, params, clip=clip)
            sdt = state_dtype_of(spec, dtype)
            runners.append(Runner(spec, params, opt, step, bytes_per_param(opt_name, dtype, sdt, clip=clip)))
            gc.collect()
            if progress is not None:
                progress.update()
        time_interleaved(runners, workload, device=dev, dtype=dtype, steps=steps, warmup=warmup, seed=seed,
                         progress=progress)
        rows = [
            _summarise(runner, opt_name, workload, dev, dtype, clip, steps, warmup, bandwidth_gbs) for runner in runners
        ]
    finally:
        runners.clear()
        gc.collect()
        _release_freed_host_memory()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    _add_speedups(rows)
    return rows


def _release_freed_host_memory() -> None:
    """Give freed heap memory back to the OS, so the next case's memory check sees it as available.

    Per-tensor optimizer states are many mid-sized allocations that glibc keeps in its heap after they are freed.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass


def _summarise(
    runner: Runner,
    opt_name: str,
    workload: Workload,
    dev: torch.device,
    dtype: torch.dtype,
    clip: float | None,
    steps: int,
    warmup: int,
    bandwidth_gbs: float | None,
) -> dict[str, Any]:
    s = sorted(runner.samples_s)
    med = percentile(s, 0.5)
    moved = runner.bytes_per_param * workload.numel
    gbs = moved / med / 1e9
    finite = bool(all(torch.isfinite(p).all() for p in runner.params))
    # A step whose data fits in the CPU's last-level cache is not bounded by memory bandwidth: no "% bw" for it.
    llc = llc_bytes() if dev.type == "cpu" else 0
    fits_in_cache = bool(llc) and moved < 2 * llc
    # Nor is one whose matmuls (Muon's Newton-Schulz) take most of its time: bytes_per_param counts its element-wise
    # part only.
    compute_bound = OPTIMIZERS[opt_name].compute_bound
    return {
        "optimizer": opt_name,
        "impl": runner.spec.label,
        "impl_name": runner.spec.name,
        "workload": workload.name,
        "params": workload.numel,
        "tensors": workload.num_tensors,
        "device": str(dev),
        "dtype": kDtypeNames[dtype],
        "state_dtype": kDtypeNames[state_dtype_of(runner.spec, dtype)],
        "clip": clip,
        "steps": steps,
        "warmup": warmup,
        "ms_median": med * 1e3,
        "ms_p10": percentile(s, 0.1) * 1e3,
        "ms_p90": percentile(s, 0.9) * 1e3,
        "params_per_s": workload.numel / med,
        "bytes_per_param": runner.bytes_per_param,
        "gbs": gbs,
        "pct_bandwidth": (100.0 * gbs / bandwidth_gbs if bandwidth_gbs and not (fits_in_cache or compute_bound)
                          else None),
        "fits_in_cache": fits_in_cache,
        "compute_bound": compute_bound,
        "speedup_vs_best_torch": None,
        "best_torch": None,
        "finite": finite,
    }


# A speed-up is trusted when the p10-p90 spreads of both rows bound it within this factor (high / low), i.e. to
# about +-20%; wider, and the machine was too noisy for the ratio to mean anything.
kMaxSpeedupUncertainty = 1.5


def _add_speedups(rows: list[dict[str, Any]]) -> None:
    torch_rows = [r for r in rows if r["impl_name"].startswith("torch-")]
    if not torch_rows:
        return
    best = min(torch_rows, key=lambda r: r["ms_median"])
    for r in rows:
        r["best_torch"] = best["impl"]
        r["speedup_vs_best_torch"] = best["ms_median"] / r["ms_median"]
        low, high = best["ms_p10"] / r["ms_p90"], best["ms_p90"] / r["ms_p10"]
        r["speedup_p10_p90"] = [low, high]
        r["speedup_trusted"] = r is best or high / low <= kMaxSpeedupUncertainty


# ------------------------------------------------------------------------------------------- environment

def set_threads(n: int) -> None:
    """Use ``n`` threads in torch and in fusedopt's compiled CPU kernels (when built)."""
    torch.set_num_threads(n)
    try:
        from fusedopt import _C  # type: ignore[attr-defined]

        _C.set_num_threads(n)
    except (ImportError, AttributeError):  # no compiled backend: torch threads are all there is
        return
