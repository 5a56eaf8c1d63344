"""RMSprop: torch.optim.RMSprop's signature and defaults; the math is csrc/include/fusedopt/math/rmsprop.h."""
from __future__ import annotations

from typing import Any

from torch import Tensor
from typing_extensions import Unpack

from ._base import FusedOptimizer, FusedOptions
from ._spec import Group, Spec, State, check_lr, check_range


def _validate(group: Group) -> None:
    check_lr(group)
    check_range("epsilon value", group["eps"], 0.0)
    check_range("momentum value", group["momentum"], 0.0)
    check_range("weight_decay value", group["weight_decay"], 0.0)
    check_range("alpha value", group["alpha"], 0.0)


RMSPROP_SPEC = Spec(
    kernel="rmsprop",
    states=(State("square_avg", signed=False), State("momentum_buffer", when=lambda g: g["momentum"] > 0),
            State("grad_avg", when=lambda g: bool(g["centered"]))),
    validate=_validate,
    hyper=lambda g: dict(alpha=g["alpha"], eps=g["eps"], weight_decay=g["weight_decay"], momentum=g["momentum"],
                         centered=g["centered"], maximize=g["maximize"]),
)


class RMSprop(FusedOptimizer):
    """RMSprop with torch.optim.RMSprop's arguments and defaults.

    State per parameter: step, square_avg, momentum_buffer (momentum > 0), grad_avg (centered), master_param.
    fusedopt's own keywords are those of `FusedOptions`.
    """

    spec = RMSPROP_SPEC

    def __init__(
        self, params: Any, lr: float | Tensor = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
        weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False, capturable: bool = False,
        foreach: bool | None = None, maximize: bool = False, differentiable: bool = False,
        **options: Unpack[FusedOptions],
    ) -> None:
        super().__init__(params, dict(
            lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum, centered=centered,
            capturable=capturable, foreach=foreach, maximize=maximize, differentiable=differentiable), options)
