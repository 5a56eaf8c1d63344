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
    not depend on the number of threads; other norms and devices use the reference implementation.
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
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot "
            "be clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`"
        )
    coefficient = torch.clamp(float(max_norm) / (total_norm + 1e-6), max=1.0)
    with torch.no_grad():
        torch._foreach_mul_([local_tensor(g) for g in grads], coefficient)
    return total_norm



def clip_grad_value_(parameters: Tensor | Iterable[Tensor], clip_value: float, foreach: bool | None = None) -> None:
    """Clamp every gradient to [-clip_value, clip_value] in place (torch.nn.utils.clip_grad_value_)."""
    reference.clip_grad_value_(parameters, clip_value, foreach=foreach)
