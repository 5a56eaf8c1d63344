"""The optimizer base class: param groups over flat storage, state views in torch.optim's layout, and the step that
hands each flat buffer set to one `fusedopt.functional.update` call. No arithmetic: the algorithm is the class's
`spec` (optim/_spec.py) and its math header; gradient scaling lives in fusedopt._scaling, checkpoint loading in
optim/_checkpoint.py, the edits of torch's visible objects in optim/_shadow.py, torch.compile glue in
fusedopt._torch_ops.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, TypedDict

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import _scaling, _torch_ops, functional
from .._backend import resolve, validate_backend
from .._distributed import local_tensor
from ..flat import (
    ABSMAX,
    PARAM_DTYPES,
    STATE_8BIT,
    STATE_DTYPES,
    FlatBuffer,
    build_flat_buffers,
    check_master_weights,
    check_master_weights_mode,
    state_dtype_for,
)
from . import _checkpoint, _shadow
from ._spec import Spec, check_range, scalar


class FusedOptions(TypedDict, total=False):
    """fusedopt's own keywords, accepted by every optimizer beside torch.optim's.

    backend: "auto", "cpu", "cuda" or "reference" (FUSEDOPT_BACKEND overrides it). max_grad_norm: clip the global
    gradient norm inside the step (kept in `last_grad_norm`). state_dtype: torch.float32 (default), torch.bfloat16 or
    "8bit" states (one byte per element and a float32 absmax per 256, csrc/include/fusedopt/quant8.h; optimizer.state
    then holds the codes and "<name>_absmax", and state_dict() torch.optim's float32 states unless
    compact_state_dict); float64 parameters always keep float64 states. compact_state_dict: with 8-bit states,
    state_dict() saves the codes and absmaxes as they are (a quarter of the size; fusedopt reads it back, torch.optim
    cannot). master_weights: how 16-bit parameters keep precision,
    in the same pass: True, fp32 copies (4 bytes per parameter); "kahan", a 16-bit compensation buffer that carries
    each rounding error into the next step (2 bytes); "stochastic", stochastic rounding of bfloat16 parameters (no
    memory), keyed on rounding_seed (default: torch.initial_seed() when the optimizer is built) and the step.
    skip_nonfinite: a step whose gradients hold inf or nan changes nothing (counted in `skipped_steps`).
    """

    backend: str
    max_grad_norm: float | None
    state_dtype: torch.dtype | None
    master_weights: bool | str
    skip_nonfinite: bool
    rounding_seed: int | None
    compact_state_dict: bool


FUSED_DEFAULTS: dict[str, Any] = {
    "backend": "auto",
    "max_grad_norm": None,
    "state_dtype": None,
    "master_weights": False,
    "skip_nonfinite": False,
    "rounding_seed": None,
    "compact_state_dict": False,
}

FUSED_DEVICES = ("cpu", "cuda")


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


def check_dtypes(params: list[Any], group: dict[str, Any], *, other_dtypes_later: bool = False) -> None:
    """Refuse parameters whose dtype flat storage does not hold, or that the group's storage options do not fit
    (float64 parameters keep float64 states and no master weights). `other_dtypes_later`: only the options are checked
    here (before torch's own checks of the group, which come first for a parameter that is no float tensor)."""
    for i, param in enumerate(params):
        if not isinstance(param, Tensor):
            continue  # torch.optim's add_param_group refuses it
        dtype = local_tensor(param).dtype
        if dtype not in PARAM_DTYPES:
            if other_dtypes_later:
                continue
            raise TypeError(f"fusedopt supports float32, bfloat16, float16 and float64 parameters, got {dtype} "
                            f"(index {i} of the group)")
        state_dtype_for(dtype, group["state_dtype"])
        check_master_weights(dtype, group["master_weights"])


Prepared = tuple[dict[str, Any], FlatBuffer, str]  # (group, buffer set with a gradient this step, backend)


class FusedOptimizer(Optimizer):
    """Base class: a torch.optim.Optimizer whose groups live in flat buffers updated by fused kernels."""

    spec: ClassVar[Spec]
    # torch.optim's defaults of this algorithm, read from the subclass's __init__ signature (its one definition).
    torch_defaults: ClassVar[dict[str, Any]] = {}

    # None: a step is decided on the device when every buffer sits on one CUDA device and none is sharded (see
    # `_decides_on_device`). The tests set True to run that same path on CPU tensors.
    _device_decisions: bool | None = None

    # Group keys a loaded checkpoint does not change: where and how state is stored, fusedopt's own policy.
    kept_on_load: ClassVar[tuple[str, ...]] = tuple(FUSED_DEFAULTS)

    def spec_of(self, group: dict[str, Any]) -> Spec:
        """The algorithm of a param group: the class's spec (Muon's non-matrix groups are AdamW's)."""
        return self.spec

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        signature = inspect.signature(cls.__init__)
        cls.torch_defaults = {name: p.default for name, p in signature.parameters.items()
                              if p.default is not inspect.Parameter.empty and name not in FUSED_DEFAULTS}

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], options: FusedOptions) -> None:
        if isinstance(params, Tensor):
            raise TypeError("params argument given to the optimizer should be an iterable of Tensors or dicts, but "
                            f"got {torch.typename(params)}")
        unknown = set(options) - set(FUSED_DEFAULTS)
        if unknown:
            raise TypeError(f"{type(self).__name__}.__init__() got unexpected keyword arguments {sorted(unknown)}")
        defaults = {**defaults, **FUSED_DEFAULTS, **options}
        if defaults["rounding_seed"] is None:  # reproducible under torch.manual_seed, different across seeds
            defaults["rounding_seed"] = torch.initial_seed() % 2**64
        self._flat_groups: list[list[FlatBuffer]] = []
        self._backends: list[list[str]] = []
        self._group_params: list[tuple[list[Any], int]] = []
        # The global norm of the last clipped step: a float, or a 0-dim tensor when the step ran on the GPU.
        self.last_grad_norm: float | Tensor | None = None
        self._skipped_on_host = 0
        self._skipped_on_device: Tensor | None = None  # steps skip_nonfinite skipped, counted on the device
        params = list(params)
        # Validate every group before the first one is moved into flat storage: a rejected call changes nothing.
        for merged in [defaults] + [{**defaults, **g} for g in params if isinstance(g, dict)]:
            self._validate(merged)
        for group in params:  # the parameters' dtypes against their group's storage options (float64: no master)
            if isinstance(group, dict):
                if not isinstance(group.get("params"), (Tensor, list, tuple)) and "params" in group:
                    group["params"] = list(group["params"])  # a generator, read once (torch's add_param_group too)
                members = group.get("params", [])
                check_dtypes([members] if isinstance(members, Tensor) else list(members), {**defaults, **group},
                             other_dtypes_later=True)
        check_dtypes([p for p in params if isinstance(p, Tensor)], defaults, other_dtypes_later=True)
        super().__init__(params, defaults)
        self.state = _shadow.TrackedState(self.state)
        # GradScaler hands us grad_scale and found_inf; we unscale and skip inside step.
        self._step_supports_amp_scaling = True
        self._handle = _torch_ops.register(self)

    # Groups ------------------------------------------------------------------------------------------------

    def _validate(self, group: dict[str, Any]) -> None:
        validate_backend(group["backend"])
        if group.get("differentiable"):
            raise ValueError("Invalid differentiable: True (fusedopt's fused kernels are not differentiable)")
        if group["max_grad_norm"] is not None:
            check_range("max_grad_norm value", group["max_grad_norm"], 0.0)
        state_dtype = group["state_dtype"]
        if state_dtype is not None and state_dtype not in STATE_DTYPES and state_dtype != STATE_8BIT:
            raise ValueError(f"Invalid state_dtype: {state_dtype!r} (expected torch.float32, torch.bfloat16 or '8bit', "
                             "or torch.float64 for float64 parameters)")
        reason = self.spec_of(group).no_8bit
        if state_dtype == STATE_8BIT and reason:
            raise ValueError(f"Invalid state_dtype: '8bit' for {type(self).__name__} ({reason})")
        check_master_weights_mode(group["master_weights"])
        if not isinstance(group["compact_state_dict"], bool):
            raise ValueError(f"Invalid compact_state_dict: {group['compact_state_dict']!r} (expected True or False)")
        seed = group["rounding_seed"]
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
            raise ValueError(f"Invalid rounding_seed: {seed!r} (expected an int, 0 <= seed < 2**64)")
        self.spec_of(group).validate(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(self.state, _shadow.TrackedState):  # torch.optim's __init__ adds groups before we wrap it
            self.state = _shadow.TrackedState(self.state)
        self._validate({**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}})
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        params = group["params"]
        try:
            check_flattenable(params)
            check_dtypes(params, group)
            self.spec_of(group).check_params(params)
        except (ValueError, TypeError, NotImplementedError):
            self.param_groups.pop()  # a rejected group leaves the optimizer as it was
            raise
        self._flat_groups.append([])
        self._backends.append([])
        self._build_group(len(self.param_groups) - 1)
        if self.spec_of(group).state_at_init:
            for buf in self._flat_groups[-1]:
                for i in range(len(buf.params)):
                    self._init_state(group, buf, i)

    def _build_group(self, index: int) -> None:
        """(Re)build the flat buffers of param group `index` from its current parameter list."""
        group = self.param_groups[index]
        params = group["params"]
        buffers = build_flat_buffers(params, master_weights=group["master_weights"],
                                     quantized=group["state_dtype"] == STATE_8BIT) if params else []
        for buf in buffers:
            self.spec_of(group).fill_scalars(buf.segments, group)
            self.spec_of(group).fill_layout(buf)
        for old in self._flat_groups[index]:
            old.close()
        self._flat_groups[index] = buffers
        self._backends[index] = [resolve(group["backend"], b.device) for b in buffers]
        # What a step checks to notice `param_groups[i]["params"]` replaced or edited in place.
        self._group_params[index:index + 1] = [(params, len(params))]

    def _follow_param_groups(self) -> None:
        """Rebuild the buffers of a group whose parameter list user code replaced or edited (append, a subset to
        freeze some), carrying over the state of the parameters it keeps; a group dict appended to param_groups
        directly is taken in as add_param_group would."""
        if len(self.param_groups) < len(self._flat_groups):
            raise RuntimeError(f"fusedopt: param_groups has {len(self.param_groups)} groups, the optimizer built "
                               f"{len(self._flat_groups)}; remove groups by creating a new optimizer")
        for index, group in enumerate(self.param_groups):
            if index >= len(self._flat_groups):
                added = self.param_groups.pop(index)
                self.add_param_group(added)
                continue
            params, count = self._group_params[index]
            if group["params"] is params and len(params) == count:
                continue
            if not isinstance(group["params"], list):
                group["params"] = list(group["params"])
            check_flattenable(group["params"])
            check_dtypes(group["params"], group)
            self.spec_of(group).check_params(group["params"])
            kept = {id(p): {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in dict.get(self.state, p).items()}
                    for p in group["params"] if dict.get(self.state, p)}
            self._build_group(index)
            for buf in self._flat_groups[index]:
                _checkpoint.adopt(self, group, buf, kept)
            self.state.dirty = False

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in {**self.torch_defaults, **FUSED_DEFAULTS}.items():
                group.setdefault(key, value)
            group.update(self.spec_of(group).forced)
        self.state = _shadow.TrackedState(self.state)
        if "_flat_groups" not in self.__dict__:  # a copy or an unpickled optimizer: build its own flat storage
            self._flat_groups, self._backends, self._group_params = [], [], []
            self.last_grad_norm, self._skipped_on_host, self._skipped_on_device = None, 0, None
            self._step_supports_amp_scaling = True
            for index in range(len(self.param_groups)):
                self._flat_groups.append([])
                self._backends.append([])
                self._build_group(index)
            self.state.dirty = True  # the copied state tensors are copied into the new buffers at the next step
        self._handle = _torch_ops.register(self)  # a copy is a different optimizer

    # Per-parameter state -----------------------------------------------------------------------------------

    def _init_state(self, group: dict[str, Any], buf: FlatBuffer, i: int, fresh: bool = False) -> None:
        """Create state[p] as views into the flat buffers (torch.optim's names and shapes). `fresh`: the parameter's
        state is created now, at its first step, so each state's region takes its first value from the group as it
        is now (a first value such as Rprop's step_size = lr follows a learning rate changed since the buffer was
        allocated)."""
        p = buf.params[i]
        spec = self.spec_of(group)
        state: dict[str, Any] = {}
        if spec.tracks_step:
            state["step"] = buf.steps[i]
        if fresh:
            spec.fill_scalars(buf.segments, group, i)
        for j, s in enumerate(spec.scalars):
            state[s.name] = buf.segments.scalars[i, j]
        dtype = state_dtype_for(buf.dtype, group["state_dtype"])
        for s in spec.kept_states(group):
            buf.ensure_state(s.name, dtype, s.fill(group), s.shape, s.signed)
            view = buf.state_view(s.name, i)
            if view is None:  # a state this parameter's shape does not keep
                continue
            if fresh:
                buf.fill_state(s.name, i, s.fill(group))
            state[s.name] = view
            if buf.is_8bit(s.name):
                state[s.name + ABSMAX] = buf.state_view(s.name + ABSMAX, i)
        if buf.master is not None:
            state["master_param"] = buf.state_view("master_param", i)
        if buf.comp is not None:
            state["kahan_comp"] = buf.state_view("kahan_comp", i)
        if state:  # like torch.optim, parameters without state (a stateless configuration) get no entry
            self.state.put(p, state)

    def _ensure_state_views(self, group: dict[str, Any], buf: FlatBuffer) -> None:
        kept = self.spec_of(group).kept_states(group)
        names = tuple(s.name for s in kept)
        if buf.complete_state == names:
            return  # the common case after the first step: nothing to create
        complete = True
        dtype = state_dtype_for(buf.dtype, group["state_dtype"])
        for i, p in enumerate(buf.params):
            state = dict.get(self.state, p)
            if not state:
                if buf.segments.flags[i]:
                    self._init_state(group, buf, i, fresh=True)
                else:
                    complete = False
                continue
            for s in kept:  # a mode switched on mid-training (e.g. amsgrad) adds a state
                if s.name not in state:
                    buf.ensure_state(s.name, dtype, s.fill(group), s.shape, s.signed)
                    view = buf.state_view(s.name, i)
                    if view is not None:
                        dict.__setitem__(state, s.name, view)
                    if buf.is_8bit(s.name):
                        dict.__setitem__(state, s.name + ABSMAX, buf.state_view(s.name + ABSMAX, i))
        # A parameter that has never had a gradient keeps the buffer incomplete: the loop runs again next step.
        buf.complete_state = names if complete else None

    @property
    def skipped_steps(self) -> int:
        """Steps skipped by `skip_nonfinite` (AMP's own skips not included). Reading it waits for the GPU when
        steps run there, since the count is kept on the device."""
        on_device = 0 if self._skipped_on_device is None else int(self._skipped_on_device.item())
        return self._skipped_on_host + on_device

    @property
    def flat_buffers(self) -> list[list[FlatBuffer]]:
        """The flat buffer sets of each param group (one per device and dtype)."""
        return self._flat_groups

    # Step --------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimization step over every group: one fused kernel call per flat buffer set.

        Under `torch.compile` the step is one `fusedopt::optimizer_step` custom op (see `_torch_ops`), which
        runs this same eager step when the compiled code executes, so dynamo needs no graph break here.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if torch.compiler.is_compiling():
            _torch_ops.compiled_step(self, grad_scale, found_inf)
        else:
            self._eager_step(self.param_groups, grad_scale, found_inf)
        return loss

    def _eager_step(self, groups: list[dict[str, Any]], grad_scale: Tensor | float | None,
                    found_inf: Tensor | None) -> None:
        """The step itself; `groups` are the param groups (or copies carrying a compiled graph's hyperparameters)."""
        self._follow_visible_objects()
        prepared: list[Prepared] = []
        for group, buffers, backends in zip(groups, self._flat_groups, self._backends):
            for buf, backend in zip(buffers, backends):
                if buf.prepare_step() or buf.reduce_groups:  # sharded buffers join every collective
                    prepared.append((group, buf, backend))
        on_device = self._decides_on_device()
        if not on_device and found_inf is not None and bool(found_inf.sum() != 0):
            return  # GradScaler saw inf/nan: parameters, states and step counts stay as they are
        prepared_with_grads = [entry for entry in prepared if entry[1].segments.any_active()]
        for group, buf, _ in prepared_with_grads:
            # torch.optim's check, with its message: fused=True asks for fused kernels, which exist on cpu and cuda.
            if group.get("fused") and buf.device.type not in FUSED_DEVICES:
                raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported "
                                   f"devices: {list(FUSED_DEVICES)} but {buf.param.dtype} and {buf.device.type}")
        if not prepared_with_grads and not any(buf.reduce_groups for _, buf, _ in prepared):
            return
        decided = self._scales(prepared, grad_scale, found_inf, on_device)
        if decided is None:
            return  # skip_nonfinite: parameters, states and step counts stay as they are
        scales, skip = decided
        for (group, buf, backend), scale in zip(prepared, scales):
            if not buf.segments.any_active() and not buf.reduce_groups:
                continue
            self._ensure_state_views(group, buf)
            self._update(group, buf, backend, self._lr(group["lr"], on_device, buf.dtype), scale, skip)
            buf.finish_step()

    def _update(self, group: dict[str, Any], buf: FlatBuffer, backend: str, lr: float | Tensor,
                grad_scale: _scaling.Scale, found_inf: Tensor | None) -> None:
        """One step of the group's algorithm over one flat buffer set: one `functional.update` call."""
        spec = self.spec_of(group)
        functional.update(
            spec.kernel, buf.param, buf.grad, [buf.state.get(s.name) for s in spec.states], buf.master, buf.segments,
            hyper=spec.hyper_for(group, buf.dtype), lr=lr, grad_scale=grad_scale, found_inf=found_inf,
            backend=backend, norm_reduce=buf.all_reduce_sums if buf.reduce_groups else None,
            absmax=[buf.absmax.get(s.name) for s in spec.states] if buf.absmax else None,
            signed=[s.signed for s in spec.states], **self.param_storage(group, buf))

    @staticmethod
    def param_storage(group: dict[str, Any], buf: FlatBuffer) -> dict[str, Any]:
        """How the buffer's 16-bit parameters are kept, beyond master weights: its Kahan compensation buffer, or the
        seed of its stochastic rounding (functional.update's comp and rounding_seed)."""
        return {"comp": buf.comp, "rounding_seed": group["rounding_seed"] if buf.stochastic else None}

    def _follow_visible_objects(self) -> None:
        """Before trusting its copies, the step checks what user code may have changed: param_groups' parameter
        lists (identity and length) and optimizer.state (a dirty flag set by its edits); the buffers follow."""
        if len(self.param_groups) != len(self._flat_groups) or any(
                group["params"] is not params or len(params) != count
                for group, (params, count) in zip(self.param_groups, self._group_params)):
            self._follow_param_groups()
        if not isinstance(self.state, _shadow.TrackedState):
            self.state = _shadow.TrackedState(self.state)
            self.state.dirty = True
        if self.state.dirty:
            _shadow.follow_state(self)

    @staticmethod
    def _lr(value: float | Tensor, on_device: bool, param_dtype: torch.dtype) -> float | Tensor:
        """The group's lr as the kernel takes it: in a step decided on the GPU a tensor lr there stays there (the
        kernel reads it in its compute dtype, float64 for float64 parameters, else float32; nothing waits); anything
        else becomes a Python float."""
        if on_device and isinstance(value, Tensor) and value.device.type == "cuda":
            return _scaling.kernel_scale(value, param_dtype)
        return scalar(value)

    def _decides_on_device(self) -> bool:
        """Whether this step keeps AMP's found_inf, the gradient norm, the clip coefficient, skip_nonfinite and the
        step counts on the device, so that the host never waits for the GPU: when every buffer sits on one CUDA
        device and none is sharded. Otherwise those are host numbers."""
        if self._device_decisions is not None:
            return self._device_decisions
        buffers = [buf for group_buffers in self._flat_groups for buf in group_buffers]
        devices = {buf.device for buf in buffers}
        return (len(devices) == 1 and next(iter(devices)).type == "cuda"
                and not any(buf.sharded for buf in buffers))

    def _scales(self, prepared: list[Prepared], grad_scale: Tensor | float | None, found_inf: Tensor | None,
                on_device: bool) -> tuple[list[_scaling.Scale], Tensor | None] | None:
        """Each prepared buffer's gradient multiplier (AMP 1/scale x clip coefficient) and the device flag that makes
        the kernels skip the step (None when the host decides); None when the host decides to skip it."""
        device = prepared[0][1].device if on_device else torch.device("cpu")
        unscale = _scaling.unscale_of(grad_scale, device) if on_device else (
            1.0 if grad_scale is None else 1.0 / scalar(grad_scale))
        skip = _scaling.amp_skip(found_inf, device) if on_device else None
        scales: list[_scaling.Scale] = [unscale] * len(prepared)
        clipping = any(group["max_grad_norm"] is not None for group, *_ in prepared)
        skipping = any(group["skip_nonfinite"] for group, *_ in prepared)
        if clipping or skipping:
            norm, nonfinite = self._global_norm(prepared, unscale, device)
            if skipping:
                if on_device:
                    counted = nonfinite if skip is None else nonfinite * (1.0 - skip)  # AMP's skips not counted
                    if self._skipped_on_device is None or self._skipped_on_device.device != device:
                        self._skipped_on_device = torch.zeros(1, dtype=torch.float32, device=device)
                    self._skipped_on_device.add_(counted)
                    skip = nonfinite if skip is None else torch.maximum(skip, nonfinite)
                elif bool(nonfinite.item()):
                    self._skipped_on_host += 1
                    return None
            if clipping:
                self.last_grad_norm = norm.reshape(()) if on_device else float(norm.item())
                scales = [_scaling.clip_coefficient(group["max_grad_norm"], norm) * unscale
                          for group, *_ in prepared]
        if not on_device:
            return [float(s.item()) if isinstance(s, Tensor) else s for s in scales], None
        return [_scaling.kernel_scale(s, buf.dtype) for s, (_, buf, _) in zip(scales, prepared)], skip

    @staticmethod
    def _global_norm(prepared: list[Prepared], unscale: _scaling.Scale, device: torch.device
                     ) -> tuple[Tensor, Tensor]:
        """The norm of every gradient of this step and its non-finite flag, from one deterministic sum of squares
        per buffer set (over its parameters that have a gradient)."""
        return buffer_norm(prepared, unscale, device, lambda buf, backend, out_sum, out_flag: (
            functional.sum_of_squares_into(buf.grad, buf.segments, out_sum, out_flag, backend=backend)))

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero every gradient with one fill per flat buffer, keeping `.grad` views (the fast path).

        Unlike torch.optim, the default is `set_to_none=False`: gradients that are None stay None, the others
        are zeroed in place. `set_to_none=True` drops all gradients; the next step copies them back in.
        Under `torch.compile` it is traced as an in-place zero of each gradient.
        """
        if torch.compiler.is_compiling() and not set_to_none:
            _torch_ops.compiled_zero_grad(self)
            return
        for buffers in self._flat_groups:
            for buf in buffers:
                buf.zero_grad(set_to_none)

    # Checkpoints -------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state_dict, with plain dicts per parameter (torch.load(weights_only=True) reads it). 8-bit
        states appear as torch.optim keeps them, float32 tensors shaped like their parameters (decoded), unless the
        group asks for `compact_state_dict`: then as codes and block absmaxes."""
        saved = super().state_dict()
        saved["state"] = {key: dict(entry) for key, entry in saved["state"].items()}
        index = {id(p): k for k, p in enumerate(p for group in self.param_groups for p in group["params"])}
        for group, buffers in zip(self.param_groups, self._flat_groups):
            for buf in buffers:
                if buf.absmax:
                    _checkpoint.export_8bit(buf, saved["state"], index, compact=group["compact_state_dict"])
        return saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a fusedopt or torch.optim checkpoint; state is copied into this optimizer's flat buffers. The whole
        dict is checked first, so a rejected load changes nothing. fusedopt's own settings (max_grad_norm,
        skip_nonfinite, backend, state_dtype, master_weights), which a torch.optim checkpoint does not carry, keep
        this optimizer's values."""
        saved_state, saved_groups, ids, params = _checkpoint.check(self, state_dict)
        kept = [{k: g[k] for k in self.kept_on_load} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, own in zip(self.param_groups, kept):
            group.update(own)
            group.update(self.spec_of(group).forced)
        originals = {id(p): saved_state.get(saved_id) for saved_id, p in zip(ids, params)}
        for group, buffers in zip(self.param_groups, self._flat_groups):
            for buf in buffers:
                buf.complete_state = None
                _checkpoint.adopt(self, group, buf, originals)
        self._group_params = [(group["params"], len(group["params"])) for group in self.param_groups]
        self.state.dirty = False


def buffer_norm(prepared: list[Prepared], unscale: _scaling.Scale, device: torch.device,
                sum_into: Callable[[FlatBuffer, str, Tensor, Tensor], Any]) -> tuple[Tensor, Tensor]:
    """A global norm over the prepared buffer sets and its non-finite flag: `sum_into(buf, backend, out_sum,
    out_flag)` writes each set's sum of squares, then they are summed and all-reduced over the shards on the
    buffers' device (NCCL needs CUDA tensors) and returned on `device` (the host's, when the host decides)."""
    # float64 sums on the host keep the norm as exact as the reduction; the CUDA kernels write float32 (float64 when
    # float64 gradients are among them: their norm is computed in float64, as torch computes it).
    float64_grads = any(buf.dtype == torch.float64 for _, buf, _ in prepared)
    home = prepared[0][1].device
    sums = torch.zeros(len(prepared), dtype=torch.float32 if home.type == "cuda" and not float64_grads
                       else torch.float64, device=home)
    flags = torch.zeros(len(prepared), dtype=torch.float32, device=home)
    for k, (_, buf, backend) in enumerate(prepared):
        if buf.device == home:
            sum_into(buf, backend, sums[k:k + 1], flags[k:k + 1])
        else:  # buffer sets on several devices: each sums on its own, then joins the first
            own_sum, own_flag = sums.new_zeros(1, device=buf.device), flags.new_zeros(1, device=buf.device)
            sum_into(buf, backend, own_sum, own_flag)
            sums[k:k + 1].copy_(own_sum)
            flags[k:k + 1].copy_(own_flag)
    norm, nonfinite = _scaling.global_norm(sums, flags, [buf.reduce_groups for _, buf, _ in prepared], unscale,
                                           float64_grads=float64_grads)
    return norm.to(device), nonfinite.to(device)
