"""The compiled kernels behind one device-agnostic wrapper: validate tensors, then hand pointers, the segment table and
the algorithm's hyperparameters to fusedopt._C (CPU) or fusedopt._C.cuda_* (CUDA).

Validation happens before any pointer crosses the boundary, and a rejected call changes nothing. Python computes no
coefficients: each math header's `make_coeffs` does, per segment, from the segment's own step count.
On CUDA every launch goes to `torch.cuda.current_stream(device)` and nothing synchronises with the host; `lr` and
`grad_scale` may then be 1-element device tensors of the compute dtype (float32, or float64 for float64 parameters)
and `found_inf` a float32 device flag that makes the kernels write nothing (a step decided on the device).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import torch
from torch import Tensor

from . import _C
from .flat import CHUNK, LAYOUT_COLUMNS, Segments, check_block_aligned
from .reference import QUANT_BLOCK

# Dtype codes of csrc/include/fusedopt/dtype.h.
DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# float64 states go with float64 parameters only, and they only with float64 gradients and states (check_buffers).
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
F64 = torch.float64


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute a parameter dtype in: float64 for float64 parameters, else float32."""
    return F64 if dtype == F64 else torch.float32
# Trust-ratio and factored passes of csrc/include/fusedopt/api.h (kPassMoments, kPassApply, kPassNorms).
PASS_MOMENTS, PASS_APPLY, PASS_NORMS = 1, 2, 4

# {name: {"kind", "fields", "states"}} from the compiled core's list of algorithms.
ALGORITHMS: dict[str, dict[str, Any]] = _C.algorithms()

_env_error = _C.isa_override_error()
if _env_error is not None:
    raise ValueError(_env_error)

Scalar = Union[float, Tensor]

_followed_threads = 0


def _follow_torch_threads() -> None:
    """Run the CPU kernels on torch's thread count (torch.set_num_threads applies to them too), unless
    `fusedopt.set_num_threads` fixed one."""
    global _followed_threads
    n = torch.get_num_threads()
    if n != _followed_threads:
        _C.follow_threads(n)
        _followed_threads = n


def _check_tensor(name: str, t: Any, like: Tensor | None, dtypes: tuple[torch.dtype, ...]) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"Invalid {name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"Invalid {name} dtype: {t.dtype} (expected one of {allowed})")
    if t.dim() != 1:
        raise ValueError(f"Invalid {name}: expected a 1-D tensor, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"Invalid {name}: tensor is not contiguous (stride {t.stride()})")
    if like is not None:
        if t.numel() != like.numel():
            raise ValueError(f"Invalid {name}: numel {t.numel()} != param numel {like.numel()}")
        if t.device != like.device:
            raise ValueError(f"Invalid {name}: device {t.device} != param device {like.device}")
    return t


def _float(name: str, value: Any) -> float:
    """A hyperparameter as a Python float: booleans as 0/1, None (max_trust_ratio) as -1, CPU tensors read."""
    if value is None:
        return -1.0
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.device.type != "cpu":
            raise ValueError(f"Invalid {name}: expected a number or a 1-element CPU tensor, got a tensor of shape "
                             f"{tuple(value.shape)} on {value.device}")
        return float(value.item())
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"Invalid {name}: expected a float, got {type(value).__name__} {value!r}") from None


def hyper_values(algorithm: str, hyper: Mapping[str, Any]) -> list[float]:
    """The algorithm's hyperparameters in the order its math header declares them (kFields)."""
    fields = ALGORITHMS[algorithm]["fields"]
    missing = [f for f in fields if f not in hyper]
    if missing:
        raise ValueError(f"Invalid hyper for {algorithm}: missing {missing} (expected {fields})")
    return [_float(f, hyper[f]) for f in fields]


def _scalars_pointer(algorithm: str, segments: Segments) -> int:
    """Pointer of the segment table's scalar states for an algorithm that keeps them (0 for the others), checked."""
    names = ALGORITHMS[algorithm]["scalars"]
    if not names:
        return 0
    t = segments.scalars
    shape = (len(segments), len(names))
    if t is None or t.dtype != torch.float32 or tuple(t.shape) != shape or not t.is_contiguous() \
            or t.device != segments.steps.device:
        got = "None" if t is None else f"{t.dtype} {tuple(t.shape)} on {t.device}"
        raise ValueError(f"Invalid segments.scalars for {algorithm}: expected a contiguous float32 tensor of shape "
                         f"{shape} ({', '.join(names)}) on {segments.steps.device}, got {got}")
    return t.data_ptr()


def _layout_pointer(segments: Segments, states: Sequence[Tensor | None]) -> tuple[Tensor, int]:
    """The checked layout of a factored algorithm (kept alive by the caller) and its pointer: every segment's shape
    fits its numel and its regions lie inside the compact state buffers and the factor sums (api.h Layout)."""
    layout = segments.layout_or_vectors()
    lengths = [0 if t is None else t.numel() for t in list(states) + [None] * (3 - len(states))]
    # An optimizer's layout never changes and its state buffers keep their lengths: checked once (a step of 200
    # parameters spent a seventh of its time here).
    key = (id(layout), *lengths)
    if segments.layout is not None and segments.layout_checked == key:
        return layout, layout.data_ptr()
    if layout.dtype != torch.int64 or tuple(layout.shape) != (len(segments), LAYOUT_COLUMNS) \
            or not layout.is_contiguous() or layout.device.type != "cpu":
        raise ValueError(f"Invalid segments.layout: expected a contiguous int64 CPU tensor of shape "
                         f"({len(segments)}, {LAYOUT_COLUMNS}), got {layout.dtype} {tuple(layout.shape)} on "
                         f"{layout.device}")
    for k, (row, numel) in enumerate(zip(layout.tolist(), segments.numels.tolist())):
        lead, rows, cols, total_rows, *at = row[:7]
        if total_rows > 0:
            if lead * rows * cols != numel or rows > total_rows:
                raise ValueError(f"Invalid segments.layout: segment {k} of {numel} elements is not {lead} x {rows} x "
                                 f"{cols} (of {total_rows} rows)")
            needs = [(0, lead * rows), (1, lead * cols)]
        else:
            needs = [(2, numel)]
        for slot, size in needs:
            if at[slot] < 0 or (size and at[slot] + size > lengths[slot]):
                raise ValueError(f"Invalid segments.layout: segment {k} needs elements [{at[slot]}, "
                                 f"{at[slot] + size}) of state slot {slot}, which holds {lengths[slot]}")
    if segments.layout is not None:
        segments.layout_checked = key
    return layout, layout.data_ptr()


def _check_segments(segments: Segments, n: int) -> None:
    last = 0
    for off, num in zip(segments.offsets.tolist(), segments.numels.tolist()):
        if off < last or num < 0 or off + num > n:
            raise ValueError(f"Invalid segments: segment ({off}, {num}) is out of order or outside the buffer of {n} "
                             "elements")
        last = off + num


def check_buffers(algorithm: str, param: Tensor, grad: Tensor, states: Sequence[Tensor | None],
                  master: Tensor | None, device_type: str) -> tuple[list[int], int, int, int]:
    """Validate one flat buffer set; returns (state pointers, master pointer, grad dtype code, state dtype code).
    A state slot passed as None is a null pointer: the compiled entry point refuses it when the configuration needs
    that state (its math header's uses_state). A factored algorithm's states are compact (their own lengths, checked
    against the segment layout by the step)."""
    factored = ALGORITHMS[algorithm]["kind"] == "factored"
    _check_tensor("param", param, None, PARAM_DTYPES)
    if param.device.type != device_type:
        raise ValueError(f"Invalid param device: {param.device} (expected a {device_type} tensor)")
    _check_tensor("grad", grad, param, PARAM_DTYPES)
    if param.dtype == F64 and grad.dtype != F64:
        raise TypeError(f"Invalid grad dtype: {grad.dtype} (expected torch.float64 like param)")
    if grad.dtype != param.dtype and grad.dtype != torch.float32:
        raise TypeError(f"Invalid grad dtype: {grad.dtype} (expected {param.dtype} like param, or torch.float32)")
    names = list(ALGORITHMS[algorithm]["states"]) + ["state"] * 3
    if len(states) > 3:
        raise ValueError(f"Invalid states: {len(states)} slots (at most 3)")
    state_dtype: torch.dtype | None = None
    pointers: list[int] = []
    used = [param, grad]
    for k in range(3):
        t = states[k] if k < len(states) else None
        if t is None:
            pointers.append(0)
            continue
        _check_tensor(names[k], t, None if factored else param, STATE_DTYPES + (torch.uint8,))
        if t.device != param.device:
            raise ValueError(f"Invalid {names[k]}: device {t.device} != param device {param.device}")
        if t.dtype == torch.uint8 and param.dtype == F64:
            raise TypeError(f"Invalid {names[k]} dtype: 8-bit states are for float32, bfloat16 and float16 "
                            "parameters (float64 parameters keep float64 states)")
        if (t.dtype == F64) != (param.dtype == F64):
            expected = "torch.float64" if param.dtype == F64 else "torch.float32 or torch.bfloat16"
            raise TypeError(f"Invalid {names[k]} dtype: {t.dtype} (expected {expected} with {param.dtype} param)")
        if state_dtype is None:
            state_dtype = t.dtype
        elif t.dtype != state_dtype:
            raise TypeError(f"Invalid {names[k]} dtype: {t.dtype} (all states of one call share {state_dtype})")
        pointers.append(t.data_ptr())
        used.append(t)
    master_ptr = 0
    if master is not None:
        if param.dtype in (torch.float32, F64):
            raise ValueError(f"Invalid master: master weights are for bfloat16/float16 parameters, param is "
                             f"{str(param.dtype)[6:]}")
        _check_tensor("master", master, param, (torch.float32,))
        master_ptr = master.data_ptr()
        used.append(master)
    if param.numel() > 0:
        # The kernels assume distinct buffers (restrict pointers); sharing storage would give undefined results.
        seen: dict[int, int] = {}
        for k, t in enumerate(used):
            if t.numel() == 0:  # an empty compact state holds no memory to share
                continue
            if t.data_ptr() in seen:
                raise ValueError(f"Invalid buffers: arguments {seen[t.data_ptr()]} and {k} share memory")
            seen[t.data_ptr()] = k
    state_code = STATE_CODE_8BIT if state_dtype == torch.uint8 else \
        DTYPE_CODES[state_dtype or compute_dtype(param.dtype)]
    return pointers, master_ptr, DTYPE_CODES[grad.dtype], state_code


# The state dtype code of 8-bit states (quant8.h kState8bit).
STATE_CODE_8BIT = 4


def quantized_args(algorithm: str, param: Tensor, states: Sequence[Tensor | None], segments: Segments,
                   absmax: Sequence[Tensor | None] | None, signed: Sequence[bool]) -> tuple[int, int, int, int]:
    """The absmax pointers of 8-bit states and the mask of signed slots (quant8.h), checked: a float32 block absmax
    tensor (one per 256 elements of the buffer) for every 8-bit slot, none for float states, and every segment on a
    block boundary (checked here from the host table: the CUDA entry points cannot read their device copy)."""
    quantized = [t is not None and t.dtype == torch.uint8 for t in states] + [False] * (3 - len(states))
    if any(quantized):
        check_block_aligned(segments)
    absmax = list(absmax or []) + [None] * (3 - len(absmax or []))
    blocks = -(-param.numel() // QUANT_BLOCK)
    names = list(ALGORITHMS[algorithm]["states"]) + ["state"] * 3
    pointers = []
    for k in range(3):
        a = absmax[k]
        if not quantized[k]:
            if a is not None:
                raise ValueError(f"Invalid absmax for {names[k]}: it is not an 8-bit state")
            pointers.append(0)
            continue
        if a is None:
            raise ValueError(f"Invalid absmax for {names[k]}: an 8-bit state needs its block absmax")
        _check_tensor(f"absmax of {names[k]}", a, None, (torch.float32,))
        if a.numel() != blocks or a.device != param.device:
            raise ValueError(f"Invalid absmax of {names[k]}: expected {blocks} float32 values (one per "
                             f"{QUANT_BLOCK} elements) on {param.device}, got {a.numel()} on {a.device}")
        pointers.append(a.data_ptr())
    mask = sum(1 << k for k, is_signed in enumerate(signed) if is_signed and k < 3)
    return pointers[0], pointers[1], pointers[2], mask


# Param modes of the compiled core (param_io.h ParamMode).
PARAM_NEAREST, PARAM_MASTER, PARAM_KAHAN, PARAM_STOCHASTIC = 0, 1, 2, 3


def param_mode(param: Tensor, master: Tensor | None, comp: Tensor | None, rounding_seed: int | None
               ) -> tuple[int, int, int]:
    """(mode, compensation pointer, seed) of how the parameters are kept: fp32 master weights, a Kahan compensation
    buffer `comp` (param's dtype and size), stochastic rounding of bf16 parameters keyed on `rounding_seed`, or
    rounding to nearest. At most one of the three."""
    if sum(x is not None for x in (master, comp, rounding_seed)) > 1:
        raise ValueError("Invalid param mode: master weights, a Kahan compensation and stochastic rounding exclude "
                         "each other")
    if comp is not None:
        if param.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"Invalid comp: Kahan compensation is for bfloat16/float16 parameters, param is "
                             f"{str(param.dtype)[6:]}")
        _check_tensor("comp", comp, param, (param.dtype,))
        if param.numel() > 0 and comp.data_ptr() == param.data_ptr():
            raise ValueError("Invalid buffers: comp and param share memory")
        return PARAM_KAHAN, comp.data_ptr(), 0
    if rounding_seed is not None:
        if param.dtype != torch.bfloat16:
            raise ValueError(f"Invalid rounding_seed: stochastic rounding is for bfloat16 parameters, param is "
                             f"{str(param.dtype)[6:]}")
        if not 0 <= int(rounding_seed) < 2**64:
            raise ValueError(f"Invalid rounding_seed: {rounding_seed} (expected 0 <= seed < 2**64)")
        return PARAM_STOCHASTIC, 0, int(rounding_seed)
    return (PARAM_MASTER if master is not None else PARAM_NEAREST), 0, 0


def step(algorithm: str, param: Tensor, grad: Tensor, states: Sequence[Tensor | None], master: Tensor | None,
         segments: Segments, *, hyper: Mapping[str, Any], lr: Scalar, grad_scale: Scalar = 1.0,
         found_inf: Tensor | None = None, norm_reduce: Callable[[Tensor], None] | None = None,
         comp: Tensor | None = None, rounding_seed: int | None = None, absmax: Sequence[Tensor | None] | None = None,
         signed: Sequence[bool] = ()) -> None:
    """One step of `algorithm` over a flat buffer set: every active segment is updated with coefficients from its own
    step count, which the kernel increments. `norm_reduce` (trust-ratio algorithms on sharded parameters) reduces the
    (2, segments) float64 per-segment sums of squares in place between the two passes. 16-bit parameters are kept as
    `param_mode` says: fp32 `master` weights, a Kahan compensation `comp`, stochastic rounding keyed on
    `rounding_seed`, or rounding to nearest. 8-bit states (uint8 slots) come with their float32 block `absmax` and
    `signed`, per slot, whether it holds signed values (fusedopt/quant8.h)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"Invalid algorithm: {algorithm!r} (expected one of {', '.join(ALGORITHMS)})")
    values = hyper_values(algorithm, hyper)
    device_type = param.device.type
    pointers, master_ptr, grad_code, state_code = check_buffers(algorithm, param, grad, states, master, device_type)
    mode, comp_ptr, seed = param_mode(param, master, comp, rounding_seed)
    if comp is not None and comp.device != param.device:
        raise ValueError(f"Invalid comp: device {comp.device} != param device {param.device}")
    storage = (master_ptr, comp_ptr, mode, seed)
    quantized = quantized_args(algorithm, param, states, segments, absmax, signed)
    n = param.numel()
    if segments.steps.device != (param.device if device_type == "cuda" else torch.device("cpu")):
        raise ValueError(f"Invalid segments: steps on {segments.steps.device} for a param on {param.device}")
    kind = ALGORITHMS[algorithm]["kind"]
    trust_ratio = kind == "trust_ratio"
    # A factored algorithm's layout, checked on the host (the CUDA kernels read a device copy of it).
    layout, layout_ptr = _layout_pointer(segments, states) if kind == "factored" else (None, 0)
    if device_type == "cuda":
        _cuda_step(algorithm, param, grad, pointers, storage, grad_code, state_code, segments, values, lr,
                   grad_scale, found_inf, trust_ratio, norm_reduce, quantized)
        return
    if found_inf is not None and bool(found_inf.item() != 0):
        return
    _follow_torch_threads()
    buffers = (param.data_ptr(), grad.data_ptr(), *pointers, *storage, n, DTYPE_CODES[param.dtype], grad_code,
               state_code)
    table = (segments.offsets.data_ptr(), segments.numels.data_ptr(), segments.steps.data_ptr(),
             segments.active.data_ptr(), len(segments), _scalars_pointer(algorithm, segments), layout_ptr)
    kernel = getattr(_C, algorithm)
    lr_value, scale = _float("lr", lr), _float("grad_scale", grad_scale)
    if layout is not None:
        _factored_passes(lambda passes, w2, u2, sums, count: kernel(*buffers, *table, values, lr_value, scale, passes,
                                                                    w2, u2, sums, count, *quantized),
                         segments, torch.device("cpu"), norm_reduce)
        return
    if not trust_ratio or norm_reduce is None:
        kernel(*buffers, *table, values, lr_value, scale, PASS_MOMENTS | PASS_APPLY, 0, 0, 0, 0, *quantized)
        return
    sums = torch.zeros(2, len(segments), dtype=torch.float64)
    w2, u2 = (sums[0].data_ptr(), sums[1].data_ptr()) if len(segments) else (0, 0)
    kernel(*buffers, *table, values, lr_value, scale, PASS_MOMENTS, w2, u2, 0, 0, *quantized)
    norm_reduce(sums)
    kernel(*buffers, *table, values, lr_value, scale, PASS_APPLY, w2, u2, 0, 0, *quantized)


def _factored_passes(call: Callable[[int, int, int, int, int], None], segments: Segments, device: torch.device,
                     norm_reduce: Callable[[Tensor], None] | None) -> None:
    """A factored algorithm's step through `call(passes, w2, u2, factor_sums, count)`: one call, or on sharded
    parameters its three passes with the sums all-reduced between them (the sums of squares of p with the row and
    column sums, then those of u), in float64 on the buffers' device."""
    count = segments.factor_sums
    if norm_reduce is None:
        call(PASS_MOMENTS | PASS_NORMS | PASS_APPLY, 0, 0, 0, count)
        return
    n = len(segments)
    sums = torch.zeros(2 * n + count, dtype=torch.float64, device=device)
    pointers = (sums.data_ptr(), sums.data_ptr() + 8 * n, sums.data_ptr() + 16 * n, count)
    call(PASS_MOMENTS, *pointers)
    norm_reduce(sums)  # p's sums of squares and the factor sums (u's are still zero)
    call(PASS_NORMS, *pointers)
    u2 = sums[n:2 * n].clone()
    norm_reduce(u2)
    sums[n:2 * n] = u2
    call(PASS_APPLY, *pointers)


def _device_scalar(name: str, t: Tensor, device: torch.device, dtype: torch.dtype = torch.float32) -> int:
    """Pointer of a 1-element `dtype` tensor on `device` (the kernels read it from device memory)."""
    if t.device != device or t.dtype != dtype or t.numel() != 1:
        raise ValueError(f"Invalid {name}: expected a 1-element {dtype} tensor on {device}, got {t.dtype} with "
                         f"{t.numel()} elements on {t.device}")
    return t.data_ptr()


def _launch(device: torch.device) -> tuple[int, int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return index, torch.cuda.current_stream(device).cuda_stream


def _cuda_step(algorithm: str, param: Tensor, grad: Tensor, pointers: list[int], storage: tuple[int, int, int, int],
               grad_code: int,
               state_code: int, segments: Segments, values: list[float], lr: Scalar, grad_scale: Scalar,
               found_inf: Tensor | None, trust_ratio: bool, norm_reduce: Callable[[Tensor], None] | None,
               quantized: tuple[int, int, int, int]) -> None:
    """The CUDA launch: device copies of the segment table, device scalars for whatever is a device tensor."""
    device = param.device
    _check_segments(segments, param.numel())  # the compiled CPU entry points check the table themselves
    table = segments.on_device(device, factored=ALGORITHMS[algorithm]["kind"] == "factored")
    # lr and grad_scale on the device are of the compute dtype: a float32 copy would round a float64 step's values.
    scalar_dtype = compute_dtype(param.dtype)
    lr_ptr = (_device_scalar("lr", lr, device, scalar_dtype)
              if isinstance(lr, Tensor) and lr.device.type == "cuda" else 0)
    scale_ptr = (_device_scalar("grad_scale", grad_scale, device, scalar_dtype)
                 if isinstance(grad_scale, Tensor) and grad_scale.device.type == "cuda" else 0)
    found_ptr = 0 if found_inf is None else _device_scalar("found_inf", found_inf, device)
    lr_value = 0.0 if lr_ptr else _float("lr", lr)
    scale = 1.0 if scale_ptr else _float("grad_scale", grad_scale)
    index, stream = _launch(device)
    kernel = getattr(_C, "cuda_" + algorithm)
    args = (param.data_ptr(), grad.data_ptr(), *pointers, *storage, param.numel(), DTYPE_CODES[param.dtype],
            grad_code, state_code, table["offsets"].data_ptr(), table["numels"].data_ptr(),
            segments.steps.data_ptr(), table["active"].data_ptr(), len(segments),
            _scalars_pointer(algorithm, segments), table["work"].data_ptr(),
            int(table["items"]), values, lr_value, scale, lr_ptr, scale_ptr, found_ptr)
    if "factored" in table:
        factored = (table["factored"].data_ptr(), int(table["row_items"]), int(table["col_items"]))
        _factored_passes(lambda passes, w2, u2, sums, count: kernel(*args, passes, w2, u2, *factored, sums, count,
                                                                    index, stream, *quantized),
                         segments, device, norm_reduce)
        return
    if not trust_ratio or norm_reduce is None:
        kernel(*args, PASS_MOMENTS | PASS_APPLY, 0, 0, 0, 0, 0, 0, 0, index, stream, *quantized)
        return
    sums = torch.zeros(2, len(segments), dtype=torch.float64, device=device)
    w2, u2 = (sums[0].data_ptr(), sums[1].data_ptr()) if len(segments) else (0, 0)
    kernel(*args, PASS_MOMENTS, w2, u2, 0, 0, 0, 0, 0, index, stream, *quantized)
    norm_reduce(sums)  # every rank takes part, whatever its shard holds
    kernel(*args, PASS_APPLY, w2, u2, 0, 0, 0, 0, 0, index, stream, *quantized)


def sum_of_squares(tensor: Tensor) -> tuple[float, bool]:
    """(sum of fp32 squares as a float, whether any element is inf/nan) of a 1-D CPU tensor; bitwise reproducible for
    any thread count. A float64 tensor's squares are float64."""
    _check_tensor("tensor", tensor, None, PARAM_DTYPES)
    if tensor.device.type != "cpu":
        raise ValueError(f"Invalid tensor device: {tensor.device} (expected a cpu tensor)")
    _follow_torch_threads()
    total, nonfinite = _C.sum_of_squares(tensor.data_ptr() if tensor.numel() else 0, tensor.numel(),
                                         DTYPE_CODES[tensor.dtype])
    return float(total), bool(nonfinite)


def sum_of_squares_segments(tensor: Tensor, segments: Segments) -> tuple[float, bool]:
    """`sum_of_squares` over the active segments of a flat CPU buffer."""
    _check_tensor("tensor", tensor, None, PARAM_DTYPES)
    _follow_torch_threads()
    total, nonfinite = _C.sum_of_squares_segments(
        tensor.data_ptr() if tensor.numel() else 0, tensor.numel(), DTYPE_CODES[tensor.dtype],
        segments.offsets.data_ptr(), segments.numels.data_ptr(), segments.active.data_ptr(), len(segments))
    return float(total), bool(nonfinite)


def sum_of_squares_into(tensor: Tensor, segments: Segments | None, out_sum: Tensor, out_nonfinite: Tensor) -> None:
    """Sum of squares (over the active segments when given) written into 1-element tensors on the tensor's device:
    `out_sum` float32, or float64 (which keeps a float64 tensor's sum unrounded), `out_nonfinite` float32 (1.0 for
    inf/nan); on CUDA without waiting for the GPU."""
    if tensor.device.type != "cuda":
        total, flag = sum_of_squares(tensor) if segments is None else sum_of_squares_segments(tensor, segments)
        out_sum.fill_(total)
        out_nonfinite.fill_(float(flag))
        return
    _check_tensor("tensor", tensor, None, PARAM_DTYPES)
    device = tensor.device
    if segments is None:  # the whole tensor: the kernel derives its chunks from n, no table to copy to the device
        work, items, active, count = 0, -(-tensor.numel() // CHUNK), 0, 0
    else:
        _check_segments(segments, tensor.numel())
        table = segments.on_device(device)
        work, items, active, count = (table["work"].data_ptr(), int(table["items"]), table["active"].data_ptr(),
                                      len(segments))
    scratch = torch.empty(int(_C.cuda_sum_of_squares_scratch(items)), dtype=torch.float64, device=device)
    index, stream = _launch(device)
    if out_sum.dtype not in (torch.float32, F64):
        raise ValueError(f"Invalid out_sum: expected a torch.float32 or torch.float64 tensor, got {out_sum.dtype}")
    _C.cuda_sum_of_squares(tensor.data_ptr(), tensor.numel(), DTYPE_CODES[tensor.dtype], work, items, active, count,
                           scratch.data_ptr(), _device_scalar("out_sum", out_sum, device, out_sum.dtype),
                           DTYPE_CODES[out_sum.dtype], _device_scalar("out_nonfinite", out_nonfinite, device),
                           index, stream)


def _check_sam(param: Tensor, grad: Tensor | None, master: Tensor | None, backup: Tensor | None,
               segments: Segments, needs_backup: bool = True) -> tuple[int, int, int, int]:
    """Validate SAM's buffers (as `check_buffers` a step's); returns the (grad, master, backup) pointers and the grad
    dtype code, 0 for an absent buffer. The backup is needed without master weights, except by the sum of squares."""
    _check_tensor("param", param, None, PARAM_DTYPES)
    grad_ptr, grad_code = 0, DTYPE_CODES[param.dtype]
    if grad is not None:
        _check_tensor("grad", grad, param, PARAM_DTYPES)
        if grad.dtype != param.dtype and (grad.dtype != torch.float32 or param.dtype == F64):
            raise TypeError(f"Invalid grad dtype: {grad.dtype} (expected {param.dtype} like param"
                            f"{'' if param.dtype == F64 else ', or torch.float32'})")
        grad_ptr, grad_code = grad.data_ptr(), DTYPE_CODES[grad.dtype]
    master_ptr = backup_ptr = 0
    if master is not None:
        if param.dtype in (torch.float32, F64):
            raise ValueError(f"Invalid master: master weights are for bfloat16/float16 parameters, param is "
                             f"{str(param.dtype)[6:]}")
        master_ptr = _check_tensor("master", master, param, (torch.float32,)).data_ptr()
    elif backup is None and needs_backup:
        raise ValueError("Invalid backup: None without master weights")
    if backup is not None and master is None:
        if backup.dtype != param.dtype:
            raise TypeError(f"Invalid backup dtype: {backup.dtype} (expected {param.dtype} like param)")
        backup_ptr = _check_tensor("backup", backup, param, (param.dtype,)).data_ptr()
    if segments.steps.device.type != "cpu" and segments.steps.device != param.device:
        raise ValueError(f"Invalid segments: steps on {segments.steps.device} for a param on {param.device}")
    _check_segments(segments, param.numel())
    pointers = [p for p in (param.data_ptr(), grad_ptr, master_ptr, backup_ptr) if p]
    if param.numel() > 0 and len(set(pointers)) != len(pointers):
        raise ValueError("Invalid buffers: param, grad, master and backup must not share memory")
    return grad_ptr, master_ptr, backup_ptr, grad_code


def _segment_table(segments: Segments) -> tuple[int, int, int, int]:
    return (segments.offsets.data_ptr(), segments.numels.data_ptr(), segments.active.data_ptr(), len(segments))


def _device_work(segments: Segments, device: torch.device) -> tuple[int, int, int, int]:
    table = segments.on_device(device)
    return table["work"].data_ptr(), int(table["items"]), table["active"].data_ptr(), len(segments)


def sam_perturb(param: Tensor, grad: Tensor, master: Tensor | None, backup: Tensor | None, segments: Segments, *,
                scale: Scalar, adaptive: bool, found_inf: Tensor | None = None) -> None:
    """SAM's perturbation of the active segments (fusedopt/math/sam.h): param := round(w + e) with w the master or
    param (whose bits go to `backup` first). On CUDA `scale` may be a 1-element device tensor of the compute dtype
    and `found_inf` a float32 device flag (non-zero: write nothing)."""
    grad_ptr, master_ptr, backup_ptr, grad_code = _check_sam(param, grad, master, backup, segments)
    n, code = param.numel(), DTYPE_CODES[param.dtype]
    if param.device.type == "cuda":
        device = param.device
        scale_ptr = (_device_scalar("scale", scale, device, compute_dtype(param.dtype))
                     if isinstance(scale, Tensor) and scale.device.type == "cuda" else 0)
        found_ptr = 0 if found_inf is None else _device_scalar("found_inf", found_inf, device)
        index, stream = _launch(device)
        _C.cuda_sam_perturb(param.data_ptr(), grad_ptr, master_ptr, backup_ptr, n, code, grad_code,
                            *_device_work(segments, device), 1.0 if scale_ptr else _float("scale", scale), scale_ptr,
                            found_ptr, bool(adaptive), index, stream)
        return
    if found_inf is not None and bool(found_inf.item() != 0):
        return
    _follow_torch_threads()
    _C.sam_perturb(param.data_ptr(), grad_ptr, master_ptr, backup_ptr, n, code, grad_code, *_segment_table(segments),
                   _float("scale", scale), bool(adaptive))


def sam_restore(param: Tensor, master: Tensor | None, backup: Tensor | None, segments: Segments, *,
                found_inf: Tensor | None = None) -> None:
    """The undo of `sam_perturb` over the active segments, bit for bit: param := backup, or round(master)."""
    _, master_ptr, backup_ptr, _ = _check_sam(param, None, master, backup, segments)
    n, code = param.numel(), DTYPE_CODES[param.dtype]
    if param.device.type == "cuda":
        device = param.device
        found_ptr = 0 if found_inf is None else _device_scalar("found_inf", found_inf, device)
        index, stream = _launch(device)
        _C.cuda_sam_restore(param.data_ptr(), master_ptr, backup_ptr, n, code, *_device_work(segments, device),
                            found_ptr, index, stream)
        return
    if found_inf is not None and bool(found_inf.item() != 0):
        return
    _follow_torch_threads()
    _C.sam_restore(param.data_ptr(), master_ptr, backup_ptr, n, code, *_segment_table(segments))


def sam_sum_of_squares(param: Tensor, grad: Tensor, master: Tensor | None, segments: Segments) -> tuple[float, bool]:
    """ASAM's sum of squares of |w| * g over the active segments of CPU buffers, and whether a term is inf/nan;
    bitwise reproducible for any thread count."""
    grad_ptr, master_ptr, _, grad_code = _check_sam(param, grad, master, None, segments,
                                                    needs_backup=False)
    if param.device.type != "cpu":
        raise ValueError(f"Invalid param device: {param.device} (expected a cpu tensor)")
    _follow_torch_threads()
    total, nonfinite = _C.sam_sum_of_squares(param.data_ptr(), grad_ptr, master_ptr, param.numel(),
                                             DTYPE_CODES[param.dtype], grad_code, *_segment_table(segments))
    return float(total), bool(nonfinite)


def sam_sum_of_squares_into(param: Tensor, grad: Tensor, master: Tensor | None, segments: Segments, out_sum: Tensor,
                            out_nonfinite: Tensor) -> None:
    """`sam_sum_of_squares` written into 1-element tensors on the buffers' device (as `sum_of_squares_into`); on CUDA
    without waiting for the GPU."""
    if param.device.type != "cuda":
        total, flag = sam_sum_of_squares(param, grad, master, segments)
        out_sum.fill_(total)
        out_nonfinite.fill_(float(flag))
        return
    grad_ptr, master_ptr, _, grad_code = _check_sam(param, grad, master, None, segments,
                                                    needs_backup=False)
    if out_sum.dtype not in (torch.float32, F64):
        raise ValueError(f"Invalid out_sum: expected a torch.float32 or torch.float64 tensor, got {out_sum.dtype}")
    device = param.device
    work = _device_work(segments, device)
    scratch = torch.empty(int(_C.cuda_sum_of_squares_scratch(work[1])), dtype=torch.float64, device=device)
    index, stream = _launch(device)
    _C.cuda_sam_sum_of_squares(param.data_ptr(), grad_ptr, master_ptr, param.numel(), DTYPE_CODES[param.dtype],
                               grad_code, *work, scratch.data_ptr(),
                               _device_scalar("out_sum", out_sum, device, out_sum.dtype), DTYPE_CODES[out_sum.dtype],
                               _device_scalar("out_nonfinite", out_nonfinite, device), index, stream)


def build_info() -> dict[str, Any]:
    return _C.build_info()


cpu_isa: Callable[[], str] = _C.cpu_isa
supported_isas: Callable[[], list[str]] = _C.supported_isas
compiled_isas: Callable[[], list[str]] = _C.compiled_isas
set_cpu_isa: Callable[[str], None] = _C.set_cpu_isa
set_num_threads: Callable[[int], None] = _C.set_num_threads
reset_num_threads: Callable[[], None] = _C.reset_num_threads
get_num_threads: Callable[[], int] = _C.get_num_threads
