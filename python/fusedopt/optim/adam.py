"""Adam and AdamW: torch.optim's constructor, defaults and state layout on fused flat-buffer kernels."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import functional
from ..flat import FlatBuffer
from ._base import FUSED_DEFAULTS, FusedOptimizer, StepScalars, check_range, scalar


class Adam(FusedOptimizer):
    """Adam (Kingma & Ba, 2015) with torch.optim.Adam's arguments; `decoupled_weight_decay=True` is AdamW.

    fusedopt extras: `backend` ("auto", "cpu", "cuda", "reference"), `max_grad_norm` (clip the global
    gradient norm inside the step; the norm is kept in `last_grad_norm`), `state_dtype` (torch.float32 or
    torch.bfloat16 moments), `master_weights` (fp32 copies of 16-bit parameters, updated in the same pass) and
    `skip_nonfinite` (a step whose gradients hold inf or nan changes nothing; counted in `skipped_steps`).
    State per parameter: step, exp_avg, exp_avg_sq, max_exp_avg_sq (amsgrad), master_param (master_weights).
    """

    STATE_NAMES = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        backend: str = "auto",
        max_grad_norm: float | None = None,
        state_dtype: torch.dtype | None = None,
        master_weights: bool = False,
        skip_nonfinite: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
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
        betas = group["betas"]
        check_range("beta parameter at index 0", betas[0], 0.0, 1.0)
        check_range("beta parameter at index 1", betas[1], 0.0, 1.0)
        check_range("weight_decay value", group["weight_decay"], 0.0)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
            group.setdefault("decoupled_weight_decay", isinstance(self, AdamW))

    def _state_specs(self, group: dict[str, Any]) -> list[tuple[str, float]]:
        specs = [("exp_avg", 0.0), ("exp_avg_sq", 0.0)]
        if group["amsgrad"]:
            specs.append(("max_exp_avg_sq", 0.0))
        return specs

    def _update(self, group: dict[str, Any], buf: FlatBuffer, first: int, last: int, scalars: StepScalars,
                backend: str) -> None:
        span = buf.span(first, last)
        beta1, beta2 = group["betas"]
        functional.adam(
            buf.param[span], buf.grad[span], buf.state["exp_avg"][span], buf.state["exp_avg_sq"][span],
            buf.state["max_exp_avg_sq"][span] if group["amsgrad"] else None,
            None if buf.master is None else buf.master[span],
            step=scalars.step, lr=scalars.lr(group["lr"]), beta1=scalar(beta1), beta2=scalar(beta2),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]), amsgrad=bool(group["amsgrad"]),
            maximize=bool(group["maximize"]), decoupled=bool(group["decoupled_weight_decay"]),
            grad_scale=scalars.grad_scale, found_inf=scalars.found_inf, backend=backend,
        )


class AdamW(Adam):
    """AdamW (Loshchilov & Hutter, 2019): Adam with decoupled weight decay, torch.optim.AdamW's defaults."""

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str = "auto",
        max_grad_norm: float | None = None,
        state_dtype: torch.dtype | None = None,
        master_weights: bool = False,
        skip_nonfinite: bool = False,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
            capturable=capturable, differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
            backend=backend, max_grad_norm=max_grad_norm, state_dtype=state_dtype, master_weights=master_weights,
            skip_nonfinite=skip_nonfinite,
        )
