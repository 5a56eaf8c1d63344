"""Adagrad (Duchi et al., 2011): torch.optim.Adagrad's arguments and state layout, fused."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import functional
from ..flat import FlatBuffer
from ._base import FUSED_DEFAULTS, FusedOptimizer, StepScalars, check_range


class Adagrad(FusedOptimizer):
    """Adagrad with torch.optim.Adagrad's arguments and defaults.

    As in torch.optim, state exists from construction: step = 0 and sum = initial_accumulator_value.
    """

    STATE_NAMES = ("sum",)

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str = "auto",
        max_grad_norm: float | None = None,
        state_dtype: torch.dtype | None = None,
        master_weights: bool = False,
        skip_nonfinite: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value, foreach=foreach, maximize=maximize,
            differentiable=differentiable, fused=fused,
        )
        defaults.update(FUSED_DEFAULTS)
        defaults.update(backend=backend, max_grad_norm=max_grad_norm, state_dtype=state_dtype,
                        master_weights=master_weights, skip_nonfinite=skip_nonfinite)
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        if isinstance(group["lr"], Tensor) and group["lr"].numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        check_range("learning rate", group["lr"], 0.0)
        check_range("lr_decay value", group["lr_decay"], 0.0)
        check_range("weight_decay value", group["weight_decay"], 0.0)
        check_range("initial_accumulator_value value", group["initial_accumulator_value"], 0.0)
        check_range("epsilon value", group["eps"], 0.0)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)

    def _state_specs(self, group: dict[str, Any]) -> list[tuple[str, float]]:
        return [("sum", float(group["initial_accumulator_value"]))]

    def _on_group_added(self, group: dict[str, Any], buffers: list[FlatBuffer]) -> None:
        for buf in buffers:
            for i in range(len(buf.params)):
                self._init_state(group, buf, i)

    def _update(self, group: dict[str, Any], buf: FlatBuffer, first: int, last: int, scalars: StepScalars,
                backend: str) -> None:
        span = buf.span(first, last)
        functional.adagrad(
            buf.param[span], buf.grad[span], buf.state["sum"][span],
            None if buf.master is None else buf.master[span],
            step=scalars.step, lr=scalars.lr(group["lr"]), lr_decay=float(group["lr_decay"]), eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]), maximize=bool(group["maximize"]), grad_scale=scalars.grad_scale,
            found_inf=scalars.found_inf,
            backend=backend,
        )
