"""Adafactor: torch.optim.Adafactor's signature and defaults; the math is csrc/include/fusedopt/math/adafactor.h."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from typing_extensions import Unpack

from ._base import FusedOptimizer, FusedOptions
from ._spec import Group, Spec, State, check_tensor_lr, require, scalar


def _validate(group: Group) -> None:
    """torch.optim.Adafactor's checks, with its messages (NaN fails each of them, as in torch)."""
    lr, (eps1, eps2) = group["lr"], group["eps"]
    check_tensor_lr(group)
    require(0.0 <= scalar(lr), f"Learning rate should be >= 0 but is: {lr}")
    require(0.0 >= group["beta2_decay"], f"beta2_decay should be <= 0 but is: {group['beta2_decay']}")
    require(eps1 is None or 0.0 <= eps1, f"epsilon1 should be >= 0 but is: {eps1}")
    require(0.0 <= eps2, f"epsilon2 should be >= 0 but is: {eps2}")
    require(1.0 <= group["d"], f"Clipping threshold d should be >= 1 but is: {group['d']}")
    require(0.0 <= group["weight_decay"], f"weight_decay should be >= 0 but is: {group['weight_decay']}")


# Factored over the last two dimensions, as torch: a row factor per row and a column factor per column of each
# leading index; vectors and scalars keep the whole second moment.
def _row_shape(shape: torch.Size) -> torch.Size | None:
    return torch.Size([*shape[:-1], 1]) if len(shape) > 1 else None


def _col_shape(shape: torch.Size) -> torch.Size | None:
    return torch.Size([*shape[:-2], 1, shape[-1]]) if len(shape) > 1 else None


def _variance_shape(shape: torch.Size) -> torch.Size | None:
    return shape if len(shape) <= 1 else None


ADAFACTOR_SPEC = Spec(
    kernel="adafactor",
    no_8bit="its factored second moments already take a few bytes per row and column, not per element",
    states=(State("row_var", shape=_row_shape), State("col_var", shape=_col_shape),
            State("variance", shape=_variance_shape)),
    validate=_validate,
    hyper=lambda g: dict(beta2_decay=g["beta2_decay"], eps2=g["eps"][1], d=g["d"], weight_decay=g["weight_decay"],
                         maximize=g["maximize"]),
    # torch's eps1=None is the machine epsilon of the parameter's dtype.
    dtype_hyper=lambda g, dtype: dict(eps1=torch.finfo(dtype).eps if g["eps"][0] is None else g["eps"][0]),
)


class Adafactor(FusedOptimizer):
    """Adafactor (Shazeer and Stern, 2018) with torch.optim.Adafactor's arguments and defaults: second moments
    factored into row and column factors over the last two dimensions of each parameter (vectors keep the whole
    second moment), a relative step size max(eps2, RMS(p)) * min(lr, 1/sqrt(t)), the update clipped to RMS d and
    decoupled weight decay. fusedopt's own keywords are those of `FusedOptions`. State per parameter, as torch: step,
    row_var and col_var (two or more dimensions) or variance, and master_param."""

    spec = ADAFACTOR_SPEC

    def __init__(
        self, params: Any, lr: float | Tensor = 1e-2, beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3), d: float = 1.0, weight_decay: float = 0.0, *,
        foreach: bool | None = None, maximize: bool = False, **options: Unpack[FusedOptions],
    ) -> None:
        super().__init__(params, dict(
            lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay, foreach=foreach,
            maximize=maximize), options)
