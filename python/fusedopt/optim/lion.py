"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2), fused."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import functional
from ..flat import FlatBuffer
from ._base import FUSED_DEFAULTS, FusedOptimizer, StepScalars, check_range, scalar


class Lion(FusedOptimizer):
    """Lion: p <- p*(1 - lr*wd) - lr*sign(beta1*m + (1-beta1)*g); m <- beta2*m + (1-beta2)*g.

    torch.optim has no Lion. State layout (documented, round-trips exactly): step, exp_avg, and
    master_param with master_weights. Use a learning rate 3-10x smaller than AdamW's and a larger weight decay.
    """

    STATE_NAMES = ("exp_avg",)

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        backend: str = "auto",
        max_grad_norm: float | None = None,
        state_dtype: torch.dtype | None = None,
        master_weights: bool = False,
        skip_nonfinite: bool = False,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize)
        defaults.update(FUSED_DEFAULTS)
        defaults.update(backend=backend, max_grad_norm=max_grad_norm, state_dtype=state_dtype,
                        master_weights=master_weights, skip_nonfinite=skip_nonfinite)
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        if isinstance(group["lr"], Tensor) and group["lr"].numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        check_range("learning rate", group["lr"], 0.0)
        check_range("beta parameter at index 0", group["betas"][0], 0.0, 1.0)
        check_range("beta parameter at index 1", group["betas"][1], 0.0, 1.0)
        check_range("weight_decay value", group["weight_decay"], 0.0)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)

    def _state_specs(self, group: dict[str, Any]) -> list[tuple[str, float]]:
        return [("exp_avg", 0.0)]

    def _run_keys(self, buf: FlatBuffer) -> list[Any]:
        return [0] * len(buf.params)  # the update does not depend on the step count

    def _update(self, group: dict[str, Any], buf: FlatBuffer, first: int, last: int, scalars: StepScalars,
                backend: str) -> None:
        span = buf.span(first, last)
        beta1, beta2 = group["betas"]
        functional.lion(
            buf.param[span], buf.grad[span], buf.state["exp_avg"][span],
            None if buf.master is None else buf.master[span],
            lr=scalars.lr(group["lr"]), beta1=scalar(beta1), beta2=scalar(beta2),
            weight_decay=float(group["weight_decay"]), maximize=bool(group["maximize"]),
            grad_scale=scalars.grad_scale, found_inf=scalars.found_inf, backend=backend,
        )
