"""torch.library custom ops through which `torch.compile` calls a fusedopt optimizer's step and zero_grad.

Dynamo cannot trace the step's Python bookkeeping (aliasing checks, `.tolist()`, host scalars, the pybind11
kernels), so a compiled `step()` records one opaque `fusedopt::optimizer_step` call instead (and a compiled
`zero_grad()` one `fusedopt::zero_grad`); at run time the op looks the optimizer up by its integer handle and
runs the ordinary eager code.
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
        raise RuntimeError(f"fusedopt::optimizer_step: no live optimizer has handle {handle}")
    return optimizer


# Only the tensors a caller can see are declared: the parameters (updated in place). Optimizer states, step
# counts and master weights live in the optimizer's flat buffers, which no compiled graph reads; gradients,
# grad_scale, found_inf and tensor hyperparameters are only read.
@torch.library.custom_op("fusedopt::optimizer_step", mutates_args=("params",))
def optimizer_step(handle: int, params: list[Tensor], grads: list[Optional[Tensor]],  # noqa: UP045
                   grad_scale: Optional[Tensor], found_inf: Optional[Tensor],  # noqa: UP045
                   hyperparameters: list[Tensor]) -> None:
    """One step of the optimizer registered under `handle`, with these parameters, gradients and AMP tensors.

    The lists follow `FusedOptimizer._compile_inputs`. Under functionalization (e.g. backend="aot_eager") the
    tensors may be copies of the optimizer's own; the step then uses their values and writes the updated
    parameters back into them.
    """
    lookup(handle)._step_from_op(params, grads, grad_scale, found_inf, hyperparameters)


@optimizer_step.register_fake
def _optimizer_step_fake(handle: int, params: list[Tensor], grads: list[Optional[Tensor]],  # noqa: UP045
                         grad_scale: Optional[Tensor], found_inf: Optional[Tensor],  # noqa: UP045
                         hyperparameters: list[Tensor]) -> None:
    return None


@torch.library.custom_op("fusedopt::zero_grad", mutates_args=("grads",))
def zero_grad(handle: int, grads: list[Tensor]) -> None:
    """`zero_grad(set_to_none=False)` of the optimizer registered under `handle`; `grads` are the `.grad` tensors
    the compiled graph holds that are not None (every one of them reads zero afterwards)."""
    lookup(handle)._zero_grad_from_op(grads)


@zero_grad.register_fake
def _zero_grad_fake(handle: int, grads: list[Tensor]) -> None:
    return None
