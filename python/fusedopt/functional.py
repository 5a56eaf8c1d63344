"""Flat-buffer functional API: one call updates a whole flat parameter buffer on the chosen backend.

Every function updates 1-D contiguous tensors of equal length in place. `backend="reference"` applies the
per-tensor formulas of `fusedopt.reference` to the flat tensor; "cpu" and "cuda" call the compiled kernels.
With `master` (fp32 master weights), the update reads and writes `master` and stores its rounded value in
`param`.

Device scalars, for a step that never waits for the GPU: `step` and `grad_scale` may be 1-element float32
tensors and `found_inf` a 1-element float32 tensor whose non-zero value means "write nothing". The CUDA kernels
read them from device memory (`step` is then the count already incremented, and every lr/step-dependent
coefficient is computed on the device); the reference and CPU backends read them on the host.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

import torch
from torch import Tensor

from . import reference
from ._backend import compiled

__all__ = ["adam", "sgd", "rmsprop", "adagrad", "lion", "lamb", "sum_of_squares", "sum_of_squares_into"]

Scalar = Union[float, Tensor]


def _kernels(backend: str) -> Any:
    """The module that implements the flat functions for `backend` on the compiled core."""
    module = compiled()
    if module is None:
        raise RuntimeError("fusedopt: the compiled extension is not available; use backend='reference'")
    if backend == "cuda":
        from . import _compiled_cuda

        return _compiled_cuda
    return module


def _skip_on_host(kwargs: dict[str, Any], found_inf: Tensor | None) -> bool:
    """For the reference and CPU backends: replace tensor `step`/`grad_scale` in `kwargs` by Python numbers, and
    say whether `found_inf` asks to skip the update."""
    for key, kind in (("step", int), ("grad_scale", float)):
        value = kwargs.get(key)
        if isinstance(value, Tensor):
            kwargs[key] = kind(value.item())
    return found_inf is not None and bool(found_inf.item() != 0)


def _reference(update: Callable[..., None], param: Tensor, master: Tensor | None, *args: Any, **kwargs: Any) -> None:
    target = param if master is None else master
    update(target, *args, **kwargs)
    if master is not None:
        param.copy_(master)


def adam(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, max_exp_avg_sq: Tensor | None,
    master: Tensor | None, *, step: int | Tensor, lr: Scalar, beta1: float, beta2: float, eps: float,
    weight_decay: float, amsgrad: bool, maximize: bool, decoupled: bool, grad_scale: Scalar = 1.0,
    found_inf: Tensor | None = None, backend: str,
) -> None:
    """Adam (L2 weight decay) or AdamW (`decoupled=True`) over a flat buffer; see `reference.adam`."""
    kwargs = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                  amsgrad=amsgrad, maximize=maximize, decoupled=decoupled, grad_scale=grad_scale)
    if backend == "cuda":
        _kernels(backend).adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master, found_inf=found_inf,
                               **kwargs)
    elif _skip_on_host(kwargs, found_inf):
        return
    elif backend == "reference":
        _reference(reference.adam, param, master, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, **kwargs)
    else:
        _kernels(backend).adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master, **kwargs)


def sgd(
    param: Tensor, grad: Tensor, momentum_buffer: Tensor | None, master: Tensor | None, *, lr: Scalar,
    momentum: float, dampening: float, weight_decay: float, nesterov: bool, maximize: bool, first_step: bool,
    grad_scale: Scalar = 1.0, found_inf: Tensor | None = None, backend: str,
) -> None:
    """SGD with optional momentum, dampening and Nesterov over a flat buffer; see `reference.sgd`."""
    kwargs = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                  maximize=maximize, first_step=first_step, grad_scale=grad_scale)
    if backend == "cuda":
        _kernels(backend).sgd(param, grad, momentum_buffer, master, found_inf=found_inf, **kwargs)
    elif _skip_on_host(kwargs, found_inf):
        return
    elif backend == "reference":
        _reference(reference.sgd, param, master, grad, momentum_buffer, **kwargs)
    else:
        _kernels(backend).sgd(param, grad, momentum_buffer, master, **kwargs)


def rmsprop(
    param: Tensor, grad: Tensor, square_avg: Tensor, momentum_buffer: Tensor | None, grad_avg: Tensor | None,
    master: Tensor | None, *, lr: Scalar, alpha: float, eps: float, weight_decay: float, momentum: float,
    centered: bool, maximize: bool, grad_scale: Scalar = 1.0, found_inf: Tensor | None = None, backend: str,
) -> None:
    """RMSprop (optionally centered, with momentum) over a flat buffer; see `reference.rmsprop`."""
    kwargs = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum, centered=centered,
                  maximize=maximize, grad_scale=grad_scale)
    if backend == "cuda":
        _kernels(backend).rmsprop(param, grad, square_avg, momentum_buffer, grad_avg, master, found_inf=found_inf,
                                  **kwargs)
    elif _skip_on_host(kwargs, found_inf):
        return
    elif backend == "reference":
        _reference(reference.rmsprop, param, master, grad, square_avg, momentum_buffer, grad_avg, **kwargs)
    else:
        _kernels(backend).rmsprop(param, grad, square_avg, momentum_buffer, grad_avg, master, **kwargs)


def adagrad(
    param: Tensor, grad: Tensor, sum: Tensor, master: Tensor | None, *, step: int | Tensor, lr: Scalar,
    lr_decay: float, eps: float, weight_decay: float, maximize: bool, grad_scale: Scalar = 1.0,
    found_inf: Tensor | None = None, backend: str,
) -> None:
    """Adagrad over a flat buffer; see `reference.adagrad`."""
    kwargs = dict(step=step, lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay, maximize=maximize,
                  grad_scale=grad_scale)
    if backend == "cuda":
        _kernels(backend).adagrad(param, grad, sum, master, found_inf=found_inf, **kwargs)
    elif _skip_on_host(kwargs, found_inf):
        return
    elif backend == "reference":
        _reference(reference.adagrad, param, master, grad, sum, **kwargs)
    else:
        _kernels(backend).adagrad(param, grad, sum, master, **kwargs)


def lion(
    param: Tensor, grad: Tensor, exp_avg: Tensor, master: Tensor | None, *, lr: Scalar, beta1: float, beta2: float,
    weight_decay: float, maximize: bool, grad_scale: Scalar = 1.0, found_inf: Tensor | None = None, backend: str,
) -> None:
    """Lion (sign update, decoupled weight decay) over a flat buffer; see `reference.lion`."""
    kwargs = dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, maximize=maximize,
                  grad_scale=grad_scale)
    if backend == "cuda":
        _kernels(backend).lion(param, grad, exp_avg, master, found_inf=found_inf, **kwargs)
    elif _skip_on_host(kwargs, found_inf):
        return
    elif backend == "reference":
        _reference(reference.lion, param, master, grad, exp_avg, **kwargs)
    else:
        _kernels(backend).lion(param, grad, exp_avg, master, **kwargs)


def lamb(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, master: Tensor | None,
    segment_offsets: Tensor, segment_numels: Tensor, *, step: int | Tensor, lr: Scalar, beta1: float, beta2: float,
    eps: float, weight_decay: float, bias_correction: bool, max_trust_ratio: float | None, maximize: bool,
    grad_scale: Scalar = 1.0, found_inf: Tensor | None = None, backend: str,
    norm_reduce: Callable[[Tensor], None] | None = None,
) -> None:
    """LAMB over a flat buffer; each segment (one parameter) gets its own trust ratio. See `reference.lamb`.

    `norm_reduce` (for sharded parameters) reduces in place the (2, segments) float64 sums of squares of the
    parameter and of the update between the two passes, so that trust ratios use the norms of whole parameters.
    """
    kwargs = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                  bias_correction=bias_correction, max_trust_ratio=max_trust_ratio, maximize=maximize,
                  grad_scale=grad_scale)
    if norm_reduce is not None and backend != "reference":
        kwargs["norm_reduce"] = norm_reduce
    if backend == "cuda":
        _kernels(backend).lamb(param, grad, exp_avg, exp_avg_sq, master, segment_offsets, segment_numels,
                               found_inf=found_inf, **kwargs)
        return
    if _skip_on_host(kwargs, found_inf):
        return
    if backend != "reference":
        _kernels(backend).lamb(param, grad, exp_avg, exp_avg_sq, master, segment_offsets, segment_numels, **kwargs)
        return
    target = param if master is None else master
    regions = [slice(o, o + n) for o, n in zip(segment_offsets.tolist(), segment_numels.tolist())]
    if norm_reduce is None:
        for region in regions:
            reference.lamb(target[region], grad[region], exp_avg[region], exp_avg_sq[region], **kwargs)
    else:
        apply_kwargs = {"lr": kwargs.pop("lr"), "max_trust_ratio": kwargs.pop("max_trust_ratio")}
        sums = torch.zeros(2, len(regions), dtype=torch.float64)
        directions = []
        for k, region in enumerate(regions):
            u, sums[0, k], sums[1, k] = reference.lamb_moments(target[region], grad[region], exp_avg[region],
                                                               exp_avg_sq[region], **kwargs)
            directions.append(u)
        norm_reduce(sums)
        for k, region in enumerate(regions):
            reference.lamb_apply(target[region], directions[k], float(sums[0, k]), float(sums[1, k]), **apply_kwargs)
    if master is not None:
        param.copy_(master)


def sum_of_squares(tensor: Tensor, *, backend: str) -> tuple[float, bool]:
    """Sum of squares of a 1-D tensor (fp32 products) and whether any element is inf or nan."""
    if backend != "reference":
        return _kernels(backend).sum_of_squares(tensor)
    values = tensor.detach().float()
    return float(values.square().sum(dtype=torch.float64)), not bool(torch.isfinite(values).all())


def sum_of_squares_into(tensor: Tensor, out_sum: Tensor, out_nonfinite: Tensor, *, backend: str) -> None:
    """`sum_of_squares` written into 1-element float32 tensors on the tensor's device (1.0 in `out_nonfinite`
    when an element is inf or nan); on CUDA without waiting for the GPU."""
    if backend == "cuda":
        _kernels(backend).sum_of_squares_device(tensor, out_sum=out_sum, out_nonfinite=out_nonfinite)
        return
    total, nonfinite = sum_of_squares(tensor, backend=backend)
    out_sum.fill_(total)
    out_nonfinite.fill_(float(nonfinite))
