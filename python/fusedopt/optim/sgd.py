"""SGD: torch.optim.SGD's signature and defaults; the math is csrc/include/fusedopt/math/sgd.h."""
from __future__ import annotations

from typing import Any

from torch import Tensor
from typing_extensions import Unpack

from ._base import FusedOptimizer, FusedOptions
from ._spec import Group, Spec, State, check_lr, check_range


def _validate(group: Group) -> None:
    check_lr(group)
    check_range("momentum value", group["momentum"], 0.0)
    check_range("dampening value", group["dampening"], -float("inf"))
    check_range("weight_decay value", group["weight_decay"], 0.0)
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


SGD_SPEC = Spec(
    kernel="sgd",
    states=(State("momentum_buffer", when=lambda g: g["momentum"] != 0),),
    validate=_validate,
    hyper=lambda g: dict(momentum=g["momentum"], dampening=g["dampening"], weight_decay=g["weight_decay"],
                         nesterov=g["nesterov"], maximize=g["maximize"]),
    tracks_step=False,
    # torch.optim.SGD keeps no step count: a saved momentum buffer means the first momentum step is done.
    loaded_step=lambda loaded: 1.0 if loaded.get("momentum_buffer") is not None else 0.0,
)


class SGD(FusedOptimizer):
    """Stochastic gradient descent with torch.optim.SGD's arguments (lr defaults to 1e-3 as in torch).

    State per parameter: momentum_buffer (when momentum != 0), master_param (master_weights). fusedopt's own
    keywords are those of `FusedOptions`.
    """

    spec = SGD_SPEC

    def __init__(
        self, params: Any, lr: float | Tensor = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
        weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False, foreach: bool | None = None,
        differentiable: bool = False, fused: bool | None = None, **options: Unpack[FusedOptions],
    ) -> None:
        super().__init__(params, dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            maximize=maximize, foreach=foreach, differentiable=differentiable, fused=fused), options)
