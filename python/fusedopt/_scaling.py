"""The gradient-scaling policy, written once on tensors: the global L2 norm of a step's gradients (per-buffer sums of
squares, all-reduced over the shards' process groups on the buffers' own device), the clip coefficient, AMP's
unscale and the skip flags of GradScaler and `skip_nonfinite`. Used by the host-decided step, the device-decided step
and `fusedopt.clip_grad_norm_`; a host decision is the same tensors read with `.item()`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import torch
from torch import Tensor

from ._distributed import all_reduce_sum

Scale = Union[float, Tensor]
_FLOAT32_MAX = torch.finfo(torch.float32).max


def global_norm(sums: Tensor, flags: Tensor, reduce_groups: Sequence[Sequence[Any]], unscale: Scale = 1.0, *,
                float64_grads: bool = False) -> tuple[Tensor, Tensor]:
    """The global norm (1-element float64) and non-finite flag (1-element float32, 1.0 when any element is inf/nan)
    from per-buffer sums of squares (float32 or float64) and flags. Buffer k is sharded over `reduce_groups[k]` (empty
    when not): its sum and flag are all-reduced over those groups, one all-reduce per distinct set of groups, on the
    sums' device. `float64_grads`: some gradients are float64, so the norm is a float64 one, as torch's is then.
    Every rank must call this with the same sharded buffers, gradients or not."""
    sums64 = sums.to(torch.float64)
    plain = [k for k, groups in enumerate(reduce_groups) if not groups]
    total = _pick(sums64, plain).sum() if plain else sums64.new_zeros(())
    flag = _pick(flags, plain).amax() if plain else flags.new_zeros(())
    by_groups: dict[tuple[int, ...], list[int]] = {}
    for k, groups in enumerate(reduce_groups):
        if groups:
            by_groups.setdefault(tuple(id(g) for g in groups), []).append(k)
    for members in by_groups.values():
        pair = torch.stack([_pick(sums64, members).sum(), _pick(flags, members).to(torch.float64).sum()])
        all_reduce_sum(pair, reduce_groups[members[0]])
        total = total + pair[0]
        flag = torch.maximum(flag, (pair[1] > 0).to(flags.dtype))
    # torch's float32 norm overflows to inf when the sum of squares leaves the float32 range (gradients of 1e18, say),
    # and clipping by it zeroes the gradients: the same here, though the sum itself is exact in float64. With float64
    # gradients among them torch's norm is float64 (its stack of per-tensor norms promotes), which does not overflow.
    if not float64_grads:
        total = torch.where(total > _FLOAT32_MAX, torch.full_like(total, float("inf")), total)
    return (total.sqrt() * unscale).reshape(1), flag.reshape(1)


def _pick(values: Tensor, indices: list[int]) -> Tensor:
    """values[indices] without an index tensor: indexing with a list copies it to the GPU, which synchronises with
    the host and cannot be captured in a CUDA graph."""
    if indices == list(range(values.numel())):
        return values
    return torch.stack([values[k] for k in indices])


def clip_coefficient(max_norm: float | None, norm: Tensor) -> Tensor | float:
    """torch.nn.utils.clip_grad_norm_'s factor max_norm / (norm + 1e-6), clamped to 1 (nan spreads, as in torch's
    clamp); 1.0 when there is no max_norm."""
    if max_norm is None:
        return 1.0
    return torch.clamp(float(max_norm) / (norm + 1e-6), max=1.0)


def unscale_of(grad_scale: Scale | None, device: torch.device) -> Scale:
    """AMP's 1/scale: a float64 tensor on `device` for a tensor scale, else a float."""
    if grad_scale is None:
        return 1.0
    if isinstance(grad_scale, Tensor):
        return grad_scale.to(device=device, dtype=torch.float64).reshape(1).reciprocal()
    return 1.0 / float(grad_scale)


def amp_skip(found_inf: Tensor | None, device: torch.device) -> Tensor | None:
    """GradScaler's found_inf (which may sum several devices' flags) as a 1-element float32 flag on `device`."""
    if found_inf is None:
        return None
    return (found_inf.to(device).reshape(1) != 0).to(torch.float32)


def kernel_scale(value: Scale, param_dtype: torch.dtype = torch.float32) -> Scale:
    """A gradient multiplier as the kernels of `param_dtype` parameters take it: a float, or a 1-element tensor of
    their compute dtype (float64 for float64 parameters, else float32)."""
    if not isinstance(value, Tensor):
        return value
    return value.to(torch.float64 if param_dtype == torch.float64 else torch.float32).reshape(1)
