"""Muon: torch.optim.Muon's signature, defaults and math, for whole models. Param groups with `use_muon=False` are
AdamW groups (embeddings, heads, norms, biases), stepped by the AdamW kernel in the same optimizer. A Muon step is
the element-wise kernels of csrc/include/fusedopt/math/muon.h around the batched Newton-Schulz of
fusedopt/_newton_schulz.py."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from typing_extensions import Unpack

from .. import _scaling, functional
from .._distributed import is_dtensor
from .._newton_schulz import orthogonalize_, orthogonalize_sharded_
from ..flat import FlatBuffer, state_dtype_for
from ._base import FusedOptimizer, FusedOptions
from ._spec import Group, Spec, State, check_tensor_lr, require, scalar
from .adam import AdamW

ADJUST_LR_FNS = (None, "original", "match_rms_adamw")

# What a use_muon=False group takes where it sets nothing: torch.optim.AdamW's values of AdamW's own keys (Muon's eps is
# Newton-Schulz's, not AdamW's); lr and weight_decay come from the optimizer's defaults, as for any group.
ADAMW_GROUP_DEFAULTS: dict[str, Any] = {"betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": False, "maximize": False,
                                        "decoupled_weight_decay": True}


def _validate(group: Group) -> None:
    """torch.optim.Muon's checks, with its messages; the Newton-Schulz arguments are checked here rather than at the
    first step."""
    lr = group["lr"]
    check_tensor_lr(group)
    require(0.0 <= scalar(lr), f"Learning rate should be >= 0 but is: {lr}")
    require(0.0 <= group["momentum"], f"momentum should be >= 0 but is: {group['momentum']}")
    require(0.0 <= group["weight_decay"], f"weight decay should be >= 0 but is: {group['weight_decay']}")
    require(group["adjust_lr_fn"] in ADJUST_LR_FNS,
           f"Adjust learning rate function {group['adjust_lr_fn']} is not supported")
    require(group["ns_steps"] < 100, "Number of steps must be less than 100 for computational efficiency")
    require(len(group["ns_coefficients"]) == 3, "Coefficients must be a tuple of exactly 3 values")


def _check_matrices(params: list[Any]) -> None:
    for p in params:
        if isinstance(p, Tensor) and p.dim() not in (2, 3):
            raise ValueError("Muon only supports 2D parameters (and 3D stacks of expert matrices) whereas we found a "
                             f"parameter with size: {p.size()}; put it in a param group with use_muon=False to step "
                             "it with AdamW")


MUON_SPEC = Spec(
    kernel="muon",
    no_8bit="its momentum feeds the Newton-Schulz orthogonalization, which needs it at full precision",
    states=(State("momentum_buffer"),),
    validate=_validate,
    hyper=lambda g: dict(momentum=g["momentum"], nesterov=g["nesterov"], weight_decay=g["weight_decay"],
                         adjust_lr=g["adjust_lr_fn"] == "match_rms_adamw", phase=0, maximize=False),
    tracks_step=False,  # torch.optim.Muon keeps only momentum_buffer
    param_check=_check_matrices,
    needs_whole_matrices=True,
)

ADAMW_SPEC = AdamW.spec


def _with_adamw_defaults(group: Any) -> Any:
    """A param group dict with use_muon=False gets AdamW's keys it does not set."""
    if isinstance(group, dict) and group.get("use_muon", True) is False:
        return {**ADAMW_GROUP_DEFAULTS, **group, "decoupled_weight_decay": True}
    return group


class Muon(FusedOptimizer):
    """Muon (Jordan et al. 2024) with torch.optim.Muon's arguments and defaults: SGD momentum (Nesterov by default)
    whose update is orthogonalized by a quintic Newton-Schulz iteration in bfloat16, decoupled weight decay, and the
    learning rate adjusted to each matrix's shape (`adjust_lr_fn`).

    Beyond torch.optim.Muon:
    - 3-D parameters (experts, out, in) are orthogonalized per expert matrix;
    - a param group with `use_muon=False` is an AdamW group for the parameters Muon should not step (embeddings,
      output heads, norms, biases): its `betas`, `eps` and `amsgrad` default to torch.optim.AdamW's, its `lr` and
      `weight_decay` to this optimizer's, and its state is AdamW's (step, exp_avg, exp_avg_sq);
    - FSDP2: row-sharded matrices are assembled, each on one rank, orthogonalized there and sent back.
    fusedopt's own keywords are those of `FusedOptions` (`max_grad_norm` clips the whole model's gradient). State per
    Muon parameter, as torch: momentum_buffer (and master_param with master weights).
    """

    spec = MUON_SPEC
    kept_on_load = (*FusedOptimizer.kept_on_load, "use_muon")

    def __init__(
        self, params: Any, lr: float | Tensor = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
        nesterov: bool = True, ns_coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315),
        eps: float = 1e-7, ns_steps: int = 5, adjust_lr_fn: str | None = None, **options: Unpack[FusedOptions],
    ) -> None:
        if not isinstance(params, Tensor):
            params = [_with_adamw_defaults(g) for g in params]
        # The last traffic of the Newton-Schulz gathers of sharded matrices, in bytes sent and received by this rank.
        self.last_orthogonalize_bytes = 0
        super().__init__(params, dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_coefficients=ns_coefficients,
            eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn, use_muon=True), options)

    def spec_of(self, group: dict[str, Any]) -> Spec:
        return MUON_SPEC if group.get("use_muon", True) else ADAMW_SPEC

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(_with_adamw_defaults(param_group))

    def _update(self, group: dict[str, Any], buf: FlatBuffer, backend: str, lr: float | Tensor,
                grad_scale: _scaling.Scale, found_inf: Tensor | None) -> None:
        if not group["use_muon"]:
            super()._update(group, buf, backend, lr, grad_scale, found_inf)
            return
        segments = buf.segments
        # Each matrix's whole shape, from which the kernel adjusts the learning rate (as torch, per expert matrix).
        if segments.scalars is None:
            segments.ensure_scalars(2)[:] = torch.tensor([p.shape[-2:] for p in buf.params], dtype=torch.float32)
        # The update between the two phases: fusedopt's scratch in the state dtype, not a torch.optim state.
        update = buf.ensure_state("update", state_dtype_for(buf.dtype, group["state_dtype"]))
        states = [buf.state["momentum_buffer"], update]
        hyper = MUON_SPEC.hyper_for(group, buf.dtype)
        # Two kernel calls: each counts the segment's step (Muon shows no step count).
        storage = self.param_storage(group, buf)
        functional.update("muon", buf.param, buf.grad, states, buf.master, segments, hyper=hyper, lr=lr,
                          grad_scale=grad_scale, found_inf=found_inf, backend=backend, **storage)
        matrices = [(p, buf.view(update, i)) for i, p in enumerate(buf.params) if segments.flags[i]]
        args = (group["ns_coefficients"], group["ns_steps"], group["eps"])
        if buf.sharded and any(is_dtensor(p) for p, _ in matrices):
            self.last_orthogonalize_bytes = orthogonalize_sharded_(matrices, *args)
        else:
            orthogonalize_([m.reshape(-1, *m.shape[-2:]) for _, m in matrices], *args)
        functional.update("muon", buf.param, buf.grad, states, buf.master, segments, hyper={**hyper, "phase": 1},
                          lr=lr, grad_scale=1.0, found_inf=found_inf, backend=backend, **storage)
