"""RMSprop (Hinton, 2012; centered variant of Graves, 2013): torch.optim.RMSprop's arguments, fused."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import functional
from ..flat import FlatBuffer
from ._base import FUSED_DEFAULTS, FusedOptimizer, StepScalars, check_range


class RMSprop(FusedOptimizer):
    """RMSprop with torch.optim.RMSprop's arguments and defaults.

    State per parameter: step, square_avg, momentum_buffer (momentum > 0), grad_avg (centered), master_param.
    """

    STATE_NAMES = ("square_avg", "momentum_buffer", "grad_avg")

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        backend: str = "auto",
        max_grad_norm: float | None = None,
        state_dtype: torch.dtype | None = None,
        master_weights: bool = False,
        skip_nonfinite: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered, weight_decay=weight_decay,
            capturable=capturable, foreach=foreach, maximize=maximize, differentiable=differentiable,
        )
        defaults.update(FUSED_DEFAULTS)
        defaults.update(backend=backend, max_grad_norm=max_grad_norm, state_dtype=state_dtype,
                        master_weights=master_weights, skip_nonfinite=skip_nonfinite)
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        if isinstance(group["lr"], Tensor) and group["lr"].numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        check_range("learning rate", group["lr"], 0.0)
        check_range("epsilon value", group["eps"], 0.0)
        check_range("momentum value", group["momentum"], 0.0)
        check_range("weight_decay value", group["weight_decay"], 0.0)
        check_range("alpha value", group["alpha"], 0.0)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("momentum", 0)
            group.setdefault("centered", False)
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)
            group.setdefault("differentiable", False)
            group.setdefault("capturable", False)

    def _state_specs(self, group: dict[str, Any]) -> list[tuple[str, float]]:
        specs = [("square_avg", 0.0)]
        if group["momentum"] > 0:
            specs.append(("momentum_buffer", 0.0))
        if group["centered"]:
            specs.append(("grad_avg", 0.0))
        return specs

    def _update(self, group: dict[str, Any], buf: FlatBuffer, first: int, last: int, scalars: StepScalars,
                backend: str) -> None:
        span = buf.span(first, last)
        momentum = float(group["momentum"])
        functional.rmsprop(
            buf.param[span], buf.grad[span], buf.state["square_avg"][span],
            buf.state["momentum_buffer"][span] if momentum > 0 else None,
            buf.state["grad_avg"][span] if group["centered"] else None,
            None if buf.master is None else buf.master[span],
            lr=scalars.lr(group["lr"]), alpha=float(group["alpha"]), eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]), momentum=momentum, centered=bool(group["centered"]),
            maximize=bool(group["maximize"]), grad_scale=scalars.grad_scale, found_inf=scalars.found_inf,
            backend=backend,
        )

    def _run_keys(self, buf: FlatBuffer) -> list[Any]:
        # The update does not depend on the step count; only skipped parameters split a run.
        return [0] * len(buf.params)
