"""fusedopt.reference, the oracle of every other test, checked against torch.optim's single-tensor code paths (every
algorithm torch.optim has), against the float64 paper formulas of tests/cases.py (the others), in 16-bit and in
float64 (computed in float64, as torch.optim computes float64 parameters), and its gradient clipping against
torch.nn.utils. Parameters and every state tensor are compared after every step.
"""
from __future__ import annotations

import inspect
import math
from typing import Any

import pytest
import torch
from cases import BIG_SIZE, EXAMPLE, ORACLE_ROWS, ROWS, SMALL_SIZES, TORCH_ROWS, Algorithm, params, row_params
from fusedopt import reference
from tolerances import assert_close, assert_update_close
from torch import Tensor

pytestmark = pytest.mark.usefixtures("single_thread_torch")

STEPS = 50
F32, F64 = torch.float32, torch.float64
_ID = {F32: "fp32", F64: "fp64"}


# --------------------------------------------------------------------------------------------------- helpers
def init_state(row: Algorithm, kwargs: dict[str, Any], param: Tensor, state_dtype: torch.dtype = torch.float32
               ) -> dict[str, Any]:
    """Fresh state as torch.optim creates it (each state's first value from the spec), plus step = 0."""
    group = row.group(kwargs)
    state: dict[str, Any] = {s.name: torch.full_like(param, s.fill(group), dtype=state_dtype)
                             for s in row.kept_states(kwargs)}
    state.update({s.name: torch.tensor(s.fill(group), dtype=torch.float32) for s in row.cls.spec.scalars})
    state["step"] = 0
    return state


def reference_function(row: Algorithm, kwargs: dict[str, Any]) -> Any:
    """fusedopt.reference's function of the row's kernel, with the case's kernel fields bound."""
    function = getattr(reference, row.kernel)
    hyper = row.hyper(kwargs)

    def step(param: Tensor, grad: Tensor, state: dict[str, Any], *, lr: float, grad_scale: float = 1.0) -> None:
        scalars = {name: state[name] for name in row.cls.spec.scalar_names()}
        function(param, grad, *(state.get(s.name) for s in row.cls.spec.states), step=state["step"], lr=lr,
                 grad_scale=grad_scale, **scalars, **hyper)

    return step


def reference_step(row: Algorithm, kwargs: dict[str, Any], param: Tensor, grad: Tensor, state: dict[str, Any],
                   grad_scale: float = 1.0) -> None:
    """One fusedopt.reference step on (param, state) with the case's hyperparameters; increments state["step"]."""
    state["step"] += 1
    reference_function(row, kwargs)(param, grad, state, lr=row.group(kwargs)["lr"], grad_scale=grad_scale)


def torch_one_step(row: Algorithm, kwargs: dict[str, Any], param: Tensor, grad: Tensor, state: dict[str, Any]
                   ) -> tuple[Tensor, dict[str, Tensor]]:
    """One fp32 torch.optim step re-anchored at (param, state) before the step (16-bit inputs upcast).
    `state["step"]` is the count before the step. Returns the new fp32 parameter and state tensors."""
    p = torch.nn.Parameter(param.detach().to(torch.float32).clone())
    p.grad = grad.detach().to(torch.float32).clone()
    opt = row.torch_optimizer([p], kwargs)
    before = state["step"]
    tensors = {k: v.detach().to(torch.float32).clone() for k, v in state.items() if isinstance(v, Tensor)}
    if row.cls.spec.state_at_init:  # torch creates this algorithm's state in the constructor
        for name, value in tensors.items():
            opt.state[p][name].copy_(value)
        opt.state[p]["step"].fill_(float(before))
    elif before > 0 or any(not torch.equal(value, torch.full_like(value, s.fill(row.group(kwargs))))
                           for s in row.kept_states(kwargs) for name, value in tensors.items() if name == s.name):
        # Also before the first step when a state's first value did not survive its storage (Rprop's step_size = lr
        # rounded to bf16): torch then starts from the stored value, as the reference does.
        if row.cls.spec.tracks_step:
            tensors["step"] = torch.tensor(float(before))
        opt.state[p].update(tensors)
    opt.step()
    return p.detach(), {k: v for k, v in opt.state[p].items() if k != "step"}


def oracle_step(row: Algorithm, kwargs: dict[str, Any], param: Tensor, grad: Tensor, state: dict[str, Any]
                ) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
    """Expected result of one step from (param, state) before it: torch.optim in fp32 where it has the algorithm,
    the row's float64 paper formulas otherwise. Returns (param, states, mask of elements not to compare)."""
    if row.torch_cls is not None:
        p, st = torch_one_step(row, kwargs, param, grad, state)
        return p, st, None
    assert row.oracle64 is not None
    states = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    return row.oracle64(param, grad, states, state["step"] + 1, row.group(kwargs))


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


def cases_and_sizes(rows: list[Algorithm]) -> list:
    """Every case at every small size, in fp32 and float64; at the biggest size only the first case and the case
    combining most modes (the table's last), in fp32 (the reference is plain torch: the size changes nothing float64
    would add), to keep the runtime reasonable. The biggest size is a `slow` test except for the example row's first
    case."""
    out = []
    for row in rows:
        for case in row.cases:
            for n in SMALL_SIZES:
                for dtype in (F32, F64):
                    out.append(pytest.param(row, case, n, dtype, id=f"{row.name}-{case.id}-n{n}-{_ID[dtype]}"))
        for case in (row.cases[0], row.cases[-1]):
            fast = row is EXAMPLE and case is row.cases[0]
            out.append(pytest.param(row, case, BIG_SIZE, F32, id=f"{row.name}-{case.id}-n{BIG_SIZE}-fp32",
                                    marks=() if fast else pytest.mark.slow))
    return out


# --------------------------------------------------------------------------------------------------- vs torch.optim
@pytest.mark.parametrize("row,case,n,dtype", cases_and_sizes(TORCH_ROWS))
def test_reference_matches_torch_optim(row: Algorithm, case, n: int, dtype: torch.dtype) -> None:
    """50 steps of the reference and of torch.optim (foreach=False) from the same random parameter with fresh random
    gradients: parameter and every state equal at every step (per-step tolerance of the dtype; both follow one
    trajectory). float64 parameters, gradients and states stay float64 on both sides."""
    p0 = torch.randn(n, dtype=dtype)
    torch_p = torch.nn.Parameter(p0.clone())
    opt = row.torch_optimizer([torch_p], case.kwargs)
    ref_p = p0.clone()
    state = init_state(row, case.kwargs, ref_p, dtype)
    names = row.state_names(case.kwargs)
    for step in range(1, STEPS + 1):
        grad = torch.randn(n, dtype=dtype)
        grad_before = grad.clone()
        torch_p.grad = grad.clone()
        opt.step()
        reference_step(row, case.kwargs, ref_p, grad, state)
        assert torch.equal(grad, grad_before), "reference modified the gradient"
        torch_state = {k: v for k, v in opt.state[torch_p].items() if k != "step"}
        assert ref_p.dtype == dtype and all(state[s.name].dtype == dtype for s in row.kept_states(case.kwargs))
        compare_step(ref_p, state, torch_p.detach(), torch_state, names, where=f"step {step}")


@pytest.mark.parametrize("row", row_params(TORCH_ROWS))
def test_reference_matches_torch_optim_on_nonfinite_gradients(row: Algorithm) -> None:
    """inf, -inf and nan in the gradients (some elements hit on two steps, so that non-finite states are read back):
    the reference's parameter and states are nan and inf where torch.optim's are, and equal elsewhere, in the case
    of the row's table that keeps the most states."""
    kwargs = row.richest_case().kwargs
    n = 40
    p0 = torch.randn(n)
    torch_p = torch.nn.Parameter(p0.clone())
    opt = row.torch_optimizer([torch_p], kwargs)
    ref_p = p0.clone()
    state = init_state(row, kwargs, ref_p)
    names = row.state_names(kwargs)
    bad = {1: {3: math.inf, 7: -math.inf, 11: math.nan}, 2: {3: 1.0, 15: math.nan, 19: math.inf},
           3: {7: -1.0, 23: -math.inf}}
    for step in (1, 2, 3, 4):
        grad = torch.randn(n)
        for i, value in bad.get(step, {}).items():
            grad[i] = value
        torch_p.grad = grad.clone()
        opt.step()
        reference_step(row, kwargs, ref_p, grad, state)
        pairs = [("param", ref_p, torch_p.detach())] + [(k, state[k], opt.state[torch_p][k]) for k in names]
        for name, actual, expected in pairs:
            where = f"step {step}: {name}"
            assert torch.equal(actual.isnan(), expected.isnan()), where
            assert torch.equal(actual.isinf(), expected.isinf()), where
            finite = torch.isfinite(expected)
            assert_close(actual[finite], expected[finite], torch.float32, msg=where)


def class_named_functions() -> list:
    """(row, function) for every public reference function named after an optimizer class but not its kernel (a
    convenience form, e.g. a variant with a mode fixed)."""
    out = []
    for row in ROWS:
        function = getattr(reference, row.name.lower(), None)
        if function is not None and row.name.lower() != row.kernel and row.name.lower() in reference.__all__:
            out.extend(pytest.param(row, case, function, id=f"{row.name}-{case.id}") for case in row.cases)
    return out


@pytest.mark.parametrize("row,case,function", class_named_functions())
def test_class_named_reference_function_is_the_kernel_function(row: Algorithm, case, function) -> None:
    """The class-named function gives bitwise what the kernel's reference function (tested above) gives with the
    class's kernel fields, from the same random state."""
    n = 4097
    param = torch.randn(n)
    ours, theirs = param.clone(), param.clone()
    state = init_state(row, case.kwargs, param)
    for s in row.kept_states(case.kwargs):
        state[s.name] = torch.rand(n) + 0.1
    other = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in state.items()}
    accepted = set(inspect.signature(function).parameters)
    hyper = {k: v for k, v in row.hyper(case.kwargs).items() if k in accepted}
    lr = row.group(case.kwargs)["lr"]
    for step in range(1, 6):
        grad = torch.randn(n)
        state["step"] = other["step"] = step
        function(ours, grad, *(state.get(s.name) for s in row.cls.spec.states), step=step, lr=lr, **hyper)
        reference_function(row, case.kwargs)(theirs, grad, other, lr=lr)
        assert torch.equal(ours, theirs), f"step {step}"
        for name in row.state_names(case.kwargs):
            assert torch.equal(state[name], other[name]), f"step {step}: {name}"


# --------------------------------------------------------------------------------------------------- float64 oracles
@pytest.mark.parametrize("row,case,n,dtype", cases_and_sizes(ORACLE_ROWS))
def test_reference_matches_float64_paper(row: Algorithm, case, n: int, dtype: torch.dtype) -> None:
    """50 steps; before each step the float64 paper formulas start from the reference's current values, so each
    step is checked at the per-step tolerance of the dtype (for a sign update, elements whose sign(c) lies within fp32
    rounding of 0 are not compared, and there must be almost none). float64 parameters are computed in float64."""
    param = torch.randn(n, dtype=dtype)
    state = init_state(row, case.kwargs, param, dtype)
    names = row.state_names(case.kwargs)
    skipped = 0
    for step in range(1, STEPS + 1):
        grad = torch.randn(n, dtype=dtype)
        exp_p, exp_state, skip = oracle_step(row, case.kwargs, param, grad, state)
        reference_step(row, case.kwargs, param, grad, state)
        compare_step(param, state, exp_p, exp_state, names, skip=skip, where=f"step {step}")
        skipped += 0 if skip is None else int(skip.sum())
    assert skipped <= max(2, 1e-5 * n * STEPS), f"{skipped} ambiguous signs"


@pytest.mark.parametrize("row,case", params([r for r in ORACLE_ROWS if r.smooth_trajectory]))
def test_whole_trajectory_float64(row: Algorithm, case) -> None:
    """A smooth update's whole 50-step float64 trajectory (never re-anchored) stays within the fp32 trajectory
    tolerance of the reference; several tensors of different sizes, each with its own per-tensor quantities."""
    assert row.oracle64 is not None
    hp = row.group(case.kwargs)
    names = row.state_names(case.kwargs)
    for n in (7, 4097):
        p32 = torch.randn(n)
        p64 = p32.to(F64)
        st32 = init_state(row, case.kwargs, p32)
        st64 = {k: v.to(F64) for k, v in st32.items() if isinstance(v, Tensor)}
        for step in range(1, STEPS + 1):
            g = torch.randn(n)
            reference_step(row, case.kwargs, p32, g, st32)
            p64, st64, _ = row.oracle64(p64, g, st64, step, hp)
            compare_step(p32, st32, p64, st64, names, param_tol="fp32_trajectory", state_tol="fp32_trajectory",
                         where=f"n {n} step {step}")


@pytest.mark.parametrize("row", row_params())
def test_zero_parameter_moves_by_a_finite_step(row: Algorithm) -> None:
    """p = 0 (a freshly zero-initialised bias) with a random gradient moves, by a finite step equal to the oracle's
    (for a trust ratio ||p||/||u||: 1 when ||p|| = 0, so the step is the plain lr*u, not 0 or nan)."""
    kwargs = row.cases[0].kwargs
    p = torch.zeros(5)
    g = torch.randn(5)
    st = init_state(row, kwargs, p)
    exp_p, exp_st, skip = oracle_step(row, kwargs, p, g, st)
    reference_step(row, kwargs, p, g, st)
    assert torch.all(p != 0) and torch.all(torch.isfinite(p))
    compare_step(p, st, exp_p, exp_st, row.state_names(kwargs), skip=skip)


# --------------------------------------------------------------------------------------------------- 16-bit
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("row,case", params())
def test_reference_16bit_params(row: Algorithm, case, dtype: torch.dtype) -> None:
    """16-bit parameter and gradient, fp32 states: each step equals the fp32 computation (torch.optim, or the float64
    paper formulas) started from the upcast values, the parameter rounded once (16-bit tolerance), states to fp32."""
    n = 4097
    param = torch.randn(n).to(dtype)
    state = init_state(row, case.kwargs, param, torch.float32)
    names = row.state_names(case.kwargs)
    for step in range(1, STEPS + 1):
        grad = torch.randn(n).to(dtype)
        exp_p, exp_state, skip = oracle_step(row, case.kwargs, param, grad, state)
        reference_step(row, case.kwargs, param, grad, state)
        assert param.dtype == dtype
        # Exactly one rounding: the 16-bit result is the fp32 result rounded to nearest.
        if row.torch_cls is not None:
            assert torch.equal(param, exp_p.to(dtype)), f"step {step}: param is not round(fp32 result)"
        compare_step(param, state, exp_p, exp_state, names, skip=skip, state_tol=torch.float32,
                     where=f"step {step}")


@pytest.mark.parametrize("row,case", params())
def test_reference_bf16_states(row: Algorithm, case) -> None:
    """fp32 parameter, bf16 states and an fp32 gradient: each step equals the fp32 computation from the upcast states;
    the parameter to fp32 precision (the states are rounded only when stored), the states to bf16 precision."""
    n = 4097
    param = torch.randn(n)
    state = init_state(row, case.kwargs, param, torch.bfloat16)
    names = row.state_names(case.kwargs)
    for step in range(1, STEPS + 1):
        grad = torch.randn(n)
        before = param.clone()
        exp_p, exp_state, skip = oracle_step(row, case.kwargs, param, grad, state)
        reference_step(row, case.kwargs, param, grad, state)
        assert all(state[s.name].dtype == torch.bfloat16 for s in row.kept_states(case.kwargs))
        if row.two_pass:  # the direction reads the stored moments: see tolerances.assert_update_close
            assert_update_close(param, exp_p, before, torch.bfloat16, msg=f"step {step}: param")
            exp_p = param
        compare_step(param, state, exp_p, exp_state, names, skip=skip, param_tol=torch.float32,
                     state_tol=torch.bfloat16, where=f"step {step}")


# --------------------------------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("row,case", params())
def test_zero_padding_stays_zero(row: Algorithm, case) -> None:
    """Flat buffers hold zero padding between parameters: p = g = 0 with fresh state must stay exactly as it is
    (each state's first value) for every algorithm and mode, while the random part moves."""
    n, pad = 100, slice(40, 60)
    param = torch.randn(n)
    param[pad] = 0
    state = init_state(row, case.kwargs, param)
    fresh = {s.name: state[s.name].clone() for s in row.kept_states(case.kwargs)}  # per-element states
    start = param.clone()
    for _ in range(10):
        grad = torch.randn(n)
        grad[pad] = 0
        reference_step(row, case.kwargs, param, grad, state)
        assert torch.all(param[pad] == 0)
        for k in fresh if row.zero_fixed_states else ():
            assert torch.equal(state[k][pad], fresh[k][pad]), k
    assert not torch.equal(param[:40], start[:40])


@pytest.mark.parametrize("row,case", params())
def test_grad_scale_equals_scaled_grad(row: Algorithm, case) -> None:
    """grad_scale=s is the same as passing grad*s (s a power of two, so both are exact)."""
    n = 4097
    p_a = torch.randn(n)
    p_b = p_a.clone()
    st_a = init_state(row, case.kwargs, p_a)
    st_b = init_state(row, case.kwargs, p_b)
    for _ in range(5):
        grad = torch.randn(n) * 64
        reference_step(row, case.kwargs, p_a, grad, st_a, grad_scale=1 / 64)
        reference_step(row, case.kwargs, p_b, grad / 64, st_b)
        assert torch.equal(p_a, p_b)
        for k in row.state_names(case.kwargs):
            assert torch.equal(st_a[k], st_b[k]), k


def test_reference_does_not_import_compiled_module() -> None:
    import ast

    tree = ast.parse(inspect.getsource(reference))
    imported = {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any("_C" in name or "_compiled" in name or name.startswith("fusedopt") for name in imported), imported


# --------------------------------------------------------------------------------------------------- clipping
def make_params(dtype: torch.dtype = torch.float32, with_none: bool = True) -> list[torch.nn.Parameter]:
    draw = F64 if dtype == F64 else F32  # float64 gets full float64 values
    params = []
    for i, n in enumerate((1, 7, 4097, 300)):
        p = torch.nn.Parameter(torch.randn(n, dtype=draw).to(dtype))
        if not (with_none and i == 3):
            p.grad = (torch.randn(n, dtype=draw) * 3).to(dtype)
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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64], ids=["fp32", "bf16", "fp64"])
def test_clip_grad_norm_matches_torch(norm_type: float, max_norm: float, dtype: torch.dtype) -> None:
    """Returned total norm and clipped gradients equal torch.nn.utils.clip_grad_norm_ (a grad-None parameter is
    skipped and keeps grad None); float64 gradients give a float64 norm, computed in float64."""
    ours = make_params(dtype)
    theirs = clone_params(ours)
    total = reference.clip_grad_norm_(ours, max_norm, norm_type)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    assert isinstance(total, Tensor) and total.dim() == 0
    assert total.dtype == F64 or dtype != F64
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
