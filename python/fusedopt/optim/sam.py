"""SAM and ASAM over any fusedopt optimizer: the ascent to w + e and its undo are one fused pass each over the base
optimizer's flat buffers (fusedopt/math/sam.h), the descent is the base optimizer's own fused step."""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import _scaling, functional
from ..flat import FlatBuffer
from ._base import FusedOptimizer, Prepared, buffer_norm
from ._spec import scalar

# ASAM's and SAM's guard against a zero norm, as davda54/sam: scale = rho / (norm + 1e-12).
NORM_EPS = 1e-12


class SAM(Optimizer):
    """Sharpness-Aware Minimization (Foret et al. 2021) around a fusedopt optimizer; ASAM (Kwon et al. 2021) with
    `adaptive=True`.

    Each step takes the gradient g at w, moves to w + e with e = rho * g / (||g|| + 1e-12), takes the gradient there
    and lets the base optimizer update w (not w + e) from it. ASAM scales the ascent element-wise by |w|:
    e = rho * w * w * g / (|| |w| * g || + 1e-12). The norm is the global one over every param group (all-reduced
    over the shards of FSDP2 parameters), kept on the GPU when the step runs there, so nothing waits for the device.

    Two-step API::

        loss_fn(model(x), y).backward()
        sam.first_step(zero_grad=True)   # w -> w + e
        loss_fn(model(x), y).backward()
        sam.second_step(zero_grad=True)  # back to w, then the base optimizer's step

    or `sam.step(closure)`, where the closure recomputes the loss and its gradients (it is called once, at w + e;
    the gradient at w must already be there). With `torch.amp.GradScaler`, pass the closure positionally,
    `scaler.step(sam, closure)` (the closure calls `scaler.scale(loss).backward()`), then `scaler.update()`: an
    inf/nan gradient at w skips the whole SAM step and leaves nothing perturbed; one at w + e skips the base step
    after the weights are restored (GradScaler lowers its scale only for the first). Do not call
    `scaler.unscale_(sam)` first (refused): clip with the base optimizer's `max_grad_norm`.

    Memory: without master weights the perturbation backs the parameters up bit for bit (p + e - e is not p in
    floating point): one flat buffer per buffer set in the parameters' dtype, allocated at the first step, i.e. one
    more copy of the parameters (4 bytes per fp32 parameter, 2 per bf16/fp16 one). With master weights
    (`master_weights=True` on 16-bit parameters) the fp32 master stays the unperturbed truth and the parameters
    receive round(master + e), then round(master) again: no extra memory. The base optimizer's `max_grad_norm`,
    `skip_nonfinite`, state dtypes and backends apply to its step as usual (`skip_nonfinite` also skips a SAM step
    whose first gradient is not finite).
    """

    def __init__(self, base_optimizer: FusedOptimizer, rho: float = 0.05, adaptive: bool = False) -> None:
        if not isinstance(base_optimizer, FusedOptimizer):
            raise TypeError(f"Invalid base_optimizer: expected a fusedopt optimizer, got "
                            f"{type(base_optimizer).__name__}")
        _check_rho(rho)
        _check_adaptive(adaptive)
        self.base_optimizer = base_optimizer
        self.rho = float(rho)
        self.adaptive = adaptive
        # torch.optim.Optimizer's attributes, without adding the parameters a second time: the groups and state are
        # the base optimizer's own objects, so schedulers, GradScaler and user edits reach it.
        self.defaults = {**base_optimizer.defaults, "rho": self.rho, "adaptive": adaptive}
        self._optimizer_step_pre_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._patch_step_function()
        self.param_groups = base_optimizer.param_groups
        self.state = base_optimizer.state
        # GradScaler hands us grad_scale and found_inf (see `step`).
        self._step_supports_amp_scaling = True
        # The perturbation's backups, one per buffer set without master weights, allocated once.
        self._backups: dict[FlatBuffer, Tensor] = {}
        # What second_step needs to undo first_step: (buffer, backend, its active flags) per perturbed buffer set, and
        # the device flag that skipped the perturbation (None: none). None while nothing is perturbed.
        self._perturbed: list[tuple[FlatBuffer, str, bytes]] | None = None
        self._skip: Tensor | None = None
        self._host_skipped = False

    # Steps ------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, grad_scale: Tensor | float | None = None,
                   found_inf: Tensor | None = None) -> None:
        """Move every parameter with a gradient to w + e, in one fused pass per buffer set. `grad_scale` and
        `found_inf` are GradScaler's (the gradients are scaled by grad_scale; found_inf non-zero skips the SAM
        step). `zero_grad`: zero the gradients afterwards, ready for the backward pass at w + e."""
        if self._perturbed is not None:
            raise RuntimeError("fusedopt.SAM: first_step() was called twice; call second_step() in between")
        base = self.base_optimizer
        prepared = self._prepare()
        on_device = base._decides_on_device()
        self._perturbed, self._skip, self._host_skipped = [], None, False
        if not on_device and found_inf is not None and bool(found_inf.sum() != 0):
            self._host_skipped = True
        elif any(buf.segments.any_active() for _, buf, _ in prepared):
            self._perturb(prepared, grad_scale, found_inf, on_device)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, grad_scale: Tensor | float | None = None,
                    found_inf: Tensor | None = None) -> None:
        """Restore the weights first_step perturbed, bit for bit, then run the base optimizer's fused step on the
        gradients taken at w + e. `grad_scale`/`found_inf`: as for first_step, for these gradients."""
        if self._perturbed is None:
            raise RuntimeError("fusedopt.SAM: second_step() was called without first_step()")
        perturbed, skip, host_skipped = self._perturbed, self._skip, self._host_skipped
        self._perturbed, self._skip, self._host_skipped = None, None, False
        for buf, backend, flags in perturbed:
            current = bytes(buf.segments.flags)
            buf.segments.flags[:] = type(buf.segments.flags)("B", flags)
            functional.sam_restore(buf.param, buf.master, self._backups.get(buf), buf.segments, found_inf=skip,
                                   backend=backend)
            buf.finish_step()  # sharded parameters: the restored weights back into the shards
            buf.segments.flags[:] = type(buf.segments.flags)("B", current)
        if not host_skipped:
            self._base_step(grad_scale, found_inf, skip)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One SAM step: first_step on the gradients already computed at w, `closure()` (which must recompute the
        loss and its gradients; called once, with gradients zeroed, at w + e), second_step. Returns the closure's
        loss. Under GradScaler (`scaler.step(sam, closure)`) the scale and inf flag it sets apply to both."""
        if closure is None:
            raise ValueError("Invalid closure: None (SAM.step needs a closure that recomputes the loss and its "
                             "gradients; or call first_step() and second_step())")
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if found_inf is not None and grad_scale is None:
            # GradScaler after scaler.unscale_(sam): the closure's gradients would reach the base step still scaled.
            raise RuntimeError("fusedopt.SAM: scaler.unscale_(optimizer) before scaler.step(optimizer, closure) is not "
                               "supported (the closure's gradients are scaled again); clip with the base "
                               "optimizer's max_grad_norm instead")
        self.first_step(zero_grad=True, grad_scale=grad_scale, found_inf=found_inf)
        with torch.enable_grad():
            loss = closure()
        self.second_step(grad_scale=grad_scale, found_inf=found_inf)
        return loss

    def zero_grad(self, set_to_none: bool = False) -> None:
        """The base optimizer's zero_grad (one fill per flat buffer)."""
        self.base_optimizer.zero_grad(set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer (the groups are its own)."""
        self.base_optimizer.add_param_group(param_group)

    # Pieces of the steps ----------------------------------------------------------------------------------------

    def _prepare(self) -> list[Prepared]:
        """The base optimizer's buffer sets with a gradient this step (and every sharded one: each rank joins every
        all-reduce), their gradients and active flags brought up to date as its step does."""
        base = self.base_optimizer
        base._follow_visible_objects()
        prepared: list[Prepared] = []
        for group, buffers, backends in zip(base.param_groups, base._flat_groups, base._backends):
            for buf, backend in zip(buffers, backends):
                if buf.prepare_step() or buf.reduce_groups:
                    prepared.append((group, buf, backend))
        return prepared

    def _perturb(self, prepared: list[Prepared], grad_scale: Tensor | float | None, found_inf: Tensor | None,
                 on_device: bool) -> None:
        device = prepared[0][1].device if on_device else torch.device("cpu")
        unscale = _scaling.unscale_of(grad_scale, device) if on_device else (
            1.0 if grad_scale is None else 1.0 / scalar(grad_scale))
        skip = _scaling.amp_skip(found_inf, device) if on_device else None
        norm, nonfinite = self._norm(prepared, unscale, device)
        if any(group["skip_nonfinite"] for group, _, _ in prepared):
            if on_device:
                skip = nonfinite if skip is None else torch.maximum(skip, nonfinite)
            elif bool(nonfinite.item()):
                self._host_skipped = True
                return
        scale = self.rho * unscale / (norm + NORM_EPS)  # the unscaled gradient's e from the scaled one
        self._skip = skip
        live = {buf for group_buffers in self.base_optimizer.flat_buffers for buf in group_buffers}
        for buf in [b for b in self._backups if b not in live]:  # buffer sets the base optimizer rebuilt
            del self._backups[buf]
        for _, buf, backend in prepared:
            if not buf.segments.any_active():
                continue
            if buf.master is None and buf not in self._backups:
                self._backups[buf] = torch.empty_like(buf.param)
            functional.sam_perturb(
                buf.param, buf.grad, buf.master, self._backups.get(buf), buf.segments,
                scale=_scaling.kernel_scale(scale, buf.dtype) if on_device else float(scale.item()),
                adaptive=self.adaptive, found_inf=skip, backend=backend)
            buf.finish_step()  # sharded parameters: the forward at w + e reads the shards
            self._perturbed.append((buf, backend, bytes(buf.segments.flags)))

    def _norm(self, prepared: list[Prepared], unscale: _scaling.Scale, device: torch.device
              ) -> tuple[Tensor, Tensor]:
        """The global norm of g (ASAM: of |w| * g) over every active parameter and its non-finite flag, as the
        base optimizer's clipping norm: one deterministic sum of squares per buffer set, all-reduced over shards."""
        if not self.adaptive:
            return self.base_optimizer._global_norm(prepared, unscale, device)
        return buffer_norm(prepared, unscale, device, lambda buf, backend, out_sum, out_flag: (
            functional.sam_sum_of_squares_into(buf.param, buf.grad, buf.master, buf.segments, out_sum, out_flag,
                                               backend=backend)))

    def _base_step(self, grad_scale: Tensor | float | None, found_inf: Tensor | None, skip: Tensor | None) -> None:
        """The base optimizer's step on the gradients at w + e, skipped by the first step's device flag, and under
        GradScaler also when these gradients hold inf/nan (GradScaler checked only those at w)."""
        base = self.base_optimizer
        if found_inf is not None:
            on_device = base._decides_on_device()
            prepared = self._prepare()
            device = prepared[0][1].device if on_device and prepared else torch.device("cpu")
            if prepared:
                _, nonfinite = base._global_norm(prepared, 1.0, device)
                found_inf = torch.maximum(_scaling.amp_skip(found_inf, device), nonfinite)
        if skip is not None:
            found_inf = skip if found_inf is None else torch.maximum(found_inf.to(skip.device).reshape(1), skip)
        if grad_scale is None and found_inf is None:
            base.step()
            return
        base.grad_scale, base.found_inf = grad_scale, found_inf  # the attributes GradScaler sets
        try:
            base.step()
        finally:
            del base.grad_scale, base.found_inf

    # Checkpoints ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state_dict, with SAM's settings under "sam" (take it after second_step)."""
        saved = self.base_optimizer.state_dict()
        saved["sam"] = {"rho": self.rho, "adaptive": self.adaptive}
        return saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a SAM checkpoint, or a plain checkpoint of the base optimizer (rho and adaptive then stay)."""
        if self._perturbed is not None:
            raise RuntimeError("fusedopt.SAM: load_state_dict() between first_step() and second_step()")
        state_dict = dict(state_dict)
        sam = state_dict.pop("sam", None)
        if sam is not None:
            _check_rho(sam.get("rho"))
            _check_adaptive(sam.get("adaptive"))
        self.base_optimizer.load_state_dict(state_dict)
        if sam is not None:
            self.rho, self.adaptive = float(sam["rho"]), sam["adaptive"]
            self.defaults.update(rho=self.rho, adaptive=self.adaptive)

    def __repr__(self) -> str:
        return f"SAM(rho={self.rho}, adaptive={self.adaptive}, base_optimizer={self.base_optimizer!r})"


def _check_rho(rho: Any) -> None:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho < 0:
        raise ValueError(f"Invalid rho value: {rho}")


def _check_adaptive(adaptive: Any) -> None:
    if not isinstance(adaptive, bool):
        raise ValueError(f"Invalid adaptive: {adaptive!r} (expected True or False)")
