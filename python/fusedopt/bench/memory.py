"""Optimizer memory measured, not computed: ``fusedopt bench --memory`` and ``bench/bench_memory.py``.

For AdamW on a GPT-2-shaped parameter set, each mode (fusedopt with fp32 or bf16 states, bf16 parameters with fp32
master weights, torch.optim.AdamW, bitsandbytes' and torchao's 8-bit AdamW when installed) runs in a fresh Python
process of its own, so that one implementation's freed memory, caches and thread pools cannot count against another.
The process reports the optimizer's bytes per parameter beyond the parameters and gradients themselves.

What is measured (CPU; the resident set size from ``/proc/self/status``):

1. Warm-up: the same mode is built over a throwaway copy of the same shapes and stepped twice, then freed. This loads
   every library and lazy kernel, starts the thread pools and compiles what compiles per shape (torchao's AdamW8bit
   is a ``torch.compile``d function), so none of it lands in the measurement.
2. The parameters and their gradients (random values, every page written) are created; ``gc.collect()`` and glibc's
   ``malloc_trim(0)``; ``base`` = VmRSS. This is what is subtracted: parameters, gradients, the interpreter, torch
   and the libraries.
3. The optimizer is built and ``steps`` steps run (fresh random gradients written in place into ``p.grad`` before
   each). Before each step the peak counter is reset (``5`` into ``/proc/self/clear_refs``) and VmHWM read after it.
4. ``steady`` = VmRSS after the steps (after ``gc.collect()`` and ``malloc_trim(0)``) - ``base``; ``peak`` = the
   largest VmHWM of the steps after the first - ``base`` (the steady state plus a step's temporaries). The first
   step, which allocates the states (and where fusedopt copies gradients created outside it into its flat buffer
   and frees them), and the construction (where fusedopt holds the old parameters and its flat copy at once) are
   reported apart: ``first_step_peak`` and ``build_peak``.

fusedopt moves parameters and gradients into its flat buffers: the parameters when the optimizer is built, the
gradients at its first step. The original tensors are freed then (nothing else refers to them here), so after the
steps the process holds one copy of each and ``steady`` counts states (and master weights) plus the flat buffers'
alignment padding (under 64 bytes per tensor and buffer). The worker runs with glibc's ``M_MMAP_THRESHOLD`` fixed at
128 KiB (``MALLOC_MMAP_THRESHOLD_``), so every tensor of any size is its own mapping and freeing it returns its pages to
the system at once; torch's CPU allocator caches nothing. Resident pages are counted, so memory allocated but never
written would not be: every state here is written by its first step.

On a GPU: ``torch.cuda.memory_allocated()`` after the parameters and gradients is ``base``, the steady figure is
``memory_allocated()`` after the steps, the peak ``max_memory_allocated()`` after ``reset_peak_memory_stats()``.

``expected`` is what the state layout says: fusedopt's flat buffers (``fusedopt.flat.packed_offsets``: states, master
weights, and the padding its parameter and gradient buffers add), torch's per-parameter states, the 8-bit optimizers'
codes, block scales and lookup tables. ``held`` counts the bytes of the tensors the optimizer's ``state`` refers to
after the steps (each storage once): a cross-check of the layout that needs no process memory.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .registry import OPTIMIZERS
from .workloads import Workload, make_params

__all__ = [
    "MODES",
    "MemoryMode",
    "check_memory_budget",
    "describe",
    "expected_bytes",
    "format_detail_table",
    "format_memory_table",
    "measure_mode",
    "measure_modes",
    "mode_keys",
    "parse_modes",
    "summary_text",
]

kDefaultSteps = 3
# AdamW hyperparameters of every mode, those of `fusedopt bench`: torch's defaults plus weight decay 0.01.
kHyper = dict(OPTIMIZERS["adamw"].hyper)
# glibc: every allocation of 128 KiB or more is its own mmap, returned to the system when freed (a fixed threshold
# also stops glibc from raising it after a large free, which would put later tensors on a heap that never shrinks).
kMallocEnv = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024), "MALLOC_TRIM_THRESHOLD_": str(128 * 1024)}
# Peers' 8-bit states: both keep 8-bit codes only for tensors of at least this many elements, with one fp32 scale per
# block of this many elements, and a 256-entry fp32 code table per state and tensor (bitsandbytes 0.50, torchao 0.18).
kMin8bit = 4096
kBlock8bit = 256
kQmapBytes = 256 * 4


# --------------------------------------------------------------------------------------------------- modes

@dataclass(frozen=True)
class MemoryMode:
    """One row of the memory table: an AdamW implementation with its parameter dtype and options.

    ``kind`` picks the builder (``_build``) and the expected layout (``expected_bytes``): ``fusedopt``, ``torch``,
    ``bnb`` or ``torchao``; ``options`` are its extra constructor arguments (fusedopt: ``state_dtype`` as ``"bf16"``,
    ``master_weights``; torch: ``fused`` / ``foreach``)."""

    key: str
    label: str
    kind: str
    param_dtype: str = "fp32"
    options: dict[str, Any] = field(default_factory=dict)
    module: str | None = None  # a package that must be importable (peers); missing: the row says so
    note: str = ""


#: The rows of ``fusedopt bench --memory``, in table order. New fusedopt memory modes (8-bit states, Kahan-compensated
#: or stochastically rounded bf16 parameters) go here: a MemoryMode with the constructor options that select them
#: (e.g. ``options={"master_weights": "kahan"}``, ``param_dtype="bf16"``), and their bytes in ``expected_bytes``'s
#: fusedopt case (``kStateBytes`` for a new state dtype, ``kKeepBytes`` for a new way of keeping 16-bit parameters).
MODES: list[MemoryMode] = [
    MemoryMode("fusedopt-fp32", "fusedopt AdamW, fp32 states", "fusedopt",
               note="default: exp_avg, exp_avg_sq fp32"),
    MemoryMode("fusedopt-bf16-states", "fusedopt AdamW, state_dtype=bf16", "fusedopt",
               options={"state_dtype": "bf16"}, note="fp32 params, bf16 states"),
    MemoryMode("fusedopt-bf16-master", "fusedopt AdamW, bf16 params, master_weights=True", "fusedopt",
               param_dtype="bf16", options={"master_weights": True},
               note="fp32 states + fp32 master copy; params/grads bf16"),
    MemoryMode("fusedopt-bf16-bf16-states", "fusedopt AdamW, bf16 params, state_dtype=bf16", "fusedopt",
               param_dtype="bf16", options={"state_dtype": "bf16"}, note="params/grads bf16, bf16 states"),
    MemoryMode("fusedopt-bf16-kahan", "fusedopt AdamW, bf16 params, master_weights='kahan'", "fusedopt",
               param_dtype="bf16", options={"master_weights": "kahan"},
               note="fp32 states + bf16 Kahan compensation"),
    MemoryMode("fusedopt-bf16-stochastic", "fusedopt AdamW, bf16 params, master_weights='stochastic'", "fusedopt",
               param_dtype="bf16", options={"master_weights": "stochastic"},
               note="fp32 states, stochastic rounding (no extra memory)"),
    MemoryMode("fusedopt-8bit", "fusedopt AdamW, state_dtype='8bit'", "fusedopt",
               options={"state_dtype": "8bit"}, note="fp32 params, 8-bit states (1 B + 4 B per 256-block each)"),
    MemoryMode("fusedopt-bf16-8bit-stochastic", "fusedopt AdamW, bf16 params, '8bit' states, 'stochastic'",
               "fusedopt", param_dtype="bf16", options={"state_dtype": "8bit", "master_weights": "stochastic"},
               note="params/grads bf16, 8-bit states, stochastic rounding"),
    MemoryMode("torch-fused", "torch.optim.AdamW(fused=True)", "torch", options={"fused": True},
               note="fp32 states"),
    MemoryMode("torch-foreach", "torch.optim.AdamW(foreach=True)", "torch", options={"foreach": True},
               note="fp32 states; foreach temporaries in the peak"),
    MemoryMode("bnb-adamw8bit", "bitsandbytes AdamW8bit", "bnb", module="bitsandbytes",
               note=f"8-bit states for tensors of >= {kMin8bit} elements"),
    MemoryMode("torchao-adamw8bit", "torchao AdamW8bit", "torchao", module="torchao",
               note=f"8-bit states for tensors of >= {kMin8bit} elements and a multiple of {kBlock8bit}"),
]
kDtypeOf = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# fusedopt's layout: bytes per element of a state by ``state_dtype``, and what a 16-bit parameter keeps besides its
# states by ``master_weights`` (True: an fp32 copy; "kahan": a compensation of the parameter's dtype; "stochastic":
# nothing).
kStateBytes = {"fp32": 4, "bf16": 2, "8bit": 1}
kKeepBytes = {False: 0, True: 4, "kahan": 2, "stochastic": 0}


def mode_keys() -> list[str]:
    return [m.key for m in MODES]


def parse_modes(text: str | None) -> list[MemoryMode]:
    """The modes named in a comma list (``None``, ``""`` or ``all``: every mode); ValueError naming unknown ones."""
    if not text or text.strip().lower() == "all":
        return list(MODES)
    by_key = {m.key: m for m in MODES}
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in by_key]
    if bad or not names:
        raise ValueError(f"Invalid memory mode: {','.join(bad) or text!r} (expected a comma list of "
                         f"{', '.join(by_key)} or all)")
    return [by_key[n] for n in dict.fromkeys(names)]


def _fusedopt_backend(device: torch.device) -> str:
    from .registry import fusedopt_backends

    return device.type if device.type in fusedopt_backends() else "reference"


def _build(mode: MemoryMode, params: list[torch.nn.Parameter], device: torch.device) -> Any:
    """The optimizer of ``mode`` over ``params``."""
    if mode.kind == "fusedopt":
        import fusedopt

        kwargs: dict[str, Any] = dict(kHyper, backend=_fusedopt_backend(device))
        for k, v in mode.options.items():
            kwargs[k] = kDtypeOf.get(v, v) if k == "state_dtype" else v
        return fusedopt.AdamW(params, **kwargs)
    if mode.kind == "torch":
        return torch.optim.AdamW(params, **kHyper, **mode.options)
    if mode.kind == "bnb":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kHyper, **mode.options)
    if mode.kind == "torchao":
        from torchao.optim import AdamW8bit

        return AdamW8bit(params, **kHyper, **mode.options)
    raise ValueError(f"unknown memory mode kind {mode.kind!r}")


def _version_of(mode: MemoryMode) -> str | None:
    name = {"fusedopt": "fusedopt", "torch": "torch", "bnb": "bitsandbytes", "torchao": "torchao"}[mode.kind]
    mod = sys.modules.get(name)
    return getattr(mod, "__version__", None) if mod is not None else None


# ------------------------------------------------------------------------------------------------ expected

def expected_bytes(mode: MemoryMode, workload: Workload) -> dict[str, Any]:
    """Bytes the optimizer of ``mode`` keeps beyond the parameters and gradients on ``workload``, from its state
    layout: ``{"bytes": total, "per_param": total / numel, "detail": text}``."""
    numels = [math.prod(s) for _, s in workload.shapes]
    n = sum(numels)
    ps = kDtypeOf[mode.param_dtype].itemsize
    if mode.kind == "fusedopt":
        from ..flat import QUANT_BLOCK, packed_offsets

        state_dtype = mode.options.get("state_dtype", "fp32")  # fp32 states by default, whatever the params
        # every tensor's region starts 64-byte aligned; with 8-bit states, on a 256-element block boundary
        _, total = packed_offsets(numels, QUANT_BLOCK if state_dtype == "8bit" else 0)
        ss = kStateBytes[state_dtype]
        master = kKeepBytes[mode.options.get("master_weights", False)] if ps < 4 else 0
        states = 2 * ss * total + (2 * 4 * total // QUANT_BLOCK if state_dtype == "8bit" else 0)
        padding = 2 * ps * (total - n)  # the flat parameter and gradient buffers' padding
        steps = 4 * len(numels)  # one float32 step count per parameter
        b = states + master * total + padding + steps
        detail = f"2 states x {ss} B" + (" + absmax per 256" if state_dtype == "8bit" else "") + \
            (f" + {master} B master" if master else "") + " + padding"
    elif mode.kind == "torch":
        b = 2 * ps * n + 4 * len(numels)  # exp_avg, exp_avg_sq in the parameter dtype; a 0-d float32 step each
        detail = f"2 states x {ps} B"
    elif mode.kind in ("bnb", "torchao"):
        b = 2 * kQmapBytes if mode.kind == "bnb" else 0  # bitsandbytes shares its two code tables
        fp32_params, fp32_tensors = 0, []
        for (name, shape), k in zip(workload.shapes, numels):
            if k >= kMin8bit and (mode.kind == "bnb" or k % kBlock8bit == 0):
                b += 2 * (k + 4 * math.ceil(k / kBlock8bit))  # uint8 codes, an fp32 scale per block
                if mode.kind == "torchao":
                    b += 2 * kQmapBytes  # a code table per state and tensor
            else:
                b += 2 * 4 * k
                fp32_params += k
                if k >= kMin8bit:
                    fp32_tensors.append(f"{name} {'x'.join(map(str, shape))}")
            if mode.kind == "torchao":
                b += 4  # a float32 step tensor (bitsandbytes counts steps in a Python int)
        detail = f"2 x (1 B + 4 B per {kBlock8bit}-block)"
        if fp32_params:
            share = 100 * fp32_params / n
            detail += f"; {fp32_params:,} params ({'<1' if share < 1 else f'{share:.0f}'}%) kept fp32 (2 x 4 B)"
        if fp32_tensors:
            shown = ", ".join(fp32_tensors[:3]) + (f" and {len(fp32_tensors) - 3} more" if len(fp32_tensors) > 3
                                                   else "")
            detail += f", among them {shown}: not a multiple of {kBlock8bit} elements"
    else:
        raise ValueError(f"unknown memory mode kind {mode.kind!r}")
    return {"bytes": int(b), "per_param": b / n, "detail": detail}


def _note(mode: MemoryMode, exp: dict[str, Any]) -> str:
    """The mode's note, with the layout's detail where it depends on the shapes (the 8-bit optimizers' fp32 share)."""
    if mode.kind in ("bnb", "torchao") and "kept fp32" in exp["detail"]:
        return f"{mode.note}; here {exp['detail'].split('; ', 1)[1]}"
    return mode.note


# ------------------------------------------------------------------------------------------ process memory

def _status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process in bytes (Linux)."""
    out: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def _reset_peak() -> bool:
    """Reset VmHWM to the current VmRSS (Linux >= 4.0); False when the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


_libc: Any = None


def _settle() -> None:
    """Collect garbage and hand freed heap memory back to the system, so that RSS shows live memory only."""
    global _libc
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            if _libc is None:
                _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim(0)
        except OSError:
            pass


class _Meter:
    """Memory in use and its peak: process RSS on CPU, torch's allocator on a GPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        if not self.cuda and not os.path.exists("/proc/self/status"):
            raise RuntimeError("measuring CPU memory needs /proc/self/status (Linux)")
        self.method = ("torch.cuda.memory_allocated / max_memory_allocated" if self.cuda
                       else "VmRSS / VmHWM from /proc/self/status, peak reset by /proc/self/clear_refs")

    def now(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.memory_allocated(self.device))
        return _status()["VmRSS"]

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif not _reset_peak():
            raise RuntimeError("cannot reset the peak RSS: /proc/self/clear_refs refused '5'")

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        return _status()["VmHWM"]


def _fill_grads(params: Sequence[torch.nn.Parameter], gen: torch.Generator) -> None:
    """Fresh random gradients, written in place into each ``p.grad`` (fusedopt's may be views of its flat buffer)."""
    with torch.no_grad():
        for p in params:
            p.grad.normal_(generator=gen)


def _held_bytes(opt: Any) -> int:
    """Bytes of the distinct storages the optimizer's state refers to (tensor subclasses: their inner tensors)."""
    seen: dict[tuple[str, int], int] = {}

    def visit(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            flatten = getattr(type(obj), "__tensor_flatten__", None)
            if flatten is not None and type(obj) is not torch.Tensor and type(obj) is not torch.nn.Parameter:
                names, _ = obj.__tensor_flatten__()
                for name in names:
                    visit(getattr(obj, name))
                return
            try:
                storage = obj.untyped_storage()
                seen[(str(obj.device), storage.data_ptr())] = storage.nbytes()
            except (RuntimeError, NotImplementedError):
                seen[(str(obj.device), id(obj))] = obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v)

    for st in opt.state.values():
        visit(st)
    return sum(seen.values())


def measure_mode(
    mode: MemoryMode, workload: Workload, *, device: str = "cpu", steps: int = kDefaultSteps, seed: int = 0,
    threads: int | None = None,
) -> dict[str, Any]:
    """Measure ``mode`` in this process (see the module docstring); call it in a fresh process
    (``measure_modes`` does). Returns the row of the table; raises whatever building or stepping raises."""
    if steps < 2:
        raise ValueError(f"Invalid steps: {steps} (the peak needs a step after the first; at least 2)")
    dev = torch.device(device)
    if threads:
        from .measure import set_threads

        set_threads(threads)
    meter = _Meter(dev)
    dtype = kDtypeOf[mode.param_dtype]
    gen = torch.Generator(device=dev).manual_seed(seed)
    t0 = time.perf_counter()

    # 1. Warm-up on a throwaway copy of the same shapes: libraries, thread pools, per-shape compilation.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warm = make_params(workload, device=dev, dtype=dtype, seed=seed + 1)
        opt = _build(mode, warm, dev)
        for _ in range(2):
            _fill_grads(warm, gen)
            opt.step()
        del opt, warm
        _settle()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        warmup_s = time.perf_counter() - t0

        # 2. Parameters and gradients, every page written: the baseline.
        params = make_params(workload, device=dev, dtype=dtype, seed=seed)
        _fill_grads(params, gen)
        _settle()
        base = meter.now()
        status_base = None if meter.cuda else _status()

        # 3. Build and step.
        meter.reset_peak()
        opt = _build(mode, params, dev)
        build_peak = meter.peak()
        _settle()
        after_build = meter.now()
        step_peaks, after_steps = [], []
        for _ in range(steps):
            _fill_grads(params, gen)
            _settle()
            meter.reset_peak()
            opt.step()
            step_peaks.append(meter.peak())
            after_steps.append(meter.now())
        _settle()
        steady = meter.now()
        status_end = None if meter.cuda else _status()
        finite = all(bool(torch.isfinite(p).all()) for p in params)
        held = _held_bytes(opt)

    n = workload.numel
    exp = expected_bytes(mode, workload)
    row: dict[str, Any] = {
        "mode": mode.key,
        "label": mode.label,
        "kind": mode.kind,
        "status": "ok",
        "param_dtype": mode.param_dtype,
        "options": mode.options,
        "version": _version_of(mode),
        "backend": _fusedopt_backend(dev) if mode.kind == "fusedopt" else None,
        "params": n,
        "tensors": workload.num_tensors,
        "device": str(dev),
        "steps": steps,
        "steady_bytes": steady - base,
        "steady_bytes_per_param": (steady - base) / n,
        "peak_bytes": max(step_peaks[1:]) - base,
        "peak_bytes_per_param": (max(step_peaks[1:]) - base) / n,
        "first_step_peak_bytes_per_param": (step_peaks[0] - base) / n,
        "build_peak_bytes_per_param": (build_peak - base) / n,
        "after_build_bytes_per_param": (after_build - base) / n,
        "after_each_step_bytes_per_param": [(a - base) / n for a in after_steps],
        "expected_bytes": exp["bytes"],
        "expected_bytes_per_param": exp["per_param"],
        "expected_detail": exp["detail"],
        "held_bytes_per_param": held / n,
        "base_bytes": base,
        "method": meter.method,
        "finite": finite,
        "note": _note(mode, exp),
        "warmup_s": warmup_s,
        "seconds": time.perf_counter() - t0,
    }
    if status_base is not None and status_end is not None:
        row["rss_anon_delta_bytes_per_param"] = (status_end["RssAnon"] - status_base["RssAnon"]) / n
        row["rss_file_delta_bytes"] = status_end["RssFile"] - status_base["RssFile"]
    return row


# ------------------------------------------------------------------------------------------------- driver

def _package_root() -> str:
    import fusedopt

    return os.path.dirname(os.path.dirname(os.path.abspath(fusedopt.__file__)))


def _unavailable(mode: MemoryMode, workload: Workload, reason: str, status: str = "unavailable") -> dict[str, Any]:
    exp = expected_bytes(mode, workload)
    return {
        "mode": mode.key, "label": mode.label, "kind": mode.kind, "status": status, "reason": reason,
        "param_dtype": mode.param_dtype, "options": mode.options, "params": workload.numel,
        "tensors": workload.num_tensors, "steady_bytes_per_param": None, "peak_bytes_per_param": None,
        "expected_bytes_per_param": exp["per_param"], "expected_detail": exp["detail"], "note": _note(mode, exp),
    }


def measure_modes(
    modes: Sequence[MemoryMode], workload: Workload, *, device: str = "cpu", steps: int = kDefaultSteps,
    seed: int = 0, threads: int | None = None, jobs: int = 1, timeout: float = 900,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Measure each mode in a fresh Python process of its own (``python -m fusedopt.bench.memory --worker``), up to
    ``jobs`` processes at a time (each counts only its own memory); a mode whose package is missing, or whose build
    or steps fail, gives a row with ``status`` and ``reason``. Rows come back in the order of ``modes``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = _package_root() + os.pathsep + env.get("PYTHONPATH", "")
    env.update(kMallocEnv)
    env.pop("FUSEDOPT_BACKEND", None)
    rows: dict[str, dict[str, Any]] = {}
    todo: list[MemoryMode] = []
    for mode in modes:
        if mode.module and importlib.util.find_spec(mode.module) is None:
            rows[mode.key] = _unavailable(mode, workload, f"{mode.module} is not installed (pip install "
                                          f"{mode.module})", status="skipped")
        else:
            todo.append(mode)
    with tempfile.TemporaryDirectory(prefix="fusedopt-memory-") as tmp:
        running: list[tuple[MemoryMode, subprocess.Popen, str, float]] = []

        def start(mode: MemoryMode) -> None:
            if progress:
                progress(mode.key)
            out = os.path.join(tmp, f"{mode.key}.out.json")
            job = {"mode": mode.key, "shapes": [[name, list(s)] for name, s in workload.shapes],
                   "name": workload.name, "description": workload.description, "device": device, "steps": steps,
                   "seed": seed, "threads": threads, "out": out}
            spec = os.path.join(tmp, f"{mode.key}.job.json")
            with open(spec, "w") as f:
                json.dump(job, f)
            with open(os.path.join(tmp, f"{mode.key}.log"), "w") as log:  # the child keeps its own descriptor
                proc = subprocess.Popen([sys.executable, "-m", "fusedopt.bench.memory", "--worker", spec], env=env,
                                        stdout=log, stderr=subprocess.STDOUT)
            running.append((mode, proc, out, time.monotonic()))

        def finish(mode: MemoryMode, proc: subprocess.Popen, out: str) -> None:
            if os.path.exists(out):
                with open(out) as f:
                    rows[mode.key] = json.load(f)
                return
            with open(os.path.join(tmp, f"{mode.key}.log")) as f:
                tail = f.read().strip().splitlines()
            rows[mode.key] = _unavailable(mode, workload, f"worker exited with {proc.returncode}: "
                                          + (tail[-1] if tail else "no output"), status="failed")

        queue = list(todo)
        try:
            while queue or running:
                while queue and len(running) < max(1, jobs):
                    start(queue.pop(0))
                time.sleep(0.05)
                for item in list(running):
                    mode, proc, out, t0 = item
                    if proc.poll() is not None:
                        running.remove(item)
                        finish(mode, proc, out)
                    elif time.monotonic() - t0 > timeout:
                        proc.kill()
                        proc.wait()
                        running.remove(item)
                        rows[mode.key] = _unavailable(mode, workload, f"timed out after {timeout:.0f} s",
                                                      status="failed")
        finally:
            for _, proc, _, _ in running:
                proc.kill()
                proc.wait()
    return [rows[m.key] for m in modes]


def _worker(spec_path: str) -> int:
    with open(spec_path) as f:
        job = json.load(f)
    mode = {m.key: m for m in MODES}[job["mode"]]
    workload = Workload(job["name"], [(n, tuple(s)) for n, s in job["shapes"]], job["description"])
    try:
        row = measure_mode(mode, workload, device=job["device"], steps=job["steps"], seed=job["seed"],
                           threads=job["threads"])
    except Exception as e:  # noqa: BLE001 - any failure of a peer's CPU path is a row saying why
        msg = f"{type(e).__name__}: {e}".strip().splitlines()
        row = _unavailable(mode, workload, msg[0][:300] if msg else type(e).__name__)
        row["version"] = _version_of(mode)
    with open(job["out"], "w") as f:
        json.dump(row, f, default=str)
    return 0


# ----------------------------------------------------------------------------------------------- output

def check_memory_budget(workload: Workload, device: str = "cpu") -> tuple[int, int]:
    """(bytes one worker needs at most, bytes available): the warm-up copy's parameters and gradients are freed
    before the measured ones are made, so the worst case is one set (4+4 B fp32) with fp32 states and master
    weights (12 B), fusedopt's transient parameter copy (4 B) and torch foreach's temporaries (about 3 states,
    12 B), plus the interpreter and libraries."""
    from .measure import available_memory

    need = workload.numel * 40 + (512 << 20)
    return need, available_memory(device)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def format_memory_table(rows: Sequence[dict[str, Any]], *, markdown: bool = False) -> str:
    """Implementation/mode, steady and peak bytes/param, expected bytes/param from the state layout, note."""
    head = ["implementation / mode", "B/param steady", "B/param peak (step)", "B/param expected", "note"]
    body = []
    for r in rows:
        if r.get("status") == "ok":
            note = r.get("note") or ""
            if not r.get("finite", True):
                note += "; non-finite parameters after the steps"
            cells = [r["label"], _fmt(r["steady_bytes_per_param"]), _fmt(r["peak_bytes_per_param"]),
                     _fmt(r["expected_bytes_per_param"]), note]
        else:
            what = "Unavailable" if r.get("status") != "skipped" else "Skipped"
            cells = [r["label"], "-", "-", _fmt(r["expected_bytes_per_param"]), f"{what}: {r.get('reason')}"]
        body.append(cells)
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * 3 + "---|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head) - 1)]
    out = []
    for cells in [head, *body]:
        left = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:-1], widths[1:])]
        out.append("  ".join(left + [cells[-1]]).rstrip())
    return "\n".join(out)


def describe(workload: Workload, device: str, steps: int) -> str:
    """One line on what was measured."""
    return (f"AdamW | {workload.name}: {workload.numel:,} params in {workload.num_tensors} tensors "
            f"({workload.description}) | {device} | {steps} steps, each mode in a fresh process; bytes per parameter "
            "beyond the parameters and gradients")


def summary_text(rows: Sequence[dict[str, Any]], workload: Workload) -> str:
    """What the numbers count, for the printed table and the markdown report."""
    text = ("steady: memory held after the steps less that with only parameters and gradients allocated (VmRSS on "
            "CPU, torch.cuda.memory_allocated on a GPU); peak: the largest during a step after the first (states "
            "plus the step's temporaries); expected: the state layout (fusedopt: flat-buffer states, master weights "
            "and alignment padding). Each mode runs in a fresh process after a warm-up on a throwaway copy.")
    per_tensor = [r["label"] for r in rows if r.get("status") == "ok" and r["kind"] in ("bnb", "torchao")]
    if per_tensor and workload.shapes:
        name, shape = max(workload.shapes, key=lambda x: math.prod(x[1]))
        share = 100 * math.prod(shape) / workload.numel
        text += (f" {' and '.join(per_tensor)} step tensor by tensor: their peak temporaries scale with the largest "
                 f"tensor ({name} {tuple(shape)}, {share:.0f}% of the parameters here), not with the model.")
    return text


def format_detail_table(rows: Sequence[dict[str, Any]], *, markdown: bool = False) -> str:
    """Per mode, in bytes per parameter: after the constructor, the constructor's peak, the first step's peak (states
    allocated; fusedopt takes the gradients into its flat buffer), and the bytes of the tensors the optimizer's state
    refers to."""
    head = ["implementation / mode", "after build", "build peak", "first-step peak", "state tensors"]
    body = [[r["label"], _fmt(r["after_build_bytes_per_param"]), _fmt(r["build_peak_bytes_per_param"]),
             _fmt(r["first_step_peak_bytes_per_param"]), _fmt(r["held_bytes_per_param"])]
            for r in rows if r.get("status") == "ok"]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * 4]
        return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join([c[0].ljust(widths[0])] + [x.rjust(w) for x, w in zip(c[1:], widths[1:])])
                     for c in [head, *body])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fusedopt.bench.memory",
                                 description="worker of fusedopt bench --memory (one mode, one process)")
    ap.add_argument("--worker", required=True, metavar="JOB_JSON")
    args = ap.parse_args(argv)
    return _worker(args.worker)


if __name__ == "__main__":
    sys.exit(main())
