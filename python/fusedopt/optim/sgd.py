"""SGD with momentum, dampening and Nesterov: torch.optim.SGD's constructor and state layout, fused."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import functional
from ..flat import FlatBuffer
from ._base import FUSED_DEFAULTS, FusedOptimizer, StepScalars, check_range


class SGD(FusedOptimizer):
    """Stochastic gradient descent with torch.optim.SGD's arguments (lr defaults to 1e-3 as in torch).

    State per parameter: momentum_buffer (when momentum != 0), master_param (master_weights). fusedopt extras
    as in `fusedopt.Adam`.
    """

    STATE_NAMES = ("momentum_buffer",)

    _tracks_step = False

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str = "auto",
        max_grad_norm: float | None = None,
        state_dtype: torch.dtype | None = None,
        master_weights: bool = False,
        skip_nonfinite: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            maximize=maximize, foreach=foreach, differentiable=differentiable, fused=fused,
        )
        defaults.update(FUSED_DEFAULTS)
        defaults.update(backend=backend, max_grad_norm=max_grad_norm, state_dtype=state_dtype,
                        master_weights=master_weights, skip_nonfinite=skip_nonfinite)
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        if isinstance(group["lr"], Tensor) and group["lr"].numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        check_range("learning rate", group["lr"], 0.0)
        check_range("momentum value", group["momentum"], 0.0)
        check_range("dampening value", group["dampening"], -float("inf"))
        check_range("weight_decay value", group["weight_decay"], 0.0)
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)
            group.setdefault("fused", False)

    def _state_specs(self, group: dict[str, Any]) -> list[tuple[str, float]]:
        return [("momentum_buffer", 0.0)] if group["momentum"] != 0 else []

    def _update(self, group: dict[str, Any], buf: FlatBuffer, first: int, last: int, scalars: StepScalars,
                backend: str) -> None:
        span = buf.span(first, last)
        momentum = float(group["momentum"])
        functional.sgd(
            buf.param[span], buf.grad[span], buf.state["momentum_buffer"][span] if momentum != 0 else None,
            None if buf.master is None else buf.master[span],
            lr=scalars.lr(group["lr"]), momentum=momentum, dampening=float(group["dampening"]),
            weight_decay=float(group["weight_decay"]), nesterov=bool(group["nesterov"]),
            maximize=bool(group["maximize"]), first_step=scalars.first_step, grad_scale=scalars.grad_scale,
            found_inf=scalars.found_inf, backend=backend,
        )

    def _first_step_differs(self, group: dict[str, Any]) -> bool:
        # The first momentum step copies the gradient; later ones apply dampening to it. Without dampening the two
        # agree on a zero momentum buffer, so a skipped first step can be decided on the device.
        return group["momentum"] != 0 and group["dampening"] != 0

    def _after_state_loaded(self, group: dict[str, Any], buf: FlatBuffer, i: int, loaded: dict[str, Any]) -> None:
        # torch.optim.SGD keeps no step count: a saved momentum buffer means the first momentum step is done.
        buf.steps[i] = 1.0 if loaded.get("momentum_buffer") is not None else 0.0
