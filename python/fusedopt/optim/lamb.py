"""LAMB (You et al., 2019, "Large Batch Optimization for Deep Learning", Algorithm 2): no torch.optim counterpart;
the math is csrc/include/fusedopt/math/lamb.h."""
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
    if group["max_trust_ratio"] is not None:
        check_range("max_trust_ratio value", group["max_trust_ratio"], 0.0)
        if group["max_trust_ratio"] == 0:
            raise ValueError(f"Invalid max_trust_ratio value: {group['max_trust_ratio']}")


LAMB_SPEC = Spec(
    kernel="lamb",
    states=(State("exp_avg"), State("exp_avg_sq", signed=False)),
    validate=_validate,
    hyper=lambda g: dict(beta1=scalar(g["betas"][0]), beta2=scalar(g["betas"][1]), eps=g["eps"],
                         weight_decay=g["weight_decay"], bias_correction=g["bias_correction"],
                         max_trust_ratio=g["max_trust_ratio"], maximize=g["maximize"]),
)


class LAMB(FusedOptimizer):
    """LAMB: first and second moment EMAs, u = m_hat/(sqrt(v_hat)+eps) + wd*p, then per parameter
    p <- p - lr * (||p||/||u||) * u.

    The trust ratio is 1 when either norm is 0 and is clamped to `max_trust_ratio` when given. State layout
    (documented, round-trips exactly): step, exp_avg, exp_avg_sq, master_param. fusedopt's own keywords are those of
    `FusedOptions`.
    """

    spec = LAMB_SPEC

    def __init__(
        self, params: Any, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
        weight_decay: float = 0.0, *, bias_correction: bool = True, max_trust_ratio: float | None = None,
        maximize: bool = False, **options: Unpack[FusedOptions],
    ) -> None:
        super().__init__(params, dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
            max_trust_ratio=max_trust_ratio, maximize=maximize), options)
