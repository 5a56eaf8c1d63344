"""Bitwise identity across CPU instruction sets: every optimizer class, stepped on backend="cpu", leaves the same bits
in its parameters and every state tensor under each ISA of `fusedopt._C.supported_isas()` (DESIGN.md: one rounding
policy for all ISAs, so no FMA contraction anywhere).

Only the public optimizer classes and `_C.set_cpu_isa/supported_isas/set_num_threads/reset_num_threads` are used,
so the test holds whatever the functional layer below the classes looks like.
"""
from __future__ import annotations

import pytest
import torch
from cases import ROWS, Algorithm

_C = pytest.importorskip("fusedopt._C")

ISAS = list(_C.supported_isas())
if len(ISAS) < 2:
    pytest.skip(f"only one CPU ISA runs here ({', '.join(ISAS)}): nothing to compare", allow_module_level=True)

F32, BF16, FP16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64

# Per class, three cases of its row in tests/cases.py: the first (which also clips the global gradient norm:
# MAX_GRAD_NORM is far below the norm of the random gradients, so the sum-of-squares kernel decides the step), one
# from the middle and the one that keeps the most states (its mode switches).
MAX_GRAD_NORM = 10.0

# (param dtype, master_weights); gradients have the parameter's dtype.
PARAM_DTYPES = [(F32, False), (BF16, False), (BF16, True), (FP16, False), (FP16, True), (F64, False)]
STATE_DTYPES = [F32, BF16]  # float64 parameters keep float64 states (state_dtype None)
LOW_PRECISION = [(BF16, "kahan"), (FP16, "kahan"), (BF16, "stochastic")]
EIGHT_BIT = [(F32, False), (BF16, "stochastic")]

# 1 and 7: shorter than any vector (scalar code only); 33: two AVX2 vectors and a tail; 4097: vector body and a
# one-element tail; 20011 (prime): longer than one 16384-element chunk, so a chunk boundary and an uneven last chunk.
# Then matrices, whose rows and columns Adafactor factors: small, stacked (3-D), rows across chunk boundaries, and one
# row longer than a chunk.
SIZES = (1, 7, 33, 4097, 20011, (3, 5), (2, 3, 40), (130, 160), (1, 20000))
STEPS = 20
SEED = 20240611
_BITS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def _grid() -> list:
    rows = []
    for row in ROWS:
        picks = [row.cases[0], row.cases[len(row.cases) // 2], row.richest_case()]
        cases = [c for k, c in enumerate(picks) if c.id not in {p.id for p in picks[:k]}]
        for k, case in enumerate(cases):
            kwargs = dict(case.kwargs)
            if k == 0:
                kwargs["max_grad_norm"] = MAX_GRAD_NORM
            for dtype, master in PARAM_DTYPES:
                for state_dtype in [None] if dtype == F64 else STATE_DTYPES:
                    name = (f"{row.name}-{case.id}{'-clip' if k == 0 else ''}-{str(dtype)[6:]}"
                            f"{'-master' if master else ''}-state_{str(state_dtype or dtype)[6:]}")
                    rows.append(pytest.param(row, kwargs, dtype, master, state_dtype, id=name))
        # 16-bit parameters without fp32 master weights (Kahan compensation, stochastic rounding), in one case.
        for dtype, master in LOW_PRECISION:
            name = f"{row.name}-{cases[0].id}-{str(dtype)[6:]}-{master}-state_float32"
            rows.append(pytest.param(row, dict(cases[0].kwargs), dtype, master, F32, id=name))
        # 8-bit states (their decode, update, block absmax and encode), where the algorithm has them.
        if not row.cls.spec.no_8bit:
            for case in (cases[0], cases[-1]):
                for dtype, master in EIGHT_BIT:
                    name = f"{row.name}-{case.id}-{str(dtype)[6:]}{'-' + master if master else ''}-state_8bit"
                    rows.append(pytest.param(row, dict(case.kwargs), dtype, master, "8bit", id=name))
    return rows


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of `t` as integers, so that -0.0 != 0.0 and NaN payloads count."""
    return t.detach().reshape(-1).view(_BITS[t.element_size()])


def bit_differences(name: str, expected: torch.Tensor, actual: torch.Tensor) -> str | None:
    """None when `actual` holds the same bits as `expected`, else one line saying how many elements differ."""
    if expected.dtype != actual.dtype or expected.shape != actual.shape:
        return f"{name}: {expected.dtype}{tuple(expected.shape)} vs {actual.dtype}{tuple(actual.shape)}"
    a, b = bits(expected), bits(actual)
    if torch.equal(a, b):
        return None
    differ = (a != b).nonzero().reshape(-1)
    i = int(differ[0])
    return (f"{name}: {differ.numel()} of {a.numel()} elements differ, first at {i}: "
            f"{expected.reshape(-1)[i].item()!r} vs {actual.reshape(-1)[i].item()!r}")


def run_steps(isa: str, row: Algorithm, kwargs: dict, dtype: torch.dtype, master: bool | str,
              state_dtype: torch.dtype | str | None) -> dict[str, torch.Tensor]:
    """STEPS optimizer steps under `isa` from a fixed seed; returns every parameter and state tensor by name."""
    _C.set_cpu_isa(isa)
    torch.manual_seed(SEED)
    draw = F64 if dtype == F64 else F32  # float64 parameters and gradients get full float64 values
    params = [torch.randn(n if isinstance(n, tuple) else (n,), dtype=draw).to(dtype).requires_grad_() for n in SIZES]
    opt = row.cls(params, backend="cpu", state_dtype=state_dtype, master_weights=master, **kwargs)
    for _ in range(STEPS):
        for p in params:
            grad = torch.randn(p.shape, dtype=draw).to(dtype)
            if p.grad is None:
                p.grad = grad
            else:
                p.grad.copy_(grad)  # into the flat gradient buffer, as backward would
        opt.step()
    out: dict[str, torch.Tensor] = {}
    for i, p in enumerate(params):
        out[f"param[{i}]"] = p.detach().clone()
        for key, value in opt.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                out[f"state[{i}][{key!r}]"] = value.detach().clone()
    if kwargs.get("max_grad_norm") is not None:
        out["last_grad_norm"] = torch.tensor(float(opt.last_grad_norm), dtype=torch.float64)
    return out


@pytest.fixture(autouse=True, scope="module")
def _one_thread_and_isa_restored():
    """One thread for both thread pools (bits do not depend on it; two pools on 2 shared cores only slow the run);
    the ISA and torch's thread count are restored afterwards, and fusedopt's count follows torch's again (restoring
    the count read before would fix it, and later tests expect it to follow torch.set_num_threads)."""
    isa, torch_threads = _C.cpu_isa(), torch.get_num_threads()
    _C.set_num_threads(1)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        _C.set_cpu_isa(isa)
        _C.reset_num_threads()
        torch.set_num_threads(torch_threads)


@pytest.mark.parametrize("row,kwargs,dtype,master,state_dtype", _grid())
def test_same_bits_on_every_isa(row, kwargs, dtype, master, state_dtype):
    results = {isa: run_steps(isa, row, kwargs, dtype, master, state_dtype) for isa in ISAS}
    expected = results[ISAS[0]]
    if row.state_names({k: v for k, v in kwargs.items() if k != "max_grad_norm"}):
        assert any(k.startswith("state[") for k in expected), "no state tensor was compared"
    if master is True:
        assert "state[0]['master_param']" in expected
    if master == "kahan":
        assert "state[0]['kahan_comp']" in expected
    problems = []
    for isa in ISAS[1:]:
        actual = results[isa]
        if sorted(actual) != sorted(expected):
            problems.append(f"{isa}: tensors {sorted(actual)} vs {ISAS[0]}: {sorted(expected)}")
            continue
        problems += [f"{isa} vs {ISAS[0]}: {line}" for name in expected
                     if (line := bit_differences(name, expected[name], actual[name])) is not None]
    assert not problems, "\n".join(problems)


def test_one_ulp_is_a_difference():
    """The comparison sees the smallest possible change: one ulp in one element, and the sign of a zero."""
    x = torch.randn(4097)
    y = x.clone()
    y[4096] = torch.nextafter(y[4096], torch.tensor(float("inf")))
    assert bit_differences("x", x, y) == f"x: 1 of 4097 elements differ, first at 4096: {x[4096].item()!r} vs " \
                                         f"{y[4096].item()!r}"
    assert bit_differences("x", x, x.clone()) is None
    h = torch.zeros(7, dtype=BF16)
    assert bit_differences("h", h, -h) == "h: 7 of 7 elements differ, first at 0: 0.0 vs -0.0"
