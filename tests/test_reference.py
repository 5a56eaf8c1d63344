"""fusedopt.reference, the oracle of every other test, checked against torch.optim's single-tensor code paths (Adam,
AdamW, SGD, RMSprop, Adagrad), against float64 implementations of the papers written here (Lion, LAMB), in 16-bit,
and its gradient clipping against torch.nn.utils. Parameters and every state tensor are compared after every step.
"""
from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from cases import (
    ALGORITHMS,
    BIG_SIZE,
    ORACLE_ALGORITHMS,
    SMALL_SIZES,
    TORCH_ALGORITHMS,
    hyperparameters,
    state_names,
)
from fusedopt import reference
from tolerances import assert_close
from torch import Tensor

pytestmark = pytest.mark.usefixtures("single_thread_torch")

STEPS = 50
F64 = torch.float64


# --------------------------------------------------------------------------------------------------- helpers
def init_state(algorithm: str, kwargs: dict[str, Any], param: Tensor, state_dtype: torch.dtype = torch.float32
               ) -> dict[str, Any]:
    """Fresh state as torch.optim creates it (zeros; Adagrad's sum = initial_accumulator_value), plus step = 0."""
    hp = hyperparameters(algorithm, kwargs)
    fill = hp["initial_accumulator_value"] if algorithm == "adagrad" else 0.0
    state: dict[str, Any] = {name: torch.full_like(param, fill, dtype=state_dtype)
                             for name in state_names(algorithm, kwargs)}
    state["step"] = 0
    return state


def reference_step(algorithm: str, kwargs: dict[str, Any], param: Tensor, grad: Tensor, state: dict[str, Any],
                   grad_scale: float = 1.0) -> None:
    """One fusedopt.reference step on (param, state) with the case's hyperparameters; increments state["step"]."""
    hp = hyperparameters(algorithm, kwargs)
    state["step"] += 1
    step = state["step"]
    s = state.get
    if algorithm in ("adam", "adamw"):
        fn = reference.adam if algorithm == "adam" else reference.adamw
        fn(param, grad, s("exp_avg"), s("exp_avg_sq"), s("max_exp_avg_sq"), step=step, lr=hp["lr"],
           beta1=hp["betas"][0], beta2=hp["betas"][1], eps=hp["eps"], weight_decay=hp["weight_decay"],
           amsgrad=hp["amsgrad"], maximize=hp["maximize"], grad_scale=grad_scale)
    elif algorithm == "sgd":
        reference.sgd(param, grad, s("momentum_buffer"), lr=hp["lr"], momentum=hp["momentum"],
                      dampening=hp["dampening"], weight_decay=hp["weight_decay"], nesterov=hp["nesterov"],
                      maximize=hp["maximize"], step=step, grad_scale=grad_scale)
    elif algorithm == "rmsprop":
        reference.rmsprop(param, grad, s("square_avg"), s("momentum_buffer"), s("grad_avg"), lr=hp["lr"],
                          alpha=hp["alpha"], eps=hp["eps"], weight_decay=hp["weight_decay"],
                          momentum=hp["momentum"], centered=hp["centered"], maximize=hp["maximize"],
                          step=step, grad_scale=grad_scale)
    elif algorithm == "adagrad":
        reference.adagrad(param, grad, s("sum"), step=step, lr=hp["lr"], lr_decay=hp["lr_decay"], eps=hp["eps"],
                          weight_decay=hp["weight_decay"], maximize=hp["maximize"], grad_scale=grad_scale)
    elif algorithm == "lion":
        reference.lion(param, grad, s("exp_avg"), step=step, lr=hp["lr"], beta1=hp["betas"][0], beta2=hp["betas"][1],
                       weight_decay=hp["weight_decay"], maximize=hp["maximize"], grad_scale=grad_scale)
    elif algorithm == "lamb":
        reference.lamb(param, grad, s("exp_avg"), s("exp_avg_sq"), step=step, lr=hp["lr"], beta1=hp["betas"][0],
                       beta2=hp["betas"][1], eps=hp["eps"], weight_decay=hp["weight_decay"],
                       bias_correction=hp["bias_correction"], max_trust_ratio=hp["max_trust_ratio"],
                       maximize=hp["maximize"], grad_scale=grad_scale)
    else:
        raise KeyError(algorithm)


_TORCH_CLASSES = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
                  "rmsprop": torch.optim.RMSprop, "adagrad": torch.optim.Adagrad}


def make_torch_optimizer(algorithm: str, params: Any, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    """torch.optim's single-tensor implementation (foreach=False) of `algorithm` with the case's kwargs."""
    return _TORCH_CLASSES[algorithm](params, **kwargs, foreach=False)


def torch_one_step(algorithm: str, kwargs: dict[str, Any], param: Tensor, grad: Tensor, state: dict[str, Any]
                   ) -> tuple[Tensor, dict[str, Tensor]]:
    """One fp32 torch.optim step re-anchored at (param, state) before the step (16-bit inputs upcast).
    `state["step"]` is the count before the step. Returns the new fp32 parameter and state tensors."""
    p = torch.nn.Parameter(param.detach().to(torch.float32).clone())
    p.grad = grad.detach().to(torch.float32).clone()
    opt = make_torch_optimizer(algorithm, [p], kwargs)
    before = state["step"]
    tensors = {k: v.detach().to(torch.float32).clone() for k, v in state.items() if isinstance(v, Tensor)}
    if algorithm == "adagrad":  # torch creates Adagrad's state in the constructor
        opt.state[p]["sum"].copy_(tensors["sum"])
        opt.state[p]["step"].fill_(float(before))
    elif before > 0:
        if algorithm != "sgd":
            tensors["step"] = torch.tensor(float(before))
        opt.state[p].update(tensors)
    opt.step()
    return p.detach(), {k: v for k, v in opt.state[p].items() if k != "step"}


def lion64(p: Tensor, g: Tensor, m: Tensor, hp: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
    """Lion, Chen et al. 2023 Alg. 2, in float64 straight from the paper:
    c = b1*m + (1-b1)*g;  p = p - lr*(sign(c) + wd*p);  m = b2*m + (1-b2)*g.
    Also returns |c| (to find elements whose sign fp32 rounding may legitimately flip)."""
    p, g, m = p.to(F64), g.to(F64), m.to(F64)
    if hp["maximize"]:
        g = -g
    b1, b2 = hp["betas"]
    c = b1 * m + (1 - b1) * g
    p_new = p - hp["lr"] * (torch.sign(c) + hp["weight_decay"] * p)
    m_new = b2 * m + (1 - b2) * g
    # fp32 lerp is accurate to a few ulp of max(|m|, |g|); inside that band the sign is not determined.
    ambiguous = c.abs() <= 1e-6 * (m.abs() + g.abs())
    return p_new, m_new, ambiguous


def lamb64(p: Tensor, g: Tensor, m: Tensor, v: Tensor, step: int, hp: dict[str, Any]
           ) -> tuple[Tensor, Tensor, Tensor]:
    """LAMB, You et al. 2019 Alg. 2, in float64 straight from the paper (phi = identity):
    m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2; mh = m/(1-b1^t), vh = v/(1-b2^t) (if bias_correction);
    u = mh/(sqrt(vh)+eps) + wd*p; r = ||p||/||u|| (1 if either is 0; min(r, max_trust_ratio)); p = p - lr*r*u."""
    p, g, m, v = p.to(F64), g.to(F64), m.to(F64), v.to(F64)
    if hp["maximize"]:
        g = -g
    b1, b2 = hp["betas"]
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    mh, vh = (m / (1 - b1**step), v / (1 - b2**step)) if hp["bias_correction"] else (m, v)
    u = mh / (torch.sqrt(vh) + hp["eps"]) + hp["weight_decay"] * p
    w_norm, u_norm = torch.linalg.vector_norm(p).item(), torch.linalg.vector_norm(u).item()
    ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
    if hp["max_trust_ratio"] is not None:
        ratio = min(ratio, hp["max_trust_ratio"])
    return p - hp["lr"] * ratio * u, m, v


def oracle_step(algorithm: str, kwargs: dict[str, Any], param: Tensor, grad: Tensor, state: dict[str, Any]
                ) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
    """Expected result of one step from (param, state) before it: torch.optim in fp32 for the torch algorithms,
    the float64 paper formulas for Lion and LAMB. Returns (param, states, mask of elements not to compare)."""
    if algorithm in TORCH_ALGORITHMS:
        p, st = torch_one_step(algorithm, kwargs, param, grad, state)
        return p, st, None
    hp = hyperparameters(algorithm, kwargs)
    if algorithm == "lion":
        p, m, ambiguous = lion64(param, grad, state["exp_avg"], hp)
        return p, {"exp_avg": m}, ambiguous
    p, m, v = lamb64(param, grad, state["exp_avg"], state["exp_avg_sq"], state["step"] + 1, hp)
    return p, {"exp_avg": m, "exp_avg_sq": v}, None


def compare_step(actual_p: Tensor, actual_state: dict[str, Any], expected_p: Tensor,
                 expected_state: dict[str, Tensor], names: tuple[str, ...], *, skip: Tensor | None = None,
                 param_tol: Any = None, state_tol: Any = None, where: str = "") -> None:
    """Parameter and every named state tensor, at the given tolerances (default: the actual tensor's dtype)."""
    assert set(expected_state) == set(names), f"{where}: expected states {sorted(expected_state)} != {names}"
    if skip is not None:
        expected_p = torch.where(skip, actual_p.to(expected_p.dtype), expected_p)
    assert_close(actual_p, expected_p, param_tol or actual_p.dtype, msg=f"{where}: param")
    for name in names:
        assert_close(actual_state[name], expected_state[name], state_tol or actual_state[name].dtype,
                     msg=f"{where}: state {name}")


def cases_and_sizes(algorithms: tuple[str, ...]) -> list:
    """Every case at every small size; at the biggest size only the first case and the case combining most modes
    (the table's last), to keep the runtime reasonable."""
    out = []
    for name in algorithms:
        table = ALGORITHMS[name]
        for case in table:
            for n in SMALL_SIZES:
                out.append(pytest.param(name, case, n, id=f"{name}-{case.id}-n{n}"))
        for case in (table[0], table[-1]):
            out.append(pytest.param(name, case, BIG_SIZE, id=f"{name}-{case.id}-n{BIG_SIZE}"))
    return out


# --------------------------------------------------------------------------------------------------- vs torch.optim
@pytest.mark.parametrize("algorithm,case,n", cases_and_sizes(TORCH_ALGORITHMS))
def test_reference_matches_torch_optim(algorithm: str, case, n: int) -> None:
    """50 steps of the reference and of torch.optim (foreach=False) from the same random parameter with fresh random
    gradients: parameter and every state equal at every step (fp32 per-step tolerance; both follow one trajectory)."""
    p0 = torch.randn(n)
    torch_p = torch.nn.Parameter(p0.clone())
    opt = make_torch_optimizer(algorithm, [torch_p], case.kwargs)
    ref_p = p0.clone()
    state = init_state(algorithm, case.kwargs, ref_p)
    names = state_names(algorithm, case.kwargs)
    for step in range(1, STEPS + 1):
        grad = torch.randn(n)
        grad_before = grad.clone()
        torch_p.grad = grad.clone()
        opt.step()
        reference_step(algorithm, case.kwargs, ref_p, grad, state)
        assert torch.equal(grad, grad_before), "reference modified the gradient"
        torch_state = {k: v for k, v in opt.state[torch_p].items() if k != "step"}
        compare_step(ref_p, state, torch_p.detach(), torch_state, names, where=f"step {step}")


# --------------------------------------------------------------------------------------------------- Lion, LAMB
@pytest.mark.parametrize("algorithm,case,n", cases_and_sizes(ORACLE_ALGORITHMS))
def test_reference_matches_float64_paper(algorithm: str, case, n: int) -> None:
    """50 steps; before each step the float64 paper formulas start from the reference's current fp32 values, so each
    step is checked at the fp32 per-step tolerance (for Lion, elements whose sign(c) lies within fp32 rounding of 0
    are not compared, and there must be almost none)."""
    param = torch.randn(n)
    state = init_state(algorithm, case.kwargs, param)
    names = state_names(algorithm, case.kwargs)
    skipped = 0
    for step in range(1, STEPS + 1):
        grad = torch.randn(n)
        exp_p, exp_state, skip = oracle_step(algorithm, case.kwargs, param, grad, state)
        reference_step(algorithm, case.kwargs, param, grad, state)
        compare_step(param, state, exp_p, exp_state, names, skip=skip, where=f"step {step}")
        skipped += 0 if skip is None else int(skip.sum())
    assert skipped <= max(2, 1e-5 * n * STEPS), f"{skipped} ambiguous Lion signs"


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in ALGORITHMS["lamb"]])
def test_lamb_trajectory_float64(case) -> None:
    """LAMB is smooth, so a whole 50-step float64 trajectory (never re-anchored) stays within the fp32 trajectory
    tolerance of the reference; several tensors of different sizes, each with its own trust ratio."""
    hp = hyperparameters("lamb", case.kwargs)
    for n in (7, 4097):
        p32 = torch.randn(n)
        p64 = p32.to(F64)
        st32 = init_state("lamb", case.kwargs, p32)
        m64, v64 = torch.zeros(n, dtype=F64), torch.zeros(n, dtype=F64)
        for step in range(1, STEPS + 1):
            g = torch.randn(n)
            reference_step("lamb", case.kwargs, p32, g, st32)
            p64, m64, v64 = lamb64(p64, g, m64, v64, step, hp)
            compare_step(p32, st32, p64, {"exp_avg": m64, "exp_avg_sq": v64}, ("exp_avg", "exp_avg_sq"),
                         param_tol="fp32_trajectory", state_tol="fp32_trajectory", where=f"n {n} step {step}")


def test_lamb_trust_ratio_is_one_for_zero_norm() -> None:
    """||p|| = 0 (a freshly zero-initialised bias) -> ratio 1, so the step is the plain lr*u, not 0 or nan."""
    kwargs = {"lr": 1e-2, "betas": (0.8, 0.9)}
    p = torch.zeros(5)
    g = torch.randn(5)
    st = init_state("lamb", kwargs, p)
    exp_p, exp_st, _ = oracle_step("lamb", kwargs, p, g, st)
    reference_step("lamb", kwargs, p, g, st)
    assert torch.all(p != 0) and torch.all(torch.isfinite(p))
    compare_step(p, st, exp_p, exp_st, ("exp_avg", "exp_avg_sq"))


# --------------------------------------------------------------------------------------------------- 16-bit
def all_cases() -> list:
    return [pytest.param(name, c, id=f"{name}-{c.id}") for name, table in ALGORITHMS.items() for c in table]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("algorithm,case", all_cases())
def test_reference_16bit_params(algorithm: str, case, dtype: torch.dtype) -> None:
    """16-bit parameter and gradient, fp32 states: each step equals the fp32 computation (torch.optim, or the float64
    paper formulas) started from the upcast values, the parameter rounded once (16-bit tolerance), states to fp32."""
    n = 4097
    param = torch.randn(n).to(dtype)
    state = init_state(algorithm, case.kwargs, param, torch.float32)
    names = state_names(algorithm, case.kwargs)
    for step in range(1, STEPS + 1):
        grad = torch.randn(n).to(dtype)
        exp_p, exp_state, skip = oracle_step(algorithm, case.kwargs, param, grad, state)
        reference_step(algorithm, case.kwargs, param, grad, state)
        assert param.dtype == dtype
        # Exactly one rounding: the 16-bit result is the fp32 result rounded to nearest.
        if algorithm in TORCH_ALGORITHMS:
            assert torch.equal(param, exp_p.to(dtype)), f"step {step}: param is not round(fp32 result)"
        compare_step(param, state, exp_p, exp_state, names, skip=skip, state_tol=torch.float32,
                     where=f"step {step}")


@pytest.mark.parametrize("algorithm,case", all_cases())
def test_reference_bf16_states(algorithm: str, case) -> None:
    """fp32 parameter, bf16 states and an fp32 gradient: each step equals the fp32 computation from the upcast states;
    the parameter to fp32 precision (the states are rounded only when stored), the states to bf16 precision."""
    n = 4097
    param = torch.randn(n)
    state = init_state(algorithm, case.kwargs, param, torch.bfloat16)
    names = state_names(algorithm, case.kwargs)
    for step in range(1, STEPS + 1):
        grad = torch.randn(n)
        exp_p, exp_state, skip = oracle_step(algorithm, case.kwargs, param, grad, state)
        reference_step(algorithm, case.kwargs, param, grad, state)
        assert all(state[k].dtype == torch.bfloat16 for k in names)
        compare_step(param, state, exp_p, exp_state, names, skip=skip, param_tol=torch.float32,
                     state_tol=torch.bfloat16, where=f"step {step}")


# --------------------------------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("algorithm,case", all_cases())
def test_zero_padding_stays_zero(algorithm: str, case) -> None:
    """Flat buffers hold zero padding between parameters: p = g = 0 with fresh state must stay exactly as it is
    (0, or Adagrad's initial accumulator) for every algorithm and mode, while the random part moves."""
    n, pad = 100, slice(40, 60)
    param = torch.randn(n)
    param[pad] = 0
    state = init_state(algorithm, case.kwargs, param)
    fresh = {k: v.clone() for k, v in state.items() if isinstance(v, Tensor)}
    start = param.clone()
    for _ in range(10):
        grad = torch.randn(n)
        grad[pad] = 0
        reference_step(algorithm, case.kwargs, param, grad, state)
        assert torch.all(param[pad] == 0)
        for k in fresh:
            assert torch.equal(state[k][pad], fresh[k][pad]), k
    assert not torch.equal(param[:40], start[:40])


@pytest.mark.parametrize("algorithm,case", all_cases())
def test_grad_scale_equals_scaled_grad(algorithm: str, case) -> None:
    """grad_scale=s is the same as passing grad*s (s a power of two, so both are exact)."""
    n = 4097
    p_a = torch.randn(n)
    p_b = p_a.clone()
    st_a = init_state(algorithm, case.kwargs, p_a)
    st_b = init_state(algorithm, case.kwargs, p_b)
    for _ in range(5):
        grad = torch.randn(n) * 64
        reference_step(algorithm, case.kwargs, p_a, grad, st_a, grad_scale=1 / 64)
        reference_step(algorithm, case.kwargs, p_b, grad / 64, st_b)
        assert torch.equal(p_a, p_b)
        for k in state_names(algorithm, case.kwargs):
            assert torch.equal(st_a[k], st_b[k]), k


def test_reference_does_not_import_compiled_module() -> None:
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(reference))
    imported = {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any("_C" in name or "_compiled" in name or name.startswith("fusedopt") for name in imported), imported


# --------------------------------------------------------------------------------------------------- clipping
def make_params(dtype: torch.dtype = torch.float32, with_none: bool = True) -> list[torch.nn.Parameter]:
    params = []
    for i, n in enumerate((1, 7, 4097, 300)):
        p = torch.nn.Parameter(torch.randn(n).to(dtype))
        if not (with_none and i == 3):
            p.grad = (torch.randn(n) * 3).to(dtype)
        params.append(p)
    return params


def clone_params(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


NORM_TYPES = [pytest.param(2.0, id="l2"), pytest.param(1.0, id="l1"), pytest.param(math.inf, id="inf")]


@pytest.mark.parametrize("max_norm", [0.5, 1e6], ids=["clips", "no-clip"])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_clip_grad_norm_matches_torch(norm_type: float, max_norm: float, dtype: torch.dtype) -> None:
    """Returned total norm and clipped gradients equal torch.nn.utils.clip_grad_norm_ (a grad-None parameter is
    skipped and keeps grad None)."""
    ours = make_params(dtype)
    theirs = clone_params(ours)
    total = reference.clip_grad_norm_(ours, max_norm, norm_type)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    assert isinstance(total, Tensor) and total.dim() == 0
    assert_close(total, expected, dtype, msg="total norm")
    for a, b in zip(ours, theirs):
        if b.grad is None:
            assert a.grad is None
        else:
            assert a.grad.dtype == dtype
            assert_close(a.grad, b.grad, dtype, msg="clipped grad")
    assert_close(reference.global_norm([p.grad for p in theirs if p.grad is not None], norm_type),
                 torch.nn.utils.get_total_norm([p.grad for p in theirs if p.grad is not None], norm_type), dtype)


def test_clip_grad_norm_single_tensor_and_empty() -> None:
    p = torch.nn.Parameter(torch.randn(10))
    p.grad = torch.randn(10)
    q = clone_params([p])[0]
    assert_close(reference.clip_grad_norm_(p, 0.1), torch.nn.utils.clip_grad_norm_(q, 0.1), torch.float32)
    assert_close(p.grad, q.grad, torch.float32)
    assert reference.clip_grad_norm_([], 1.0).item() == 0.0
    assert reference.global_norm([]).item() == 0.0


@pytest.mark.parametrize("bad", [math.inf, math.nan], ids=["inf", "nan"])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_clip_grad_norm_nonfinite(norm_type: float, bad: float) -> None:
    """error_if_nonfinite=True raises RuntimeError like torch and leaves every gradient untouched; with False the
    returned norm is the same non-finite value as torch's."""
    ours = make_params()
    ours[1].grad[3] = bad
    theirs = clone_params(ours)
    before = [None if p.grad is None else p.grad.clone() for p in ours]
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="non-finite"):
        reference.clip_grad_norm_(ours, 1.0, norm_type, error_if_nonfinite=True)
    for p, b in zip(ours, before):
        assert (p.grad is None and b is None) or torch.equal(p.grad.nan_to_num(), b.nan_to_num())
    total = reference.clip_grad_norm_(ours, 1.0, norm_type, error_if_nonfinite=False)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type, error_if_nonfinite=False)
    assert (total.isnan().item(), total.isinf().item()) == (expected.isnan().item(), expected.isinf().item())
    for a, b in zip(ours, theirs):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, equal_nan=True)


@pytest.mark.parametrize("clip_value", [0.5, 2.0, 100.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_clip_grad_value_matches_torch(clip_value: float, dtype: torch.dtype) -> None:
    ours = make_params(dtype)
    theirs = clone_params(ours)
    assert reference.clip_grad_value_(ours, clip_value) is None
    torch.nn.utils.clip_grad_value_(theirs, clip_value)
    for a, b in zip(ours, theirs):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad)
            assert a.grad.abs().max().item() <= clip_value
