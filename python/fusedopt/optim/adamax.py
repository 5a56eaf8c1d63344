"""Adamax: torch.optim.Adamax's signature and defaults; the math is csrc/include/fusedopt/math/adamax.h."""
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


ADAMAX_SPEC = Spec(
    kernel="adamax",
    states=(State("exp_avg"), State("exp_inf", signed=False)),
    validate=_validate,
    hyper=lambda g: dict(beta1=scalar(g["betas"][0]), beta2=scalar(g["betas"][1]), eps=g["eps"],
                         weight_decay=g["weight_decay"], maximize=g["maximize"]),
)


class Adamax(FusedOptimizer):
    """Adamax (Kingma & Ba, 2015, Algorithm 2) with torch.optim.Adamax's arguments and defaults. fusedopt's own
    keywords are those of `FusedOptions`. State per parameter: step, exp_avg, exp_inf, master_param."""

    spec = ADAMAX_SPEC

    def __init__(
        self, params: Any, lr: float | Tensor = 2e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
        weight_decay: float = 0.0, foreach: bool | None = None, *, maximize: bool = False,
        differentiable: bool = False, capturable: bool = False, **options: Unpack[FusedOptions],
    ) -> None:
        super().__init__(params, dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach, maximize=maximize,
            differentiable=differentiable, capturable=capturable), options)
