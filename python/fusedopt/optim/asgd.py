"""ASGD: torch.optim.ASGD's signature and defaults; the math is csrc/include/fusedopt/math/asgd.h."""
from __future__ import annotations

from typing import Any

from torch import Tensor
from typing_extensions import Unpack

from ._base import FusedOptimizer, FusedOptions
from ._spec import Group, Spec, State, check_lr, check_range, scalar


def _validate(group: Group) -> None:
    check_lr(group)
    check_range("weight_decay value", group["weight_decay"], 0.0)


ASGD_SPEC = Spec(
    kernel="asgd",
    no_8bit="its state ax is the averaged model, which 8 bits per weight would damage",
    states=(State("ax"),),
    # eta starts at the group's lr when the parameter's state is created, mu at 1 (no averaging before t0).
    scalars=(State("eta", fill=lambda g: scalar(g["lr"])), State("mu", fill=lambda g: 1.0)),
    validate=_validate,
    hyper=lambda g: dict(lambd=g["lambd"], alpha=g["alpha"], t0=g["t0"], weight_decay=g["weight_decay"],
                         maximize=g["maximize"]),
)


class ASGD(FusedOptimizer):
    """Averaged SGD (Polyak & Juditsky, 1992) with torch.optim.ASGD's arguments and defaults: SGD with the decaying
    step size eta_t = lr / (1 + lambd lr t)^alpha, keeping in `ax` the running average of the parameters from step t0
    on. fusedopt's own keywords are those of `FusedOptions`. State per parameter: step, eta, mu (float32 0-dim tensors,
    as in torch), ax, master_param."""

    spec = ASGD_SPEC

    def __init__(
        self, params: Any, lr: float | Tensor = 1e-2, lambd: float = 1e-4, alpha: float = 0.75, t0: float = 1e6,
        weight_decay: float = 0.0, foreach: bool | None = None, maximize: bool = False,
        differentiable: bool = False, capturable: bool = False, **options: Unpack[FusedOptions],
    ) -> None:
        super().__init__(params, dict(
            lr=lr, lambd=lambd, alpha=alpha, t0=t0, weight_decay=weight_decay, foreach=foreach, maximize=maximize,
            differentiable=differentiable, capturable=capturable), options)
