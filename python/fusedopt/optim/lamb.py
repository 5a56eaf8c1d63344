"""LAMB (You et al., 2019, "Large Batch Optimization for Deep Learning", Algorithm 2), fused."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import functional
from ..flat import FlatBuffer
from ._base import FUSED_DEFAULTS, FusedOptimizer, StepScalars, check_range, scalar


class LAMB(FusedOptimizer):
    """LAMB: Adam moments, u = m_hat/(sqrt(v_hat)+eps) + wd*p, p <- p - lr * (||p||/||u||) * u per parameter.

    The trust ratio is 1 when either norm is 0 and is clamped to `max_trust_ratio` when given. torch.optim
    has no LAMB. State layout (documented, round-trips exactly): step, exp_avg, exp_avg_sq, master_param.
    """

    STATE_NAMES = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        bias_correction: bool = True,
        max_trust_ratio: float | None = None,
        maximize: bool = False,
        backend: str = "auto",
        max_grad_norm: float | None = None,
        state_dtype: torch.dtype | None = None,
        master_weights: bool = False,
        skip_nonfinite: bool = False,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
                        max_trust_ratio=max_trust_ratio, maximize=maximize)
        defaults.update(FUSED_DEFAULTS)
        defaults.update(backend=backend, max_grad_norm=max_grad_norm, state_dtype=state_dtype,
                        master_weights=master_weights, skip_nonfinite=skip_nonfinite)
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        if isinstance(group["lr"], Tensor) and group["lr"].numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        check_range("learning rate", group["lr"], 0.0)
        check_range("epsilon value", group["eps"], 0.0)
        check_range("beta parameter at index 0", group["betas"][0], 0.0, 1.0)
        check_range("beta parameter at index 1", group["betas"][1], 0.0, 1.0)
        check_range("weight_decay value", group["weight_decay"], 0.0)
        if group["max_trust_ratio"] is not None:
            check_range("max_trust_ratio value", group["max_trust_ratio"], 0.0)
            if group["max_trust_ratio"] == 0:
                raise ValueError(f"Invalid max_trust_ratio value: {group['max_trust_ratio']}")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("bias_correction", True)
            group.setdefault("max_trust_ratio", None)
            group.setdefault("maximize", False)

    def _state_specs(self, group: dict[str, Any]) -> list[tuple[str, float]]:
        return [("exp_avg", 0.0), ("exp_avg_sq", 0.0)]

    def _update(self, group: dict[str, Any], buf: FlatBuffer, first: int, last: int, scalars: StepScalars,
                backend: str) -> None:
        span = buf.span(first, last)
        offsets, numels = buf.segments(first, last)
        beta1, beta2 = group["betas"]
        max_trust_ratio = group["max_trust_ratio"]
        functional.lamb(
            buf.param[span], buf.grad[span], buf.state["exp_avg"][span], buf.state["exp_avg_sq"][span],
            None if buf.master is None else buf.master[span], offsets, numels,
            step=scalars.step, lr=scalars.lr(group["lr"]), beta1=scalar(beta1), beta2=scalar(beta2),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]), bias_correction=bool(group["bias_correction"]),
            max_trust_ratio=None if max_trust_ratio is None else float(max_trust_ratio),
            maximize=bool(group["maximize"]), grad_scale=scalars.grad_scale, found_inf=scalars.found_inf,
            backend=backend,
            norm_reduce=buf.all_reduce_sums if buf.reduce_groups else None,
        )
