"""Rprop: torch.optim.Rprop's signature and defaults; the math is csrc/include/fusedopt/math/rprop.h."""
from __future__ import annotations

from typing import Any

from torch import Tensor
from typing_extensions import Unpack

from ._base import FusedOptimizer, FusedOptions
from ._spec import Group, Spec, State, check_lr, scalar


def _validate(group: Group) -> None:
    check_lr(group)
    etaminus, etaplus = group["etas"]
    if not 0.0 < etaminus < 1.0 < etaplus:
        raise ValueError(f"Invalid eta values: {etaminus}, {etaplus}")


RPROP_SPEC = Spec(
    kernel="rprop",
    # step_size starts at the group's lr (torch.full_like(grad, lr) when the state is created).
    states=(State("prev"), State("step_size", signed=False, fill=lambda g: scalar(g["lr"]))),
    validate=_validate,
    hyper=lambda g: dict(etaminus=scalar(g["etas"][0]), etaplus=scalar(g["etas"][1]),
                         step_size_min=scalar(g["step_sizes"][0]), step_size_max=scalar(g["step_sizes"][1]),
                         maximize=g["maximize"]),
)


class Rprop(FusedOptimizer):
    """Rprop (Riedmiller & Braun, 1993) with torch.optim.Rprop's arguments and defaults: per-element step sizes
    that grow by etaplus while the gradient keeps its sign and shrink by etaminus when it flips, within step_sizes.
    fusedopt's own keywords are those of `FusedOptions`; with `max_grad_norm` the clipped gradient is the one whose
    sign is taken (and stored in prev). State per parameter: step, prev, step_size, master_param."""

    spec = RPROP_SPEC

    def __init__(
        self, params: Any, lr: float | Tensor = 1e-2, etas: tuple[float, float] = (0.5, 1.2),
        step_sizes: tuple[float, float] = (1e-6, 50), *, capturable: bool = False, foreach: bool | None = None,
        maximize: bool = False, differentiable: bool = False, **options: Unpack[FusedOptions],
    ) -> None:
        super().__init__(params, dict(
            lr=lr, etas=etas, step_sizes=step_sizes, foreach=foreach, maximize=maximize,
            differentiable=differentiable, capturable=capturable), options)
