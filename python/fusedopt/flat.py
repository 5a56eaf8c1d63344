"""Flat storage: the parameters of one param group that share (device, dtype) live in one contiguous buffer.

Parameters, their gradients, optimizer states and optional fp32 master weights each get one flat buffer;
every parameter's region starts on a 64-byte boundary in all of them. Parameters and their `.grad` are views
into these buffers, so backward accumulates straight into the flat gradient buffer and a step is one kernel
call per run of parameters. When the user breaks the aliasing (assigns `p.grad`, sets it to None, or
replaces `p.data`), `prepare_step` copies the data back in and restores the views.
Offsets and sizes are Python ints, so they are 64-bit.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

ALIGN_BYTES = 64
# Offsets are counted in elements and shared by all buffers of the set; aligning them to the smallest element
# size we store (2 bytes) keeps every region 64-byte aligned in fp32, bf16 and fp16 buffers alike.
ALIGN_ELEMENTS = ALIGN_BYTES // 2

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATE_DTYPES = (torch.float32, torch.bfloat16)


def _align(n: int) -> int:
    return (n + ALIGN_ELEMENTS - 1) // ALIGN_ELEMENTS * ALIGN_ELEMENTS


def _allocate(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A zeroed 1-D buffer whose first element is 64-byte aligned."""
    extra = ALIGN_BYTES // torch.empty((), dtype=dtype).element_size()
    raw = torch.zeros(numel + extra, dtype=dtype, device=device)
    misalignment = raw.data_ptr() % ALIGN_BYTES
    if misalignment == 0:
        return raw[:numel]
    shift = (ALIGN_BYTES - misalignment) // raw.element_size()
    return raw[shift:shift + numel]


class FlatBuffer:
    """One (device, dtype) buffer set of a param group: parameters, gradients, states and a segment table."""

    def __init__(self, params: Sequence[Tensor], master_weights: bool = False) -> None:
        if not params:
            raise ValueError("FlatBuffer needs at least one parameter")
        first = params[0]
        self.device: torch.device = first.device
        self.dtype: torch.dtype = first.dtype
        if self.dtype not in PARAM_DTYPES:
            raise TypeError(f"fusedopt supports float32, bfloat16 and float16 parameters, got {self.dtype}")
        self.params: list[Tensor] = list(params)
        self.numels: list[int] = [p.numel() for p in self.params]
        self.offsets: list[int] = []
        total = 0
        for numel in self.numels:
            self.offsets.append(total)
            total = _align(total + numel)
        self.total: int = total
        self.param: Tensor = _allocate(total, self.dtype, self.device)
        self.grad: Tensor = _allocate(total, self.dtype, self.device)
        self.state: dict[str, Tensor] = {}
        # Float32 step counts, one per parameter; state[p]["step"] are 0-d views into it (torch.optim's layout).
        self.steps: Tensor = torch.zeros(len(self.params), dtype=torch.float32)
        self.master: Tensor | None = None
        with torch.no_grad():
            for i, p in enumerate(self.params):
                self.region(self.param, i).copy_(p.detach().reshape(-1))
                p.data = self.view(self.param, i)
            if master_weights and self.dtype != torch.float32:
                self.master = _allocate(total, torch.float32, self.device)
                self.master.copy_(self.param)
        self._param_ptrs = [p.data_ptr() for p in self.params]
        # The .grad tensors we hand out: a step recognises them by identity.
        self._grad_views = [self.view(self.grad, i) for i in range(len(self.params))]
        # State names for which every parameter already has its views (None: check on the next step).
        self.complete_state: tuple[str, ...] | None = None
        self._segment_cache: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}

    # Regions and views -------------------------------------------------------------------------------------

    def region(self, flat: Tensor, i: int) -> Tensor:
        """The 1-D slice of `flat` that belongs to parameter i."""
        return flat[self.offsets[i]:self.offsets[i] + self.numels[i]]

    def view(self, flat: Tensor, i: int) -> Tensor:
        """Parameter i's region of `flat`, shaped like the parameter."""
        return self.region(flat, i).view(self.params[i].shape)

    def span(self, first: int, last: int) -> slice:
        """Elements of parameters first..last inclusive (with the padding between them, which stays zero)."""
        end = self.total if last == len(self.params) - 1 else self.offsets[last + 1]
        return slice(self.offsets[first], end)

    def segments(self, first: int, last: int) -> tuple[Tensor, Tensor]:
        """Offsets (relative to the span's start) and sizes of parameters first..last, as int64 CPU tensors."""
        key = (first, last)
        if key not in self._segment_cache:
            start = self.offsets[first]
            offsets = torch.tensor([o - start for o in self.offsets[first:last + 1]], dtype=torch.int64)
            numels = torch.tensor(self.numels[first:last + 1], dtype=torch.int64)
            self._segment_cache[key] = (offsets, numels)
        return self._segment_cache[key]

    # States ------------------------------------------------------------------------------------------------

    def ensure_state(self, name: str, dtype: torch.dtype, fill: float = 0.0) -> Tensor:
        """The flat buffer of optimizer state `name`, allocated (filled with `fill`) on first use."""
        flat = self.state.get(name)
        if flat is None:
            if dtype not in STATE_DTYPES:
                raise TypeError(f"Invalid state_dtype: {dtype} (expected torch.float32 or torch.bfloat16)")
            flat = _allocate(self.total, dtype, self.device)
            if fill != 0.0:
                for i in range(len(self.params)):
                    self.region(flat, i).fill_(fill)
            self.state[name] = flat
        return flat

    # Aliasing ----------------------------------------------------------------------------------------------

    def prepare_step(self) -> list[bool]:
        """Restore aliasing the user broke and report which parameters have a gradient this step.

        A parameter whose data was replaced (`p.data = t`) is copied back in; a gradient that is not our view
        (assigned, or created by autograd after `set_to_none=True`) is copied into the flat buffer and the view
        put back. The fast path is one pointer compare and one identity check per parameter: autograd accumulates
        into the existing `.grad` tensor, which keeps its Python object.
        """
        has_grad = []
        param_ptrs, grad_views = self._param_ptrs, self._grad_views
        for i, p in enumerate(self.params):
            if p.data_ptr() != param_ptrs[i]:
                self._adopt_param(i)
            g = p.grad
            if g is None:
                has_grad.append(False)
                continue
            if g is not grad_views[i]:
                self._adopt_grad(i, g)
            has_grad.append(True)
        return has_grad

    def _adopt_param(self, i: int) -> None:
        p = self.params[i]
        if p.device != self.device or p.dtype != self.dtype or p.numel() != self.numels[i]:
            raise RuntimeError(
                f"fusedopt: parameter {i} changed to {tuple(p.shape)} {p.dtype} on {p.device} after the "
                f"optimizer was created (was {self.numels[i]} elements {self.dtype} on {self.device}); "
                "create the optimizer after moving or casting the model"
            )
        with torch.no_grad():
            self.region(self.param, i).copy_(p.detach().reshape(-1))
            if self.master is not None:
                self.region(self.master, i).copy_(self.region(self.param, i))
            p.data = self.view(self.param, i)

    def _adopt_grad(self, i: int, g: Tensor) -> None:
        p = self.params[i]
        if g.layout != torch.strided:
            raise RuntimeError(f"fusedopt does not support sparse gradients (parameter {i}, layout {g.layout})")
        with torch.no_grad():
            self.region(self.grad, i).copy_(g.detach().reshape(-1))
        p.grad = self._grad_views[i]

    def zero_grad(self, set_to_none: bool) -> None:
        """Zero every gradient in one call (views kept), or set them all to None."""
        if set_to_none:
            for p in self.params:
                p.grad = None
            return
        self.grad.zero_()
        for i, p in enumerate(self.params):
            g = p.grad
            if g is not None and g is not self._grad_views[i]:
                p.grad = self._grad_views[i]

    def runs(self, active: Sequence[bool], keys: Sequence[object]) -> list[tuple[int, int]]:
        """Maximal ranges (first, last) of consecutive active parameters that share the same key."""
        result: list[tuple[int, int]] = []
        start = None
        for i, is_active in enumerate(active):
            if start is not None and (not is_active or keys[i] != keys[start]):
                result.append((start, i - 1))
                start = None
            if is_active and start is None:
                start = i
        if start is not None:
            result.append((start, len(active) - 1))
        return result


def build_flat_buffers(params: Sequence[Tensor], master_weights: bool = False) -> list[FlatBuffer]:
    """One FlatBuffer per (device, dtype) among `params`, each keeping the group's parameter order."""
    by_key: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for p in params:
        by_key.setdefault((p.device, p.dtype), []).append(p)
    return [FlatBuffer(group, master_weights=master_weights) for group in by_key.values()]
