"""Benchmark implementations by name (``fusedopt-cpu``, ``torch-fused``, ``deepspeed-cpu-adam``, ...): the
algorithms benchmarked, their hyperparameters, the bytes a step must move, and builders that probe availability."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .workloads import Workload, make_params

__all__ = [
    "KNOWN_IMPLS",
    "OPTIMIZERS",
    "ImplSpec",
    "OptSpec",
    "Unavailable",
    "build_optimizer",
    "bytes_per_param",
    "default_impls",
    "fusedopt_backends",
    "kDtypeNames",
    "kDtypes",
    "probe",
    "resolve_impls",
    "state_dtype_of",
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
    # torch.optim's class has one implementation and takes neither foreach nor fused: it runs as torch-forloop,
    # and torch-foreach / torch-fused are Unavailable.
    torch_single: bool = False
    # Steps 2-D parameters only (Muon): the CLI keeps a workload's 2-D tensors, and other shapes are Unavailable.
    matrices_only: bool = False
    # Matmuls (Muon's Newton-Schulz), not memory traffic, bound the step: no share of bandwidth is claimed.
    compute_bound: bool = False


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
    "adamax": OptSpec("Adamax", "Adamax", {"lr": 2e-3}, 2),
    "radam": OptSpec("RAdam", "RAdam", {"lr": 1e-3}, 2),
    "adadelta": OptSpec("Adadelta", "Adadelta", {"lr": 1.0}, 2),
    "rprop": OptSpec("Rprop", "Rprop", {"lr": 1e-2}, 2),
    "nadam": OptSpec("NAdam", "NAdam", {"lr": 2e-3}, 2),
    "asgd": OptSpec("ASGD", "ASGD", {"lr": 1e-2}, 1),
    # Factored second moments: a matrix keeps a row and a column vector, so the states add no per-parameter bytes.
    "adafactor": OptSpec("Adafactor", "Adafactor", {"lr": 1e-2}, 0),
    # Matrices only; one state (momentum_buffer). Its bytes per parameter count the element-wise part (20 in fp32),
    # but the Newton-Schulz iteration (5 x 3 bf16 matmuls per matrix) takes most of the step.
    "muon": OptSpec("Muon", "Muon", {"lr": 0.02, "weight_decay": 0.1}, 1, torch_single=True, matrices_only=True,
                    compute_bound=True),
}

kFusedoptImpls = ("fusedopt-cpu", "fusedopt-cuda", "fusedopt-reference")
kTorchImpls = ("torch-forloop", "torch-foreach", "torch-fused")
kOtherImpls = ("deepspeed-cpu-adam", "deepspeed-cpu-lion", "deepspeed-cpu-adagrad", "apex-fused-adam")
KNOWN_IMPLS = kFusedoptImpls + kTorchImpls + kOtherImpls
kStateOptions = {"bf16-states": torch.bfloat16, "fp32-states": torch.float32}


class Unavailable(Exception):
    """An implementation cannot run here (not installed, not built, not supported for this optimizer/device)."""



@dataclass(frozen=True)
class ImplSpec:
    """An implementation by name, optionally with fusedopt's state dtype: ``fusedopt-cpu[bf16-states]``."""

    name: str
    state_dtype: torch.dtype | None = None

    @property
    def label(self) -> str:
        """The name as tables and result files show it, with the state-dtype option when given."""
        if self.state_dtype is None:
            return self.name
        return f"{self.name}[{kDtypeNames[self.state_dtype]}-states]"

    @property
    def family(self) -> str:
        """``fusedopt``, ``torch``, ``deepspeed`` or ``apex``."""
        return self.name.split("-", 1)[0]

    @staticmethod
    def parse(text: str) -> ImplSpec:
        """``ImplSpec`` from ``"torch-fused"`` or ``"fusedopt-cpu[bf16-states]"``; ``ValueError`` naming the text."""
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
    total = 2 * ps + gs + 2 * ss * OPTIMIZERS[opt_name].states
    if clip:
        total += gs
    return total



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


def default_impls(opt_name: str, device: str, *, forloop: bool = True) -> list[ImplSpec]:
    """fusedopt's best backend for ``device``, every torch.optim flavour (the slow for-loop one only with
    ``forloop``), and DeepSpeed/Apex when importable.

    Availability (e.g. torch ``fused=True`` for this optimizer) is settled later by ``resolve_impls``."""
    spec = OPTIMIZERS[opt_name]
    backends = fusedopt_backends()
    dev = torch.device(device).type
    if dev in backends:
        names = [f"fusedopt-{dev}"]
    else:
        names = ["fusedopt-reference"]
    if spec.torch_single:  # its one implementation, the for-loop, is the comparison; the others say why they don't run
        names += list(kTorchImpls)
    elif spec.torch_cls is not None:
        names += [n for n in kTorchImpls if forloop or n != "torch-forloop"]
    elif names[0] != "fusedopt-reference":  # Lion, LAMB: no torch.optim version, so compare fusedopt's backends
        names.append("fusedopt-reference")
    if dev == "cpu" and spec.deepspeed and _deepspeed_importable():
        names.append(spec.deepspeed)
    if dev == "cuda" and spec.apex and _apex_importable():
        names.append(spec.apex)
    return [ImplSpec(n) for n in names]


def build_optimizer(
    spec: ImplSpec,
    opt_name: str,
    params: list[torch.nn.Parameter],
    *,
    clip: float | None,
) -> tuple[Any, Callable[[], Any], torch.dtype | None]:
    """(optimizer, step function, state dtype) for ``spec`` over ``params`` with ``OPTIMIZERS[opt_name]``'s
    hyperparameters; the step function includes clipping to ``clip`` when given. Raises Unavailable with the reason."""
    ospec = OPTIMIZERS[opt_name]
    hyper = dict(ospec.hyper)
    name = spec.name
    if ospec.matrices_only:
        bad = next((p for p in params if p.dim() != 2), None)
        if bad is not None:
            raise Unavailable(f"{opt_name} is benchmarked on 2-D parameters only, not a {tuple(bad.shape)} tensor "
                              "(fusedopt.bench.matrices_only keeps a workload's matrices)")
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
        cls = getattr(torch.optim, ospec.torch_cls, None)
        if cls is None:
            raise Unavailable(f"torch.optim.{ospec.torch_cls} does not exist in torch {torch.__version__}")
        flavour = {
            "torch-forloop": {"foreach": False},
            "torch-foreach": {"foreach": True},
            "torch-fused": {"fused": True},
        }
        if ospec.torch_single:
            if name != "torch-forloop":
                raise Unavailable(f"torch.optim.{ospec.torch_cls} has a single implementation (a for-loop over the "
                                  "parameters, no foreach or fused argument); it is benchmarked as torch-forloop")
            flavour["torch-forloop"] = {}
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


def _build_deepspeed(
    name: str, opt_name: str, params: list[torch.nn.Parameter], hyper: dict[str, Any], clip: float | None
) -> tuple[Any, Callable[[], Any], torch.dtype | None]:
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


def _with_torch_clip(
    opt: Any, params: list[torch.nn.Parameter], clip: float | None, *, foreach: bool
) -> Callable[[], Any]:
    if not clip:
        return opt.step

    def step() -> None:
        torch.nn.utils.clip_grad_norm_(params, clip, foreach=foreach)
        opt.step()

    return step


def state_dtype_of(spec: ImplSpec, param_dtype: torch.dtype) -> torch.dtype:
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
        second = (6, 10) if OPTIMIZERS[opt_name].matrices_only else (7,)
        tiny = Workload("probe", [("a", (8, 8)), ("b", second)])
        params = make_params(tiny, device=device, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, step, _ = build_optimizer(spec, opt_name, params, clip=clip)
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
