"""Flat functional kernels on CUDA tensors: validate, precompute coefficients in double, launch fusedopt._C.cuda_*.

Same functions and signatures as fusedopt._compiled (CONTRACT.md "Flat functional layer"), for tensors on one CUDA
device. Every launch goes to `torch.cuda.current_stream(device)` and nothing here synchronises with the host (except
`sum_of_squares`, whose contract is to return a Python float). Beyond the CPU signatures:

* `grad_scale` may be a 1-element float32 CUDA tensor (e.g. clip coefficient x AMP 1/scale from `clip_coefficient`);
  the kernel reads it from device memory.
* `found_inf`: optional 1-element float32 CUDA tensor; when it holds a non-zero value the kernels write nothing
  (AMP skipped step, decided on the device).
* capturable: `lr` as a 1-element float32 CUDA tensor and `step` as a 1-element float32 CUDA tensor (already
  incremented, as torch.optim's capturable state) make the kernels recompute every lr/step-dependent coefficient on
  the device, so a captured CUDA graph replays correct steps.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Union

import torch
from torch import Tensor

from . import _C
from ._compiled import (
    _LAMB_APPLY,
    _LAMB_MOMENTS,
    _PARAM_DTYPES,
    DTYPE_CODES,
    _check_lamb_arguments,
    _check_tensor,
    _scalar,
)
from ._compiled import _buffers as _check_buffers

__all__ = [
    "adagrad",
    "adam",
    "clip_coefficient",
    "device_count",
    "lamb",
    "lion",
    "rmsprop",
    "sgd",
    "sum_of_squares",
    "sum_of_squares_device",
]

_CHUNK = 16384  # fusedopt::kChunk: LAMB work items never cross a multiple of it within a segment

Scalar = Union[float, int, Tensor]


def device_count() -> int:
    """CUDA devices visible to the compiled module's runtime (0 without a driver)."""
    return int(_C.cuda_device_count())


def _launch(param: Tensor) -> dict[str, int]:
    device = param.device
    return {
        "device": device.index if device.index is not None else torch.cuda.current_device(),
        "stream": torch.cuda.current_stream(device).cuda_stream,
    }


def _device_tensor(name: str, t: Tensor, device: torch.device) -> int:
    """Pointer of a 1-element float32 tensor on `device` (the kernels read it from device memory)."""
    if t.device != device:
        raise ValueError(f"Invalid {name}: device {t.device} != param device {device}")
    if t.dtype != torch.float32 or t.numel() != 1:
        raise ValueError(
            f"Invalid {name}: expected a 1-element torch.float32 tensor, got {t.dtype} with "
            f"{t.numel()} elements"
        )
    return t.data_ptr()


def _host_scalar(name: str, value: Any) -> float:
    """A hyperparameter as a Python float; CPU tensors are read on the host (never a GPU synchronisation)."""
    if isinstance(value, Tensor) and value.device.type != "cpu":
        raise ValueError(f"Invalid {name}: a {value.device} tensor is not accepted here (use a float)")
    return _scalar(name, value)


class _Device:
    """Per-call device scalars: host values of lr/step/grad_scale and the device pointers that override them."""

    def __init__(
        self,
        param: Tensor,
        *,
        grad_scale: Scalar,
        maximize: bool,
        found_inf: Tensor | None,
        lr: Scalar,
        step: Scalar | None = None,
    ) -> None:
        device = param.device
        self.keep: list[Tensor] = []  # tensors created here must outlive the (asynchronous) launch
        # grad_scale: host part carries the maximize sign; a device tensor multiplies it in the kernel.
        if isinstance(grad_scale, Tensor) and grad_scale.device.type == "cuda":
            self.grad_scale_ptr = _device_tensor("grad_scale", grad_scale, device)
            scale = 1.0
        else:
            self.grad_scale_ptr = 0
            scale = _host_scalar("grad_scale", grad_scale)
        self.grad_scale = -scale if maximize else scale
        self.found_inf_ptr = 0 if found_inf is None else _device_tensor("found_inf", found_inf, device)
        lr_on_device = isinstance(lr, Tensor) and lr.device.type == "cuda"
        step_on_device = isinstance(step, Tensor) and step.device.type == "cuda"
        if step_on_device and not lr_on_device:
            # Capturable step with a Python lr: the kernels read both from device memory.
            lr = torch.full((1,), _host_scalar("lr", lr), dtype=torch.float32, device=device)
            self.keep.append(lr)
            lr_on_device = True
        if lr_on_device:
            assert isinstance(lr, Tensor)
            self.lr_ptr = _device_tensor("lr", lr, device)
            self.lr = 0.0  # placeholder: every lr-dependent coefficient is recomputed on the device
        else:
            self.lr_ptr = 0
            self.lr = _host_scalar("lr", lr)
        if step is None:
            self.step_ptr, self.step = 0, 1
        elif step_on_device:
            assert isinstance(step, Tensor)
            self.step_ptr = _device_tensor("step", step, device)
            self.step = 1
        else:
            self.step_ptr, self.step = 0, _check_step(step)
        if self.lr_ptr and step is not None and not self.step_ptr:
            raise ValueError(
                "Invalid step: with lr on the device (capturable), step must be a 1-element float32 "
                "tensor on the same device"
            )

    def kwargs(self) -> dict[str, int]:
        return {
            "grad_scale_ptr": self.grad_scale_ptr,
            "found_inf_ptr": self.found_inf_ptr,
            "lr_ptr": self.lr_ptr,
            "step_ptr": self.step_ptr,
        }


def _check_step(step: Any) -> int:
    if isinstance(step, Tensor):
        if step.device.type != "cpu":
            raise ValueError(f"Invalid step: {step.device} tensor outside capturable mode")
        step = step.item()
    if isinstance(step, float) and step.is_integer():
        step = int(step)
    if not isinstance(step, int) or step < 1:
        raise ValueError(f"Invalid step: {step!r} (expected an int >= 1, already incremented)")
    return step


def _buffers(
    param: Tensor,
    grad: Tensor,
    states: dict[str, Tensor | None],
    required: dict[str, bool],
    master: Tensor | None,
) -> tuple[list[int], int, int, int, int, int]:
    """The CPU wrapper's validation of one flat buffer set, for CUDA tensors."""
    return _check_buffers(param, grad, states, required, master, device_type="cuda")


def adam(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    master: Tensor | None,
    *,
    step: Scalar,
    lr: Scalar,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled: bool = False,
    grad_scale: Scalar = 1.0,
    found_inf: Tensor | None = None,
) -> None:
    """Adam / AdamW (decoupled=True) over one flat buffer set on a CUDA device; see fusedopt.reference.adam."""
    beta1, beta2 = _host_scalar("beta1", beta1), _host_scalar("beta2", beta2)
    eps, weight_decay = _host_scalar("eps", eps), _host_scalar("weight_decay", weight_decay)
    states = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "max_exp_avg_sq": max_exp_avg_sq}
    required = {"exp_avg": True, "exp_avg_sq": True, "max_exp_avg_sq": bool(amsgrad)}
    ptrs, master_ptr, n, pd, gd, sd = _buffers(param, grad, states, required, master)
    d = _Device(param, grad_scale=grad_scale, maximize=maximize, found_inf=found_inf, lr=lr, step=step)
    bc1 = 1.0 - beta1**d.step
    bc2 = 1.0 - beta2**d.step
    decoupled_wd = weight_decay != 0 and decoupled
    _C.cuda_adam(
        param.data_ptr(),
        grad.data_ptr(),
        ptrs[0],
        ptrs[1],
        ptrs[2],
        master_ptr,
        n,
        pd,
        gd,
        sd,
        grad_scale=d.grad_scale,
        beta1_weight=1.0 - beta1,
        beta2=beta2,
        one_minus_beta2=1.0 - beta2,
        eps=eps,
        weight_decay=weight_decay,
        decay=1.0 - d.lr * weight_decay if decoupled_wd else 1.0,
        step_size=d.lr / bc1,
        bc2_sqrt=math.sqrt(bc2),
        coupled_wd=weight_decay != 0 and not decoupled,
        amsgrad=bool(amsgrad),
        beta1=beta1,
        decoupled=bool(decoupled),
        **d.kwargs(),
        **_launch(param),
    )


def sgd(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor | None,
    master: Tensor | None,
    *,
    lr: Scalar,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
    grad_scale: Scalar = 1.0,
    found_inf: Tensor | None = None,
) -> None:
    """SGD (momentum, dampening, Nesterov) over one flat buffer set on a CUDA device; see fusedopt.reference.sgd."""
    momentum, dampening = _host_scalar("momentum", momentum), _host_scalar("dampening", dampening)
    weight_decay = _host_scalar("weight_decay", weight_decay)
    ptrs, master_ptr, n, pd, gd, sd = _buffers(
        param, grad, {"momentum_buffer": momentum_buffer}, {"momentum_buffer": momentum != 0}, master
    )
    d = _Device(param, grad_scale=grad_scale, maximize=maximize, found_inf=found_inf, lr=lr)
    _C.cuda_sgd(
        param.data_ptr(),
        grad.data_ptr(),
        ptrs[0],
        master_ptr,
        n,
        pd,
        gd,
        sd,
        grad_scale=d.grad_scale,
        lr=d.lr,
        weight_decay=weight_decay,
        momentum=momentum,
        one_minus_dampening=1.0 - dampening,
        nesterov=bool(nesterov),
        first_step=bool(first_step),
        **d.kwargs(),
        **_launch(param),
    )


def rmsprop(
    param: Tensor,
    grad: Tensor,
    square_avg: Tensor,
    momentum_buffer: Tensor | None,
    grad_avg: Tensor | None,
    master: Tensor | None,
    *,
    lr: Scalar,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
    grad_scale: Scalar = 1.0,
    found_inf: Tensor | None = None,
) -> None:
    """RMSprop (centered, momentum) over one flat buffer set on a CUDA device; see fusedopt.reference.rmsprop."""
    alpha, eps = _host_scalar("alpha", alpha), _host_scalar("eps", eps)
    weight_decay, momentum = _host_scalar("weight_decay", weight_decay), _host_scalar("momentum", momentum)
    states = {"square_avg": square_avg, "momentum_buffer": momentum_buffer, "grad_avg": grad_avg}
    required = {"square_avg": True, "momentum_buffer": momentum > 0, "grad_avg": bool(centered)}
    ptrs, master_ptr, n, pd, gd, sd = _buffers(param, grad, states, required, master)
    d = _Device(param, grad_scale=grad_scale, maximize=maximize, found_inf=found_inf, lr=lr)
    _C.cuda_rmsprop(
        param.data_ptr(),
        grad.data_ptr(),
        ptrs[0],
        ptrs[1],
        ptrs[2],
        master_ptr,
        n,
        pd,
        gd,
        sd,
        grad_scale=d.grad_scale,
        lr=d.lr,
        alpha=alpha,
        one_minus_alpha=1.0 - alpha,
        eps=eps,
        weight_decay=weight_decay,
        momentum=momentum,
        centered=bool(centered),
        **d.kwargs(),
        **_launch(param),
    )


def adagrad(
    param: Tensor,
    grad: Tensor,
    sum: Tensor,
    master: Tensor | None,
    *,
    step: Scalar,
    lr: Scalar,
    lr_decay: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    grad_scale: Scalar = 1.0,
    found_inf: Tensor | None = None,
) -> None:
    """Adagrad over one flat buffer set on a CUDA device; see fusedopt.reference.adagrad."""
    lr_decay, eps = _host_scalar("lr_decay", lr_decay), _host_scalar("eps", eps)
    weight_decay = _host_scalar("weight_decay", weight_decay)
    ptrs, master_ptr, n, pd, gd, sd = _buffers(param, grad, {"sum": sum}, {"sum": True}, master)
    d = _Device(param, grad_scale=grad_scale, maximize=maximize, found_inf=found_inf, lr=lr, step=step)
    _C.cuda_adagrad(
        param.data_ptr(),
        grad.data_ptr(),
        ptrs[0],
        master_ptr,
        n,
        pd,
        gd,
        sd,
        grad_scale=d.grad_scale,
        clr=d.lr / (1.0 + (d.step - 1) * lr_decay),
        eps=eps,
        weight_decay=weight_decay,
        lr_decay=lr_decay,
        **d.kwargs(),
        **_launch(param),
    )


def lion(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    master: Tensor | None,
    *,
    lr: Scalar,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    grad_scale: Scalar = 1.0,
    found_inf: Tensor | None = None,
) -> None:
    """Lion over one flat buffer set on a CUDA device; see fusedopt.reference.lion."""
    beta1, beta2 = _host_scalar("beta1", beta1), _host_scalar("beta2", beta2)
    weight_decay = _host_scalar("weight_decay", weight_decay)
    ptrs, master_ptr, n, pd, gd, sd = _buffers(param, grad, {"exp_avg": exp_avg}, {"exp_avg": True}, master)
    d = _Device(param, grad_scale=grad_scale, maximize=maximize, found_inf=found_inf, lr=lr)
    _C.cuda_lion(
        param.data_ptr(),
        grad.data_ptr(),
        ptrs[0],
        master_ptr,
        n,
        pd,
        gd,
        sd,
        grad_scale=d.grad_scale,
        lr=d.lr,
        decay=1.0 - d.lr * weight_decay if weight_decay != 0 else 1.0,
        beta1_weight=1.0 - beta1,
        beta2_weight=1.0 - beta2,
        weight_decay=weight_decay,
        **d.kwargs(),
        **_launch(param),
    )


# LAMB work lists in device memory, keyed by device and segment table (the table of a flat buffer set never changes,
# so after the first step no host-to-device copy happens, which keeps later steps graph-capturable).
_LAMB_WORK: OrderedDict[tuple[Any, ...], tuple[Tensor, int, int]] = OrderedDict()
_LAMB_WORK_MAX = 64


def _lamb_work(offsets: Tensor, numels: Tensor, n: int, device: torch.device) -> tuple[Tensor, int, int]:
    """(device int64 table [item_begin | item_end | item_segment | seg_first], items, segments)."""
    key = (str(device), n, offsets.numpy().tobytes(), numels.numpy().tobytes())
    hit = _LAMB_WORK.get(key)
    if hit is not None:
        _LAMB_WORK.move_to_end(key)
        return hit
    count = offsets.numel()
    if count:
        ends = offsets + numels
        if bool((offsets < 0).any()) or bool((numels < 0).any()) or bool((ends > n).any()):
            raise ValueError(f"Invalid segments: every (offset, numel) must lie within [0, {n})")
        if count > 1 and bool((offsets[1:] < ends[:-1]).any()):
            raise ValueError(
                "Invalid segment_offsets: segments must be sorted by offset and must not overlap"
            )
    per = (numels + _CHUNK - 1) // _CHUNK
    seg_first = torch.zeros(count + 1, dtype=torch.int64)
    seg_first[1:] = torch.cumsum(per, 0)
    items = int(seg_first[-1])
    item_segment = torch.repeat_interleave(torch.arange(count, dtype=torch.int64), per)
    local = torch.arange(items, dtype=torch.int64) - seg_first[:-1][item_segment]
    item_begin = offsets[item_segment] + local * _CHUNK
    item_end = torch.minimum(item_begin + _CHUNK, (offsets + numels)[item_segment])
    host = torch.cat([item_begin, item_end, item_segment, seg_first])
    if torch.cuda.is_available():
        host = host.pin_memory()  # pinned + non_blocking: an asynchronous copy, no host synchronisation
    table = host.to(device, non_blocking=True)
    entry = (table, items, count)
    _LAMB_WORK[key] = entry
    while len(_LAMB_WORK) > _LAMB_WORK_MAX:
        _LAMB_WORK.popitem(last=False)
    return entry


def lamb(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    master: Tensor | None,
    segment_offsets: Tensor,
    segment_numels: Tensor,
    *,
    step: Scalar,
    lr: Scalar,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    max_trust_ratio: float | None,
    maximize: bool,
    grad_scale: Scalar = 1.0,
    found_inf: Tensor | None = None,
    norm_reduce: Any = None,
) -> None:
    """LAMB with one trust ratio per segment (offset, numel) on a CUDA device; see fusedopt.reference.lamb.

    `norm_reduce`, as on the CPU, receives the (2, segments) float64 per-segment sums of squares of the parameter and
    of the update direction between the two passes, here a CUDA tensor, and reduces it in place (an all-reduce
    across the ranks a sharded parameter lives on).
    """
    beta1, beta2 = _host_scalar("beta1", beta1), _host_scalar("beta2", beta2)
    eps, weight_decay = _host_scalar("eps", eps), _host_scalar("weight_decay", weight_decay)
    mtr = -1.0 if max_trust_ratio is None else _host_scalar("max_trust_ratio", max_trust_ratio)
    offsets, numels = _check_lamb_arguments(mtr, segment_offsets, segment_numels)
    states = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    ptrs, master_ptr, n, pd, gd, sd = _buffers(
        param, grad, states, {"exp_avg": True, "exp_avg_sq": True}, master
    )
    d = _Device(param, grad_scale=grad_scale, maximize=maximize, found_inf=found_inf, lr=lr, step=step)
    table, items, segments = _lamb_work(offsets, numels, n, param.device)
    if items == 0:
        return
    # Scratch: per-item partial sums (double), per-segment sums (double, the (2, segments) tensor norm_reduce gets),
    # then per-segment scaled learning rates (float): one allocation.
    scratch = torch.empty(2 * items + 2 * segments + (segments + 1) // 2, dtype=torch.float64, device=param.device)
    segment_sums = scratch[2 * items:2 * items + 2 * segments].view(2, segments)
    base, word = table.data_ptr(), 8
    bc1 = 1.0 - beta1**d.step if bias_correction else 1.0
    bc2 = 1.0 - beta2**d.step if bias_correction else 1.0

    def run(phases: int) -> None:
        _C.cuda_lamb(
            param.data_ptr(),
            grad.data_ptr(),
            ptrs[0],
            ptrs[1],
            master_ptr,
            n,
            pd,
            gd,
            sd,
            item_begin=base,
            item_end=base + items * word,
            item_segment=base + 2 * items * word,
            seg_first=base + 3 * items * word,
            items=items,
            segments=segments,
            partial_w=scratch.data_ptr(),
            partial_u=scratch.data_ptr() + items * word,
            scaled_lr=scratch.data_ptr() + (2 * items + 2 * segments) * word,
            grad_scale=d.grad_scale,
            lr=d.lr,
            beta1_weight=1.0 - beta1,
            beta2=beta2,
            one_minus_beta2=1.0 - beta2,
            bc1=bc1,
            bc2=bc2,
            eps=eps,
            weight_decay=weight_decay,
            max_trust_ratio=mtr,
            beta1=beta1,
            bias_correction=bool(bias_correction),
            segment_w2=segment_sums[0].data_ptr(),
            segment_u2=segment_sums[1].data_ptr(),
            phases=phases,
            **d.kwargs(),
            **_launch(param),
        )

    if norm_reduce is None:
        run(_LAMB_MOMENTS | _LAMB_APPLY)
        return
    run(_LAMB_MOMENTS)
    norm_reduce(segment_sums)
    run(_LAMB_APPLY)


def _check_1d_cuda(name: str, tensor: Tensor) -> None:
    _check_tensor(name, tensor, None, _PARAM_DTYPES)
    if tensor.device.type != "cuda":
        raise ValueError(f"Invalid {name} device: {tensor.device} (the CUDA kernels need a cuda tensor)")


def sum_of_squares_device(
    tensor: Tensor,
    *,
    out_sum: Tensor | None = None,
    out_nonfinite: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(sum of fp32 squares, non-finite flag) as 0-dim float32 CUDA tensors, without synchronising.

    The flag holds 1.0 when an element is inf/nan, else 0.0, so it can be passed as `found_inf`. `out_sum` /
    `out_nonfinite` (1-element float32 tensors on the same device, e.g. views into a (k,) tensor for k buffers) let
    the caller gather several sums for `clip_coefficient` without a stack.
    """
    _check_1d_cuda("tensor", tensor)
    device = tensor.device
    if out_sum is None:
        out_sum = torch.empty((), dtype=torch.float32, device=device)
    if out_nonfinite is None:
        out_nonfinite = torch.empty((), dtype=torch.float32, device=device)
    sum_ptr = _device_tensor("out_sum", out_sum, device)
    flag_ptr = _device_tensor("out_nonfinite", out_nonfinite, device)
    n = tensor.numel()
    scratch = torch.empty(_C.cuda_sum_of_squares_scratch(n), dtype=torch.float64, device=device)
    _C.cuda_sum_of_squares(
        tensor.data_ptr() if n else 0,
        n,
        DTYPE_CODES[tensor.dtype],
        scratch.data_ptr(),
        out_sum=sum_ptr,
        out_nonfinite=flag_ptr,
        **_launch(tensor),
    )
    return out_sum, out_nonfinite


def sum_of_squares(tensor: Tensor, *, backend: str | None = None) -> tuple[float, bool]:
    """(sum of fp32 squares as a float, whether any element is inf/nan); deterministic.

    Synchronises, since it returns host floats; sum_of_squares_device keeps the result on the GPU.
    """
    del backend
    _check_1d_cuda("tensor", tensor)
    device = tensor.device
    n = tensor.numel()
    out = torch.empty(2, dtype=torch.float64, device=device)  # [sum, flag]
    flag = torch.empty((), dtype=torch.float32, device=device)
    scratch = torch.empty(_C.cuda_sum_of_squares_scratch(n), dtype=torch.float64, device=device)
    _C.cuda_sum_of_squares(
        tensor.data_ptr() if n else 0,
        n,
        DTYPE_CODES[tensor.dtype],
        scratch.data_ptr(),
        out_sum64=out.data_ptr(),
        out_nonfinite=flag.data_ptr(),
        **_launch(tensor),
    )
    out[1] = flag
    total, nonfinite = out.tolist()
    return float(total), bool(nonfinite != 0.0)


def clip_coefficient(
    sums: Tensor,
    flags: Tensor | None,
    max_norm: float,
    *,
    inv_scale: Scalar = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """(coef, norm, found_inf) as 0-dim float32 CUDA tensors, computed on the device from fp32 sums of squares.

    norm = sqrt(sum(sums)) * inv_scale (the norm of the unscaled gradient under AMP);
    coef = min(max_norm / (norm + 1e-6), 1) * inv_scale, ready to pass as `grad_scale` to the update kernels;
    found_inf = 1.0 when a flag is set or the norm is not finite. `inv_scale` may be a 1-element CUDA tensor.
    """
    if (
        not isinstance(sums, Tensor)
        or sums.device.type != "cuda"
        or sums.dtype != torch.float32
        or not sums.is_contiguous()
    ):
        raise ValueError("Invalid sums: expected a contiguous float32 CUDA tensor")
    device = sums.device
    flags_ptr = 0
    if flags is not None:
        if (
            flags.device != device
            or flags.dtype != torch.float32
            or flags.numel() != sums.numel()
            or not flags.is_contiguous()
        ):
            raise ValueError("Invalid flags: expected a contiguous float32 tensor like sums")
        flags_ptr = flags.data_ptr()
    max_norm = _host_scalar("max_norm", max_norm)
    if math.isnan(max_norm):
        raise ValueError(f"Invalid max_norm: {max_norm}")
    if isinstance(inv_scale, Tensor) and inv_scale.device.type == "cuda":
        inv_ptr, inv_host = _device_tensor("inv_scale", inv_scale, device), 1.0
    else:
        inv_ptr, inv_host = 0, _host_scalar("inv_scale", inv_scale)
    out = torch.empty(3, dtype=torch.float32, device=device)
    base = out.data_ptr()
    _C.cuda_clip_coefficient(
        sums.data_ptr(),
        flags_ptr,
        sums.numel(),
        max_norm,
        base,
        inv_scale_ptr=inv_ptr,
        inv_scale=inv_host,
        out_norm=base + 4,
        out_found_inf=base + 8,
        **_launch(sums),
    )
    return out[0], out[1], out[2]
