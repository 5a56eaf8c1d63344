"""Flat functional kernels on the compiled core: validate tensors, precompute coefficients, call fusedopt._C.

Every function here has the signature of its counterpart in fusedopt.functional (CONTRACT.md) minus `backend`.
Validation happens before any pointer crosses the boundary, and a rejected call changes nothing. Coefficients such
as bias corrections are computed here in Python floats (double) and rounded once to fp32 by the C++ side.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import _C

__all__ = [
    "adam",
    "sgd",
    "rmsprop",
    "adagrad",
    "lion",
    "lamb",
    "sum_of_squares",
    "build_info",
    "cpu_isa",
    "supported_isas",
    "compiled_isas",
    "set_cpu_isa",
    "set_num_threads",
    "get_num_threads",
    "DTYPE_CODES",
]

# Dtype codes of csrc/include/fusedopt/dtype.h.
DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_STATE_DTYPES = (torch.float32, torch.bfloat16)
# LAMB passes of csrc/include/fusedopt/api.h (kLambMoments, kLambApply).
_LAMB_MOMENTS, _LAMB_APPLY = 1, 2

build_info = _C.build_info
cpu_isa = _C.cpu_isa
supported_isas = _C.supported_isas
compiled_isas = _C.compiled_isas
set_cpu_isa = _C.set_cpu_isa
set_num_threads = _C.set_num_threads
get_num_threads = _C.get_num_threads

_env_error = _C.isa_override_error()
if _env_error is not None:
    raise ValueError(_env_error)


def _scalar(name: str, value: Any) -> float:
    """A hyperparameter as a Python float (tensor lr / grad_scale are read once, on the host)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: expected a scalar, got a tensor of shape {tuple(value.shape)}")
        return float(value.item())
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"Invalid {name}: expected a float, got {type(value).__name__} {value!r}") from None


def _check_tensor(name: str, t: Any, like: Tensor | None, dtypes: tuple[torch.dtype, ...]) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"Invalid {name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"Invalid {name} dtype: {t.dtype} (expected one of {allowed})")
    if t.dim() != 1:
        raise ValueError(f"Invalid {name}: expected a 1-D tensor, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"Invalid {name}: tensor is not contiguous (stride {t.stride()})")
    if like is not None:
        if t.numel() != like.numel():
            raise ValueError(f"Invalid {name}: numel {t.numel()} != param numel {like.numel()}")
        if t.device != like.device:
            raise ValueError(f"Invalid {name}: device {t.device} != param device {like.device}")
    return t


def _check_device(param: Tensor, device_type: str = "cpu") -> None:
    if param.device.type != device_type:
        raise ValueError(
            f"Invalid param device: {param.device} (these kernels run on {device_type} tensors; "
            f"cuda_built={_C.build_info()['cuda_built']})"
        )


def _buffers(
    param: Tensor,
    grad: Tensor,
    states: dict[str, Tensor | None],
    required: dict[str, bool],
    master: Tensor | None,
    device_type: str = "cpu",
) -> tuple[list[int], int, int, int, int, int]:
    """Validates one flat buffer set on `device_type`; returns (state pointers, master ptr, n, dtype codes)."""
    _check_tensor("param", param, None, _PARAM_DTYPES)
    _check_device(param, device_type)
    _check_tensor("grad", grad, param, _PARAM_DTYPES)
    if grad.dtype != param.dtype and grad.dtype != torch.float32:
        raise TypeError(f"Invalid grad dtype: {grad.dtype} (expected {param.dtype} like param, or torch.float32)")
    state_dtype: torch.dtype | None = None
    pointers: list[int] = []
    used = [param, grad]
    for name, t in states.items():
        if not required[name]:
            pointers.append(0)
            continue
        if t is None:
            raise ValueError(f"Invalid {name}: None, but this configuration needs it")
        _check_tensor(name, t, param, _STATE_DTYPES)
        if state_dtype is None:
            state_dtype = t.dtype
        elif t.dtype != state_dtype:
            raise TypeError(f"Invalid {name} dtype: {t.dtype} (all states of one call share {state_dtype})")
        pointers.append(t.data_ptr())
        used.append(t)
    master_ptr = 0
    if master is not None:
        _check_tensor("master", master, param, (torch.float32,))
        master_ptr = master.data_ptr()
        used.append(master)
    n = param.numel()
    if n > 0:
        # The kernels assume distinct buffers (restrict pointers); sharing storage would give undefined results.
        seen: dict[int, int] = {}
        for k, t in enumerate(used):
            if t.data_ptr() in seen:
                raise ValueError(f"Invalid buffers: arguments {seen[t.data_ptr()]} and {k} share memory")
            seen[t.data_ptr()] = k
    return (
        pointers,
        master_ptr,
        n,
        DTYPE_CODES[param.dtype],
        DTYPE_CODES[grad.dtype],
        DTYPE_CODES[state_dtype if state_dtype is not None else torch.float32],
    )


def _check_step(step: Any) -> int:
    if isinstance(step, Tensor):
        step = int(step.item())
    if isinstance(step, float) and step.is_integer():
        step = int(step)
    if not isinstance(step, int) or step < 1:
        raise ValueError(f"Invalid step: {step!r} (expected an int >= 1, already incremented)")
    return step


def _signed_scale(grad_scale: Any, maximize: bool) -> float:
    scale = _scalar("grad_scale", grad_scale)
    return -scale if maximize else scale


def adam(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, max_exp_avg_sq: Tensor | None,
    master: Tensor | None, *, step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
    amsgrad: bool, maximize: bool, decoupled: bool = False, grad_scale: float = 1.0,
) -> None:
    """Adam / AdamW (decoupled=True) over one flat buffer set; see fusedopt.reference.adam."""
    step = _check_step(step)
    lr, beta1, beta2 = _scalar("lr", lr), _scalar("beta1", beta1), _scalar("beta2", beta2)
    eps, weight_decay = _scalar("eps", eps), _scalar("weight_decay", weight_decay)
    states = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "max_exp_avg_sq": max_exp_avg_sq}
    required = {"exp_avg": True, "exp_avg_sq": True, "max_exp_avg_sq": bool(amsgrad)}
    ptrs, master_ptr, n, pd, gd, sd = _buffers(param, grad, states, required, master)
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    decoupled_wd = weight_decay != 0 and decoupled
    _C.adam(
        param.data_ptr(), grad.data_ptr(), ptrs[0], ptrs[1], ptrs[2], master_ptr, n, pd, gd, sd,
        grad_scale=_signed_scale(grad_scale, maximize), beta1_weight=1.0 - beta1, beta2=beta2,
        one_minus_beta2=1.0 - beta2, eps=eps, weight_decay=weight_decay,
        decay=1.0 - lr * weight_decay if decoupled_wd else 1.0, step_size=lr / bc1, bc2_sqrt=math.sqrt(bc2),
        coupled_wd=weight_decay != 0 and not decoupled, amsgrad=bool(amsgrad),
    )


def sgd(
    param: Tensor, grad: Tensor, momentum_buffer: Tensor | None, master: Tensor | None, *, lr: float,
    momentum: float, dampening: float, weight_decay: float, nesterov: bool, maximize: bool, first_step: bool,
    grad_scale: float = 1.0,
) -> None:
    """SGD (momentum, dampening, Nesterov) over one flat buffer set; see fusedopt.reference.sgd."""
    lr, momentum = _scalar("lr", lr), _scalar("momentum", momentum)
    dampening, weight_decay = _scalar("dampening", dampening), _scalar("weight_decay", weight_decay)
    ptrs, master_ptr, n, pd, gd, sd = _buffers(
        param, grad, {"momentum_buffer": momentum_buffer}, {"momentum_buffer": momentum != 0}, master
    )
    _C.sgd(
        param.data_ptr(), grad.data_ptr(), ptrs[0], master_ptr, n, pd, gd, sd,
        grad_scale=_signed_scale(grad_scale, maximize), lr=lr, weight_decay=weight_decay, momentum=momentum,
        one_minus_dampening=1.0 - dampening, nesterov=bool(nesterov), first_step=bool(first_step),
    )


def rmsprop(
    param: Tensor, grad: Tensor, square_avg: Tensor, momentum_buffer: Tensor | None, grad_avg: Tensor | None,
    master: Tensor | None, *, lr: float, alpha: float, eps: float, weight_decay: float, momentum: float,
    centered: bool, maximize: bool, grad_scale: float = 1.0,
) -> None:
    """RMSprop (centered, momentum) over one flat buffer set; see fusedopt.reference.rmsprop."""
    lr, alpha, eps = _scalar("lr", lr), _scalar("alpha", alpha), _scalar("eps", eps)
    weight_decay, momentum = _scalar("weight_decay", weight_decay), _scalar("momentum", momentum)
    states = {"square_avg": square_avg, "momentum_buffer": momentum_buffer, "grad_avg": grad_avg}
    required = {"square_avg": True, "momentum_buffer": momentum > 0, "grad_avg": bool(centered)}
    ptrs, master_ptr, n, pd, gd, sd = _buffers(param, grad, states, required, master)
    _C.rmsprop(
        param.data_ptr(), grad.data_ptr(), ptrs[0], ptrs[1], ptrs[2], master_ptr, n, pd, gd, sd,
        grad_scale=_signed_scale(grad_scale, maximize), lr=lr, alpha=alpha, one_minus_alpha=1.0 - alpha, eps=eps,
        weight_decay=weight_decay, momentum=momentum, centered=bool(centered),
    )


def adagrad(
    param: Tensor, grad: Tensor, sum: Tensor, master: Tensor | None, *, step: int, lr: float,  # noqa: A002
    lr_decay: float, eps: float, weight_decay: float, maximize: bool, grad_scale: float = 1.0,
) -> None:
    """Adagrad over one flat buffer set; see fusedopt.reference.adagrad."""
    step = _check_step(step)
    lr, lr_decay = _scalar("lr", lr), _scalar("lr_decay", lr_decay)
    eps, weight_decay = _scalar("eps", eps), _scalar("weight_decay", weight_decay)
    ptrs, master_ptr, n, pd, gd, sd = _buffers(param, grad, {"sum": sum}, {"sum": True}, master)
    _C.adagrad(
        param.data_ptr(), grad.data_ptr(), ptrs[0], master_ptr, n, pd, gd, sd,
        grad_scale=_signed_scale(grad_scale, maximize), clr=lr / (1.0 + (step - 1) * lr_decay), eps=eps,
        weight_decay=weight_decay,
    )


def lion(
    param: Tensor, grad: Tensor, exp_avg: Tensor, master: Tensor | None, *, lr: float, beta1: float,
    beta2: float, weight_decay: float, maximize: bool, grad_scale: float = 1.0,
) -> None:
    """Lion over one flat buffer set; see fusedopt.reference.lion."""
    lr, beta1, beta2 = _scalar("lr", lr), _scalar("beta1", beta1), _scalar("beta2", beta2)
    weight_decay = _scalar("weight_decay", weight_decay)
    ptrs, master_ptr, n, pd, gd, sd = _buffers(param, grad, {"exp_avg": exp_avg}, {"exp_avg": True}, master)
    _C.lion(
        param.data_ptr(), grad.data_ptr(), ptrs[0], master_ptr, n, pd, gd, sd,
        grad_scale=_signed_scale(grad_scale, maximize), lr=lr,
        decay=1.0 - lr * weight_decay if weight_decay != 0 else 1.0, beta1_weight=1.0 - beta1,
        beta2_weight=1.0 - beta2,
    )


def _check_segments(name: str, t: Any) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"Invalid {name}: expected an int64 CPU tensor, got {type(t).__name__}")
    if t.dtype != torch.int64 or t.device.type != "cpu" or t.dim() != 1 or not t.is_contiguous():
        raise ValueError(
            f"Invalid {name}: expected a contiguous 1-D int64 CPU tensor, got {t.dtype} on {t.device} "
            f"with shape {tuple(t.shape)}"
        )
    return t


def _check_lamb_arguments(max_trust_ratio: float, segment_offsets: Tensor,
                          segment_numels: Tensor) -> tuple[Tensor, Tensor]:
    """Validate LAMB's max_trust_ratio (-1.0 for None) and segment table; return the checked offsets and numels."""
    if max_trust_ratio != -1.0 and not max_trust_ratio >= 0.0:
        raise ValueError(f"Invalid max_trust_ratio: {max_trust_ratio} (expected None or >= 0)")
    offsets = _check_segments("segment_offsets", segment_offsets)
    numels = _check_segments("segment_numels", segment_numels)
    if offsets.numel() != numels.numel():
        raise ValueError(f"Invalid segment_numels: {numels.numel()} entries != {offsets.numel()} segment_offsets")
    return offsets, numels


def lamb(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, master: Tensor | None,
    segment_offsets: Tensor, segment_numels: Tensor, *, step: int, lr: float, beta1: float, beta2: float,
    eps: float, weight_decay: float, bias_correction: bool, max_trust_ratio: float | None, maximize: bool,
    grad_scale: float = 1.0, norm_reduce: Callable[[Tensor], None] | None = None,
) -> None:
    """LAMB with one trust ratio per segment (offset, numel); see fusedopt.reference.lamb.

    `norm_reduce`, when given, receives a (2, segments) float64 tensor of the per-segment sums of squares of the
    parameter and of the update direction between the two passes and must reduce it in place (a sharded
    parameter's all-reduce across ranks), so that trust ratios use the norms of whole parameters.
    """
    step = _check_step(step)
    lr, beta1, beta2 = _scalar("lr", lr), _scalar("beta1", beta1), _scalar("beta2", beta2)
    eps, weight_decay = _scalar("eps", eps), _scalar("weight_decay", weight_decay)
    mtr = -1.0 if max_trust_ratio is None else _scalar("max_trust_ratio", max_trust_ratio)
    offsets, numels = _check_lamb_arguments(mtr, segment_offsets, segment_numels)
    states = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    ptrs, master_ptr, n, pd, gd, sd = _buffers(param, grad, states, {"exp_avg": True, "exp_avg_sq": True}, master)
    bc1 = 1.0 - beta1**step if bias_correction else 1.0
    bc2 = 1.0 - beta2**step if bias_correction else 1.0
    def run(phases: int, sums: Tensor | None) -> None:
        _C.lamb(
            param.data_ptr(), grad.data_ptr(), ptrs[0], ptrs[1], master_ptr, n, pd, gd, sd,
            offsets.data_ptr() if offsets.numel() else 0, numels.data_ptr() if numels.numel() else 0,
            offsets.numel(), grad_scale=_signed_scale(grad_scale, maximize), lr=lr, beta1_weight=1.0 - beta1,
            beta2=beta2, one_minus_beta2=1.0 - beta2, bc1=bc1, bc2=bc2, eps=eps, weight_decay=weight_decay,
            max_trust_ratio=mtr, phases=phases,
            segment_w2=0 if sums is None or not sums.numel() else sums[0].data_ptr(),
            segment_u2=0 if sums is None or not sums.numel() else sums[1].data_ptr(),
        )

    if norm_reduce is None:
        run(_LAMB_MOMENTS | _LAMB_APPLY, None)
        return
    sums = torch.zeros(2, offsets.numel(), dtype=torch.float64)
    run(_LAMB_MOMENTS, sums)
    norm_reduce(sums)
    run(_LAMB_APPLY, sums)


def sum_of_squares(tensor: Tensor, *, backend: str | None = None) -> tuple[float, bool]:
    """(sum of fp32 squares as a float, whether any element is inf/nan); bitwise reproducible for any thread count."""
    del backend  # accepted for signature compatibility with fusedopt.functional
    _check_tensor("tensor", tensor, None, _PARAM_DTYPES)
    _check_device(tensor)
    total, nonfinite = _C.sum_of_squares(tensor.data_ptr() if tensor.numel() else 0, tensor.numel(),
                                         DTYPE_CODES[tensor.dtype])
    return float(total), bool(nonfinite)
