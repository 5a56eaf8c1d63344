"""Adadelta: torch.optim.Adadelta's signature and defaults; the math is csrc/include/fusedopt/math/adadelta.h."""
from __future__ import annotations

from typing import Any

from torch import Tensor
from typing_extensions import Unpack

from ._base import FusedOptimizer, FusedOptions
from ._spec import Group, Spec, State, check_lr, check_range


def _validate(group: Group) -> None:
    check_lr(group)
    check_range("rho value", group["rho"], 0.0, 1.0, high_open=False)
    check_range("epsilon value", group["eps"], 0.0)
    check_range("weight_decay value", group["weight_decay"], 0.0)


ADADELTA_SPEC = Spec(
    kernel="adadelta",
    states=(State("square_avg", signed=False), State("acc_delta", signed=False)),
    validate=_validate,
    hyper=lambda g: dict(rho=g["rho"], eps=g["eps"], weight_decay=g["weight_decay"], maximize=g["maximize"]),
)


class Adadelta(FusedOptimizer):
    """Adadelta (Zeiler, 2012) with torch.optim.Adadelta's arguments and defaults (its lr scales the update, its
    weight decay is added to the gradient). fusedopt's own keywords are those of `FusedOptions`. State per parameter:
    step, square_avg, acc_delta, master_param."""

    spec = ADADELTA_SPEC

    def __init__(
        self, params: Any, lr: float | Tensor = 1.0, rho: float = 0.9, eps: float = 1e-6, weight_decay: float = 0,
        foreach: bool | None = None, *, capturable: bool = False, maximize: bool = False,
        differentiable: bool = False, **options: Unpack[FusedOptions],
    ) -> None:
        super().__init__(params, dict(
            lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize, capturable=capturable,
            foreach=foreach, differentiable=differentiable), options)
