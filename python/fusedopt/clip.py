"""Gradient clipping with torch.nn.utils' signatures; the L2 norm uses fusedopt's deterministic reduction."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from . import _scaling, functional, reference
from ._backend import resolve
from ._distributed import is_dtensor, local_tensor, shard_groups
from .flat import PARAM_DTYPES

__all__ = ["clip_grad_norm_", "clip_grad_value_"]


def clip_grad_norm_(
    parameters: Tensor | Iterable[Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> Tensor:
    """Scale gradients so that their global `norm_type` norm is at most `max_norm`; return the norm.

    Same contract as torch.nn.utils.clip_grad_norm_: coefficient = max_norm / (norm + 1e-6) clamped to 1,
    applied to every gradient. The L2 norm of CPU gradients is a two-phase sum of squares whose result does
    not depend on the number of threads; on a GPU it stays on the device, so the host waits only when
    `error_if_nonfinite` asks it to look at the norm (as torch's does). Other norms use the reference
    implementation.
    DTensor gradients (FSDP2) are summed over the local shards and all-reduced across the ranks they are sharded
    over (one all-reduce per mesh and placement), so every rank gets the norm of the whole model; the result is a
    plain tensor.
    """
    params = [parameters] if isinstance(parameters, Tensor) else [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in params if p.grad is not None]
    norm_type = float(norm_type)
    if not grads:
        return torch.tensor(0.0)
    device = grads[0].device
    backend = resolve("auto", device)
    sharded = any(is_dtensor(g) for g in grads)
    if not sharded and (norm_type != 2.0 or backend == "reference" or any(g.device != device or g.is_sparse
                                                                           for g in grads)):
        return reference.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite, foreach)
    if sharded and norm_type != 2.0:
        raise ValueError(f"Invalid norm_type: {norm_type} (fusedopt clips DTensor gradients by their L2 norm only)")
    # One sum of squares per gradient, into tensors on the gradients' device (float64 on the host, float32 from the
    # CUDA kernels unless float64 gradients are among them), then the norm and the coefficient there too: on a GPU the
    # host does not wait. With float64 gradients the norm is float64, as torch's is (its stack of norms promotes).
    locals_ = [local_tensor(g) for g in grads]
    float64_grads = any(local.dtype == torch.float64 for local in locals_)
    sums = torch.zeros(len(grads), dtype=torch.float32 if device.type == "cuda" and not float64_grads
                       else torch.float64, device=device)
    flags = torch.zeros(len(grads), dtype=torch.float32, device=device)
    for k, local in enumerate(locals_):
        flat = local.detach().reshape(-1)
        functional.sum_of_squares_into(flat, None, sums[k:k + 1], flags[k:k + 1],
                                       backend=backend if flat.dtype in PARAM_DTYPES else "reference")
    norm, _ = _scaling.global_norm(sums, flags, [shard_groups(g) for g in grads], float64_grads=float64_grads)
    total_norm = norm.to(torch.float64 if float64_grads else torch.float32).reshape(())
    if error_if_nonfinite and not bool(torch.isfinite(total_norm)):
        raise _nonfinite_norm_error()
    coefficient = _scaling.clip_coefficient(float(max_norm), total_norm)
    with torch.no_grad():
        torch._foreach_mul_(locals_, coefficient)
    return total_norm


def _nonfinite_norm_error() -> RuntimeError:
    return RuntimeError(
        "The total norm of order 2.0 for gradients from `parameters` is non-finite, so it cannot be clipped. To "
        "disable this error and scale the gradients by the non-finite norm anyway, set `error_if_nonfinite=False`"
    )


def clip_grad_value_(parameters: Tensor | Iterable[Tensor], clip_value: float, foreach: bool | None = None) -> None:
    """Clamp every gradient to [-clip_value, clip_value] in place (torch.nn.utils.clip_grad_value_)."""
    reference.clip_grad_value_(parameters, clip_value, foreach=foreach)
