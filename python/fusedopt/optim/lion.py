"""Lion (Chen et al. 2023): no torch.optim counterpart; the math is csrc/include/fusedopt/math/lion.h."""
from __future__ import annotations

from typing import Any

from torch import Tensor
from typing_extensions import Unpack

from ._base import FusedOptimizer, FusedOptions
from ._spec import Group, Spec, State, check_betas, check_lr, check_range, scalar


def _validate(group: Group) -> None:
    check_lr(group)
    check_betas(group)
    check_range("weight_decay value", group["weight_decay"], 0.0)


LION_SPEC = Spec(
    kernel="lion",
    states=(State("exp_avg"),),
    validate=_validate,
    hyper=lambda g: dict(beta1=scalar(g["betas"][0]), beta2=scalar(g["betas"][1]), weight_decay=g["weight_decay"],
                         maximize=g["maximize"]),
)


class Lion(FusedOptimizer):
    """Lion: p <- p*(1 - lr*wd) - lr*sign(beta1*m + (1-beta1)*g); m <- beta2*m + (1-beta2)*g.

    State layout (documented, round-trips exactly): step, exp_avg, and master_param with master_weights. Use a
    learning rate 3-10x smaller than AdamW's and a larger weight decay. fusedopt's own keywords are those of
    `FusedOptions`.
    """

    spec = LION_SPEC

    def __init__(
        self, params: Any, lr: float | Tensor = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0, *, maximize: bool = False, **options: Unpack[FusedOptions],
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize), options)
