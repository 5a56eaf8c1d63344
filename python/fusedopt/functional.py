"""Flat-buffer functional API: one call updates a whole flat buffer set, every parameter (segment) with its own step
count, on the chosen backend.

`update` takes 1-D contiguous tensors of equal length and a `fusedopt.flat.Segments` table. `backend="reference"`
applies the per-tensor formulas of `fusedopt.reference` to each active segment; "cpu" and "cuda" call the compiled
kernels (`fusedopt._kernels`). With `master` (fp32 master weights of 16-bit parameters), the update reads and writes
`master` and stores its rounded value in `param`. Every backend counts the step of each active segment in
`segments.steps` before using it.

Device scalars, for a step that never waits for the GPU: `lr` and `grad_scale` may be 1-element tensors of the compute
dtype (float32, or float64 for float64 parameters) and `found_inf` a 1-element float32 tensor whose non-zero value
means "write nothing". The CUDA kernels read them from device memory; the reference and CPU backends read them on the
host.

float64 parameters go with float64 gradients and states and no master weights; they are computed in float64 on every
backend, with coefficients (bias corrections, step sizes) in float64, as torch.optim computes them.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import torch
from torch import Tensor

from . import reference
from ._backend import compiled
from .flat import Segments, check_block_aligned

__all__ = ["update", "sum_of_squares", "sum_of_squares_into", "sam_perturb", "sam_restore", "sam_sum_of_squares",
           "sam_sum_of_squares_into"]

Scalar = Union[float, Tensor]

def _kernels() -> Any:
    module = compiled()
    if module is None:
        raise RuntimeError("fusedopt: the compiled extension is not available; use backend='reference'")
    return module


def _host(value: Scalar) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def update(
    algorithm: str, param: Tensor, grad: Tensor, states: Sequence[Tensor | None], master: Tensor | None,
    segments: Segments, *, hyper: Mapping[str, Any], lr: Scalar, grad_scale: Scalar = 1.0,
    found_inf: Tensor | None = None, backend: str, norm_reduce: Callable[[Tensor], None] | None = None,
    comp: Tensor | None = None, rounding_seed: int | None = None, absmax: Sequence[Tensor | None] | None = None,
    signed: Sequence[bool] = (),
) -> None:
    """One step of `algorithm` (a name of the compiled core's list, `fusedopt._C.algorithms()`) over a flat buffer set.

    `states` are the state buffers in the algorithm's slot order (None for a state this configuration does not
    keep), `hyper` its hyperparameters by name (the math header's kFields, as `fusedopt._C.algorithms()` lists
    them). An algorithm with per-parameter scalar states (NAdam's mu_product, ASGD's eta and mu) reads and advances
    them in `segments.scalars`, which its caller fills with their first values (`Segments.ensure_scalars`).
    `norm_reduce` (trust-ratio algorithms on sharded parameters) reduces in place the (2, segments) float64 sums of
    squares of the parameter and of the update between the two passes, so that trust ratios use the norms of whole
    parameters.

    8-bit states (csrc/include/fusedopt/quant8.h) are uint8 slots with their float32 block `absmax` (one per 256
    elements of the buffer; every segment starts on a multiple of 256) and `signed`, per slot, whether the state
    holds signed values: each active segment's states are decoded, updated and encoded again in the same call.
    """
    if backend != "reference":
        _kernels().step(algorithm, param, grad, states, master, segments, hyper=hyper, lr=lr, grad_scale=grad_scale,
                        found_inf=found_inf, norm_reduce=norm_reduce, comp=comp, rounding_seed=rounding_seed,
                        absmax=absmax, signed=signed)
        return
    quantized = [t is not None and t.dtype == torch.uint8 for t in states]
    if any(quantized):
        _update_8bit(algorithm, param, grad, states, master, segments, hyper=hyper, lr=lr, grad_scale=grad_scale,
                     found_inf=found_inf, comp=comp, rounding_seed=rounding_seed, absmax=absmax, signed=signed)
        return
    if found_inf is not None and bool(found_inf.item() != 0):
        return
    function = getattr(reference, algorithm)  # the reference function has the kernel's name
    target = _update_target(param, master, comp, rounding_seed)
    kwargs = dict(hyper)
    kwargs.update(lr=_host(lr), grad_scale=_host(grad_scale))
    regions = _active_segments(segments)
    steps = segments.steps
    scalar_names = reference.SCALAR_STATES.get(algorithm, ())
    if scalar_names and (segments.scalars is None or tuple(segments.scalars.shape) != (len(segments),
                                                                                        len(scalar_names))):
        raise ValueError(f"Invalid segments.scalars for {algorithm}: expected {len(scalar_names)} per segment "
                         f"({', '.join(scalar_names)}), got {segments.scalars}")
    if algorithm in reference.FACTORED:
        if norm_reduce is not None:
            raise NotImplementedError(f"fusedopt: the reference backend runs {algorithm} on whole parameters only; "
                                      "sharded (FSDP2) parameters need the compiled kernels")
        layout = segments.layout_or_vectors().tolist()
        for k, region in regions:
            steps[k] += 1
            function(*_factored_views(target[region], grad[region], states, layout[k]), step=int(steps[k].item()),
                     **kwargs)
    elif norm_reduce is None or not hasattr(reference, algorithm + "_moments"):  # one pass unless trust-ratio
        for k, region in regions:
            steps[k] += 1
            # Each scalar state as torch keeps it, a 0-dim float32 tensor the function updates in place.
            scalars = {name: segments.scalars[k, j] for j, name in enumerate(scalar_names)}  # type: ignore[index]
            function(target[region], grad[region], *(s if s is None else s[region] for s in states),
                     step=int(steps[k].item()), **scalars, **kwargs)
    else:
        apply_kwargs = {"lr": kwargs.pop("lr"), "max_trust_ratio": kwargs.pop("max_trust_ratio")}
        sums = torch.zeros(2, len(segments), dtype=torch.float64)
        directions = {}
        moments, apply = getattr(reference, algorithm + "_moments"), getattr(reference, algorithm + "_apply")
        for k, region in regions:
            steps[k] += 1
            directions[k], sums[0, k], sums[1, k] = moments(
                target[region], grad[region], states[0][region], states[1][region], step=int(steps[k].item()),
                **kwargs)
        norm_reduce(sums)
        for k, region in regions:
            apply(target[region], directions[k], float(sums[0, k]), float(sums[1, k]), **apply_kwargs)
    _store_params(param, target, master, comp, rounding_seed, segments, regions)


def _update_target(param: Tensor, master: Tensor | None, comp: Tensor | None, rounding_seed: int | None) -> Tensor:
    """The values the reference update starts from: the fp32 master weights, p + comp (Kahan), an fp32 copy of p to be
    rounded stochastically, or p itself."""
    if master is not None:
        return master
    if comp is not None:
        return param.float() + comp.float()
    if rounding_seed is not None:
        return param.float()
    return param


def _store_params(param: Tensor, target: Tensor, master: Tensor | None, comp: Tensor | None,
                  rounding_seed: int | None, segments: Segments, regions: list[tuple[int, slice]]) -> None:
    """Write the updated values of the active regions into the parameters in their mode (see _update_target)."""
    if master is not None:
        for _, region in regions:
            param[region].copy_(master[region])
    elif comp is not None:
        for _, region in regions:
            reference.kahan_split(target[region], param[region], comp[region])
    elif rounding_seed is not None:
        offsets = segments.offsets.tolist()
        for k, region in regions:
            key = reference.rounding_key(rounding_seed, float(segments.steps[k]), k)
            param[region].copy_(reference.stochastic_round_bf16(target[region], key, offsets[k]))


def _update_8bit(algorithm: str, param: Tensor, grad: Tensor, states: Sequence[Tensor | None], master: Tensor | None,
                 segments: Segments, *, absmax: Sequence[Tensor | None] | None, signed: Sequence[bool],
                 **kwargs: Any) -> None:
    """The reference step with 8-bit states: each active segment's states decoded to fp32, the reference update,
    then encoded again with their new block absmaxes (what the kernels do block by block). A trust-ratio algorithm
    takes its direction from the moments as encoded, as its second pass reads them."""
    if algorithm in reference.FACTORED:
        raise ValueError(f"Invalid states: 8-bit states are implemented for element-wise and trust-ratio algorithms, "
                         f"not {algorithm}")
    if absmax is None or len(absmax) < len(states):
        raise ValueError("Invalid absmax: 8-bit states need their block absmax")
    check_block_aligned(segments)
    spans = [(slice(o, o + n), reference.blocks_of(o, n))
             for o, n in zip(segments.offsets.tolist(), segments.numels.tolist())]
    decoded: list[Tensor | None] = []
    for k, t in enumerate(states):
        if t is None or t.dtype != torch.uint8:
            decoded.append(t)
            continue
        values = torch.zeros(t.numel(), dtype=torch.float32, device=t.device)
        for k_seg, (region, blocks) in enumerate(spans):
            if segments.flags[k_seg]:
                values[region] = reference.dequantize8(t[region], absmax[k][blocks], signed[k])  # type: ignore[index]
        decoded.append(values)

    def encode(k: int, k_seg: int) -> None:
        """Slot k of segment k_seg into its codes and absmaxes; its fp32 values become what they decode to."""
        region, blocks = spans[k_seg]
        codes, block_absmax = reference.quantize8(decoded[k][region], signed[k])  # type: ignore[index]
        states[k][region] = codes  # type: ignore[index]
        absmax[k][blocks] = block_absmax  # type: ignore[index]
        decoded[k][region] = reference.dequantize8(codes, block_absmax, signed[k])  # type: ignore[index]

    if hasattr(reference, algorithm + "_moments"):
        _trust_ratio_8bit(algorithm, param, grad, decoded, master, segments, encode, **kwargs)
        return
    update(algorithm, param, grad, decoded, master, segments, backend="reference", **kwargs)
    if kwargs.get("found_inf") is not None and bool(kwargs["found_inf"].item() != 0):
        return
    for k, t in enumerate(states):
        if t is None or t.dtype != torch.uint8:
            continue
        for k_seg in range(len(spans)):
            if segments.flags[k_seg]:
                encode(k, k_seg)


def _trust_ratio_8bit(algorithm: str, param: Tensor, grad: Tensor, decoded: list[Tensor | None],
                      master: Tensor | None, segments: Segments, encode: Callable[[int, int], None], *,
                      hyper: Mapping[str, Any], lr: Scalar, grad_scale: Scalar = 1.0, found_inf: Tensor | None = None,
                      norm_reduce: Callable[[Tensor], None] | None = None, comp: Tensor | None = None,
                      rounding_seed: int | None = None) -> None:
    """A trust-ratio step (LAMB) with 8-bit moments: the moments move and are encoded, then the direction and its
    norm come from the decoded codes, which is what the kernels' second pass reads."""
    if found_inf is not None and bool(found_inf.item() != 0):
        return
    target = _update_target(param, master, comp, rounding_seed)
    kwargs = {k: v for k, v in hyper.items() if k not in ("max_trust_ratio",)}
    regions = _active_segments(segments)
    moments, direction, apply = (getattr(reference, algorithm + suffix) for suffix in ("_moments", "_direction",
                                                                                        "_apply"))
    sums = torch.zeros(2, len(segments), dtype=torch.float64)
    directions = {}
    for k, region in regions:
        segments.steps[k] += 1
        step = int(segments.steps[k].item())
        m, v = decoded[0][region], decoded[1][region]  # type: ignore[index]
        moments(target[region], grad[region], m, v, step=step, grad_scale=_host(grad_scale), **kwargs)
        encode(0, k)
        encode(1, k)
        directions[k], sums[0, k], sums[1, k] = direction(
            target[region], m, v, step=step, **{n: kwargs[n] for n in ("beta1", "beta2", "eps", "weight_decay",
                                                                     "bias_correction")})
    if norm_reduce is not None:
        norm_reduce(sums)
    for k, region in regions:
        apply(target[region], directions[k], float(sums[0, k]), float(sums[1, k]), lr=_host(lr),
              max_trust_ratio=hyper["max_trust_ratio"])
    _store_params(param, target, master, comp, rounding_seed, segments, regions)


def _factored_views(param: Tensor, grad: Tensor, states: Sequence[Tensor | None], layout: list[int]
                    ) -> tuple[Tensor | None, ...]:
    """One segment of a factored algorithm as its reference function takes it: a stack of matrices as (leading, rows,
    cols) with its row and column factors, else a vector with its variance (`Segments.layout`, api.h's Layout)."""
    lead, rows, cols, total_rows, row_at, col_at, var_at = layout[:7]
    n = param.numel()
    if total_rows == 0:
        return param, grad, None, None, states[2][var_at:var_at + n]  # type: ignore[index]
    row = states[0][row_at:row_at + lead * rows].view(lead, rows, 1)  # type: ignore[index]
    col = states[1][col_at:col_at + lead * cols].view(lead, 1, cols)  # type: ignore[index]
    return param.view(lead, rows, cols), grad.view(lead, rows, cols), row, col, None


def sum_of_squares(tensor: Tensor, segments: Segments | None = None, *, backend: str) -> tuple[float, bool]:
    """Sum of squares of a 1-D tensor (fp32 products, float64 for a float64 tensor; float64 sum), over the active
    segments when given, and whether any of those elements is inf or nan."""
    if backend != "reference":
        if segments is None:
            return _kernels().sum_of_squares(tensor)
        return _kernels().sum_of_squares_segments(tensor, segments)
    if segments is not None:
        parts = [tensor[o:o + n] for k, (o, n) in enumerate(zip(segments.offsets.tolist(), segments.numels.tolist()))
                 if segments.flags[k]]
        tensor = torch.cat(parts) if parts else tensor[:0]
    values = tensor.detach()
    values = values if values.dtype == torch.float64 else values.float()
    return float(values.square().sum(dtype=torch.float64)), not bool(torch.isfinite(values).all())


def sum_of_squares_into(tensor: Tensor, segments: Segments | None, out_sum: Tensor, out_nonfinite: Tensor, *,
                        backend: str) -> None:
    """`sum_of_squares` written into 1-element tensors on the tensor's device (`out_sum` float32 or float64,
    `out_nonfinite` float32, 1.0 when an element is inf or nan); on CUDA without waiting for the GPU."""
    if backend == "cuda":
        _kernels().sum_of_squares_into(tensor, segments, out_sum, out_nonfinite)
        return
    total, nonfinite = sum_of_squares(tensor, segments, backend=backend)
    out_sum.fill_(total)
    out_nonfinite.fill_(float(nonfinite))


# SAM (fusedopt.SAM): the perturbation of a flat buffer set, its exact undo and ASAM's norm term. ------------------

def _active_segments(segments: Segments) -> list[tuple[int, slice]]:
    """(index, region) of each segment with a gradient this step."""
    return [(k, slice(o, o + n)) for k, (o, n) in enumerate(zip(segments.offsets.tolist(), segments.numels.tolist()))
            if segments.flags[k]]


def _active_regions(segments: Segments) -> list[slice]:
    return [region for _, region in _active_segments(segments)]


def sam_perturb(param: Tensor, grad: Tensor, master: Tensor | None, backup: Tensor | None, segments: Segments, *,
                scale: Scalar, adaptive: bool, found_inf: Tensor | None = None, backend: str) -> None:
    """SAM's ascent over the active segments of a flat buffer set: param := round(w + e), e = scale * g (ASAM,
    `adaptive`: scale * w * w * g), w the fp32 `master` when given (left unperturbed), else param, whose bits are
    first copied into `backup` (param's dtype) for `sam_restore`. `scale` (rho over the global norm) may be a
    1-element tensor of the compute dtype, `found_inf` a float32 flag whose non-zero value means "write nothing"."""
    if backend != "reference":
        _kernels().sam_perturb(param, grad, master, backup, segments, scale=scale, adaptive=adaptive,
                               found_inf=found_inf)
        return
    if found_inf is not None and bool(found_inf.item() != 0):
        return
    value = _host(scale)
    for region in _active_regions(segments):
        reference.sam_perturb(param[region], grad[region], None if master is None else master[region],
                              None if backup is None else backup[region], scale=value, adaptive=adaptive)


def sam_restore(param: Tensor, master: Tensor | None, backup: Tensor | None, segments: Segments, *,
                found_inf: Tensor | None = None, backend: str) -> None:
    """The undo of `sam_perturb` over the active segments, bit for bit: param := round(master), else backup."""
    if backend != "reference":
        _kernels().sam_restore(param, master, backup, segments, found_inf=found_inf)
        return
    if found_inf is not None and bool(found_inf.item() != 0):
        return
    for region in _active_regions(segments):
        reference.sam_restore(param[region], None if master is None else master[region],
                              None if backup is None else backup[region])


def sam_sum_of_squares(param: Tensor, grad: Tensor, master: Tensor | None, segments: Segments, *,
                       backend: str) -> tuple[float, bool]:
    """ASAM's squared norm: the sum of (|w| * g)^2 over the active segments (w the master when given), and whether any
    term is inf or nan."""
    if backend != "reference":
        return _kernels().sam_sum_of_squares(param, grad, master, segments)
    total, nonfinite = 0.0, False
    for region in _active_regions(segments):
        part, bad = reference.sam_sum_of_squares(param[region], grad[region],
                                                 None if master is None else master[region])
        total, nonfinite = total + part, nonfinite or bad
    return total, nonfinite


def sam_sum_of_squares_into(param: Tensor, grad: Tensor, master: Tensor | None, segments: Segments, out_sum: Tensor,
                            out_nonfinite: Tensor, *, backend: str) -> None:
    """`sam_sum_of_squares` written into 1-element tensors on the buffers' device (as `sum_of_squares_into`)."""
    if backend == "cuda":
        _kernels().sam_sum_of_squares_into(param, grad, master, segments, out_sum, out_nonfinite)
        return
    total, nonfinite = sam_sum_of_squares(param, grad, master, segments, backend=backend)
    out_sum.fill_(total)
    out_nonfinite.fill_(float(nonfinite))
