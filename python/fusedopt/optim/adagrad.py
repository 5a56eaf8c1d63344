"""Adagrad: torch.optim.Adagrad's signature and defaults; the math is csrc/include/fusedopt/math/adagrad.h."""
from __future__ import annotations

from typing import Any

from torch import Tensor
from typing_extensions import Unpack

from ._base import FusedOptimizer, FusedOptions
from ._spec import Group, Spec, State, check_lr, check_range


def _validate(group: Group) -> None:
    check_lr(group)
    check_range("lr_decay value", group["lr_decay"], 0.0)
    check_range("weight_decay value", group["weight_decay"], 0.0)
    check_range("initial_accumulator_value value", group["initial_accumulator_value"], 0.0)
    check_range("epsilon value", group["eps"], 0.0)


ADAGRAD_SPEC = Spec(
    kernel="adagrad",
    states=(State("sum", signed=False, fill=lambda g: float(g["initial_accumulator_value"])),),
    validate=_validate,
    hyper=lambda g: dict(lr_decay=g["lr_decay"], eps=g["eps"], weight_decay=g["weight_decay"],
                         maximize=g["maximize"]),
    state_at_init=True,  # as in torch.optim: step = 0 and sum = initial_accumulator_value from construction
)


class Adagrad(FusedOptimizer):
    """Adagrad with torch.optim.Adagrad's arguments and defaults. fusedopt's own keywords are those of
    `FusedOptions`. State per parameter: step, sum, master_param (master_weights)."""

    spec = ADAGRAD_SPEC

    def __init__(
        self, params: Any, lr: float | Tensor = 1e-2, lr_decay: float = 0.0, weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0, eps: float = 1e-10, foreach: bool | None = None, *,
        maximize: bool = False, differentiable: bool = False, fused: bool | None = None,
        **options: Unpack[FusedOptions],
    ) -> None:
        super().__init__(params, dict(
            lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value, foreach=foreach, maximize=maximize,
            differentiable=differentiable, fused=fused), options)
