"""torch.library custom op through which `torch.compile` calls a fusedopt optimizer's step.

Dynamo cannot trace the step's Python bookkeeping (aliasing checks, `.tolist()`, host scalars, the pybind11
kernels), so a compiled `step()` records one opaque `fusedopt::optimizer_step` call instead; at run time the op
looks the optimizer up by its integer handle and runs the ordinary eager step.
"""
from __future__ import annotations

import itertools
import weakref
from typing import Any, Optional

import torch
from torch import Tensor

# handle -> weak reference to a live FusedOptimizer; an entry goes away with its optimizer.
_OPTIMIZERS: dict[int, weakref.ReferenceType[Any]] = {}
_next_handle = itertools.count()


def register(optimizer: Any) -> int:
    """A new handle under which `optimizer_step` finds `optimizer` (held weakly)."""
    handle = next(_next_handle)
    _OPTIMIZERS[handle] = weakref.ref(optimizer, lambda _ref: _OPTIMIZERS.pop(handle, None))
    return handle


def lookup(handle: int) -> Any:
    """The optimizer registered under `handle`; RuntimeError if it no longer exists."""
    ref = _OPTIMIZERS.get(handle)
    optimizer = None if ref is None else ref()
    if optimizer is None:
        raise RuntimeError(f"fusedopt: no live optimizer has handle {handle} (it was garbage-collected)")
    return optimizer


# `Optional`, not `X | None`: torch.library reads these annotations at run time, and Python 3.9 has no `|` on types.
# Declared mutated: the flat parameter buffers (the parameters are views into them; one storage each, so inductor
# lets the op update them in place, where a list of parameters sharing one storage would be copied). The step also
# updates the optimizer states, step counts and master weights, which stay undeclared: they live in flat buffers
# that a training graph does not read, and declaring them would make them graph inputs that functionalization
# copies. Gradients, grad_scale, found_inf and the tensor hyperparameters are only read. Python-number
# hyperparameters are not passed (a graph would then be specialised on, and recompiled for, every value): the op
# reads them from the param groups when it runs.
@torch.library.custom_op("fusedopt::optimizer_step", mutates_args=("flat_params",))
def optimizer_step(handle: int, flat_params: list[Tensor], grads: list[Optional[Tensor]],  # noqa: UP045
                   grad_scale: Optional[Tensor], found_inf: Optional[Tensor],  # noqa: UP045
                   hyperparameters: list[Tensor]) -> None:
    """One step of the optimizer registered under `handle`: `grads` are the parameters' `.grad` in flat-buffer
    order, `hyperparameters` its tensor hyperparameters (see `FusedOptimizer._compiled_step`)."""
    lookup(handle)._step_from_op(flat_params, grads, grad_scale, found_inf, hyperparameters)


@optimizer_step.register_fake
def _optimizer_step_fake(handle: int, flat_params: list[Tensor], grads: list[Optional[Tensor]],  # noqa: UP045
                         grad_scale: Optional[Tensor], found_inf: Optional[Tensor],  # noqa: UP045
                         hyperparameters: list[Tensor]) -> None:
    return None
