"""Adam and AdamW: torch.optim's signatures and defaults; the math is csrc/include/fusedopt/math/adam.h."""
from __future__ import annotations

from typing import Any

from torch import Tensor
from typing_extensions import Unpack

from ._base import FusedOptimizer, FusedOptions
from ._spec import Group, Spec, State, check_betas, check_lr, check_range, scalar


def _validate(group: Group) -> None:
    # torch.optim.Adam's checks of tensor hyperparameters, with its messages (its foreach path cannot take them).
    foreach_only = group.get("foreach") and not group.get("capturable")
    if isinstance(group["lr"], Tensor) and foreach_only:
        raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
    betas = group["betas"]
    if not (all(isinstance(b, float) for b in betas) or all(isinstance(b, Tensor) for b in betas)):
        raise ValueError("betas must be either both floats or both Tensors")
    for k, beta in enumerate(betas):
        if isinstance(beta, Tensor):
            if foreach_only:
                raise ValueError(f"betas[{k}] as a Tensor is not supported for capturable=False and foreach=True")
            if beta.numel() != 1:
                raise ValueError(f"Tensor betas[{k}] must be 1-element")
    check_lr(group)
    check_range("epsilon value", group["eps"], 0.0)
    check_betas(group)
    check_range("weight_decay value", group["weight_decay"], 0.0)


def _hyper(group: Group) -> dict[str, Any]:
    beta1, beta2 = group["betas"]
    return dict(beta1=scalar(beta1), beta2=scalar(beta2), eps=group["eps"], weight_decay=group["weight_decay"],
                amsgrad=group["amsgrad"], maximize=group["maximize"], decoupled=group["decoupled_weight_decay"])


ADAM = Spec(
    kernel="adam",
    states=(State("exp_avg"), State("exp_avg_sq", signed=False),
            State("max_exp_avg_sq", signed=False, when=lambda g: bool(g["amsgrad"]))),
    validate=_validate,
    hyper=_hyper,
)


class Adam(FusedOptimizer):
    """Adam (Kingma & Ba, 2015) with torch.optim.Adam's arguments; `decoupled_weight_decay=True` is AdamW.

    fusedopt's own keywords are those of `FusedOptions`. State per parameter: step, exp_avg, exp_avg_sq,
    max_exp_avg_sq (amsgrad), master_param (master_weights).
    """

    spec = ADAM

    def __init__(
        self, params: Any, lr: float | Tensor = 1e-3, betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *, foreach: bool | None = None,
        maximize: bool = False, capturable: bool = False, differentiable: bool = False, fused: bool | None = None,
        decoupled_weight_decay: bool = False, **options: Unpack[FusedOptions],
    ) -> None:
        super().__init__(params, dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, foreach=foreach,
            maximize=maximize, capturable=capturable, differentiable=differentiable, fused=fused,
            decoupled_weight_decay=decoupled_weight_decay), options)


class AdamW(Adam):
    """AdamW (Loshchilov & Hutter, 2019): Adam with decoupled weight decay, torch.optim.AdamW's defaults."""

    spec = Spec(kernel="adam", states=ADAM.states, validate=_validate, hyper=_hyper,
                forced={"decoupled_weight_decay": True})

    def __init__(
        self, params: Any, lr: float | Tensor = 1e-3, betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
        foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
        fused: bool | None = None, **options: Unpack[FusedOptions],
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, **options)
