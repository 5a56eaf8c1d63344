"""Flat storage: the parameters of one param group that share (device, dtype) live in one contiguous buffer.

Parameters, their gradients, optimizer states and optional fp32 master weights each get one flat buffer;
every parameter's region starts on a 64-byte boundary in all of them. Parameters and their `.grad` are views
into these buffers, so backward accumulates straight into the flat gradient buffer and a step is one kernel
call per buffer set, whatever the parameters' step counts. When the user breaks the aliasing (assigns `p.grad`,
sets it to None, or replaces `p.data`), `prepare_step` copies the data back in and restores the views.
Offsets and sizes are Python ints, so they are 64-bit.

DTensor parameters (FSDP2 shards) are held by their local shards. Their storage belongs to FSDP, which
all-gathers from it, so it is not re-pointed: a step copies the local parameter and gradient shards in (FSDP hands
out new gradient tensors every step, and a loaded checkpoint writes the parameters through tensors whose version
counters we cannot see) and the updated parameter shards back out. State tensors are exposed as DTensors with the
parameter's placements, which is what torch.distributed.checkpoint reshards.
"""
from __future__ import annotations

import array
import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Union

import torch
from torch import Tensor

from ._distributed import (
    all_reduce_sum,
    is_dtensor,
    local_tensor,
    shard_groups,
    shard_offset,
    sharding_key,
    state_as_dtensor,
)
from .reference import QUANT_BLOCK, blocks_of, dequantize8, quantize8

ALIGN_BYTES = 64
# Offsets are counted in elements and shared by all buffers of the set; aligning them to the smallest element
# size we store (2 bytes) keeps every region 64-byte aligned in fp32, bf16, fp16 and fp64 buffers alike.
ALIGN_ELEMENTS = ALIGN_BYTES // 2
# fusedopt::kChunk: the kernels' work items never cross a multiple of it within a segment.
CHUNK = 16384
# Columns per column item of the CUDA factored kernels: a block of kThreads (256) threads, a column each.
CUDA_COLUMNS = 256

# fusedopt::Layout (api.h): lead, rows, cols, total_rows, row_var_at, col_var_at, variance_at, row_sum_at, col_sum_at,
# numel, per segment of a factored algorithm.
LAYOUT_COLUMNS = 10

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# float64 states belong to float64 parameters, whose states are always float64 (see `state_dtype_for`).
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
# state_dtype="8bit": one byte per element and a float32 absmax per QUANT_BLOCK elements (csrc/include/fusedopt/
# quant8.h), stored as uint8 buffers; every parameter's region then starts on a block boundary.
STATE_8BIT = "8bit"
ABSMAX = "_absmax"  # state[p][name + ABSMAX]: the block absmaxes of 8-bit state `name`


# The shape of a state of a parameter of the given shape, or None when such a parameter keeps no such state; a state
# without one is shaped like its parameter. Used for Adafactor's factored second moments.
StateShape = Callable[[torch.Size], "torch.Size | None"]


def packed_offsets(numels: Sequence[int], align: int = 0) -> tuple[list[int], int]:
    """Offsets of regions of the given sizes laid out one after another, each start 64-byte aligned (and a multiple of
    `align` elements when given), and the length of a buffer that holds them."""
    offsets, total = [], 0
    for n in numels:
        offsets.append(total)
        total = _align(total + n)
        if align:
            total = -(-total // align) * align
    return offsets, total


def state_dtype_for(param_dtype: torch.dtype, requested: torch.dtype | str | None) -> torch.dtype:
    """The storage dtype of the states of `param_dtype` parameters under the group's `state_dtype` (None: the
    default; "8bit": uint8 codes).

    float64 parameters keep float64 states, as torch.optim does, and compute in float64: no other state dtype fits
    them. Other parameters keep float32 states unless bfloat16 or 8-bit states are asked for."""
    if requested == STATE_8BIT:
        if param_dtype == torch.float64:
            raise ValueError("Invalid state_dtype: '8bit' for float64 parameters (their states are float64; leave "
                             "state_dtype=None)")
        return torch.uint8
    if param_dtype == torch.float64:
        if requested not in (None, torch.float64):
            raise ValueError(f"Invalid state_dtype: {requested} for float64 parameters (their states are float64; "
                             "leave state_dtype=None)")
        return torch.float64
    if requested == torch.float64:
        raise ValueError(f"Invalid state_dtype: torch.float64 for {param_dtype} parameters (float64 states are for "
                         "float64 parameters; expected torch.float32 or torch.bfloat16)")
    return requested or torch.float32


MasterWeights = Union[bool, str]  # True / False, "kahan" or "stochastic"


def check_block_aligned(segments: Segments) -> None:
    """Refuse a segment table for 8-bit states whose segments do not start on a block boundary (a block would cross a
    parameter)."""
    for k, offset in enumerate(segments.offsets.tolist()):
        if offset % QUANT_BLOCK:
            raise ValueError(f"Invalid segments: with 8-bit states every segment starts on a multiple of {QUANT_BLOCK} "
                             f"elements (segment {k} starts at {offset})")


def check_master_weights_mode(master_weights: Any) -> None:
    """Refuse a master_weights value that names no mode (whatever the parameters' dtype)."""
    if not (isinstance(master_weights, bool) or master_weights in ("kahan", "stochastic")):
        raise ValueError(f"Invalid master_weights: {master_weights!r} (expected True, False, 'kahan' or "
                         "'stochastic')")


def check_master_weights(param_dtype: torch.dtype, master_weights: MasterWeights) -> None:
    """How 16-bit parameters are kept: True, fp32 copies (master weights); "kahan", a 16-bit compensation buffer that
    carries each update's rounding error into the next; "stochastic", stochastic rounding of bfloat16 parameters (no
    extra memory). float32 parameters need none of them (they are ignored there); a float64 parameter cannot have
    them (they would round it to float32 or lose nothing)."""
    check_master_weights_mode(master_weights)
    if master_weights is not False and param_dtype == torch.float64:
        raise ValueError(f"Invalid master_weights: {master_weights!r} for float64 parameters (master weights, Kahan "
                         "compensation and stochastic rounding are for bfloat16/float16 parameters; float64 "
                         "parameters are updated in float64)")
    if master_weights == "stochastic" and param_dtype == torch.float16:
        raise ValueError("Invalid master_weights: 'stochastic' for float16 parameters (stochastic rounding is "
                         "implemented for bfloat16 parameters; use master_weights='kahan' or True for float16)")


class Segments:
    """The segment table of a flat buffer set, as the kernels read it: parameter k occupies
    [offsets[k], offsets[k] + numels[k]) of every buffer, has taken steps[k] steps (float32, as torch.optim's `step`;
    the kernels count the step of every active segment) and has a gradient this step when active[k] is 1.

    One kernel call serves segments whose step counts differ. `active` is a uint8 CPU tensor over a Python array, so the
    step sets a flag per parameter at the cost of a list store. `scalars` holds the per-parameter scalar states of an
    algorithm that keeps them (NAdam's mu_product, ASGD's eta and mu): float32, one row per segment, beside `steps`;
    None for the others. `layout` is the per-segment layout of a factored algorithm's compact states (Adafactor's
    row/column factors; `fusedopt::Segments::layout`, api.h's Layout columns) and `factor_sums` the length of the
    row and column sums it needs; None and 0 for the others.
    """

    def __init__(self, offsets: Sequence[int], numels: Sequence[int], steps_device: torch.device) -> None:
        self.offsets: Tensor = torch.tensor(list(offsets), dtype=torch.int64)
        self.numels: Tensor = torch.tensor(list(numels), dtype=torch.int64)
        self.steps: Tensor = torch.zeros(len(offsets), dtype=torch.float32, device=steps_device)
        self.scalars: Tensor | None = None
        self.layout: Tensor | None = None
        self.factor_sums = 0
        self.layout_checked: tuple[int, ...] | None = None  # what _kernels last checked `layout` against
        self.flags = array.array("B", bytes(len(offsets)))
        self.active: Tensor = torch.frombuffer(self.flags, dtype=torch.uint8) if len(offsets) else \
            torch.zeros(0, dtype=torch.uint8)
        self._on_device: dict[torch.device, dict[str, Tensor]] = {}

    @classmethod
    def packed(cls, numels: Sequence[int], device: torch.device | str = "cpu") -> Segments:
        """Segments of the given sizes laid out as flat storage lays them out (each start 64-byte aligned), all
        active, steps 0 on `device`; `total` is the length of a buffer that holds them."""
        offsets, total = packed_offsets(numels)
        table = cls(offsets, numels, torch.device(device))
        table.total = total
        table.set_all_active(True)
        return table

    def __len__(self) -> int:
        return len(self.flags)

    def layout_or_vectors(self) -> Tensor:
        """The layout of a factored algorithm's compact states: `layout`, or without one every segment a vector whose
        variance (slot 2) lies where the segment lies (1-D flat buffers hold no shapes)."""
        if self.layout is not None:
            return self.layout
        vectors = torch.zeros(len(self), LAYOUT_COLUMNS, dtype=torch.int64)
        vectors[:, 0] = 1
        vectors[:, 2] = self.numels
        vectors[:, 6] = self.offsets
        vectors[:, 9] = self.numels
        return vectors

    def factored_items(self) -> tuple[Tensor, int, int]:
        """The CUDA kernels' table of a factored algorithm (fusedopt::cuda::DeviceWork::factored): the layout, each
        segment's first row item, the row items {segment, row} (one per row of its stack of matrices) and the column
        items {segment, leading index, first column, end column} (up to CUDA_COLUMNS columns, a thread each); with
        the numbers of row and column items."""
        layout = self.layout_or_vectors()
        row_first, rows, cols = [0], [], []
        for k, (lead, n_rows, n_cols, total_rows) in enumerate(layout[:, :4].tolist()):
            if total_rows > 0:
                rows += [x for q in range(lead * n_rows) for x in (k, q)]
                cols += [x for b in range(lead) for c0 in range(0, n_cols, CUDA_COLUMNS)
                         for x in (k, b, c0, min(n_cols, c0 + CUDA_COLUMNS))]
            row_first.append(len(rows) // 2)
        table = torch.cat([layout.reshape(-1), torch.tensor(row_first + rows + cols, dtype=torch.int64)])
        return table, len(rows) // 2, len(cols) // 4

    def ensure_scalars(self, count: int) -> Tensor:
        """The (segments, count) float32 table of per-segment scalar states, created (zeros) on first use."""
        if self.scalars is None or self.scalars.shape[1] != count:
            self.scalars = torch.zeros(len(self), count, dtype=torch.float32, device=self.steps.device)
        return self.scalars

    def set_all_active(self, value: bool) -> None:
        for k in range(len(self.flags)):
            self.flags[k] = int(value)

    def any_active(self) -> bool:
        return any(self.flags)

    def on_device(self, device: torch.device, factored: bool = False) -> dict[str, Tensor]:
        """Device copies for the CUDA kernels: the offsets/numels table and the work list over every segment (item
        begin, end, segment, then each segment's first item), and with `factored` the layout of a factored algorithm
        with its row and column items (`factored_items`), built once; the active flags, written each call.

        Nothing here waits for the GPU. Under CUDA graph capture nothing can be copied from host memory, so the
        tables must exist before the capture (any eager step builds them, or a call of this method), and the flags are
        written by fill kernels instead: the graph replays the flags it was captured with, and an eager call after a
        replay writes its own again."""
        cached = self._on_device.get(device)
        capturing = torch.cuda.is_current_stream_capturing()
        if cached is None:
            if capturing:
                raise RuntimeError("fusedopt: the device copy of a segment table is built on its first CUDA step, "
                                   "which cannot be captured in a CUDA graph: take one step, or call "
                                   "Segments.on_device(device), before capturing")
            begin, end, segment, first = [], [], [], []
            for k, (off, num) in enumerate(zip(self.offsets.tolist(), self.numels.tolist())):
                first.append(len(begin))
                for x in range(0, num, CHUNK):
                    begin.append(off + x)
                    end.append(off + min(num, x + CHUNK))
                    segment.append(k)
            first.append(len(begin))
            work = torch.tensor(begin + end + segment + first, dtype=torch.int64)
            # From pinned memory, so that the copies do not wait for the GPU either.
            cached = {"offsets": self.offsets.pin_memory().to(device, non_blocking=True),
                      "numels": self.numels.pin_memory().to(device, non_blocking=True),
                      "work": work.pin_memory().to(device, non_blocking=True),
                      "items": torch.tensor(len(begin)), "active": torch.zeros_like(self.active, device=device)}
            self._on_device[device] = cached
        if factored and "factored" not in cached:
            if capturing:
                raise RuntimeError("fusedopt: the device copy of a factored layout is built on its first CUDA step, "
                                   "which cannot be captured in a CUDA graph: take one step before capturing")
            table, row_items, col_items = self.factored_items()
            cached["factored"] = table.pin_memory().to(device, non_blocking=True)
            cached["row_items"], cached["col_items"] = torch.tensor(row_items), torch.tensor(col_items)
        if not capturing:
            cached["active"].copy_(self.active, non_blocking=True)
            return cached
        start = 0
        for k in range(1, len(self.flags) + 1):  # one fill per run of equal flags: one kernel when all are set
            if k == len(self.flags) or self.flags[k] != self.flags[start]:
                cached["active"][start:k].fill_(self.flags[start])
                start = k
        return cached


# Storages of flat buffers this process allocated: a parameter already living in one (an earlier optimizer over the
# same model) is re-pointed like a fresh one, while any other shared storage keeps its aliasing (see FlatBuffer).
_OWN_STORAGES: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()


def keeps_external_storage(p: Tensor) -> bool:
    """Whether `p`'s memory must stay where it is: shared memory (`model.share_memory()`, Hogwild workers) or part of a
    larger tensor the user may read (parameters made as views of one big tensor). Flat storage then copies such
    parameters in before each step and out after it, instead of re-pointing them."""
    if is_dtensor(p) or p.device.type == "meta":
        return False
    storage = p.untyped_storage()
    if storage.data_ptr() in _OWN_STORAGES:
        return False
    # torch calls every CUDA tensor shared (is_shared() is always True there): only CPU shared memory counts, or
    # every GPU parameter would be copied in and out at every step.
    shared = p.device.type == "cpu" and p.is_shared()
    return shared or storage.nbytes() > p.numel() * p.element_size()


class _GradMark:
    """Post-accumulate-grad hook: marks that backward produced parameter i's gradient since the last zero_grad."""

    __slots__ = ("flags", "i")

    def __init__(self, flags: array.array, i: int) -> None:
        self.flags, self.i = flags, i

    def __call__(self, param: Tensor) -> None:
        self.flags[self.i] = 1


def _align(n: int) -> int:
    return (n + ALIGN_ELEMENTS - 1) // ALIGN_ELEMENTS * ALIGN_ELEMENTS


def _allocate(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A zeroed 1-D buffer whose first element is 64-byte aligned, owning its whole storage where possible.

    torch's CPU and CUDA allocators already align to 64 bytes or more, so the buffer is normally a plain tensor
    over an exact-size storage; only a misaligned allocation is retried with slack, as a `_base`-less view.
    torch.compile relies on this when one graph holds both a flat buffer and the parameters that are views into
    it: it rebuilds them from their shared storage, which it supports only for tensors without `_base` whose
    storage is not larger than the buffer.
    """
    raw = torch.zeros(numel, dtype=dtype, device=device)
    if raw.data_ptr() % ALIGN_BYTES == 0:
        _OWN_STORAGES[raw.untyped_storage().data_ptr()] = raw
        return raw
    extra = ALIGN_BYTES // raw.element_size()
    raw = torch.zeros(numel + extra, dtype=dtype, device=device)
    shift = (ALIGN_BYTES - raw.data_ptr() % ALIGN_BYTES) % ALIGN_BYTES // raw.element_size()
    flat = torch.empty((0,), dtype=dtype, device=device).set_(raw.untyped_storage(), shift, (numel,), (1,))
    _OWN_STORAGES[flat.untyped_storage().data_ptr()] = flat
    return flat


class FlatBuffer:
    """One (device, dtype) buffer set of a param group: parameters, gradients, states and a segment table."""

    def __init__(self, params: Sequence[Tensor], master_weights: MasterWeights = False,
                 quantized: bool = False) -> None:
        if not params:
            raise ValueError("FlatBuffer needs at least one parameter")
        first = params[0]
        self.device: torch.device = first.device
        self.dtype: torch.dtype = first.dtype
        if self.dtype not in PARAM_DTYPES:
            raise TypeError(f"fusedopt supports float32, bfloat16, float16 and float64 parameters, got {self.dtype}")
        check_master_weights(self.dtype, master_weights)
        self.params: list[Tensor] = list(params)
        locals_ = [local_tensor(p) for p in self.params]
        self.sharded: bool = is_dtensor(first)
        # Parameters whose memory stays theirs (FSDP2 shards, shared memory, views of a user tensor): copied in before
        # each step and out after it. Shared-memory buffers are allocated in shared memory too.
        self.external: bool = self.sharded or any(keeps_external_storage(p) for p in params)
        self.shapes: list[torch.Size] = [t.shape for t in locals_]
        self.numels: list[int] = [t.numel() for t in locals_]
        # 8-bit states: regions start on block boundaries, so that no quantization block crosses a parameter.
        self.quantized: bool = quantized
        self.offsets, total = packed_offsets(self.numels, QUANT_BLOCK if quantized else 0)
        self.total: int = total
        self.param: Tensor = _allocate(total, self.dtype, self.device)
        self.grad: Tensor = _allocate(total, self.dtype, self.device)
        if any(p.is_shared() for p in locals_ if p.device.type == "cpu"):
            self.param.share_memory_()
            self.grad.share_memory_()
        self.state: dict[str, Tensor] = {}
        # The float32 block absmaxes of each 8-bit state (uint8 codes in `state`), one per QUANT_BLOCK elements.
        self.absmax: dict[str, Tensor] = {}
        self.signed: dict[str, bool] = {}  # per 8-bit state: whether it holds signed values (its code, quant8.h)
        # States not shaped like their parameters: each such state's StateShape and its per-parameter offsets and
        # shapes in its own compact buffer (`compact_layout`). The others share the parameters' offsets.
        self.state_layouts: dict[str, tuple[StateShape, list[int], list[torch.Size | None]]] = {}
        # The segment table the kernels read. Step counts are float32, one per parameter; state[p]["step"] are 0-d views
        # into them (torch.optim's layout). On the GPU they live on the device, as torch.optim's fused/capturable
        # steps do, so that a step skipped on the device (AMP found_inf, skip_nonfinite) is not counted and nothing
        # has to be read back.
        steps_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        self.segments = Segments(self.offsets, self.numels, steps_device)
        self.steps: Tensor = self.segments.steps
        self.master: Tensor | None = None
        # Kahan-compensated 16-bit parameters: the value is param + comp (param's dtype, zero at first).
        self.comp: Tensor | None = None
        # Stochastic rounding of bf16 parameters (its seed is the param group's rounding_seed).
        self.stochastic: bool = master_weights == "stochastic" and self.dtype == torch.bfloat16
        with torch.no_grad():
            for i, (p, local) in enumerate(zip(self.params, locals_)):
                self.region(self.param, i).copy_(local.detach().reshape(-1))
                if not self.external:
                    p.data = self.view(self.param, i)
            sixteen_bit = self.dtype in (torch.bfloat16, torch.float16)
            if master_weights is True and sixteen_bit:
                self.master = _allocate(total, torch.float32, self.device)
                self.master.copy_(self.param)
            if master_weights == "kahan" and sixteen_bit:
                self.comp = _allocate(total, self.dtype, self.device)
                self.comp.zero_()
        # Which parameters received a gradient since the last zero_grad: zero_grad keeps the views and zeroes them, so a
        # parameter that backward did not reach has a zero gradient, and the step skips it as torch.optim skips a None
        # one (its state does not move). Set by a post-accumulate-grad hook, or when a gradient is handed over.
        self._received = array.array("B", bytes(len(self.params)))
        self.received: Tensor = (torch.frombuffer(self._received, dtype=torch.uint8) if self.params
                                 else torch.zeros(0, dtype=torch.uint8))
        self._hooks = [] if self.external else [p.register_post_accumulate_grad_hook(_GradMark(self._received, i))
                                                for i, p in enumerate(self.params) if p.requires_grad]
        # The gradient buffer's version counter after the last zero_grad: if nothing wrote to it since, an unmarked
        # gradient is certainly zero; if something did (user code writing into .grad in place), it is read to see.
        self._zeroed_version = self.grad._version
        # Sharded parameters are copied in every step, so only plain ones need their addresses checked.
        self._param_ptrs = [] if self.external else [p.data_ptr() for p in self.params]
        # Version counters of the parameters when master weights last matched them: an in-place write by the user
        # (a loaded pretrained model, p.clamp_(), an init) bumps it, and the next step takes the new value into the
        # master copy instead of overwriting it. The kernels write through pointers and bump nothing.
        self._versions = [p._version for p in self.params]
        # The .grad tensors we hand out: a step recognises them by identity and address (`p.grad.data = t` keeps
        # the object but not the memory).
        self._grad_views = [self.view(self.grad, i) for i in range(len(self.params))]
        self._grad_ptrs = [v.data_ptr() for v in self._grad_views]
        # A gradient that is not ours but keeps coming back at the same address after we re-pointed `.grad` (DDP with
        # gradient_as_bucket_view puts its bucket view back after every backward) is left in place: each step copies
        # from it and zero_grad zeroes it, instead of two copies a step fighting over `.grad`.
        self._foreign_ptrs: list[int] = [0] * len(self.params)  # address of the last foreign gradient re-pointed
        # State names for which every parameter already has its views (None: check on the next step).
        self.complete_state: tuple[str, ...] | None = None

    @property
    def reduce_groups(self) -> list[Any]:
        """Process groups over which this buffer's parameters are sharded: per-rank sums of squares (global norm,
        trust ratios) are all-reduced over them to give the norms of whole parameters. Looked up from the parameters'
        device mesh at each use, never kept: a process group the buffer held would outlive
        `destroy_process_group`, and its gloo threads could then finish a collective while Python shuts down, which
        aborts the process."""
        return shard_groups(self.params[0]) if self.sharded else []

    # Regions and views -------------------------------------------------------------------------------------

    def region(self, flat: Tensor, i: int) -> Tensor:
        """The 1-D slice of `flat` that belongs to parameter i."""
        return flat[self.offsets[i]:self.offsets[i] + self.numels[i]]

    def view(self, flat: Tensor, i: int) -> Tensor:
        """Parameter i's region of `flat`, shaped like the parameter (like its local shard when sharded)."""
        return self.region(flat, i).view(self.shapes[i])

    def grad_view(self, i: int) -> Tensor:
        """The `.grad` tensor this buffer hands out for parameter i: a view into `grad` (a step recognises it by
        identity and address; torch.compile's traced step by identity)."""
        return self._grad_views[i]

    def blocks(self, i: int) -> slice:
        """Parameter i's entries in the block absmaxes of an 8-bit state."""
        return blocks_of(self.offsets[i], self.numels[i])

    def absmax_of(self, name: str) -> str | None:
        """The 8-bit state whose block absmaxes `name` ("<state>_absmax") names, or None."""
        owner = name[:-len(ABSMAX)] if name.endswith(ABSMAX) else None
        return owner if owner in self.absmax else None

    def state_region(self, name: str, i: int) -> Tensor | None:
        """Parameter i's 1-D region of state `name` ("master_param": the master weights; "<state>_absmax": the block
        absmaxes of an 8-bit state), None where that parameter keeps no such state (a factored state of a vector)."""
        owner = self.absmax_of(name)
        if owner is not None:
            return self.absmax[owner][self.blocks(i)]
        flat = self.master if name == "master_param" else self.comp if name == "kahan_comp" else self.state[name]
        if flat is None:  # master weights or a compensation this buffer does not keep
            return None
        layout = self.state_layouts.get(name)
        if layout is None:
            return self.region(flat, i)
        _, offsets, shapes = layout
        shape = shapes[i]
        return None if shape is None else flat[offsets[i]:offsets[i] + shape.numel()]

    def state_view(self, name: str, i: int) -> Tensor | None:
        """Parameter i's state `name` as torch.optim exposes it: shaped like the parameter (or as its StateShape says),
        a DTensor placed like a sharded parameter; None where the parameter keeps no such state."""
        region = self.state_region(name, i)
        if region is None:
            return None
        if self.absmax_of(name) is not None:
            return region  # per block of the local parameter (shard), not placed like the parameter
        layout = self.state_layouts.get(name)
        if layout is None:
            view = region.view(self.shapes[i])
            return view if not self.sharded else state_as_dtensor(view, self.params[i])
        shape_of, _, shapes = layout
        view = region.view(shapes[i])
        if not self.sharded:
            return view
        return state_as_dtensor(view, self.params[i], shape_of(self.params[i].shape))

    # States ------------------------------------------------------------------------------------------------

    def ensure_state(self, name: str, dtype: torch.dtype, fill: float = 0.0, shape: StateShape | None = None,
                     signed: bool = True) -> Tensor:
        """The flat buffer of optimizer state `name`, allocated (filled with `fill`) on first use: as long as the
        parameter buffer, or with `shape`, a compact buffer of the states that function gives. uint8: an 8-bit
        state of `signed` or nonnegative values, with its block absmaxes."""
        flat = self.state.get(name)
        if flat is None:
            if dtype == torch.uint8:
                self.signed[name] = signed
                if shape is not None or not self.quantized:
                    raise ValueError(f"fusedopt: state {name!r} cannot be 8-bit here (8-bit states are shaped like "
                                     "their parameters, in a buffer set built for them)")
                self.state[name] = _allocate(self.total, torch.uint8, self.device)
                self.absmax[name] = _allocate(self.total // QUANT_BLOCK, torch.float32, self.device)
                if fill != 0.0:
                    for i in range(len(self.params)):
                        self.fill_state(name, i, fill)
                return self.state[name]
            if dtype not in STATE_DTYPES:
                raise TypeError(f"Invalid state_dtype: {dtype} (expected torch.float32, torch.bfloat16 or "
                                "torch.float64)")
            total = self.total
            if shape is not None:
                offsets, shapes, total = self.compact_layout(shape)
                self.state_layouts[name] = (shape, offsets, shapes)
            flat = _allocate(total, dtype, self.device)
            self.state[name] = flat
            if fill != 0.0:
                for i in range(len(self.params)):
                    region = self.state_region(name, i)
                    if region is not None:
                        region.fill_(fill)
        return flat

    def is_8bit(self, name: str) -> bool:
        return name in self.absmax

    def fill_state(self, name: str, i: int, value: float) -> None:
        """Set parameter i's state `name` to `value` everywhere (an 8-bit state: its code for that value)."""
        region = self.state_region(name, i)
        if region is None:
            return
        if self.is_8bit(name):  # every element is its block's absmax: the top code, or 0 for 0 (quant8.h)
            signed = self.signed[name]
            top = (127 | (128 if value < 0 else 0)) if signed else 255
            region.fill_(top if value != 0 else 0)
            self.absmax[name][self.blocks(i)] = abs(float(value))
        else:
            region.fill_(value)

    def write_state(self, name: str, i: int, values: Tensor) -> None:
        """Copy `values` (a plain tensor with the region's element count) into parameter i's state `name`. An 8-bit
        state takes float values quantized (as torch.optim's fp32 states load into it) and uint8 values as codes
        (a compact checkpoint's; their absmaxes are written as "<name>_absmax")."""
        region = self.state_region(name, i)
        assert region is not None
        values = values.detach().reshape(-1).to(self.device)
        if self.is_8bit(name) and values.dtype != torch.uint8:
            codes, absmax = quantize8(values.float(), self.signed[name])
            region.copy_(codes)
            self.absmax[name][self.blocks(i)] = absmax
        else:
            region.copy_(values)

    def read_state(self, name: str, i: int) -> Tensor:
        """Parameter i's state `name` as values: an 8-bit state decoded to float32, shaped like the parameter (a plain
        tensor, the local shard's when sharded)."""
        region = self.state_region(name, i)
        assert region is not None
        if not self.is_8bit(name):
            return region.view(self.shapes[i])
        return dequantize8(region, self.absmax[name][self.blocks(i)], self.signed[name]).view(self.shapes[i])

    def compact_layout(self, shape: StateShape) -> tuple[list[int], list[torch.Size | None], int]:
        """Where each parameter's state of StateShape `shape` lies in a compact buffer: offsets, shapes (None: the
        parameter keeps none) and the buffer's length."""
        shapes = [shape(s) for s in self.shapes]
        offsets, total = packed_offsets([0 if s is None else s.numel() for s in shapes])
        return offsets, shapes, total

    def factored_layout(self, shapes: Sequence[StateShape]) -> tuple[Tensor, int]:
        """The segment layout of a factored algorithm whose slots (row factors, column factors, variance) have these
        StateShapes, and the length of the row and column sums it needs (api.h Layout). Offsets in the slots are
        those `ensure_state` lays out. A parameter of two or more dimensions is a stack of matrices over its last two;
        its row and column sums are placed by the leading index in the whole parameter, so that the shards of one
        parameter add up the same entries when the sums are all-reduced."""
        slot_offsets = [self.compact_layout(shape)[0] for shape in shapes]
        table, sums = [], 0
        for i, (local, numel) in enumerate(zip(self.shapes, self.numels)):
            whole = self.params[i].shape
            at = [offsets[i] for offsets in slot_offsets]
            if len(whole) < 2:
                table.append([1, 0, numel, 0, *at, 0, 0, whole.numel()])
                continue
            cols, lead_whole = whole[-1], math.prod(whole[:-2])
            first = shard_offset(self.params[i])[0] * math.prod(whole[1:-2]) if len(whole) > 2 else 0
            table.append([math.prod(local[:-2]), local[-2], cols, whole[-2], *at, sums + first,
                          sums + lead_whole + first * cols, whole.numel()])
            sums += lead_whole * (1 + cols)
        return torch.tensor(table, dtype=torch.int64).reshape(len(table), LAYOUT_COLUMNS), sums

    # Aliasing ----------------------------------------------------------------------------------------------

    def prepare_step(self) -> bool:
        """Restore aliasing the user broke, mark in `segments.flags` which parameters have a gradient this step, and say
        whether any has.

        A parameter whose data was replaced (`p.data = t`) is copied back in; a gradient that is not our view
        (assigned, or created by autograd after `set_to_none=True`) is copied into the flat buffer and the view
        put back. The fast path is one pointer compare and one identity check per parameter: autograd accumulates
        into the existing `.grad` tensor, which keeps its Python object.
        """
        if self.external:
            return self._prepare_external()
        if self.master is not None or self.comp is not None:
            self._sync_master()
        flags, received = self.segments.flags, self._received
        any_grad = False
        written = self.grad._version != self._zeroed_version
        # A view no backward reached since zero_grad holds a gradient only if user code wrote it in place. The CPU
        # reads it to see; on a GPU that read would make the host wait, so there the hooks decide: after a backward
        # the parameters it did not reach are skipped, and gradients copied in with no backward at all count.
        on_gpu = self.device.type == "cuda"
        unreached_count = on_gpu and written and not any(received)
        # One pass of plain list walks: this loop is most of a step's Python cost.
        for i, p, param_ptr, view, grad_ptr in zip(range(len(flags)), self.params, self._param_ptrs, self._grad_views,
                                                   self._grad_ptrs):
            if p.data_ptr() != param_ptr:
                self._adopt_param(i)
            g = p.grad
            if g is None:
                flags[i] = 0
                continue
            if g is not view or g.data_ptr() != grad_ptr:
                self._take_grad(i, g)
                received[i] = 1
            elif not received[i]:  # our zeroed view, which backward has not reached since zero_grad
                has_grad = unreached_count if on_gpu else written and bool(self.region(self.grad, i).any())
                if not has_grad:
                    flags[i] = 0
                    continue
                received[i] = 1  # written in place by user code
            flags[i] = 1
            any_grad = True
        return any_grad

    @torch.no_grad()
    def _sync_master(self) -> None:
        """Take parameters the user wrote in place since the last step into the master weights (or drop their Kahan
        compensation: the written value is the parameter's value now)."""
        current = [p._version for p in self.params]
        if current == self._versions:
            return
        for i, (now, seen) in enumerate(zip(current, self._versions)):
            if now != seen:
                self._param_rewritten(i)
        self._versions = current

    def _param_rewritten(self, i: int) -> None:
        """Parameter i's region of `param` holds a value written from outside: the master weights take it, a Kahan
        compensation is dropped."""
        if self.master is not None:
            self.region(self.master, i).copy_(self.region(self.param, i))
        if self.comp is not None:
            self.region(self.comp, i).zero_()

    @torch.no_grad()
    def _prepare_external(self) -> bool:
        """Copy in the gradients (or local gradient shards) and the parameters that have one."""
        flags = self.segments.flags
        for i, p in enumerate(self.params):
            g = p.grad
            flags[i] = int(g is not None)
            if g is not None:
                local = local_tensor(p)
                self._check_same_layout(i, local)
                param_region = self.region(self.param, i)
                if self.master is None and self.comp is None:
                    param_region.copy_(local.reshape(-1))
                else:  # master + p or p + comp is the truth; take the shard only if something else rewrote it
                    if not torch.equal(param_region, local.reshape(-1)):
                        param_region.copy_(local.reshape(-1))
                        self._param_rewritten(i)
                local_grad = local_tensor(g)
                self._check_grad(i, local_grad)
                self.region(self.grad, i).copy_(local_grad.reshape(-1))
        return any(flags)

    @torch.no_grad()
    def finish_step(self) -> None:
        """Write updated parameters back into their own storage (external buffers only)."""
        if not self.external:
            return
        for i, p in enumerate(self.params):
            if self.segments.flags[i]:
                local_tensor(p).copy_(self.view(self.param, i))

    def close(self) -> None:
        """Remove the gradient hooks (the buffer set is being replaced)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def all_reduce_sums(self, sums: Tensor) -> None:
        """Sum `sums` in place over the process groups this buffer is sharded across."""
        all_reduce_sum(sums, self.reduce_groups)

    def _check_grad(self, i: int, g: Tensor) -> None:
        if g.layout != torch.strided:
            raise RuntimeError(f"fusedopt does not support sparse gradients (parameter {i}, layout {g.layout})")
        self._check_same_layout(i, g, "gradient")

    def _check_same_layout(self, i: int, t: Tensor, what: str = "parameter") -> None:
        if t.device == self.device and t.dtype == self.dtype and t.numel() == self.numels[i]:
            return
        found = f"{tuple(t.shape)} {t.dtype} on {t.device}"
        held = f"{self.numels[i]} elements {self.dtype} on {self.device}"
        if what == "parameter":
            raise RuntimeError(f"fusedopt: parameter {i} changed to {found} after the optimizer was created (was "
                               f"{held}); create the optimizer after moving or casting the model")
        raise RuntimeError(f"fusedopt: the gradient of parameter {i} is {found}, the parameter is {held}; a "
                           "gradient must match its parameter's size, dtype and device")

    def _adopt_param(self, i: int) -> None:
        p = self.params[i]
        self._check_same_layout(i, p)
        if p.shape != self.shapes[i]:  # same numel, new shape: the states' layout would no longer match
            raise RuntimeError(f"fusedopt: parameter {i} changed shape from {tuple(self.shapes[i])} to "
                               f"{tuple(p.shape)} after the optimizer was created; create the optimizer after "
                               "reshaping the model")
        with torch.no_grad():
            self.region(self.param, i).copy_(p.detach().reshape(-1))
            self._param_rewritten(i)
            p.data = self.view(self.param, i)

    def _take_grad(self, i: int, g: Tensor) -> None:
        """Bring a gradient that is not our view into the flat buffer: copied and re-pointed at our view, or, when it
        came back at the address we re-pointed last time, copied and left in place."""
        self._check_grad(i, g)
        if not self.is_kept(i, g):
            self._foreign_ptrs[i] = g.data_ptr()
            self._adopt_grad(i, g)
            return
        with torch.no_grad():
            self.region(self.grad, i).copy_(g.detach().reshape(-1))

    def is_kept(self, i: int, g: Tensor) -> bool:
        """Whether `g`, parameter i's `.grad`, is a foreign gradient left in place (copied from at each step)."""
        return g.data_ptr() == self._foreign_ptrs[i]

    def _adopt_grad(self, i: int, g: Tensor) -> None:
        p = self.params[i]
        with torch.no_grad():
            self.region(self.grad, i).copy_(g.detach().reshape(-1))
        view = self._grad_views[i]
        if g is view or view.data_ptr() != self._grad_ptrs[i] or view.shape != self.shapes[i]:
            # our view object had its data replaced (`p.grad.data = t`): hand out a fresh view
            self._grad_views[i] = self.view(self.grad, i)
        p.grad = self._grad_views[i]

    def zero_grad(self, set_to_none: bool) -> None:
        """Zero every gradient in one call (views kept), or set them all to None."""
        self.received.zero_()
        if set_to_none:
            for p in self.params:
                p.grad = None
            return
        if self.external:  # the gradients are the user's (FSDP's) tensors, not views into self.grad
            grads = [p.grad for p in self.params if p.grad is not None]
            if grads:
                torch._foreach_zero_(grads)
            return
        kept = [p.grad for i, p in enumerate(self.params) if p.grad is not None and self.is_kept(i, p.grad)]
        if len(kept) < len(self.params):  # each step copies every kept gradient in: their regions need no zeroing
            self.grad.zero_()
        if kept:
            torch._foreach_zero_(kept)
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None or self.is_kept(i, g):
                continue
            if g is not self._grad_views[i] or g.data_ptr() != self._grad_ptrs[i]:
                if g is self._grad_views[i]:
                    self._grad_views[i] = self.view(self.grad, i)
                p.grad = self._grad_views[i]
        self._zeroed_version = self.grad._version


def build_flat_buffers(params: Sequence[Tensor], master_weights: MasterWeights = False, quantized: bool = False
                       ) -> list[FlatBuffer]:
    """One FlatBuffer per (device, dtype, sharding) among `params`, each keeping the group's parameter order;
    `quantized`: laid out for 8-bit states."""
    by_key: dict[tuple[Any, ...], list[Tensor]] = {}
    for p in params:
        by_key.setdefault((p.device, p.dtype, sharding_key(p)), []).append(p)
    return [FlatBuffer(group, master_weights=master_weights, quantized=quantized) for group in by_key.values()]
