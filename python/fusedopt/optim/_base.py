"""Shared machinery of fusedopt's optimizers: flat storage per group, gradient clipping, AMP, state_dict.

Subclasses declare their states and implement `_update`, which hands one run of parameters (consecutive
parameters that have gradients and share a step count) to one `fusedopt.functional` call.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import _torch_ops, functional
from .._backend import resolve, validate_backend
from ..flat import STATE_DTYPES, FlatBuffer, all_reduce_sum, build_flat_buffers, is_dtensor, local_tensor

# Group keys that describe where and how state is stored, not the training trajectory: a loaded
# checkpoint keeps the optimizer's own values for these.
_LAYOUT_KEYS = ("backend", "state_dtype", "master_weights")

FUSED_DEFAULTS: dict[str, Any] = {
    "backend": "auto",
    "max_grad_norm": None,
    "state_dtype": None,
    "master_weights": False,
    "skip_nonfinite": False,
}


def scalar(value: float | Tensor) -> float:
    """A hyperparameter as a Python float (tensor learning rates and betas are accepted)."""
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def check_range(name: str, value: Any, low: float, high: float | None = None, high_open: bool = True) -> None:
    """Raise ValueError naming `name` unless low <= value (< or <=) high; NaN is always rejected."""
    v = scalar(value)
    ok = v >= low and (high is None or (v < high if high_open else v <= high))
    if not ok or math.isnan(v):
        raise ValueError(f"Invalid {name}: {value}")


def check_flattenable(params: list[Tensor]) -> None:
    """Refuse parameters that flat storage cannot hold without changing what the model computes."""
    seen: set[int] = set()
    extents: list[tuple[int, int, int, int]] = []
    for i, param in enumerate(params):
        p = local_tensor(param)  # a DTensor's checks apply to the shard this rank holds
        if id(param) in seen:
            raise ValueError(f"fusedopt: parameter {i} appears twice in one parameter group")
        seen.add(id(param))
        if p.layout != torch.strided:
            raise ValueError(f"fusedopt cannot optimize a {p.layout} parameter (index {i} of the group)")
        if p.is_complex():
            raise ValueError(f"fusedopt does not support complex parameters (index {i} of the group, "
                             f"dtype {p.dtype}); optimize torch.view_as_real views instead")
        if p.numel() > 1 and torch._debug_has_internal_overlap(p) == 1:
            raise ValueError(f"fusedopt cannot optimize parameter {i}: its elements overlap in memory "
                             f"(shape {tuple(p.shape)}, stride {p.stride()}); pass a contiguous tensor")
        if p.numel() > 0 and p.device.type != "meta":
            last_element = sum((size - 1) * stride for size, stride in zip(p.shape, p.stride()))
            start = p.data_ptr()
            extents.append((start, start + (last_element + 1) * p.element_size(), i, p.untyped_storage().data_ptr()))
    extents.sort()
    for (_start_a, end_a, a, storage_a), (start_b, _, b, storage_b) in zip(extents, extents[1:]):
        if storage_a == storage_b and start_b < end_a:
            raise ValueError(f"fusedopt cannot optimize parameters {a} and {b}: they share memory; "
                             "flat storage would give each its own copy")


def _local_values(value: Tensor, p: Tensor) -> Tensor:
    """A loaded state tensor as this rank's part of parameter `p`: a DTensor is redistributed like `p`."""
    if is_dtensor(value):
        if not is_dtensor(p):
            return value.full_tensor()
        return value.redistribute(p.device_mesh, p.placements).to_local()
    if is_dtensor(p):
        if value.numel() == p.numel():  # a whole (unsharded) tensor: keep this rank's shard of it
            from torch.distributed.tensor import distribute_tensor
            return distribute_tensor(value.reshape(p.shape).to(p.device), p.device_mesh, p.placements,
                                     src_data_rank=None).to_local()
    return value


def clip_coefficient(max_norm: float | None, norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_'s factor max_norm / (norm + 1e-6), clamped to 1; nan spreads as in torch."""
    if max_norm is None:
        return 1.0
    if math.isnan(norm):
        return math.nan
    return min(float(max_norm) / (norm + 1e-6), 1.0)


def _tensor_hyperparameters(groups: list[dict[str, Any]]) -> list[tuple[int, str, int | None, Tensor]]:
    """(group index, key, index in a tuple value or None, tensor) for every tensor hyperparameter, e.g. a tensor
    lr or betas: a compiled step passes them to the op so that it sees values the same graph just wrote."""
    found: list[tuple[int, str, int | None, Tensor]] = []
    for g, group in enumerate(groups):
        for key, value in group.items():
            if key == "params":
                continue
            if isinstance(value, Tensor):
                found.append((g, key, None, value))
            elif isinstance(value, (tuple, list)):
                found.extend((g, key, j, v) for j, v in enumerate(value) if isinstance(v, Tensor))
    return found


@dataclass
class StepScalars:
    """What one kernel call needs besides the group's hyperparameters: host numbers, or tensors on the buffer's
    device when the step is decided there (see `FusedOptimizer._decides_on_device`)."""

    # The step being taken, 1 for the first: an int, or a 1-element float32 tensor already incremented.
    step: int | Tensor
    # No update has reached these parameters yet (SGD initialises its momentum buffer from the gradient).
    first_step: bool
    # Multiplies every gradient: AMP's 1/scale times the clip coefficient.
    grad_scale: float | Tensor
    # When it holds a non-zero value the kernel writes nothing (AMP's found_inf, skip_nonfinite).
    found_inf: Tensor | None
    on_device: bool

    def lr(self, value: float | Tensor) -> float | Tensor:
        """The group's lr as the kernel takes it: in a step decided on the GPU a tensor lr there stays there (the
        kernel reads it, nothing waits); anything else becomes a Python float."""
        if self.on_device and isinstance(value, Tensor) and value.device.type == "cuda":
            return value.to(torch.float32).reshape(1)
        return scalar(value)


def _kernel_scale(value: float | Tensor) -> float | Tensor:
    """A gradient multiplier as the kernels take it: a float, or a 1-element float32 tensor."""
    return value.to(torch.float32).reshape(1) if isinstance(value, Tensor) else value


class FusedOptimizer(Optimizer):
    """Base class: a torch.optim.Optimizer whose groups live in flat buffers updated by fused kernels."""

    # State tensors this algorithm keeps per parameter, as (name, fill value), for a given group.
    def _state_specs(self, group: dict[str, Any]) -> list[tuple[str, float]]:
        raise NotImplementedError

    # Every state name this algorithm may keep (torch.optim's names), for checking loaded checkpoints.
    STATE_NAMES: tuple[str, ...] = ()

    # Whether state[p] exposes torch.optim's float32 "step" tensor (every FlatBuffer counts steps either way).
    _tracks_step = True

    def _update(self, group: dict[str, Any], buf: FlatBuffer, first: int, last: int, scalars: StepScalars,
                backend: str) -> None:
        raise NotImplementedError

    # None: a step is decided on the device when every buffer sits on one CUDA device and none is sharded (see
    # `_decides_on_device`). The tests set True to run that same path on CPU tensors.
    _device_decisions: bool | None = None

    def _validate_group(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        if defaults.get("differentiable"):
            raise ValueError("Invalid differentiable: True (fusedopt's fused kernels are not differentiable)")
        self._flat_groups: list[list[FlatBuffer]] = []
        self._backends: list[list[str]] = []
        # The global norm of the last clipped step: a float, or a 0-dim tensor when the step ran on the GPU.
        self.last_grad_norm: float | Tensor | None = None
        self._skipped_on_host = 0
        self._skipped_on_device: Tensor | None = None  # steps skip_nonfinite skipped, counted on the device
        self._device_decided_steps = 0  # identifies each step decided on the device in FlatBuffer.step_keys
        params = [params] if isinstance(params, Tensor) else list(params)
        # Validate every group before the first one is moved into flat storage: a rejected call changes nothing.
        candidates = [defaults] + [{**defaults, **g} for g in params if isinstance(g, dict)]
        for merged in candidates:
            self._validate_common(merged)
            self._validate_group(merged)
        super().__init__(params, defaults)
        # GradScaler hands us grad_scale and found_inf; we unscale and skip inside step.
        self._step_supports_amp_scaling = True
        self._handle = _torch_ops.register(self)

    # Groups ------------------------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        candidate = dict(self.defaults)
        candidate.update({k: v for k, v in param_group.items() if k != "params"})
        self._validate_common(candidate)
        self._validate_group(candidate)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        params = group["params"]
        try:
            check_flattenable(params)
        except ValueError:
            self.param_groups.pop()  # a rejected group leaves the optimizer as it was
            raise
        buffers = build_flat_buffers(params, master_weights=bool(group["master_weights"])) if params else []
        self._flat_groups.append(buffers)
        self._backends.append([resolve(group["backend"], b.device) for b in buffers])
        self._on_group_added(group, buffers)

    def _on_group_added(self, group: dict[str, Any], buffers: list[FlatBuffer]) -> None:
        """Hook for algorithms whose state exists before the first step (Adagrad)."""

    def _validate_common(self, group: dict[str, Any]) -> None:
        validate_backend(group["backend"])
        if group.get("differentiable"):
            raise ValueError("Invalid differentiable: True (fusedopt's fused kernels are not differentiable)")
        max_norm = group["max_grad_norm"]
        if max_norm is not None:
            check_range("max_grad_norm value", max_norm, 0.0)
        state_dtype = group["state_dtype"]
        if state_dtype is not None and state_dtype not in STATE_DTYPES:
            raise ValueError(f"Invalid state_dtype: {state_dtype} (expected torch.float32 or torch.bfloat16)")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in FUSED_DEFAULTS.items():
                group.setdefault(key, value)
        self._handle = _torch_ops.register(self)  # a copy is a different optimizer

    def _state_dtype(self, group: dict[str, Any]) -> torch.dtype:
        return group["state_dtype"] or torch.float32

    # Per-parameter state -----------------------------------------------------------------------------------

    def _init_state(self, group: dict[str, Any], buf: FlatBuffer, i: int) -> None:
        """Create state[p] as views into the flat buffers (torch.optim's names and shapes)."""
        p = buf.params[i]
        state: dict[str, Any] = {}
        if self._tracks_step:
            state["step"] = buf.steps[i]
        for name, fill in self._state_specs(group):
            state[name] = buf.state_view(buf.ensure_state(name, self._state_dtype(group), fill), i)
        if buf.master is not None:
            state["master_param"] = buf.state_view(buf.master, i)
        if state:  # like torch.optim, parameters without state (plain SGD) get no entry
            self.state[p] = state

    def _ensure_state_views(self, group: dict[str, Any], buf: FlatBuffer, has_grad: list[bool]) -> None:
        specs = self._state_specs(group)
        names = tuple(name for name, _ in specs)
        if buf.complete_state == names:
            return  # the common case after the first step: nothing to create
        complete = True
        for i, p in enumerate(buf.params):
            state = self.state.get(p)
            if not state:
                if has_grad[i]:
                    self._init_state(group, buf, i)
                else:
                    complete = False
                continue
            for name, fill in specs:  # a mode switched on mid-training (e.g. amsgrad) adds a state
                if name not in state:
                    state[name] = buf.state_view(buf.ensure_state(name, self._state_dtype(group), fill), i)
        # A parameter that has never had a gradient keeps the buffer incomplete: the loop runs again next step.
        buf.complete_state = names if complete else None

    def _run_keys(self, buf: FlatBuffer) -> list[Any]:
        """Parameters in one kernel call must agree on this key (the step count by default, known on the host)."""
        return buf.step_keys

    @property
    def skipped_steps(self) -> int:
        """Steps skipped by `skip_nonfinite` (AMP's own skips not included). Reading it waits for the GPU when
        steps run there, since the count is kept on the device."""
        on_device = 0 if self._skipped_on_device is None else int(self._skipped_on_device.item())
        return self._skipped_on_host + on_device

    # Step --------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimization step over every group (one fused kernel call per run of parameters).

        Under `torch.compile` the step is one `fusedopt::optimizer_step` custom op (see `_torch_ops`), which
        runs this same eager step when the compiled code executes, so dynamo needs no graph break here.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if torch.compiler.is_compiling():
            self._compiled_step(grad_scale, found_inf)
        else:
            self._eager_step(self.param_groups, grad_scale, found_inf)
        return loss

    def _eager_step(self, groups: list[dict[str, Any]], grad_scale: Tensor | float | None,
                    found_inf: Tensor | None) -> None:
        """The step itself; `groups` are the param groups (or copies carrying a compiled graph's hyperparameters)."""
        prepared: list[tuple[dict[str, Any], FlatBuffer, str, list[bool]]] = []
        for group, buffers, backends in zip(groups, self._flat_groups, self._backends):
            for buf, backend in zip(buffers, backends):
                has_grad = buf.prepare_step()
                if any(has_grad):
                    prepared.append((group, buf, backend, has_grad))
        # A first step that differs from later ones is chosen on the host, so it must not be skipped on the device.
        on_device = self._decides_on_device() and not any(
            self._first_step_differs(group) and any(has and buf.step_keys[i][0] == 0 for i, has in enumerate(has_grad))
            for group, buf, _, has_grad in prepared)
        if not on_device and found_inf is not None and bool(found_inf.sum() != 0):
            return  # GradScaler saw inf/nan: parameters, states and step counts stay as they are
        if not prepared:
            return

        skip: Tensor | None = None
        if on_device:
            scales, skip = self._device_scales(prepared, grad_scale, found_inf)
            self._device_decided_steps += 1
        else:
            host_scales = self._host_scales(prepared, grad_scale)
            if host_scales is None:
                return  # skip_nonfinite: parameters, states and step counts stay as they are
            scales = list(host_scales)
        applied = None if skip is None else 1.0 - skip  # per-step increment of the device step counts
        decided_as = self._device_decided_steps if skip is not None else None
        for (group, buf, backend, has_grad), grad_scale_k in zip(prepared, scales):
            self._ensure_state_views(group, buf, has_grad)
            for first, last in buf.runs(has_grad, self._run_keys(buf)):
                steps = buf.steps[first:last + 1]
                if on_device:
                    steps.add_(1.0 if applied is None else applied)  # before the kernel, which reads it
                    scalars = StepScalars(step=buf.steps[first:first + 1], first_step=buf.step_keys[first][0] == 0,
                                          grad_scale=grad_scale_k, found_inf=skip, on_device=True)
                    self._update(group, buf, first, last, scalars, backend)
                else:
                    step = int(buf.steps[first].item()) + 1
                    scalars = StepScalars(step=step, first_step=step == 1, grad_scale=grad_scale_k, found_inf=None,
                                          on_device=False)
                    self._update(group, buf, first, last, scalars, backend)
                    steps.add_(1)
                buf.count_steps(first, last, decided_as)
            buf.finish_step(has_grad)

    def _first_step_differs(self, group: dict[str, Any]) -> bool:
        """Whether this group's first update is a different formula that the kernel is told about by the host
        (SGD's momentum initialisation). Parameters that have not taken it yet are stepped with host decisions:
        `step_keys` then count only applied steps until it is done."""
        return False

    def _decides_on_device(self) -> bool:
        """Whether this step keeps AMP's found_inf, the gradient norm, the clip coefficient, skip_nonfinite and the
        step counts on the device, so that the host never waits for the GPU: when every buffer sits on one CUDA
        device and none is sharded. Otherwise those are host numbers (sharded norms are all-reduced on the host)."""
        if self._device_decisions is not None:
            return self._device_decisions
        buffers = [buf for group_buffers in self._flat_groups for buf in group_buffers]
        devices = {buf.device for buf in buffers}
        return (len(devices) == 1 and next(iter(devices)).type == "cuda"
                and not any(buf.sharded for buf in buffers))

    def _host_scales(self, prepared: list[tuple[dict[str, Any], FlatBuffer, str, list[bool]]],
                     grad_scale: Tensor | float | None) -> list[float] | None:
        """Each prepared buffer's gradient multiplier (AMP 1/scale x clip coefficient), or None when
        skip_nonfinite skips this step."""
        unscale = 1.0 if grad_scale is None else 1.0 / scalar(grad_scale)
        coefficients = [1.0] * len(prepared)
        clipping = any(group["max_grad_norm"] is not None for group, *_ in prepared)
        if clipping or any(group["skip_nonfinite"] for group, *_ in prepared):
            norm, nonfinite = self._global_grad_norm(prepared, unscale)
            if nonfinite and any(group["skip_nonfinite"] for group, *_ in prepared):
                self._skipped_on_host += 1
                return None
            if clipping:
                self.last_grad_norm = norm
                coefficients = [clip_coefficient(group["max_grad_norm"], norm) for group, *_ in prepared]
        return [unscale * coefficient for coefficient in coefficients]

    def _device_scales(self, prepared: list[tuple[dict[str, Any], FlatBuffer, str, list[bool]]],
                       grad_scale: Tensor | float | None,
                       found_inf: Tensor | None) -> tuple[list[float | Tensor], Tensor | None]:
        """`_host_scales` computed on the device: the gradient multipliers (tensors when they depend on device
        values) and the flag that makes the kernels skip this step (AMP's found_inf, or skip_nonfinite's
        verdict), None when nothing can skip it. The same formulas, evaluated in float64 tensors."""
        device = prepared[0][1].device
        # GradScaler's found_inf sums the flags of several devices: any non-zero value means skip.
        skip = None if found_inf is None else (found_inf.to(device).reshape(1) != 0).to(torch.float32)
        unscale: float | Tensor = 1.0
        if isinstance(grad_scale, Tensor):
            unscale = grad_scale.to(device=device, dtype=torch.float64).reshape(1).reciprocal()
        elif grad_scale is not None:
            unscale = 1.0 / float(grad_scale)
        scales: list[float | Tensor] = [unscale] * len(prepared)
        clipping = any(group["max_grad_norm"] is not None for group, *_ in prepared)
        if clipping or any(group["skip_nonfinite"] for group, *_ in prepared):
            norm, nonfinite = self._device_grad_norm(prepared, unscale, device)
            if any(group["skip_nonfinite"] for group, *_ in prepared):
                counted = nonfinite if skip is None else nonfinite * (1.0 - skip)  # AMP's own skips not counted
                if self._skipped_on_device is None or self._skipped_on_device.device != device:
                    self._skipped_on_device = torch.zeros(1, dtype=torch.float32, device=device)
                self._skipped_on_device.add_(counted)
                skip = nonfinite if skip is None else torch.maximum(skip, nonfinite)
            if clipping:
                self.last_grad_norm = norm.reshape(())
                scales = [unscale if group["max_grad_norm"] is None
                          else torch.clamp(float(group["max_grad_norm"]) / (norm + 1e-6), max=1.0) * unscale
                          for group, *_ in prepared]  # torch.clamp keeps nan, as clip_coefficient does
        return [_kernel_scale(value) for value in scales], skip

    @staticmethod
    def _device_grad_norm(prepared: list[tuple[dict[str, Any], FlatBuffer, str, list[bool]]],
                          unscale: float | Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
        """The global gradient norm as a 1-element float64 tensor and the 1-element float32 non-finite flag (1.0
        when a gradient holds inf or nan), both computed on the device."""
        spans = [(buf, backend, buf.span(first, last)) for _, buf, backend, has_grad in prepared
                 for first, last in buf.runs(has_grad, [0] * len(has_grad))]
        sums = torch.zeros(len(spans), dtype=torch.float32, device=device)
        flags = torch.zeros(len(spans), dtype=torch.float32, device=device)
        for k, (buf, backend, span) in enumerate(spans):
            functional.sum_of_squares_into(buf.grad[span], sums[k:k + 1], flags[k:k + 1], backend=backend)
        norm = sums.to(torch.float64).sum().sqrt().reshape(1) * unscale
        return norm, flags.amax().reshape(1)

    # torch.compile -----------------------------------------------------------------------------------------

    def _compiled_step(self, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """What dynamo traces for `step()`: the aliasing repair of `prepare_step` for gradients (a `.grad` that is
        not the flat buffer's view is copied into it and replaced by it), then one `fusedopt::optimizer_step` call.

        Doing that repair in the graph rather than in the op keeps every write to a tensor the graph can see
        declared: the op writes only the flat parameter buffers (one storage each, so inductor lets it update them
        in place) and reads the gradients. It never gets the flat gradient buffers: a graph holding a buffer and
        views into it that some op writes (gradient clipping, zero_grad) needs AOTAutograd's synthetic bases,
        which fail on recompiled graphs.
        """
        buffers = [buf for group_buffers in self._flat_groups for buf in group_buffers]
        for buf in buffers:
            if not buf.sharded:  # a sharded buffer's gradients belong to FSDP; the op copies them in
                for i, p in enumerate(buf.params):
                    if p.grad is not None and p.grad is not buf.grad_view(i):
                        buf.grad_view(i).copy_(p.grad)
                        p.grad = buf.grad_view(i)
        grads = [p.grad for buf in buffers for p in buf.params]
        hyperparameters = [value for _, _, _, value in _tensor_hyperparameters(self.param_groups)]
        torch.ops.fusedopt.optimizer_step(self._handle, [buf.param for buf in buffers], grads, grad_scale,
                                          found_inf, hyperparameters)

    @torch.no_grad()
    def _step_from_op(self, flat_params: list[Tensor], grads: list[Tensor | None], grad_scale: Tensor | None,
                      found_inf: Tensor | None, hyperparameters: list[Tensor]) -> None:
        """The real implementation of `fusedopt::optimizer_step`: an eager step on the values the op was given.

        With inductor the op normally receives the optimizer's own flat parameter buffers and gradient views, and
        this is a plain eager step. Otherwise (functionalization under backend="aot_eager", a graph that also reads
        the parameters, or inductor handing over a gradient it knows equals the view) it gets other tensors holding
        the graph's values: parameters that differ are loaded into flat storage first and the passed copies receive
        the updated values afterwards, and gradients other than the views are read through a scratch copy of the
        flat gradient buffer, because the graph may already have written the real one (zeroed it, say) without
        this op's knowledge. Every `p.grad` is left as the op found it: no Python state changes behind dynamo.
        """
        buffers = [buf for group_buffers in self._flat_groups for buf in group_buffers]
        slots = [(buf, i) for buf in buffers for i in range(len(buf.params))]
        if len(flat_params) != len(buffers) or len(grads) != len(slots):
            raise RuntimeError(f"fusedopt::optimizer_step: got {len(flat_params)} flat parameter buffers and "
                               f"{len(grads)} gradients, the optimizer has {len(buffers)} and {len(slots)}")
        copies = [(given, buf) for given, buf in zip(flat_params, buffers) if given.data_ptr() != buf.param.data_ptr()]
        for given, buf in copies:
            for i in range(len(buf.params)):
                if not torch.equal(buf.region(given, i), buf.region(buf.param, i)):
                    buf.region(buf.param, i).copy_(buf.region(given, i))
                    if buf.master is not None:
                        buf.region(buf.master, i).copy_(buf.region(buf.param, i))
        found = [buf.params[i].grad for buf, i in slots]
        real_grads: dict[int, Tensor] = {}  # id(buf) -> its flat gradient buffer, while a scratch copy stands in
        try:
            for (buf, i), grad in zip(slots, grads):
                p = buf.params[i]
                if grad is None or buf.sharded:
                    p.grad = grad  # None skips the parameter; FSDP's gradient shards are copied in by prepare_step
                    continue
                if grad.data_ptr() != buf.region(buf.grad, i).data_ptr():
                    if id(buf) not in real_grads:
                        real_grads[id(buf)] = buf.grad
                        buf.grad = buf.grad.clone()
                    buf.region(buf.grad, i).copy_(grad.reshape(-1))
                p.grad = buf.grad_view(i)  # what prepare_step recognises as already in place
            self._eager_step(self._groups_with(hyperparameters), grad_scale, found_inf)
        finally:
            for buf in buffers:
                buf.grad = real_grads.get(id(buf), buf.grad)
            for (buf, i), grad in zip(slots, found):
                buf.params[i].grad = grad
        for given, buf in copies:
            given.copy_(buf.param)

    def _groups_with(self, hyperparameters: list[Tensor]) -> list[dict[str, Any]]:
        """The param groups, with copies where the op was handed tensor hyperparameters other than the groups' own
        (a graph that wrote to `group["lr"]` before the step passes the written value)."""
        groups = self.param_groups
        entries = _tensor_hyperparameters(groups)
        if len(entries) != len(hyperparameters):
            raise RuntimeError(f"fusedopt::optimizer_step: got {len(hyperparameters)} tensor hyperparameters, "
                               f"the param groups hold {len(entries)}")
        replaced = [(g, key, index, given) for (g, key, index, own), given in zip(entries, hyperparameters)
                    if given.data_ptr() != own.data_ptr()]
        if not replaced:
            return groups
        groups = [dict(group) for group in groups]
        for g, key, index, given in replaced:
            if index is None:
                groups[g][key] = given
            else:
                values = list(groups[g][key])
                values[index] = given
                groups[g][key] = type(groups[g][key])(values)
        return groups

    def _compiled_zero_grad(self) -> None:
        """What dynamo traces for `zero_grad(set_to_none=False)`: every gradient that is not None zeroed in place,
        after re-pointing any that is not the flat buffer's view at that view, as the eager zero_grad does. (One
        `zero_()` per gradient: inductor writes those straight into the buffer, while `_foreach_zero_` has no
        lowering and would allocate fresh zeros and copy them over.)"""
        for buffers in self._flat_groups:
            for buf in buffers:
                for i, p in enumerate(buf.params):
                    if p.grad is None:
                        continue
                    if not buf.sharded and p.grad is not buf.grad_view(i):
                        p.grad = buf.grad_view(i)
                    p.grad.zero_()

    def _global_grad_norm(self, prepared: list[tuple[dict[str, Any], FlatBuffer, str, list[bool]]],
                          unscale: float) -> tuple[float, bool]:
        """L2 norm of every gradient of this step (deterministic sum of squares) and whether any is inf/nan.

        Sums over sharded (DTensor) buffers are all-reduced across their process groups, one all-reduce per
        distinct set of groups; every rank takes part for every sharded buffer, gradients or not.
        """
        partials = {id(buf): self._sum_of_squares(buf, backend, has_grad) for _, buf, backend, has_grad in prepared}
        total, nonfinite = 0.0, False
        sharded: dict[tuple[int, ...], tuple[list[Any], list[float]]] = {}
        for buffers in self._flat_groups:
            for buf in buffers:
                if not buf.reduce_groups:
                    continue
                key = tuple(id(g) for g in buf.reduce_groups)
                entry = sharded.setdefault(key, (buf.reduce_groups, [0.0, 0.0]))
                partial, flag = partials.pop(id(buf), (0.0, False))
                entry[1][0] += partial
                entry[1][1] += float(flag)
        for partial, flag in partials.values():
            total += partial
            nonfinite = nonfinite or flag
        for groups, (partial, flag) in sharded.values():
            sums = torch.tensor([partial, flag], dtype=torch.float64)
            all_reduce_sum(sums, groups)
            total += float(sums[0])
            nonfinite = nonfinite or bool(sums[1] > 0)
        return math.sqrt(total) * unscale, nonfinite

    @staticmethod
    def _sum_of_squares(buf: FlatBuffer, backend: str, has_grad: list[bool]) -> tuple[float, bool]:
        total, nonfinite = 0.0, False
        for first, last in buf.runs(has_grad, [0] * len(has_grad)):
            partial, flag = functional.sum_of_squares(buf.grad[buf.span(first, last)], backend=backend)
            total += partial
            nonfinite = nonfinite or flag
        return total, nonfinite

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero every gradient with one fill per flat buffer, keeping `.grad` views (the fast path).

        Unlike torch.optim, the default is `set_to_none=False`: gradients that are None stay None, the others
        are zeroed in place. `set_to_none=True` drops all gradients; the next step copies them back in.
        Under `torch.compile` it is traced as an in-place zero of each gradient.
        """
        if torch.compiler.is_compiling() and not set_to_none:
            self._compiled_zero_grad()
            return
        for buffers in self._flat_groups:
            for buf in buffers:
                buf.zero_grad(set_to_none)

    # Checkpoints -------------------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a fusedopt or torch.optim checkpoint; state is copied into this optimizer's flat buffers."""
        saved_state = state_dict["state"]
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, optimizer has {len(self.param_groups)}"
            )
        ids = [i for g in saved_groups for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        if len(ids) != len(params):
            raise ValueError("loaded state dict contains a parameter group that doesn't match the size of "
                             "optimizer's group")
        owners = [{**self.defaults, **g} for g in saved_groups for _ in g["params"]]
        for saved_group in saved_groups:
            merged = {**self.defaults, **{k: v for k, v in saved_group.items() if k != "params"}}
            self._validate_common(merged)
            self._validate_group(merged)
        for saved_id, p, owner in zip(ids, params, owners):
            self._check_loaded_state(saved_id, p, saved_state.get(saved_id), owner)
        layouts = [{k: g[k] for k in _LAYOUT_KEYS} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, layout in zip(self.param_groups, layouts):
            group.update(layout)
        originals = {id(p): saved_state.get(saved_id) for saved_id, p in zip(ids, params)}
        for group, buffers in zip(self.param_groups, self._flat_groups):
            for buf in buffers:
                buf.complete_state = None
                self._adopt_loaded_state(group, buf, originals)

    def _check_loaded_state(self, saved_id: int, p: Tensor, loaded: dict[str, Any] | None,
                            group: dict[str, Any]) -> None:
        """Refuse a checkpoint entry whose keys, sizes or dtypes do not fit this algorithm and parameter."""
        if not loaded:
            return
        required = {name for name, _ in self._state_specs(group)} | ({"step"} if self._tracks_step else set())
        allowed = set(self.STATE_NAMES) | {"step", "master_param"}
        missing, unknown = required - set(loaded), set(loaded) - allowed
        if missing or unknown:
            raise ValueError(f"loaded state of parameter {saved_id} does not fit {type(self).__name__}: "
                             f"missing {sorted(missing)}, unknown {sorted(unknown)}")
        for key, value in loaded.items():
            if key == "step" or value is None:
                continue
            if not isinstance(value, Tensor) or not value.is_floating_point():
                raise ValueError(f"loaded state {key!r} of parameter {saved_id} must be a floating-point tensor, "
                                 f"got {value.dtype if isinstance(value, Tensor) else type(value).__name__}")
            if value.numel() != p.numel():
                raise ValueError(f"loaded state {key!r} of parameter {saved_id} has {value.numel()} elements, "
                                 f"the parameter has {p.numel()}")

    @torch.no_grad()
    def _adopt_loaded_state(self, group: dict[str, Any], buf: FlatBuffer,
                            originals: dict[int, dict[str, Any] | None]) -> None:
        """Copy loaded per-parameter state into the flat buffers and make state[p] views again.

        Values come from the checkpoint's own tensors, not from torch's copies cast to the parameter dtype, so
        fp32 states and master weights of 16-bit parameters keep their precision.
        """
        for i, p in enumerate(buf.params):
            loaded = originals.get(id(p))
            if not loaded:
                self.state.pop(p, None)
                continue
            self._init_state(group, buf, i)
            state = self.state.setdefault(p, {})
            for key, value in loaded.items():
                if key == "step":
                    buf.steps[i] = scalar(value)
                elif key == "master_param":
                    if buf.master is not None:
                        buf.region(buf.master, i).copy_(_local_values(value, p).reshape(-1))
                elif isinstance(value, Tensor) and key in state:
                    local_tensor(state[key]).copy_(_local_values(value, p).reshape(buf.shapes[i]))
                elif key not in state:
                    state[key] = value
            if buf.master is not None and "master_param" not in loaded:
                buf.region(buf.master, i).copy_(buf.region(buf.param, i))
            self._after_state_loaded(group, buf, i, loaded)
        buf.reset_step_keys()

    def _after_state_loaded(self, group: dict[str, Any], buf: FlatBuffer, i: int, loaded: dict[str, Any]) -> None:
        """Hook for algorithms that derive bookkeeping from loaded state (SGD's first momentum step)."""

    @property
    def flat_buffers(self) -> list[list[FlatBuffer]]:
        """The flat buffer sets of each param group (one per device and dtype)."""
        return self._flat_groups
