"""torch's visible objects are the truth: `optimizer.state` and `param_groups` as user code sees and edits them. The
flat buffers are fusedopt's copies, and this module makes them follow: a state mapping that notices edits (clear,
del, assignment, also inside an entry), and the checks and repairs a step runs before it trusts its copies. Functions
over the optimizer's groups, flat buffers and spec, as in optim/_checkpoint.py."""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from .._distributed import local_tensor
from ..flat import ABSMAX, STATE_8BIT, state_dtype_for
from ._spec import is_scalar_value


class StateEntry(dict):
    """state[p]: a dict that marks its owner dirty when user code writes into it."""

    __slots__ = ("owner",)

    def __init__(self, owner: TrackedState | None = None, *args: Any) -> None:
        super().__init__(*args)
        self.owner = owner

    def _touch(self) -> None:
        if self.owner is not None:
            self.owner.dirty = True

    def __reduce__(self) -> Any:  # copies and pickles are plain dicts; the optimizer wraps them again
        return (dict, (dict(self),))

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        self._touch()

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(key)
        self._touch()

    def clear(self) -> None:
        super().clear()
        self._touch()

    def pop(self, *args: Any) -> Any:
        self._touch()
        return super().pop(*args)

    def popitem(self) -> Any:
        self._touch()
        return super().popitem()

    def update(self, *args: Any, **kwargs: Any) -> None:
        super().update(*args, **kwargs)
        self._touch()

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self._touch()
        return super().setdefault(key, default)


class TrackedState(defaultdict):
    """optimizer.state: torch.optim's defaultdict(dict), whose edits (an entry replaced, deleted or cleared, or written
    into) set `dirty`, so that the next step makes the flat buffers follow them."""

    def __init__(self, items: Any = ()) -> None:
        super().__init__(self._new_entry)
        self.dirty = False
        for key, value in dict(items).items():
            dict.__setitem__(self, key, self.entry(value))

    def _new_entry(self) -> StateEntry:
        self.dirty = True
        return StateEntry(self)

    def entry(self, values: Any) -> StateEntry:
        """`values` as an entry of this mapping (fusedopt's own writes: no dirty mark)."""
        return StateEntry(self, values)

    def put(self, key: Any, values: dict[str, Any]) -> None:
        """Store an entry written by fusedopt itself."""
        dict.__setitem__(self, key, self.entry(values))

    def __reduce__(self) -> Any:  # copies and pickles are plain defaultdict(dict)s
        return (defaultdict, (dict,), None, None, ((k, dict(v)) for k, v in self.items()))

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value if isinstance(value, StateEntry) and value.owner is self else
                            self.entry(value))
        self.dirty = True

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(key)
        self.dirty = True

    def clear(self) -> None:
        super().clear()
        self.dirty = True

    def pop(self, *args: Any) -> Any:
        self.dirty = True
        return super().pop(*args)

    def popitem(self) -> Any:
        self.dirty = True
        return super().popitem()

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value


def _is_region(t: Any, region: Tensor) -> bool:
    return isinstance(t, Tensor) and local_tensor(t).data_ptr() == region.data_ptr() and t.numel() == region.numel()


@torch.no_grad()
def follow_state(optimizer: Any) -> None:
    """Make the flat buffers follow `optimizer.state` after user code edited it: a parameter whose entry is gone or
    empty starts afresh (step 0, states at their initial values), as torch.optim re-creates it; a state tensor or step
    that was replaced is copied in and becomes a view again. Checked before anything is written: an unusable entry
    raises and changes nothing."""
    state: TrackedState = optimizer.state
    plans = []
    for group, buffers in zip(optimizer.param_groups, optimizer.flat_buffers):
        spec = optimizer.spec_of(group)
        for buf in buffers:
            for i, p in enumerate(buf.params):
                entry = dict.get(state, p)
                if not entry:
                    plans.append((group, buf, i, p, None))
                    continue
                for key, value in entry.items():
                    if key == "step":
                        continue
                    if key in spec.scalar_names():
                        if not is_scalar_value(value):
                            raise ValueError(f"optimizer.state of parameter {i}: {key!r} must be a number or a "
                                             f"1-element tensor, got {value!r:.80}")
                        continue
                    held = (buf.master is not None if key == "master_param" else
                            buf.comp is not None if key == "kahan_comp" else key in buf.state or
                            buf.absmax_of(key) is not None)
                    if held and _is_region(value, buf.state_region(key, i)):
                        continue
                    if key.endswith(ABSMAX) and key[:-len(ABSMAX)] in spec.state_names():
                        blocks = buf.blocks(i)
                        if group["state_dtype"] != STATE_8BIT or not isinstance(value, Tensor) or \
                                value.numel() != blocks.stop - blocks.start:
                            raise ValueError(f"optimizer.state of parameter {i}: {key!r} must be the "
                                             f"{blocks.stop - blocks.start} block absmaxes of an 8-bit state, got "
                                             f"{value!r:.80}")
                        continue
                    shape = spec.state_shape(key, buf.shapes[i])
                    if key not in spec.state_names() and key not in ("master_param", "kahan_comp") or shape is None:
                        raise ValueError(f"optimizer.state of parameter {i}: unknown state {key!r} for "
                                         f"{type(optimizer).__name__}")
                    if not isinstance(value, Tensor) or value.numel() != shape.numel():
                        raise ValueError(f"optimizer.state of parameter {i}: {key!r} must be a tensor of "
                                         f"{shape.numel()} elements, got {value!r:.80}")
                plans.append((group, buf, i, p, entry))
    for group, buf, i, p, entry in plans:
        spec = optimizer.spec_of(group)
        if entry is None:
            if dict.get(state, p) is not None:
                dict.__delitem__(state, p)
            reset(optimizer, group, buf, i)
            continue
        step = entry.get("step")
        if step is not None and step is not buf.steps[i] and spec.tracks_step:
            buf.steps[i] = float(step)
        values = dict(entry)
        optimizer._init_state(group, buf, i)
        own = dict.get(state, p, {})
        for j, name in enumerate(spec.scalar_names()):
            value = values.get(name)
            view = buf.segments.scalars[i, j]
            if value is not None and not _is_region(value, view):
                view.fill_(float(value))
        for key, value in values.items():
            if key == "step" or key in spec.scalar_names() or not isinstance(value, Tensor) or key.endswith(ABSMAX):
                continue
            if key not in ("master_param", "kahan_comp") and key not in buf.state:
                state_spec = next(s for s in spec.states if s.name == key)
                buf.ensure_state(key, state_dtype_for(buf.dtype, group["state_dtype"]), shape=state_spec.shape,
                                 signed=state_spec.signed)
                own[key] = buf.state_view(key, i)
                if buf.is_8bit(key):
                    own[key + ABSMAX] = buf.state_view(key + ABSMAX, i)
            region = buf.state_region(key, i)
            if region is None or _is_region(value, region):
                continue
            # an 8-bit state takes float values quantized, and codes as they are (their absmaxes below)
            buf.write_state(key, i, local_tensor(value))
        for key, value in values.items():  # absmaxes assigned with codes, or alone
            if not key.endswith(ABSMAX) or not isinstance(value, Tensor):
                continue
            codes = values.get(key[:-len(ABSMAX)])
            region = buf.state_region(key, i)
            if region is not None and not _is_region(value, region) and \
                    not (isinstance(codes, Tensor) and codes.dtype != torch.uint8):  # float values set their own
                region.copy_(local_tensor(value).reshape(-1))
        buf.complete_state = None
    state.dirty = False


@torch.no_grad()
def reset(optimizer: Any, group: dict[str, Any], buf: Any, i: int) -> None:
    """Parameter i of `buf` starts afresh, as with no state in torch.optim: step 0, states at their initial values,
    master weights from the parameter."""
    spec = optimizer.spec_of(group)
    buf.steps[i] = 0.0
    spec.fill_scalars(buf.segments, group, i)
    for s in spec.states:
        if s.name in buf.state:
            buf.fill_state(s.name, i, s.fill(group))
    if buf.master is not None:
        buf.region(buf.master, i).copy_(buf.region(buf.param, i))
    if buf.comp is not None:
        buf.region(buf.comp, i).zero_()
    buf.complete_state = None
    if spec.state_at_init:
        optimizer._init_state(group, buf, i)
