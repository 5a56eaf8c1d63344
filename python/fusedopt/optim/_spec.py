"""The declarative spec of an algorithm on the Python side: its kernel in the compiled core's list, its states and when
each exists, validation with torch's messages, the group-to-kernel mapping and checkpoint quirks. The optimizer class
holds torch's signature and defaults; the spec holds everything else, and the base class reads it."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ..flat import FlatBuffer, Segments, StateShape

Group = Mapping[str, Any]


def scalar(value: float | Tensor) -> float:
    """A hyperparameter as a Python float (tensor learning rates and betas are accepted)."""
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def check_range(name: str, value: Any, low: float, high: float | None = None, high_open: bool = True) -> None:
    """Raise ValueError naming `name` unless low <= value (< or <=) high; NaN is always rejected."""
    v = scalar(value)
    ok = v >= low and (high is None or (v < high if high_open else v <= high))
    if not ok or math.isnan(v):
        raise ValueError(f"Invalid {name}: {value}")


def require(ok: bool, message: str) -> None:
    """Raise ValueError(message) unless ok (for torch.optim checks whose messages are not check_range's)."""
    if not ok:
        raise ValueError(message)


def check_tensor_lr(group: Group) -> None:
    """torch.optim's check of a tensor `lr`, shared by every algorithm."""
    require(not (isinstance(group["lr"], Tensor) and group["lr"].numel() != 1), "Tensor lr must be 1-element")


def check_lr(group: Group) -> None:
    """torch.optim's checks of `lr`, shared by the algorithms with its "Invalid learning rate" message."""
    check_tensor_lr(group)
    check_range("learning rate", group["lr"], 0.0)


def check_betas(group: Group) -> None:
    check_range("beta parameter at index 0", group["betas"][0], 0.0, 1.0)
    check_range("beta parameter at index 1", group["betas"][1], 0.0, 1.0)


def always(group: Group) -> bool:
    return True


@dataclass(frozen=True)
class State:
    """One state, in the kernel's slot order: torch.optim's name, when the group keeps it, its first value, and its
    shape for a parameter of a given shape (None: the parameter's own; a function returning None: a parameter of that
    shape keeps no such state, as a vector keeps no Adafactor row factor), and whether its values may be negative."""

    name: str
    when: Callable[[Group], bool] = always
    fill: Callable[[Group], float] = lambda group: 0.0
    shape: StateShape | None = None
    signed: bool = True  # False: never negative (a second moment), which 8-bit states encode with more range

    def shape_for(self, param_shape: torch.Size) -> torch.Size | None:
        return param_shape if self.shape is None else self.shape(param_shape)


@dataclass(frozen=True)
class Spec:
    """Everything about an algorithm that is not its math (csrc/include/fusedopt/math/<kernel>.h) or torch's
    signature (the optimizer class)."""

    kernel: str  # its name in the compiled core's list and in fusedopt.functional.REFERENCE
    states: tuple[State, ...]  # slot order of the math header's kStates
    validate: Callable[[Group], None]  # raises torch.optim's ValueError for a bad group
    hyper: Callable[[Group], dict[str, Any]]  # the group's values of the math header's kFields
    tracks_step: bool = True  # state[p] shows torch.optim's float32 "step"
    state_at_init: bool = False  # states exist from construction, not from the first step
    # Group keys a loaded checkpoint cannot change (a decoupled variant stays decoupled whatever its parent's
    # checkpoint says).
    forced: Mapping[str, Any] = field(default_factory=dict)
    # The step count of a loaded parameter that carries no "step" (some torch.optim algorithms keep none): a function
    # of its loaded state.
    loaded_step: Callable[[Mapping[str, Any]], float] | None = None
    # Per-parameter scalar states (0-dim float32 tensors in torch.optim, such as NAdam's mu_product), in the order of
    # the math header's kScalars; kept in the segment table, always.
    scalars: tuple[State, ...] = ()
    # Kernel fields whose value depends on the parameters' dtype (Adafactor's eps1=None: that dtype's machine
    # epsilon), from the group and that dtype; merged over `hyper`.
    dtype_hyper: Callable[[Group, torch.dtype], dict[str, Any]] | None = None
    # Raises for parameters the algorithm cannot step (with the index of the offending one in its message).
    param_check: Callable[[list[Any]], None] | None = None
    # The step works on whole matrices (Muon's orthogonalization): shards are gathered by rows.
    needs_whole_matrices: bool = False
    # Why state_dtype="8bit" is refused, for an algorithm whose states are not 8-bit ("": they can be).
    no_8bit: str = ""

    def hyper_for(self, group: Group, dtype: torch.dtype) -> dict[str, Any]:
        """The group's values of the math header's kFields for parameters of `dtype`."""
        values = self.hyper(group)
        if self.dtype_hyper is not None:
            values.update(self.dtype_hyper(group, dtype))
        return values

    def state_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.states)

    def scalar_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.scalars)

    def fill_scalars(self, segments: Segments, group: Group, rows: int | slice = slice(None)) -> None:
        """Write the first values of the scalar states (from the group as it is now) into `rows` of the segment
        table, which is created on first use; nothing for an algorithm without scalar states."""
        if self.scalars:
            table = segments.ensure_scalars(len(self.scalars))
            table[rows] = torch.tensor([s.fill(group) for s in self.scalars], dtype=torch.float32)

    def kept_states(self, group: Group) -> list[State]:
        return [s for s in self.states if s.when(group)]

    def kept_for(self, group: Group, param_shape: torch.Size) -> list[State]:
        """The states a parameter of this shape keeps under the group's options."""
        return [s for s in self.kept_states(group) if s.shape_for(param_shape) is not None]

    def state_shape(self, name: str, param_shape: torch.Size) -> torch.Size | None:
        """The shape of state `name` (or master_param) of a parameter of this shape; None when it keeps none."""
        for s in self.states:
            if s.name == name:
                return s.shape_for(param_shape)
        return param_shape

    def factored(self) -> bool:
        """Whether some state is not shaped like its parameter (a factored algorithm: Adafactor)."""
        return any(s.shape is not None for s in self.states)

    def check_params(self, params: Iterable[Any]) -> None:
        """Refuse parameters the algorithm cannot step: those `param_check` refuses (Muon's non-matrices), and shards
        whose sums cannot be combined. A factored algorithm's sums (and Muon's gathered matrices) go by leading index
        or row, so a DTensor parameter must be split along its first dimension, over one mesh dimension (FSDP2's
        default)."""
        params = list(params)
        if self.param_check is not None:
            self.param_check(params)
        if not self.factored() and not self.needs_whole_matrices:
            return
        for p in params:
            placements = getattr(p, "placements", ())
            if any(pl.is_shard() and pl.dim != 0 for pl in placements) or \
                    sum(pl.is_shard() for pl in placements) > 1:
                raise NotImplementedError(f"fusedopt: {self.kernel} supports parameters sharded along their first "
                                          f"dimension on one mesh dimension (FSDP2's default), got {placements}")

    def fill_layout(self, buf: FlatBuffer) -> None:
        """Give a factored algorithm's segment table its layout (where each parameter's compact states lie); nothing
        for the others."""
        if not self.factored():
            return
        buf.segments.layout, buf.segments.factor_sums = buf.factored_layout(
            [s.shape for s in self.states])  # type: ignore[misc]


def is_scalar_value(value: Any) -> bool:
    """Whether `value` can be a scalar state: a number (not a bool) or a 1-element tensor."""
    if isinstance(value, Tensor):
        return value.numel() == 1
    return isinstance(value, (float, int)) and not isinstance(value, bool)
