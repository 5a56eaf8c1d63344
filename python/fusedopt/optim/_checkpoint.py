"""Loading checkpoints into flat storage: the whole state_dict is checked against the optimizer before anything is
written, then loaded values are copied into the flat buffers and state[p] becomes views again. Functions over the
optimizer's groups, flat buffers and spec; torch.optim.Optimizer.load_state_dict does the group bookkeeping."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._distributed import local_tensor, local_values, state_as_dtensor
from ..flat import ABSMAX, STATE_8BIT, FlatBuffer
from ..reference import QUANT_BLOCK
from ._shadow import reset
from ._spec import is_scalar_value, scalar


def check(optimizer: Any, state_dict: dict[str, Any]) -> tuple[dict[Any, Any], list[dict[str, Any]], list[Any],
                                                              list[Tensor]]:
    """Refuse a checkpoint that does not fit: group count and sizes, hyperparameters, state keys, sizes, dtypes and
    step values. Returns (saved state, saved groups, saved parameter ids, this optimizer's parameters)."""
    saved_state = state_dict["state"]
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups, optimizer has "
                         f"{len(optimizer.param_groups)}")
    for saved, own in zip(saved_groups, optimizer.param_groups):
        if len(saved["params"]) != len(own["params"]):
            raise ValueError("loaded state dict contains a parameter group that doesn't match the size of "
                             "optimizer's group")
    ids = [i for g in saved_groups for i in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    merged_groups = []
    for saved, own in zip(saved_groups, optimizer.param_groups):
        merged = {**optimizer.defaults, **{k: v for k, v in saved.items() if k != "params"}}
        merged.update({k: own[k] for k in optimizer.kept_on_load})
        merged.update(optimizer.spec_of(merged).forced)
        optimizer._validate(merged)
        merged_groups.extend([merged] * len(saved["params"]))
    for saved_id, p, group in zip(ids, params, merged_groups):
        _check_entry(optimizer.spec_of(group), saved_id, p, saved_state.get(saved_id), group)
    return saved_state, saved_groups, ids, params


def _check_entry(spec: Any, saved_id: Any, p: Tensor, loaded: dict[str, Any] | None, group: dict[str, Any]) -> None:
    if not loaded:
        return
    scalars = set(spec.scalar_names())
    required = {s.name for s in spec.kept_for(group, p.shape)} | ({"step"} if spec.tracks_step else set()) | scalars
    # A compact 8-bit checkpoint: codes (uint8) with their block absmaxes, for an optimizer with 8-bit states.
    compact = {name for name in spec.state_names() if name + ABSMAX in loaded}
    if compact and group["state_dtype"] != STATE_8BIT:
        raise ValueError(f"loaded state of parameter {saved_id} holds 8-bit states ({sorted(compact)} with their "
                         "absmaxes, a compact checkpoint); load it into an optimizer with state_dtype='8bit'")
    allowed = set(spec.state_names()) | {"step", "master_param", "kahan_comp"} | scalars | \
        {name + ABSMAX for name in compact}
    missing, unknown = required - set(loaded), set(loaded) - allowed
    if missing or unknown:
        raise ValueError(f"loaded state of parameter {saved_id} does not fit {spec.kernel}: missing {sorted(missing)}, "
                         f"unknown {sorted(unknown)}")
    for key, value in loaded.items():
        if key == "step":
            step = value.item() if isinstance(value, Tensor) and value.numel() == 1 else value
            if isinstance(value, Tensor) and value.numel() != 1 or not isinstance(step, (int, float)) \
                    or isinstance(step, bool) or step < 0 or float(step) != int(step):
                raise ValueError(f"loaded state 'step' of parameter {saved_id} must be a whole number >= 0, got "
                                 f"{value!r}")
            continue
        if value is None:
            continue
        if key in scalars:
            if not is_scalar_value(value):
                raise ValueError(f"loaded state {key!r} of parameter {saved_id} must be a number or a 1-element "
                                 f"tensor, got {value!r:.80}")
            continue
        if key.endswith(ABSMAX):
            blocks = -(-local_tensor(p).numel() // QUANT_BLOCK)
            if not isinstance(value, Tensor) or value.dtype != torch.float32 or value.numel() != blocks:
                raise ValueError(f"loaded state {key!r} of parameter {saved_id} must be {blocks} float32 block "
                                 f"absmaxes (one per {QUANT_BLOCK} elements of the parameter as this rank holds it), "
                                 f"got {value!r:.80}")
            continue
        codes = key in compact and isinstance(value, Tensor) and value.dtype == torch.uint8
        if not isinstance(value, Tensor) or not (value.is_floating_point() or codes):
            raise ValueError(f"loaded state {key!r} of parameter {saved_id} must be a floating-point tensor, "
                             f"got {value.dtype if isinstance(value, Tensor) else type(value).__name__}")
        if key in compact and not codes:
            raise ValueError(f"loaded state {key!r} of parameter {saved_id} comes with {key + ABSMAX!r}, so it must "
                             f"be uint8 codes, got {value.dtype}")
        shape = spec.state_shape(key, p.shape)
        if shape is None or value.numel() != shape.numel():
            expected = "none" if shape is None else f"{shape.numel()} (shape {tuple(shape)})"
            raise ValueError(f"loaded state {key!r} of parameter {saved_id} has {value.numel()} elements, "
                             f"expected {expected} for a parameter of shape {tuple(p.shape)}")


@torch.no_grad()
def adopt(optimizer: Any, group: dict[str, Any], buf: FlatBuffer, originals: dict[int, dict[str, Any] | None]) -> None:
    """Copy loaded per-parameter state into the flat buffers and make state[p] views again.

    Values come from the checkpoint's own tensors, not from torch's copies cast to the parameter dtype, so fp32
    states and master weights of 16-bit parameters keep their precision. A parameter the checkpoint has no state for
    starts afresh, as in torch.optim.
    """
    spec = optimizer.spec_of(group)
    for i, p in enumerate(buf.params):
        loaded = originals.get(id(p))
        if not loaded:
            if dict.get(optimizer.state, p) is not None:
                dict.__delitem__(optimizer.state, p)
            reset(optimizer, group, buf, i)
            continue
        optimizer._init_state(group, buf, i)
        state = dict.get(optimizer.state, p)
        if state is None:
            state = optimizer.state.entry({})
            dict.__setitem__(optimizer.state, p, state)
        scalars = spec.scalar_names()
        for key, value in loaded.items():
            if key == "step":
                buf.steps[i] = scalar(value)
            elif key in scalars:
                buf.segments.scalars[i, scalars.index(key)] = scalar(local_tensor(value) if isinstance(value, Tensor)
                                                                     else value)
            elif key == "master_param":
                if buf.master is not None:
                    buf.region(buf.master, i).copy_(local_values(value, p).reshape(-1))
            elif key == "kahan_comp":
                if buf.comp is not None:
                    buf.region(buf.comp, i).copy_(local_values(value, p).reshape(-1))
            elif key.endswith(ABSMAX):
                pass  # written with its codes
            elif isinstance(value, Tensor) and buf.is_8bit(key):
                buf.write_state(key, i, local_values(value, state[key]))
                if value.dtype == torch.uint8:
                    buf.absmax[key][buf.blocks(i)] = local_tensor(loaded[key + ABSMAX]).reshape(-1)
            elif isinstance(value, Tensor) and key in state:
                own = local_tensor(state[key])  # placed like the state (a replicated column factor), not like p
                own.copy_(local_values(value, state[key]).reshape(own.shape))
            elif key not in state:
                dict.__setitem__(state, key, value)
        if buf.master is not None and "master_param" not in loaded:
            buf.region(buf.master, i).copy_(buf.region(buf.param, i))
        if buf.comp is not None and "kahan_comp" not in loaded:
            buf.region(buf.comp, i).zero_()
        if "step" not in loaded and spec.loaded_step is not None:
            buf.steps[i] = spec.loaded_step(loaded)


@torch.no_grad()
def export_8bit(buf: FlatBuffer, saved_state: dict[Any, dict[str, Any]], index: dict[int, Any], compact: bool
                ) -> None:
    """The 8-bit states of `buf` in a state_dict being built: decoded to float32 tensors shaped (and placed) like
    their parameters, torch.optim's layout; or with `compact`, the codes and absmaxes as they are (copies), which only
    an optimizer on the same sharding reads back."""
    for i, p in enumerate(buf.params):
        entry = saved_state.get(index[id(p)])
        if entry is None:
            continue
        for name in buf.absmax:
            if name not in entry:
                continue
            if compact:
                if buf.sharded:
                    raise NotImplementedError("fusedopt: compact_state_dict=True saves per-shard 8-bit blocks, which "
                                              "distributed checkpoints cannot reshard; save sharded optimizers with "
                                              "compact_state_dict=False (float32 states)")
                entry[name] = buf.state_view(name, i).clone()
                entry[name + ABSMAX] = buf.state_view(name + ABSMAX, i).clone()
                continue
            values = buf.read_state(name, i)
            entry[name] = state_as_dtensor(values, p) if buf.sharded else values
            entry.pop(name + ABSMAX, None)
