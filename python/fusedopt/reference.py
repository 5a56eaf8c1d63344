"""Per-tensor reference optimizers in plain torch: the oracle of every test and the fallback with nothing compiled.

Each function updates `param` and its state tensors in place, computing in fp32 and mirroring the operation order of
torch.optim's single-tensor code paths (lerp / addcmul / addcdiv) so fp32 results agree with torch.optim to float32
rounding. 16-bit tensors (parameters, gradients, bf16 states) are upcast to fp32, updated, and written back with one
rounding. float64 tensors (parameters with their gradients and states) are computed in float64, as torch.optim
computes them. Never imports the compiled module.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TypeVar, Union

import torch
from torch import Tensor

__all__ = [
    "adadelta",
    "adafactor",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "asgd",
    "clip_grad_norm_",
    "clip_grad_value_",
    "global_norm",
    "kahan_split",
    "lamb",
    "lion",
    "muon",
    "nadam",
    "radam",
    "rmsprop",
    "rounding_key",
    "rprop",
    "sam_perturb",
    "sam_restore",
    "sam_sum_of_squares",
    "sgd",
    "stochastic_round_bf16",
]

_TensorOrTensors = Union[Tensor, Iterable[Tensor]]  # runtime alias: no `|` on Python 3.9

# The per-parameter scalar states of the functions that keep some (0-dim float32 tensors, as torch.optim keeps them,
# updated in place), by function name, in the compiled core's order (its algorithms()[name]["scalars"]).
SCALAR_STATES: dict[str, tuple[str, ...]] = {"nadam": ("mu_product",), "asgd": ("eta", "mu"), "muon": ("rows", "cols")}

# The functions whose states are factored (not shaped like the parameter): they take the parameter shaped as
# (leading, rows, cols) with its row and column factors, or a vector with its whole variance (the compiled core's
# "factored" kind, whose segment layout says which).
FACTORED: frozenset[str] = frozenset({"adafactor"})


# Parameter storage without fp32 master weights (the compiled core's param_io.h): Kahan-compensated 16-bit parameters
# and stochastic rounding to bfloat16, bit for bit as the kernels do them.

_MASK32 = 0xFFFFFFFF
_IntOrTensor = TypeVar("_IntOrTensor", int, Tensor)


def _mix32(x: _IntOrTensor) -> _IntOrTensor:
    """lowbias32 of 32-bit values: a Python int, or an int64 tensor (whose products wrap; only their low 32 bits
    are kept)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def rounding_key(seed: int, step: float, segment: int) -> int:
    """The key of a segment's stochastic roundings at a step (its count after this step's increment)."""
    s = _mix32((seed & _MASK32) ^ _mix32(((seed >> 32) + 0x632BE5AB) & _MASK32))
    return _mix32(s ^ _mix32((int(step) * 0x9E3779B9 + segment) & _MASK32))


def stochastic_round_bf16(values: Tensor, key: int, first_index: int) -> Tensor:
    """fp32 `values` (elements first_index.. of the flat buffer) rounded to bfloat16 stochastically: 16 random bits
    from the element's index under `key` are added below the kept 16 bits, so a value rounds away from zero with
    probability (its distance from the bfloat16 value toward zero) / (the gap). inf and NaN round to nearest."""
    index = torch.arange(first_index, first_index + values.numel(), dtype=torch.int64, device=values.device)
    bits = _mix32(((index * 0x9E3779B1) & _MASK32) ^ key ^ (index >> 32))
    u = values.contiguous().view(torch.int32).to(torch.int64) & _MASK32
    rounded = (((u + (bits & 0xFFFF)) >> 16) << 16) & _MASK32
    out = torch.where(rounded >= 2**31, rounded - 2**32, rounded).to(torch.int32).view(torch.float32)
    return torch.where(torch.isfinite(values), out, values).to(torch.bfloat16)


def kahan_split(values: Tensor, param: Tensor, comp: Tensor) -> None:
    """Write fp32 `values` as a 16-bit parameter and its compensation: param = round(values), comp = round(values -
    param) (the difference is exact in fp32)."""
    rounded = values.to(param.dtype)
    param.copy_(rounded)
    comp.copy_((values - rounded.float()).to(comp.dtype))


# 8-bit states (csrc/include/fusedopt/quant8.h): blocks of QUANT_BLOCK elements from the segment's start, one float32
# absmax each, values on a grid of small floats shifted by 8 (q = f - 8, f with three mantissa bits), scaled so that
# the absmax is the top code.
QUANT_BLOCK = 256
SIGNED_TOP, UNSIGNED_TOP = 491512.0, 32212254720.0  # q(127), q(255) as float32


def blocks_of(offset: int, numel: int) -> slice:
    """The block absmaxes of the region [offset, offset + numel) of a flat buffer (offset on a block boundary)."""
    return slice(offset // QUANT_BLOCK, -(-(offset + numel) // QUANT_BLOCK))


def block_absmax(values: Tensor) -> Tensor:
    """The largest |v| of each QUANT_BLOCK block of fp32 `values` (the last block may be partial), NaN for a block
    that holds inf or NaN."""
    n = values.numel()
    padded = torch.zeros(-(-n // QUANT_BLOCK) * QUANT_BLOCK, dtype=torch.float32, device=values.device)
    padded[:n] = values
    blocks = padded.view(-1, QUANT_BLOCK).abs()
    largest = blocks.amax(dim=1)
    return torch.where(torch.isfinite(blocks).all(dim=1), largest, torch.full_like(largest, math.nan))


def quantize8(values: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """fp32 `values` (one segment, from a block boundary) as 8-bit codes and their block absmaxes, bit for bit what
    the kernels write."""
    values = values.float().contiguous()
    top = torch.tensor(SIGNED_TOP if signed else UNSIGNED_TOP, dtype=torch.float32)
    absmax = block_absmax(values)
    inv = torch.where(absmax > 0, top / absmax, torch.zeros_like(absmax))
    y = values.abs().view(-1) * inv.repeat_interleave(QUANT_BLOCK)[:values.numel()]
    y = torch.where(y < top, y, top)  # NaN: top
    u = (y + 8.0).view(torch.int32)
    magnitude = ((u + 0x80000) >> 20) - 1040
    if signed:
        magnitude |= (values.view(torch.int32) < 0).to(torch.int32) << 7
    return magnitude.to(torch.uint8), absmax


def dequantize8(codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
    """The fp32 values of 8-bit `codes` (one segment, from a block boundary) under their block absmaxes."""
    c = codes.to(torch.int32)
    m = c & 127 if signed else c
    q = ((m + 1040) << 20).view(torch.float32) - 8.0
    top = torch.tensor(SIGNED_TOP if signed else UNSIGNED_TOP, dtype=torch.float32)
    v = q * (absmax.float() / top).repeat_interleave(QUANT_BLOCK)[:codes.numel()]
    if signed:
        v = torch.where(c >= 128, -v, v)
    return v


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 tensors, float32 for every other (fp32, bf16, fp16) tensor."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _work(t: Tensor | None) -> Tensor | None:
    """The tensor itself when already of its compute dtype (fp32, or float64; updated in place), else an fp32 working
    copy."""
    if t is None or t.dtype == _compute_dtype(t.dtype):
        return t
    return t.to(torch.float32)


def _write_back(dst: Tensor | None, work: Tensor | None) -> None:
    """Round an fp32 working copy back into its 16-bit tensor once (no-op when `work` is `dst`)."""
    if dst is not None and work is not dst:
        dst.copy_(work)


def _effective_grad(grad: Tensor, grad_scale: float, maximize: bool) -> Tensor:
    """g = grad*grad_scale, negated when maximizing, as a new tensor of the compute dtype (the caller's grad is never
    modified)."""
    g = grad.to(_compute_dtype(grad.dtype))
    if grad_scale != 1.0:
        g = g * grad_scale
    if maximize:
        g = -g
    return g


def _check_same_numel(param: Tensor, **tensors: Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.numel() != param.numel():
            raise ValueError(f"Invalid {name}: numel {t.numel()} != param numel {param.numel()}")


@torch.no_grad()
def adam(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled: bool = False,
    grad_scale: float = 1.0,
) -> None:
    """Adam (Kingma & Ba 2015, Alg. 1) with torch.optim.Adam's options; AdamW when `decoupled`.

    g = grad*grad_scale (negated if maximize); weight decay: decoupled -> p = p*(1 - lr*wd), else g = g + wd*p;
    m = lerp(m, g, 1-beta1); v = beta2*v + (1-beta2)*g*g; amsgrad: vmax = max(vmax, v) and v := vmax below;
    p = p - lr/(1-beta1**t) * m / (sqrt(v)/sqrt(1-beta2**t) + eps).   `step` is t >= 1, already incremented.
    """
    if step < 1:
        raise ValueError(f"Invalid step: {step}")
    if amsgrad and max_exp_avg_sq is None:
        raise ValueError("Invalid max_exp_avg_sq: None with amsgrad=True")
    _check_same_numel(param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
                      max_exp_avg_sq=max_exp_avg_sq if amsgrad else None)
    p, m, v = _work(param), _work(exp_avg), _work(exp_avg_sq)
    vmax = _work(max_exp_avg_sq) if amsgrad else None
    g = _effective_grad(grad, grad_scale, maximize)

    if weight_decay != 0:
        if decoupled:
            p.mul_(1 - lr * weight_decay)
        else:
            g = g.add(p, alpha=weight_decay)

    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)

    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5

    if amsgrad:
        torch.maximum(vmax, v, out=vmax)
        denom = (vmax.sqrt() / bias_correction2_sqrt).add_(eps)
    else:
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(m, denom, value=-step_size)

    _write_back(param, p)
    _write_back(exp_avg, m)
    _write_back(exp_avg_sq, v)
    if amsgrad:
        _write_back(max_exp_avg_sq, vmax)


def adamw(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    grad_scale: float = 1.0,
) -> None:
    """AdamW (Loshchilov & Hutter 2019, Alg. 2): Adam with decoupled weight decay p = p*(1 - lr*wd) before the
    Adam update (torch.optim.AdamW's form, where the decay is scaled by lr); see `adam` for the rest."""
    adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
         weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, decoupled=True, grad_scale=grad_scale)


@torch.no_grad()
def sgd(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor | None,
    *,
    step: int,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    grad_scale: float = 1.0,
) -> None:
    """SGD with momentum (Sutskever et al. 2013 form used by torch.optim.SGD).

    g = grad*grad_scale (negated if maximize); g = g + wd*p; if momentum != 0:
    buf = g on the first step (step 1) else momentum*buf + (1-dampening)*g; g = g + momentum*buf if nesterov else
    buf; p = p - lr*g.
    """
    if momentum != 0 and momentum_buffer is None:
        raise ValueError(f"Invalid momentum_buffer: None with momentum={momentum}")
    _check_same_numel(param, grad=grad, momentum_buffer=momentum_buffer if momentum != 0 else None)
    p = _work(param)
    g = _effective_grad(grad, grad_scale, maximize)
    if weight_decay != 0:
        g = g.add(p, alpha=weight_decay)

    buf = None
    if momentum != 0:
        buf = _work(momentum_buffer)
        if step <= 1:
            buf.copy_(g)
        else:
            buf.mul_(momentum).add_(g, alpha=1 - dampening)
        g = g.add(buf, alpha=momentum) if nesterov else buf
    p.add_(g, alpha=-lr)

    _write_back(param, p)
    if buf is not None:
        _write_back(momentum_buffer, buf)


@torch.no_grad()
def rmsprop(
    param: Tensor,
    grad: Tensor,
    square_avg: Tensor,
    momentum_buffer: Tensor | None,
    grad_avg: Tensor | None,
    *,
    step: int,
    lr: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
    grad_scale: float = 1.0,
) -> None:
    """RMSprop (Hinton, Coursera lecture 6e; centered variant Graves 2013, eq. 38-40), as torch.optim.RMSprop.

    g = grad*grad_scale (negated if maximize); g = g + wd*p; sq = alpha*sq + (1-alpha)*g*g;
    centered: ga = lerp(ga, g, 1-alpha), avg = sqrt(sq - ga*ga) + eps, else avg = sqrt(sq) + eps;
    momentum > 0: buf = momentum*buf + g/avg, p = p - lr*buf, else p = p - lr*g/avg.
    """
    if momentum > 0 and momentum_buffer is None:
        raise ValueError(f"Invalid momentum_buffer: None with momentum={momentum}")
    if centered and grad_avg is None:
        raise ValueError("Invalid grad_avg: None with centered=True")
    del step  # RMSprop has no step-dependent term
    _check_same_numel(param, grad=grad, square_avg=square_avg,
                      momentum_buffer=momentum_buffer if momentum > 0 else None,
                      grad_avg=grad_avg if centered else None)
    p, sq = _work(param), _work(square_avg)
    g = _effective_grad(grad, grad_scale, maximize)
    if weight_decay != 0:
        g = g.add(p, alpha=weight_decay)

    sq.mul_(alpha).addcmul_(g, g, value=1 - alpha)
    ga = None
    if centered:
        ga = _work(grad_avg)
        ga.lerp_(g, 1 - alpha)
        avg = sq.addcmul(ga, ga, value=-1).sqrt_()
    else:
        avg = sq.sqrt()
    avg = avg.add_(eps)

    buf = None
    if momentum > 0:
        buf = _work(momentum_buffer)
        buf.mul_(momentum).addcdiv_(g, avg)
        p.add_(buf, alpha=-lr)
    else:
        p.addcdiv_(g, avg, value=-lr)

    _write_back(param, p)
    _write_back(square_avg, sq)
    if ga is not None:
        _write_back(grad_avg, ga)
    if buf is not None:
        _write_back(momentum_buffer, buf)


@torch.no_grad()
def adagrad(
    param: Tensor,
    grad: Tensor,
    sum: Tensor,
    *,
    step: int,
    lr: float,
    lr_decay: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    grad_scale: float = 1.0,
) -> None:
    """Adagrad (Duchi et al. 2011, diagonal form), as torch.optim.Adagrad.

    g = grad*grad_scale (negated if maximize); g = g + wd*p; clr = lr / (1 + (t-1)*lr_decay);
    sum = sum + g*g; p = p - clr * g / (sqrt(sum) + eps).   `step` is t >= 1, already incremented.
    """
    if step < 1:
        raise ValueError(f"Invalid step: {step}")
    _check_same_numel(param, grad=grad, sum=sum)
    p, s = _work(param), _work(sum)
    g = _effective_grad(grad, grad_scale, maximize)
    if weight_decay != 0:
        g = g.add(p, alpha=weight_decay)
    clr = lr / (1 + (step - 1) * lr_decay)
    s.addcmul_(g, g, value=1)
    std = s.sqrt().add_(eps)
    p.addcdiv_(g, std, value=-clr)

    _write_back(param, p)
    _write_back(sum, s)


@torch.no_grad()
def lion(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    grad_scale: float = 1.0,
) -> None:
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Alg. 2), betas default (0.9, 0.99).

    g = grad*grad_scale (negated if maximize); p = p*(1 - lr*wd)   (decoupled weight decay);
    c = lerp(m, g, 1-beta1) = beta1*m + (1-beta1)*g;  p = p - lr*sign(c)   (sign(0) = 0);
    m = lerp(m, g, 1-beta2) = beta2*m + (1-beta2)*g.
    """
    del step  # Lion has no step-dependent term
    _check_same_numel(param, grad=grad, exp_avg=exp_avg)
    p, m = _work(param), _work(exp_avg)
    g = _effective_grad(grad, grad_scale, maximize)
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    c = torch.lerp(m, g, 1 - beta1)
    p.add_(torch.sign(c), alpha=-lr)
    m.lerp_(g, 1 - beta2)

    _write_back(param, p)
    _write_back(exp_avg, m)


def muon_lr_ratio(adjust_lr_fn: str | None, rows: int, cols: int) -> float:
    """torch.optim.Muon's learning-rate adjustment of an A x B matrix: sqrt(max(1, A/B)) ("original", the default),
    0.2 sqrt(max(A, B)) ("match_rms_adamw", Liu et al. 2025: the RMS of an AdamW update)."""
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))
    return 0.2 * math.sqrt(max(rows, cols))


@torch.no_grad()
def muon(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor,
    update: Tensor,
    *,
    step: int,
    rows: Tensor,
    cols: Tensor,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    adjust_lr: int,
    phase: int,
    maximize: bool,
    grad_scale: float = 1.0,
) -> None:
    """Muon's element-wise phases (Jordan et al. 2024; torch.optim.Muon's operation order), around the Newton-Schulz
    orthogonalization of `update` that runs between them (fusedopt._newton_schulz).

    phase 0: g = grad*grad_scale; B = lerp(B, g, 1-momentum); update = lerp(g, B, momentum) if nesterov else B.
    phase 1: p = p*(1 - lr*wd); p = p - lr*ratio*update, `update` now holding the orthogonalized O, ratio
    `muon_lr_ratio` of the matrix shape (rows x cols, 0-dim float32 tensors) with adjust_lr 0 ("original") or 1
    ("match_rms_adamw").
    """
    del step  # Muon has no step-dependent term
    _check_same_numel(param, grad=grad, momentum_buffer=momentum_buffer, update=update)
    if phase == 0:
        b = _work(momentum_buffer)
        g = _effective_grad(grad, grad_scale, maximize)
        b.lerp_(g, 1 - momentum)
        _write_back(update, g.lerp(b, momentum) if nesterov else b)
        _write_back(momentum_buffer, b)
        return
    ratio = muon_lr_ratio("match_rms_adamw" if adjust_lr else "original", int(rows), int(cols))
    p = _work(param)
    p.mul_(1 - lr * weight_decay)
    p.add_(_work(update), alpha=-(lr * ratio))
    _write_back(param, p)


@torch.no_grad()
def adafactor(
    param: Tensor,
    grad: Tensor,
    row_var: Tensor | None,
    col_var: Tensor | None,
    variance: Tensor | None,
    *,
    step: int,
    lr: float,
    beta2_decay: float,
    eps1: float,
    eps2: float,
    d: float,
    weight_decay: float,
    maximize: bool,
    grad_scale: float = 1.0,
) -> None:
    """Adafactor (Shazeer & Stern 2018, Algorithms 4 and 5, as torch.optim.Adafactor) on one whole tensor.

    g = grad*grad_scale (negated if maximize); beta2_t = 1 - t**beta2_decay; rho = min(lr, 1/sqrt(t));
    alpha = max(eps2, RMS(p)) * rho, p before weight decay; p *= 1 - lr*wd.
    A tensor of two or more dimensions (row_var [..., R, 1], col_var [..., 1, C]): over its last two dimensions
      row_var = lerp(row_var, mean_c(g^2), 1-beta2_t); col_var = lerp(col_var, mean_r(g^2), 1-beta2_t);
      v = row_var @ col_var / max(mean_r(row_var), eps1);
    otherwise variance = lerp(variance, g^2, 1-beta2_t); v = variance.
    u = g / sqrt(max(v, eps1^2)); p -= alpha / max(1, RMS(u)/d) * u.
    Factors and estimates come from the states as stored (rounded when bf16).
    """
    if step < 1:
        raise ValueError(f"Invalid step: {step}")
    _check_same_numel(param, grad=grad)
    if param.numel() == 0:
        return  # no RMS to take (torch.optim divides by zero there)
    p = _work(param)
    g = _effective_grad(grad, grad_scale, maximize)
    new_weight = step**beta2_decay
    rho = min(lr, 1 / (step**0.5))
    alpha = max(eps2, p.norm(2).item() / (p.numel() ** 0.5)) * rho
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    if param.dim() > 1:
        if row_var is None or col_var is None:
            raise ValueError("Invalid states: a tensor of two or more dimensions keeps row_var and col_var")
        row, col = _work(row_var), _work(col_var)
        row.lerp_(torch.norm(g, dim=-1, keepdim=True).square_().div_(g.size(-1)), new_weight)
        col.lerp_(torch.norm(g, dim=-2, keepdim=True).square_().div_(g.size(-2)), new_weight)
        _write_back(row_var, row)
        _write_back(col_var, col)
        row, col = _work(row_var), _work(col_var)
        estimate = row @ col
        estimate.div_(row.mean(dim=-2, keepdim=True).clamp_(min=eps1))
    else:
        if variance is None:
            raise ValueError("Invalid states: a vector or scalar keeps variance")
        _check_same_numel(param, variance=variance)
        v = _work(variance)
        v.lerp_(g * g, new_weight)
        _write_back(variance, v)
        estimate = _work(variance).clone()
    u = estimate.clamp_(min=eps1 * eps1).rsqrt_().mul_(g)
    denominator = max(1.0, u.norm(2).item() / ((u.numel() ** 0.5) * d))
    p.add_(u, alpha=-alpha / denominator)
    _write_back(param, p)


def lamb(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    max_trust_ratio: float | None,
    maximize: bool,
    grad_scale: float = 1.0,
) -> None:
    """LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning", Alg. 2) on one whole tensor (one layer).

    g = grad*grad_scale (negated if maximize); m = lerp(m, g, 1-beta1); v = beta2*v + (1-beta2)*g*g;
    mh, vh = (m/(1-beta1**t), v/(1-beta2**t)) if bias_correction else (m, v), from m and v as stored;
    u = mh / (sqrt(vh) + eps) + wd*p   (decoupled weight decay inside the update);
    ratio = ||p|| / ||u|| when both norms are > 0, else 1; ratio = min(ratio, max_trust_ratio) when given;
    p = p - lr*ratio*u.   Norms are accumulated in float64 from the fp32 values.
    """
    u, w2, u2 = lamb_moments(param, grad, exp_avg, exp_avg_sq, step=step, beta1=beta1, beta2=beta2, eps=eps,
                             weight_decay=weight_decay, bias_correction=bias_correction, maximize=maximize,
                             grad_scale=grad_scale)
    lamb_apply(param, u, w2, u2, lr=lr, max_trust_ratio=max_trust_ratio)


def lamb_moments(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, step: int, beta1: float, beta2: float,
    eps: float, weight_decay: float, bias_correction: bool, maximize: bool, grad_scale: float = 1.0,
) -> tuple[Tensor, float, float]:
    """LAMB's first half (see `lamb`): update the moments in place; return u and the sums of squares of p and u.

    The sums of a sharded parameter are all-reduced across ranks before `lamb_apply`.
    """
    if step < 1:
        raise ValueError(f"Invalid step: {step}")
    _check_same_numel(param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    m, v = _work(exp_avg), _work(exp_avg_sq)
    g = _effective_grad(grad, grad_scale, maximize)

    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    _write_back(exp_avg, m)
    _write_back(exp_avg_sq, v)
    # u from the moments as stored (rounded when states are bf16): the update is a function of the saved state,
    # the same in the step's two halves and after a checkpoint resume.
    return lamb_direction(param, exp_avg, exp_avg_sq, step=step, beta1=beta1, beta2=beta2, eps=eps,
                          weight_decay=weight_decay, bias_correction=bias_correction)


def lamb_direction(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, step: int, beta1: float, beta2: float,
                   eps: float, weight_decay: float, bias_correction: bool) -> tuple[Tensor, float, float]:
    """LAMB's update direction u from the moments as stored (see `lamb`), and the sums of squares of p and u."""
    p, m, v = _work(param), _work(exp_avg), _work(exp_avg_sq)
    if bias_correction:
        mh = m / (1 - beta1**step)
        vh = v / (1 - beta2**step)
    else:
        mh, vh = m, v
    u = mh / vh.sqrt().add_(eps)
    if weight_decay != 0:
        u.add_(p, alpha=weight_decay)
    return u, p.double().square().sum().item(), u.double().square().sum().item()


def lamb_apply(param: Tensor, u: Tensor, w2: float, u2: float, *, lr: float, max_trust_ratio: float | None) -> None:
    """LAMB's second half: p -= lr * trust_ratio * u, the trust ratio from the sums of squares |p|^2 and |u|^2."""
    w_norm, u_norm = math.sqrt(w2), math.sqrt(u2)
    ratio = w_norm / u_norm if (w_norm > 0 and u_norm > 0) else 1.0
    if max_trust_ratio is not None and max_trust_ratio >= 0:  # None (or the kernels' -1): no clamp
        ratio = min(ratio, max_trust_ratio)
    p = _work(param)
    p.add_(u, alpha=-(lr * ratio))
    _write_back(param, p)


@torch.no_grad()
def global_norm(tensors: _TensorOrTensors, norm_type: float = 2.0) -> Tensor:
    """The norm_type-norm of all `tensors` viewed as one vector (as torch.nn.utils.get_total_norm): the norm of the
    per-tensor norms. Computed in fp32 (16-bit tensors upcast; float64 tensors in float64, and then the result is
    float64, as torch's); returns a 0-dim tensor on the first tensor's device, tensor(0.) for no tensors. norm_type
    may be inf."""
    if isinstance(tensors, Tensor):
        tensors = [tensors]
    tensors = list(tensors)
    norm_type = float(norm_type)
    if not tensors:
        return torch.tensor(0.0)
    device = tensors[0].device
    norms = [torch.linalg.vector_norm(t.to(_compute_dtype(t.dtype)), norm_type).to(device) for t in tensors]
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)


@torch.no_grad()
def clip_grad_norm_(
    parameters: _TensorOrTensors,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> Tensor:
    """torch.nn.utils.clip_grad_norm_: total = global_norm of the grads; grads *= min(max_norm/(total + 1e-6), 1).

    Returns the total norm (before clipping). Raises RuntimeError when error_if_nonfinite and the norm is nan/inf
    (no gradient is changed then). `foreach` is accepted for signature compatibility and ignored.
    """
    del foreach
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    total_norm = global_norm(grads, norm_type)
    if error_if_nonfinite and not bool(torch.isfinite(total_norm)):
        raise RuntimeError(
            f"The total norm of order {float(norm_type)} for gradients from `parameters` is non-finite, so it "
            "cannot be clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`"
        )
    if grads:
        clip_coef = torch.clamp(float(max_norm) / (total_norm + 1e-6), max=1.0)
        for g in grads:
            g.mul_(clip_coef.to(g.device))
    return total_norm


@torch.no_grad()
def clip_grad_value_(parameters: _TensorOrTensors, clip_value: float, foreach: bool | None = None) -> None:
    """torch.nn.utils.clip_grad_value_: clamp every gradient element to [-clip_value, clip_value] in place."""
    del foreach
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    clip_value = float(clip_value)
    for p in parameters:
        if p.grad is not None:
            p.grad.clamp_(min=-clip_value, max=clip_value)


@torch.no_grad()
def adamax(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_inf: Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    grad_scale: float = 1.0,
) -> None:
    """Adamax (Kingma & Ba 2015, Algorithm 2), as torch.optim.Adamax.

    g = grad*grad_scale (negated if maximize); g = g + wd*p; m = lerp(m, g, 1-beta1);
    u = max(beta2*u, |g| + eps); p = p - lr/(1 - beta1**t) * m/u.
    """
    if step < 1:
        raise ValueError(f"Invalid step: {step}")
    _check_same_numel(param, grad=grad, exp_avg=exp_avg, exp_inf=exp_inf)
    p, m, u = _work(param), _work(exp_avg), _work(exp_inf)
    g = _effective_grad(grad, grad_scale, maximize)
    if weight_decay != 0:
        g = g.add(p, alpha=weight_decay)
    m.lerp_(g, 1 - beta1)
    torch.maximum(u.mul_(beta2), g.abs().add_(eps), out=u)
    p.addcdiv_(m, u, value=-lr / (1 - beta1**step))
    _write_back(param, p)
    _write_back(exp_avg, m)
    _write_back(exp_inf, u)


@torch.no_grad()
def radam(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    maximize: bool,
    grad_scale: float = 1.0,
) -> None:
    """RAdam (Liu et al. 2020, Algorithm 2), as torch.optim.RAdam.

    m = lerp(m, g, 1-beta1), v = beta2*v + (1-beta2)*g*g (decoupled: p = p*(1 - lr*wd) first, else g = g + wd*p);
    rho_inf = 2/(1-beta2) - 1,
    rho_t = rho_inf - 2t beta2^t/(1 - beta2^t); when rho_t > 5:
    p = p - lr * m/(1-beta1^t) * sqrt(1-beta2^t)/(sqrt(v)+eps) * r_t with
    r_t = sqrt((rho_t-4)(rho_t-2)rho_inf / ((rho_inf-4)(rho_inf-2)rho_t)); else p = p - lr * m/(1-beta1^t).
    """
    if step < 1:
        raise ValueError(f"Invalid step: {step}")
    _check_same_numel(param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    p, m, v = _work(param), _work(exp_avg), _work(exp_avg_sq)
    g = _effective_grad(grad, grad_scale, maximize)
    if weight_decay != 0 and decoupled:
        p.mul_(1 - lr * weight_decay)
    elif weight_decay != 0:
        g = g.add(p, alpha=weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2**step) / bc2
    update = m / bc1 * lr
    if rho_t > 5.0:
        rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
        update = update * ((bc2**0.5) / v.sqrt().add_(eps)) * rect
    p.add_(update, alpha=-1.0)
    _write_back(param, p)
    _write_back(exp_avg, m)
    _write_back(exp_avg_sq, v)


@torch.no_grad()
def adadelta(
    param: Tensor,
    grad: Tensor,
    square_avg: Tensor,
    acc_delta: Tensor,
    *,
    step: int,
    lr: float,
    rho: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    grad_scale: float = 1.0,
) -> None:
    """Adadelta (Zeiler 2012, Algorithm 1, with a learning rate), as torch.optim.Adadelta.

    g = grad*grad_scale (negated if maximize); g = g + wd*p; E[g^2] = rho*E[g^2] + (1-rho)*g*g;
    dx = sqrt(E[dx^2] + eps) / sqrt(E[g^2] + eps) * g; E[dx^2] = rho*E[dx^2] + (1-rho)*dx*dx; p = p - lr*dx.
    """
    del step  # Adadelta has no step-dependent term
    _check_same_numel(param, grad=grad, square_avg=square_avg, acc_delta=acc_delta)
    p, sq, acc = _work(param), _work(square_avg), _work(acc_delta)
    g = _effective_grad(grad, grad_scale, maximize)
    if weight_decay != 0:
        g = g.add(p, alpha=weight_decay)
    sq.mul_(rho).addcmul_(g, g, value=1 - rho)
    std = sq.add(eps).sqrt_()
    delta = acc.add(eps).sqrt_().div_(std).mul_(g)
    acc.mul_(rho).addcmul_(delta, delta, value=1 - rho)
    p.add_(delta, alpha=-lr)
    _write_back(param, p)
    _write_back(square_avg, sq)
    _write_back(acc_delta, acc)


@torch.no_grad()
def rprop(
    param: Tensor,
    grad: Tensor,
    prev: Tensor,
    step_size: Tensor,
    *,
    step: int,
    lr: float,
    etaminus: float,
    etaplus: float,
    step_size_min: float,
    step_size_max: float,
    maximize: bool,
    grad_scale: float = 1.0,
) -> None:
    """Rprop (Riedmiller & Braun 1993, without weight backtracking), as torch.optim.Rprop.

    g = grad*grad_scale (negated if maximize); s = sign(g*prev); step_size = step_size * (etaplus if s > 0, etaminus
    if s < 0, 1 if s = 0; NaN stays NaN), clamped to [step_size_min, step_size_max]; g = 0 where s < 0;
    p = p - sign(g)*step_size; prev = g. `lr` is step_size's first value, written when the state is created.
    """
    del step, lr
    _check_same_numel(param, grad=grad, prev=prev, step_size=step_size)
    p, pv, size = _work(param), _work(prev), _work(step_size)
    g = _effective_grad(grad, grad_scale, maximize)
    sign = g.mul(pv).sign()
    sign[sign.gt(0)] = etaplus
    sign[sign.lt(0)] = etaminus
    sign[sign.eq(0)] = 1
    size.mul_(sign).clamp_(step_size_min, step_size_max)
    g = torch.where(sign.eq(etaminus), 0.0, g)  # a new tensor: the caller's gradient is never modified
    p.addcmul_(g.sign(), size, value=-1)
    pv.copy_(g)
    _write_back(param, p)
    _write_back(prev, pv)
    _write_back(step_size, size)


@torch.no_grad()
def nadam(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    step: int,
    mu_product: Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    momentum_decay: float,
    decoupled: bool,
    maximize: bool,
    grad_scale: float = 1.0,
) -> None:
    """NAdam (Dozat 2016, Algorithm 2, with the momentum schedule mu_t = beta1 (1 - 0.5 * 0.96^(t psi))), as
    torch.optim.NAdam.

    Decoupled: p = p (1 - lr wd) first, else g = g + wd p. mu_product (a 0-dim float32 tensor, updated in place)
    *= mu_t; m = lerp(m, g, 1-beta1), v = beta2 v + (1-beta2) g^2, d = sqrt(v / (1-beta2^t)) + eps;
    p = p - lr (1-mu_t)/(1-mu_product) g/d - lr mu_{t+1}/(1 - mu_product mu_{t+1}) m/d.
    """
    if step < 1:
        raise ValueError(f"Invalid step: {step}")
    _check_same_numel(param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    p, m, v = _work(param), _work(exp_avg), _work(exp_avg_sq)
    g = _effective_grad(grad, grad_scale, maximize)
    if weight_decay != 0 and decoupled:
        p.mul_(1 - lr * weight_decay)
    elif weight_decay != 0:
        g = g.add(p, alpha=weight_decay)
    mu = beta1 * (1.0 - 0.5 * 0.96 ** (step * momentum_decay))
    mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((step + 1) * momentum_decay))
    mu_product.mul_(mu)
    product = float(mu_product.item())
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = v.div(1 - beta2**step).sqrt_().add_(eps)
    p.addcdiv_(g, denom, value=-lr * (1.0 - mu) / (1.0 - product))
    p.addcdiv_(m, denom, value=(-lr * mu_next) / (1.0 - product * mu_next))
    _write_back(param, p)
    _write_back(exp_avg, m)
    _write_back(exp_avg_sq, v)


@torch.no_grad()
def asgd(
    param: Tensor,
    grad: Tensor,
    ax: Tensor,
    *,
    step: int,
    eta: Tensor,
    mu: Tensor,
    lr: float,
    lambd: float,
    alpha: float,
    t0: float,
    weight_decay: float,
    maximize: bool,
    grad_scale: float = 1.0,
) -> None:
    """ASGD (Polyak & Juditsky 1992; step sizes and averaging start of Bottou 2012, section 5.3), as torch.optim.ASGD.

    g = g + wd p; p = p (1 - lambd eta) - eta g; ax = ax + (p - ax) mu (ax = p while mu is 1); then the next step's
    eta = lr / (1 + lambd lr t)^alpha and mu = 1 / max(1, t - t0), written into the 0-dim float32 tensors `eta` and
    `mu`.
    """
    if step < 1:
        raise ValueError(f"Invalid step: {step}")
    _check_same_numel(param, grad=grad, ax=ax)
    p, a = _work(param), _work(ax)
    g = _effective_grad(grad, grad_scale, maximize)
    if weight_decay != 0:
        g = g.add(p, alpha=weight_decay)
    eta_value, mu_value = float(eta.item()), float(mu.item())
    p.mul_(1 - lambd * eta_value)
    p.add_(g, alpha=-eta_value)
    if mu_value != 1:
        a.add_(p.sub(a).mul_(mu_value))
    else:
        a.copy_(p)
    eta.fill_(lr / ((1 + lambd * lr * step) ** alpha))
    mu.fill_(1 / max(1, step - t0))
    _write_back(param, p)
    _write_back(ax, a)


def sam_perturb(param: Tensor, grad: Tensor, master: Tensor | None, backup: Tensor | None, *, scale: float,
                adaptive: bool) -> None:
    """SAM's ascent to w + e (Foret et al. 2021, eq. 2): e = scale * g, or for ASAM (Kwon et al. 2021) e = scale * w *
    w * g, with scale = rho / (||g|| + 1e-12) (ASAM: rho / (|| |w| * g || + 1e-12)) made by the caller and rounded
    once to the compute dtype. w is the fp32 master when given (param receives round(w + e), the master is not
    written); otherwise param, whose exact bits are first copied into `backup` (param's dtype) for `sam_restore`."""
    _check_same_numel(param, grad=grad, master=master, backup=backup)
    dtype = _compute_dtype(param.dtype)
    if master is None:
        if backup is None:
            raise ValueError("Invalid backup: None without master weights")
        backup.copy_(param)
        w = param.to(dtype)
    else:
        w = master
    g = grad.to(dtype)
    direction = w * w * g if adaptive else g
    param.copy_(w + torch.tensor(scale, dtype=dtype, device=param.device) * direction)


@torch.no_grad()
def sam_restore(param: Tensor, master: Tensor | None, backup: Tensor | None) -> None:
    """The undo of `sam_perturb`, bit for bit: param := round(master) with master weights, else param := backup."""
    source = master if master is not None else backup
    if source is None:
        raise ValueError("Invalid backup: None without master weights")
    _check_same_numel(param, source=source)
    param.copy_(source)


@torch.no_grad()
def sam_sum_of_squares(param: Tensor, grad: Tensor, master: Tensor | None) -> tuple[float, bool]:
    """ASAM's squared norm term: the sum of (|w| * g)^2 (products in the compute dtype, squares of fp32 terms summed in
    float64), w the master when given, and whether any term is inf or nan."""
    _check_same_numel(param, grad=grad, master=master)
    dtype = _compute_dtype(param.dtype)
    w = master if master is not None else param.to(dtype)
    term = w.abs() * grad.to(dtype)
    return float(term.square().sum(dtype=torch.float64)), not bool(torch.isfinite(term).all())
