"""NAdam: torch.optim.NAdam's signature and defaults; the math is csrc/include/fusedopt/math/nadam.h."""
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
    check_range("momentum_decay value", group["momentum_decay"], 0.0)


NADAM_SPEC = Spec(
    kernel="nadam",
    states=(State("exp_avg"), State("exp_avg_sq", signed=False)),
    scalars=(State("mu_product", fill=lambda g: 1.0),),
    validate=_validate,
    hyper=lambda g: dict(beta1=scalar(g["betas"][0]), beta2=scalar(g["betas"][1]), eps=g["eps"],
                         weight_decay=g["weight_decay"], momentum_decay=g["momentum_decay"],
                         decoupled=g["decoupled_weight_decay"], maximize=g["maximize"]),
)


class NAdam(FusedOptimizer):
    """NAdam (Dozat, 2016) with torch.optim.NAdam's arguments and defaults: Adam whose first moment takes a Nesterov
    look-ahead, with the momentum schedule mu_t = beta1 (1 - 0.5 * 0.96^(t momentum_decay)). fusedopt's own keywords are
    those of `FusedOptions`. State per parameter: step, mu_product (a float32 0-dim tensor, as in torch), exp_avg,
    exp_avg_sq, master_param."""

    spec = NADAM_SPEC

    def __init__(
        self, params: Any, lr: float | Tensor = 2e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
        weight_decay: float = 0.0, momentum_decay: float = 4e-3, decoupled_weight_decay: bool = False, *,
        foreach: bool | None = None, maximize: bool = False, capturable: bool = False, differentiable: bool = False,
        **options: Unpack[FusedOptions],
    ) -> None:
        super().__init__(params, dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum_decay=momentum_decay,
            decoupled_weight_decay=decoupled_weight_decay, foreach=foreach, maximize=maximize, capturable=capturable,
            differentiable=differentiable), options)
