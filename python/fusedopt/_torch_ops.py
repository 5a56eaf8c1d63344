"""torch.compile glue: the torch.library custom op through which a compiled step calls a fusedopt optimizer's eager
step, what dynamo traces for `step()` and `zero_grad()` around it, and the op's real implementation. Functions over
the optimizer's param groups and flat buffers; the optimizer reaches them through `step()`/`zero_grad()`.

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
# The schema is spelled out: torch < 2.6 cannot infer one from postponed (string) annotations.
@torch.library.custom_op("fusedopt::optimizer_step", mutates_args=("flat_params",), schema=(
    "(int handle, Tensor(a!)[] flat_params, Tensor?[] grads, Tensor? grad_scale, Tensor? found_inf, "
    "Tensor[] hyperparameters) -> ()"))
def optimizer_step(handle: int, flat_params: list[Tensor], grads: list[Optional[Tensor]],  # noqa: UP045
                   grad_scale: Optional[Tensor], found_inf: Optional[Tensor],  # noqa: UP045
                   hyperparameters: list[Tensor]) -> None:
    """One step of the optimizer registered under `handle`: `grads` are the parameters' `.grad` in flat-buffer
    order, `hyperparameters` its tensor hyperparameters (see `compiled_step`)."""
    step_from_op(lookup(handle), flat_params, grads, grad_scale, found_inf, hyperparameters)


@optimizer_step.register_fake
def _optimizer_step_fake(handle: int, flat_params: list[Tensor], grads: list[Optional[Tensor]],  # noqa: UP045
                         grad_scale: Optional[Tensor], found_inf: Optional[Tensor],  # noqa: UP045
                         hyperparameters: list[Tensor]) -> None:
    return None


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


def compiled_step(optimizer: Any, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:  # noqa: UP045
    """What dynamo traces for `step()`: the aliasing repair of `prepare_step` for gradients (a `.grad` that is
    not the flat buffer's view is copied into it and replaced by it), then one `fusedopt::optimizer_step` call.

    Doing that repair in the graph rather than in the op keeps every write to a tensor the graph can see
    declared: the op writes only the flat parameter buffers (one storage each, so inductor lets it update them
    in place) and reads the gradients. It never gets the flat gradient buffers: a graph holding a buffer and
    views into it that some op writes (gradient clipping, zero_grad) needs AOTAutograd's synthetic bases,
    which fail on recompiled graphs.
    """
    buffers = [buf for group_buffers in optimizer._flat_groups for buf in group_buffers]
    for buf in buffers:
        if not buf.external:  # an external buffer's gradients are not ours (FSDP's); the op copies them in
            for i, p in enumerate(buf.params):
                if p.grad is not None and p.grad is not buf.grad_view(i):
                    buf.grad_view(i).copy_(p.grad)
                    p.grad = buf.grad_view(i)
    grads = [p.grad for buf in buffers for p in buf.params]
    hyperparameters = [value for _, _, _, value in _tensor_hyperparameters(optimizer.param_groups)]
    torch.ops.fusedopt.optimizer_step(optimizer._handle, [buf.param for buf in buffers], grads, grad_scale,
                                      found_inf, hyperparameters)

@torch.no_grad()
def step_from_op(optimizer: Any, flat_params: list[Tensor], grads: list[Optional[Tensor]],  # noqa: UP045
                 grad_scale: Optional[Tensor], found_inf: Optional[Tensor],  # noqa: UP045
                 hyperparameters: list[Tensor]) -> None:
    """The real implementation of `fusedopt::optimizer_step`: an eager step on the values the op was given.

    With inductor the op normally receives the optimizer's own flat parameter buffers and gradient views, and
    this is a plain eager step. Otherwise (functionalization under backend="aot_eager", a graph that also reads
    the parameters, or inductor handing over a gradient it knows equals the view) it gets other tensors holding
    the graph's values: parameters that differ are loaded into flat storage first and the passed copies receive
    the updated values afterwards, and gradients other than the views are read through a scratch copy of the
    flat gradient buffer, because the graph may already have written the real one (zeroed it, say) without
    this op's knowledge. Every `p.grad` is left as the op found it: no Python state changes behind dynamo.
    """
    buffers = [buf for group_buffers in optimizer._flat_groups for buf in group_buffers]
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
            if grad is None or buf.external:
                p.grad = grad  # None skips the parameter; FSDP's gradient shards are copied in by prepare_step
                continue
            if grad.data_ptr() != buf.region(buf.grad, i).data_ptr():
                if id(buf) not in real_grads:
                    real_grads[id(buf)] = buf.grad
                    buf.grad = buf.grad.clone()
                buf.region(buf.grad, i).copy_(grad.reshape(-1))
            p.grad = buf.grad_view(i)  # what prepare_step recognises as already in place
        optimizer._eager_step(_groups_with(optimizer, hyperparameters), grad_scale, found_inf)
    finally:
        for buf in buffers:
            buf.grad = real_grads.get(id(buf), buf.grad)
        for (buf, i), grad in zip(slots, found):
            buf.params[i].grad = grad
    for given, buf in copies:
        given.copy_(buf.param)

def _groups_with(optimizer: Any, hyperparameters: list[Tensor]) -> list[dict[str, Any]]:
    """The param groups, with copies where the op was handed tensor hyperparameters other than the groups' own
    (a graph that wrote to `group["lr"]` before the step passes the written value)."""
    groups = optimizer.param_groups
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

def compiled_zero_grad(optimizer: Any) -> None:
    """What dynamo traces for `zero_grad(set_to_none=False)`: every gradient that is not None zeroed in place,
    after re-pointing any that is not the flat buffer's view at that view, as the eager zero_grad does. (One
    `zero_()` per gradient: inductor writes those straight into the buffer, while `_foreach_zero_` has no
    lowering and would allocate fresh zeros and copy them over.)"""
    for buffers in optimizer._flat_groups:
        for buf in buffers:
            buf.received.zero_()
            for i, p in enumerate(buf.params):
                if p.grad is None:
                    continue
                if not buf.external and p.grad is not buf.grad_view(i):
                    p.grad = buf.grad_view(i)
                p.grad.zero_()
