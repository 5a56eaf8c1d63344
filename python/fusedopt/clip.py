"""Gradient clipping with torch.nn.utils' signatures; the L2 norm uses fusedopt's deterministic reduction."""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from . import functional, reference
from ._backend import resolve
from .flat import PARAM_DTYPES, all_reduce_sum, is_dtensor, local_tensor, shard_groups

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
    if not sharded:
        return _clip_l2(grads, float(max_norm), error_if_nonfinite, backend)
    total = 0.0
    by_sharding: dict[tuple[object, ...], tuple[list[object], list[float]]] = {}
    for g in grads:
        local = local_tensor(g).detach().reshape(-1)
        partial, _ = functional.sum_of_squares(local, backend=backend if local.dtype in PARAM_DTYPES else "reference")
        if is_dtensor(g):
            entry = by_sharding.setdefault((g.device_mesh, tuple(g.placements)), (shard_groups(g), [0.0]))
            entry[1][0] += partial
        else:
            total += partial
    for groups, (partial,) in by_sharding.values():
        sums = torch.tensor([partial], dtype=torch.float64)
        all_reduce_sum(sums, groups)
        total += float(sums[0])
    norm = math.sqrt(total)
    total_norm = torch.tensor(norm, dtype=torch.float32, device=device)
    if error_if_nonfinite and not math.isfinite(norm):
        raise _nonfinite_norm_error()
    coefficient = torch.clamp(float(max_norm) / (total_norm + 1e-6), max=1.0)
    with torch.no_grad():
        torch._foreach_mul_([local_tensor(g) for g in grads], coefficient)
    return total_norm


def _clip_l2(grads: list[Tensor], max_norm: float, error_if_nonfinite: bool, backend: str) -> Tensor:
    """The L2 clip of gradients on one device: each gradient's sum of squares lands in a tensor on that device, and
    the norm and the coefficient are computed there too (on a GPU the host does not wait)."""
    device = grads[0].device
    sums = torch.zeros(len(grads), dtype=torch.float32, device=device)
    flags = torch.zeros(len(grads), dtype=torch.float32, device=device)
    for k, g in enumerate(grads):
        flat = g.detach().reshape(-1)
        functional.sum_of_squares_into(flat, sums[k:k + 1], flags[k:k + 1],
                                       backend=backend if flat.dtype in PARAM_DTYPES else "reference")
    total_norm = sums.to(torch.float64).sum().sqrt().to(torch.float32)
    if error_if_nonfinite and not bool(torch.isfinite(total_norm)):
        raise _nonfinite_norm_error()
    coefficient = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    with torch.no_grad():
        torch._foreach_mul_(grads, coefficient)
    return total_norm


def _nonfinite_norm_error() -> RuntimeError:
    return RuntimeError(
        "The total norm of order 2.0 for gradients from `parameters` is non-finite, so it cannot be clipped. To "
        "disable this error and scale the gradients by the non-finite norm anyway, set `error_if_nonfinite=False`"
    )



def clip_grad_value_(parameters: Tensor | Iterable[Tensor], clip_value: float, foreach: bool | None = None) -> None:
    """Clamp every gradient to [-clip_value, clip_value] in place (torch.nn.utils.clip_grad_value_)."""
    reference.clip_grad_value_(parameters, clip_value, foreach=foreach)
