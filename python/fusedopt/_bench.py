"""Benchmark harness shared by ``fusedopt bench`` and ``bench/*.py``: builds implementations by name, times
interleaved optimizer steps on fresh gradients and reports ms/step, throughput and share of memory bandwidth."""

from __future__ import annotations

import csv
import ctypes
import datetime as _dt
import gc
import io
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ._workloads import Workload, format_size, make_params

__all__ = [
    "OPTIMIZERS",
    "ImplSpec",
    "MemoryError_",
    "Progress",
    "Unavailable",
    "available_memory",
    "bytes_per_param",
    "bytes_table",
    "check_memory",
    "default_impls",
    "estimate_bytes",
    "format_table",
    "fusedopt_backends",
    "machine_info",
    "machine_tag",
    "resolve_impls",
    "run_benchmark",
    "set_threads",
    "write_csv",
    "write_json",
]

kDtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
kDtypeNames = {v: k for k, v in kDtypes.items()}


@dataclass(frozen=True)
class OptSpec:
    """One algorithm: fusedopt / torch.optim class names, benchmark hyperparameters, optimizer states."""

    fusedopt_cls: str
    torch_cls: str | None
    hyper: dict[str, Any]
    states: int  # state tensors per parameter with these hyperparameters
    deepspeed: str | None = None
    apex: str | None = None


#: Hyperparameters are torch.optim defaults plus what makes the step do its usual work (momentum for SGD,
#: weight decay for the decoupled optimizers), so every implementation runs the same update.
OPTIMIZERS: dict[str, OptSpec] = {
    "adam": OptSpec("Adam", "Adam", {"lr": 1e-3}, 2, "deepspeed-cpu-adam", "apex-fused-adam"),
    "adamw": OptSpec("AdamW", "AdamW", {"lr": 1e-3, "weight_decay": 1e-2}, 2, "deepspeed-cpu-adam", "apex-fused-adam"),
    "sgd": OptSpec("SGD", "SGD", {"lr": 1e-3, "momentum": 0.9}, 1),
    "rmsprop": OptSpec("RMSprop", "RMSprop", {"lr": 1e-3}, 1),
    "adagrad": OptSpec("Adagrad", "Adagrad", {"lr": 1e-2}, 1, "deepspeed-cpu-adagrad"),
    "lion": OptSpec("Lion", None, {"lr": 1e-4, "weight_decay": 1e-2}, 1, "deepspeed-cpu-lion"),
    "lamb": OptSpec("LAMB", None, {"lr": 1e-3, "weight_decay": 1e-2}, 2),
}

kFusedoptImpls = ("fusedopt-cpu", "fusedopt-cuda", "fusedopt-reference")
kTorchImpls = ("torch-forloop", "torch-foreach", "torch-fused")
kOtherImpls = ("deepspeed-cpu-adam", "deepspeed-cpu-lion", "deepspeed-cpu-adagrad", "apex-fused-adam")
KNOWN_IMPLS = kFusedoptImpls + kTorchImpls + kOtherImpls
kStateOptions = {"bf16-states": torch.bfloat16, "fp32-states": torch.float32}


class Unavailable(Exception):
    """An implementation cannot run here (not installed, not built, not supported for this optimizer/device)."""


class MemoryError_(RuntimeError):
    """The benchmark would not fit in the memory available; raised before anything large is allocated."""


@dataclass(frozen=True)
class ImplSpec:
    """An implementation by name, optionally with fusedopt's state dtype: ``fusedopt-cpu[bf16-states]``."""

    name: str
    state_dtype: torch.dtype | None = None

    @property
    def label(self) -> str:
        if self.state_dtype is None:
            return self.name
        return f"{self.name}[{kDtypeNames[self.state_dtype]}-states]"

    @property
    def family(self) -> str:
        return self.name.split("-", 1)[0]

    @staticmethod
    def parse(text: str) -> ImplSpec:
        text = text.strip()
        name, _, opt = text.partition("[")
        if name not in KNOWN_IMPLS:
            raise ValueError(f"Invalid implementation: {text!r} (expected one of {', '.join(KNOWN_IMPLS)})")
        state_dtype = None
        if opt:
            key = opt.rstrip("]")
            if key not in kStateOptions or not name.startswith("fusedopt-"):
                raise ValueError(f"Invalid implementation option: {text!r} (fusedopt-*[bf16-states] or [fp32-states])")
            state_dtype = kStateOptions[key]
        return ImplSpec(name, state_dtype)


# --------------------------------------------------------------------------------------------------- bytes

def _state_elements(opt_name: str) -> int:
    return OPTIMIZERS[opt_name].states


def bytes_per_param(
    opt_name: str,
    param_dtype: torch.dtype = torch.float32,
    state_dtype: torch.dtype | None = None,
    *,
    grad_dtype: torch.dtype | None = None,
    clip: float | None = None,
) -> int:
    """Bytes a one-pass step must move per parameter: read+write the parameter, read the gradient, read+write
    each state (``states`` of this optimizer, each of ``state_dtype``, default the parameter's dtype), plus one
    more gradient read when clipping by global norm (the norm pass). AdamW fp32: 4+4 + 4 + 2*(4+4) = 28."""
    ps = torch.finfo(param_dtype).bits // 8
    gs = torch.finfo(grad_dtype or param_dtype).bits // 8
    ss = torch.finfo(state_dtype or param_dtype).bits // 8
    total = 2 * ps + gs + 2 * ss * _state_elements(opt_name)
    if clip:
        total += gs
    return total


def bytes_table() -> str:
    """Markdown table of bytes per parameter per algorithm and dtype (no clipping)."""
    cases = [
        ("fp32 params, fp32 states", torch.float32, torch.float32),
        ("bf16 params, fp32 states", torch.bfloat16, torch.float32),
        ("fp32 params, bf16 states", torch.float32, torch.bfloat16),
        ("bf16 params, bf16 states", torch.bfloat16, torch.bfloat16),
    ]
    lines = ["| optimizer | states | " + " | ".join(c[0] for c in cases) + " |", "|---" * (len(cases) + 2) + "|"]
    for name, spec in OPTIMIZERS.items():
        row = [str(bytes_per_param(name, p, s)) for _, p, s in cases]
        lines.append(f"| {name} | {spec.states} | " + " | ".join(row) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ implementations

def fusedopt_backends() -> list[str]:
    """Backends this fusedopt build can run ("reference" always; "cpu"/"cuda" when compiled)."""
    try:
        import fusedopt

        return list(fusedopt.build_info().get("backends", ["reference"]))
    except Exception:  # noqa: BLE001 - a broken install still benchmarks torch
        return ["reference"]


def _deepspeed_importable() -> bool:
    try:
        import deepspeed.ops  # noqa: F401
    except Exception:  # noqa: BLE001 - deepspeed raises many kinds of errors at import
        return False
    return True


def _apex_importable() -> bool:
    try:
        from apex.optimizers import FusedAdam  # noqa: F401
    except Exception:  # noqa: BLE001 - apex raises many kinds of errors at import
        return False
    return True


def default_impls(opt_name: str, device: str) -> list[ImplSpec]:
    """fusedopt's best backend for ``device``, every torch.optim flavour, and DeepSpeed/Apex when importable.

    Availability (e.g. torch ``fused=True`` for this optimizer) is settled later by ``resolve_impls``."""
    spec = OPTIMIZERS[opt_name]
    backends = fusedopt_backends()
    dev = torch.device(device).type
    if dev in backends:
        names = [f"fusedopt-{dev}"]
    else:
        names = ["fusedopt-reference"]
    if spec.torch_cls is not None:
        names += list(kTorchImpls)
    elif names[0] != "fusedopt-reference":  # Lion, LAMB: no torch.optim version, so compare fusedopt's backends
        names.append("fusedopt-reference")
    if dev == "cpu" and spec.deepspeed and _deepspeed_importable():
        names.append(spec.deepspeed)
    if dev == "cuda" and spec.apex and _apex_importable():
        names.append(spec.apex)
    return [ImplSpec(n) for n in names]


@dataclass
class Runner:
    """One implementation's parameters and optimizer; ``step`` is what gets timed (clipping included)."""

    spec: ImplSpec
    params: list[torch.nn.Parameter]
    optimizer: Any
    step: Callable[[], Any]
    bytes_per_param: int
    samples_s: list[float] = field(default_factory=list)


def _build(
    spec: ImplSpec,
    opt_name: str,
    params: list[torch.nn.Parameter],
    *,
    clip: float | None,
) -> tuple[Any, Callable[[], Any], torch.dtype | None]:
    """(optimizer, step function, state dtype) for ``spec``; raises Unavailable with the reason."""
    ospec = OPTIMIZERS[opt_name]
    hyper = dict(ospec.hyper)
    name = spec.name
    if name.startswith("fusedopt-"):
        try:
            import fusedopt
        except Exception as e:  # pragma: no cover - the package is what runs this code
            raise Unavailable(f"fusedopt import failed: {e!r}") from e
        cls = getattr(fusedopt, ospec.fusedopt_cls, None)
        if cls is None:
            raise Unavailable(f"fusedopt.{ospec.fusedopt_cls} does not exist yet")
        backend = name.split("-", 1)[1]
        kwargs: dict[str, Any] = dict(hyper, backend=backend)
        if clip:
            kwargs["max_grad_norm"] = clip
        if spec.state_dtype is not None:
            kwargs["state_dtype"] = spec.state_dtype
        try:
            opt = cls(params, **kwargs)
        except (RuntimeError, ValueError, TypeError) as e:
            raise Unavailable(str(e)) from e
        state_dtype = spec.state_dtype or (torch.float32 if params[0].dtype != torch.float32 else None)
        return opt, opt.step, state_dtype
    if name.startswith("torch-"):
        if ospec.torch_cls is None:
            raise Unavailable(f"torch.optim has no {opt_name}")
        cls = getattr(torch.optim, ospec.torch_cls)
        flavour = {
            "torch-forloop": {"foreach": False},
            "torch-foreach": {"foreach": True},
            "torch-fused": {"fused": True},
        }
        try:
            opt = cls(params, **hyper, **flavour[name])
        except (RuntimeError, ValueError, TypeError) as e:
            raise Unavailable(str(e)) from e
        return opt, _with_torch_clip(opt, params, clip, foreach=name != "torch-forloop"), None
    if name.startswith("deepspeed-"):
        return _build_deepspeed(name, opt_name, params, hyper, clip)
    if name == "apex-fused-adam":
        if opt_name not in ("adam", "adamw"):
            raise Unavailable("apex FusedAdam implements Adam/AdamW only")
        try:
            from apex.optimizers import FusedAdam
        except Exception as e:
            raise Unavailable(f"apex not importable: {e!r}") from e
        opt = FusedAdam(params, adam_w_mode=opt_name == "adamw", **hyper)
        return opt, _with_torch_clip(opt, params, clip, foreach=True), None
    raise Unavailable(f"unknown implementation {name!r}")


def _build_deepspeed(name: str, opt_name: str, params, hyper: dict, clip: float | None):
    want = {
        "deepspeed-cpu-adam": ("adam", "adamw"),
        "deepspeed-cpu-lion": ("lion",),
        "deepspeed-cpu-adagrad": ("adagrad",),
    }
    if opt_name not in want[name]:
        raise Unavailable(f"{name} does not implement {opt_name}")
    if params[0].device.type != "cpu":
        raise Unavailable(f"{name} runs on CPU tensors only")
    try:
        if name == "deepspeed-cpu-adam":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            opt = DeepSpeedCPUAdam(params, adamw_mode=opt_name == "adamw", **hyper)
        elif name == "deepspeed-cpu-lion":
            from deepspeed.ops.lion import DeepSpeedCPULion

            opt = DeepSpeedCPULion(params, **hyper)
        else:
            from deepspeed.ops.adagrad import DeepSpeedCPUAdagrad

            opt = DeepSpeedCPUAdagrad(params, **hyper)
    except Exception as e:  # import errors, JIT build failures, unsupported dtypes
        raise Unavailable(repr(e)) from e
    return opt, _with_torch_clip(opt, params, clip, foreach=True), None


def _with_torch_clip(opt, params, clip: float | None, *, foreach: bool) -> Callable[[], Any]:
    if not clip:
        return opt.step

    def step() -> None:
        torch.nn.utils.clip_grad_norm_(params, clip, foreach=foreach)
        opt.step()

    return step


def _torch_state_dtype(spec: ImplSpec, param_dtype: torch.dtype) -> torch.dtype:
    """Dtype of the optimizer states an implementation keeps for parameters of ``param_dtype``."""
    if spec.name.startswith("fusedopt-"):
        return spec.state_dtype or torch.float32
    if spec.name.startswith("deepspeed-"):
        return torch.float32
    return param_dtype  # torch.optim and apex keep states in the parameter's dtype


_probe_cache: dict[tuple, str | None] = {}


def probe(spec: ImplSpec, opt_name: str, device: str, dtype: torch.dtype, clip: float | None) -> str | None:
    """None when ``spec`` constructs and runs two steps on a tiny parameter set here, else the reason it can't."""
    key = (spec, opt_name, str(device), dtype, bool(clip))
    if key in _probe_cache:
        return _probe_cache[key]
    reason: str | None = None
    try:
        tiny = Workload("probe", [("a", (8, 8)), ("b", (7,))])
        params = make_params(tiny, device=device, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, step, _ = _build(spec, opt_name, params, clip=clip)
            for _ in range(2):
                for p in params:
                    p.grad.normal_()
                step()
        if not all(torch.isfinite(p).all() for p in params):
            reason = "non-finite parameters after two steps"
    except Unavailable as e:
        reason = str(e)
    except Exception as e:  # noqa: BLE001 - any failure means "cannot benchmark this here"
        reason = f"{type(e).__name__}: {e}"
    _probe_cache[key] = reason
    return reason


def resolve_impls(
    specs: Sequence[ImplSpec], opt_name: str, device: str, dtype: torch.dtype, clip: float | None
) -> tuple[list[ImplSpec], dict[str, str]]:
    """Split ``specs`` into those that run here and {label: reason} for those that don't."""
    ok: list[ImplSpec] = []
    skipped: dict[str, str] = {}
    for spec in specs:
        reason = probe(spec, opt_name, device, dtype, clip)
        if reason is None:
            ok.append(spec)
        else:
            skipped[spec.label] = reason.splitlines()[0][:200]
    return ok, skipped


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
        ss = torch.finfo(_torch_state_dtype(spec, dtype)).bits // 8
        total += numel * (2 * ps + ss * _state_elements(opt_name))
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

def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _copy_grads(runner: Runner, sources: list[torch.Tensor]) -> None:
    # Re-read p.grad every time: fusedopt may have swapped in views of its flat gradient buffer.
    grads = [p.grad for p in runner.params]
    try:
        torch._foreach_copy_(grads, sources)
    except (AttributeError, RuntimeError):
        for g, s in zip(grads, sources):
            g.copy_(s)


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
    """Time ``steps`` optimizer steps of each implementation, interleaved, and return one result row each.

    Every round draws one fresh random gradient set (outside the timed region) and copies it into each
    implementation's existing ``.grad`` tensors just before that implementation's timed step; the order of
    implementations rotates each round so that machine noise and cache state affect all alike.
    """
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
                opt, step, _ = _build(spec, opt_name, params, clip=clip)
            sdt = _torch_state_dtype(spec, dtype)
            runners.append(Runner(spec, params, opt, step, bytes_per_param(opt_name, dtype, sdt, clip=clip)))
            gc.collect()
            if progress is not None:
                progress.update()
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
            for runner in runners[k:] + runners[:k]:
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


def _summarise(runner, opt_name, workload, dev, dtype, clip, steps, warmup, bandwidth_gbs) -> dict[str, Any]:
    s = sorted(runner.samples_s)
    med = _percentile(s, 0.5)
    moved = runner.bytes_per_param * workload.numel
    gbs = moved / med / 1e9
    finite = bool(all(torch.isfinite(p).all() for p in runner.params))
    return {
        "optimizer": opt_name,
        "impl": runner.spec.label,
        "impl_name": runner.spec.name,
        "workload": workload.name,
        "params": workload.numel,
        "tensors": workload.num_tensors,
        "device": str(dev),
        "dtype": kDtypeNames[dtype],
        "state_dtype": kDtypeNames[_torch_state_dtype(runner.spec, dtype)],
        "clip": clip,
        "steps": steps,
        "warmup": warmup,
        "ms_median": med * 1e3,
        "ms_p10": _percentile(s, 0.1) * 1e3,
        "ms_p90": _percentile(s, 0.9) * 1e3,
        "params_per_s": workload.numel / med,
        "bytes_per_param": runner.bytes_per_param,
        "gbs": gbs,
        "pct_bandwidth": 100.0 * gbs / bandwidth_gbs if bandwidth_gbs else None,
        "speedup_vs_best_torch": None,
        "best_torch": None,
        "finite": finite,
    }


def _add_speedups(rows: list[dict[str, Any]]) -> None:
    torch_rows = [r for r in rows if r["impl_name"].startswith("torch-")]
    if not torch_rows:
        return
    best = min(torch_rows, key=lambda r: r["ms_median"])
    for r in rows:
        r["best_torch"] = best["impl"]
        r["speedup_vs_best_torch"] = best["ms_median"] / r["ms_median"]


# ------------------------------------------------------------------------------------------- environment

def set_threads(n: int) -> None:
    """Use ``n`` threads in torch and in fusedopt's compiled CPU kernels (when built)."""
    torch.set_num_threads(n)
    try:
        from fusedopt import _C  # type: ignore[attr-defined]

        _C.set_num_threads(n)
    except (ImportError, AttributeError):  # no compiled backend: torch threads are all there is
        return


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit(here: str | None = None) -> str | None:
    """HEAD of the git checkout holding ``here`` (default: this package), "-dirty" with uncommitted changes."""
    here = here or os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
        )
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here, capture_output=True, text=True, timeout=5,
            check=False,
        )
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: str = "cpu", *, repo_dir: str | None = None) -> dict[str, Any]:
    """Tags for a result file: machine, ISA, versions, commit (of ``repo_dir`` or else this package's checkout),
    timestamp."""
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": (repo_dir and _git_commit(repo_dir)) or _git_commit(),
    }
    try:
        import fusedopt

        build = fusedopt.build_info()
        info["fusedopt_version"] = getattr(fusedopt, "__version__", build.get("version"))
        info["cpu_isa"] = build.get("cpu_isa")
        info["fusedopt_backends"] = build.get("backends")
        info["build_info"] = build
    except Exception as e:  # noqa: BLE001 - a tag must never stop a benchmark
        info["fusedopt_version"] = None
        info["build_info_error"] = repr(e)
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        idx = torch.device(device).index or 0
        prop = torch.cuda.get_device_properties(idx)
        info["gpu"] = prop.name
        info["gpu_memory_bytes"] = prop.total_memory
    return info


def machine_tag(info: dict[str, Any] | None = None, device: str = "cpu") -> str:
    """Short file-name tag: ``amd-epyc-2c`` on CPU, ``nvidia-h100-80gb-hbm3`` on GPU."""
    info = info or machine_info(device)
    if info.get("gpu") and torch.device(device).type == "cuda":
        base = info["gpu"]
    else:
        base = f"{info['cpu_model']}-{info['cpu_cores']}c"
    for junk in ("(R)", "(TM)", "(tm)", "CPU", "Processor", "@"):
        base = base.replace(junk, " ")
    tag = "".join(c.lower() if c.isalnum() else "-" for c in base)
    while "--" in tag:
        tag = tag.replace("--", "-")
    return tag.strip("-") or "unknown"


# ------------------------------------------------------------------------------------------------ output

kColumns = [
    ("implementation", "impl", "{}"),
    ("ms/step", "ms_median", "{:.3f}"),
    ("p10-p90 ms", None, None),
    ("Mparams/s", "params_per_s", None),
    ("B/param", "bytes_per_param", "{}"),
    ("GB/s", "gbs", "{:.1f}"),
    ("% bw", "pct_bandwidth", "{:.0f}%"),
    ("speed-up vs best torch", "speedup_vs_best_torch", "{:.2f}x"),
]


def format_table(rows: Iterable[dict[str, Any]], *, markdown: bool = False) -> str:
    """Aligned text (or markdown) table: implementation, ms/step, p10-p90, Mparams/s, bytes/param, GB/s,
    % of measured bandwidth, speed-up over the best torch.optim flavour."""
    body: list[list[str]] = []
    for r in rows:
        line = []
        for title, key, fmt in kColumns:
            if title == "p10-p90 ms":
                line.append(f"{r['ms_p10']:.3f}-{r['ms_p90']:.3f}")
            elif title == "Mparams/s":
                line.append(f"{r['params_per_s'] / 1e6:.1f}")
            else:
                v = r.get(key)
                line.append("n/a" if v is None else fmt.format(v))
        body.append(line)
    header = [c[0] for c in kColumns]
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(line) + " |" for line in body]
        return "\n".join(out)
    widths = [max(len(header[i]), *(len(b[i]) for b in body)) if body else len(header[i]) for i in range(len(header))]
    def fmt_line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [fmt_line(header), "  ".join("-" * w for w in widths)]
    out += [fmt_line(b) for b in body]
    return "\n".join(out)


def write_json(path: str, payload: dict[str, Any]) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
        f.write("\n")


kCsvFields = [
    "optimizer", "impl", "workload", "params", "tensors", "device", "dtype", "state_dtype", "clip", "steps",
    "ms_median", "ms_p10", "ms_p90", "params_per_s", "bytes_per_param", "gbs", "pct_bandwidth",
    "speedup_vs_best_torch", "best_torch", "finite",
]


def write_csv(path: str, rows: Iterable[dict[str, Any]], meta: dict[str, Any] | None = None) -> None:
    """One row per (optimizer, workload, implementation); machine tags repeated on each row."""
    extra = ["cpu_model", "cpu_isa", "torch", "fusedopt_version", "git_commit", "timestamp"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=kCsvFields + extra, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({**r, **{k: (meta or {}).get(k) for k in extra}})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        f.write(buf.getvalue())


class Progress:
    """A plain stderr progress bar that appears only after one second and only on a terminal (or when forced)."""

    def __init__(self, label: str = "", total: int = 0, *, enabled: bool | None = None, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label = label
        self.total = total
        self.done = 0
        self.start = time.perf_counter()
        self._last = 0.0
        self._drawn = False

    def reset(self, total: int, label: str | None = None) -> None:
        self.total, self.done = total, 0
        if label is not None:
            self.label = label
        self._draw()

    def update(self, n: int = 1) -> None:
        self.done += n
        self._draw()

    def set_label(self, label: str) -> None:
        self.label = label
        self._draw()

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and (now - self.start < 1.0 or now - self._last < 0.1):
            return
        self._last = now
        frac = self.done / self.total if self.total else 0.0
        width = 30
        filled = int(frac * width)
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(f"\r{self.label[:40]:<40} [{bar}] {100 * frac:3.0f}% {now - self.start:6.1f}s")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self.enabled and self._drawn:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()
