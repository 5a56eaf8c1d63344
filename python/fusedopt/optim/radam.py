"""RAdam: torch.optim.RAdam's signature and defaults; the math is csrc/include/fusedopt/math/radam.h."""
from __future__ import annotations

from typing import Any

from torch import Tensor
from typing_extensions import Unpack

from ._base import FusedOptimizer, FusedOptions
from ._spec import Group, Spec, State, check_betas, check_lr, check_range, scalar


def _validate(group: Group) -> None:
    check_lr(group)
    check_range("epsilon value", group["eps"], 0.0)
    check_betas(group)
    check_range("weight_decay value", group["weight_decay"], 0.0)


RADAM_SPEC = Spec(
    kernel="radam",
    states=(State("exp_avg"), State("exp_avg_sq", signed=False)),
    validate=_validate,
    hyper=lambda g: dict(beta1=scalar(g["betas"][0]), beta2=scalar(g["betas"][1]), eps=g["eps"],
                         weight_decay=g["weight_decay"], decoupled=g["decoupled_weight_decay"],
                         maximize=g["maximize"]),
)


class RAdam(FusedOptimizer):
    """RAdam (Liu et al., 2020) with torch.optim.RAdam's arguments and defaults: moment estimates whose adaptive
    step is switched on, and rectified, once the variance of its estimate is tractable (rho_t > 5). fusedopt's own
    keywords are those of `FusedOptions`. State per parameter: step, exp_avg, exp_avg_sq, master_param."""

    spec = RADAM_SPEC

    def __init__(
        self, params: Any, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
        weight_decay: float = 0.0, decoupled_weight_decay: bool = False, *, foreach: bool | None = None,
        maximize: bool = False, capturable: bool = False, differentiable: bool = False,
        **options: Unpack[FusedOptions],
    ) -> None:
        super().__init__(params, dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
            foreach=foreach, maximize=maximize, capturable=capturable, differentiable=differentiable), options)
