"""CPU kernels (fusedopt._kernels on fusedopt._C) against fusedopt.reference, step by step, through
fusedopt.functional.update on both sides.

Tables of cases per algorithm run over param/grad/state dtype x master weights x size x ISA (state dtype, size and
ISA rotate through the cross product so every mode meets every param/grad/master combination, both state dtypes,
several sizes and every ISA, within the time budget). Each test
runs 10 steps with fresh random gradients and compares the parameters, master weights and every state tensor after
every step; both sides then continue from the compiled result, so each step is checked from identical inputs.
Also: segments whose step counts differ updated in one call, inactive segments left untouched, bitwise determinism
across thread counts, LAMB segments, sum_of_squares, and argument checks at the boundary.
"""
from __future__ import annotations

import math
import os
import sys
from contextlib import contextmanager

import pytest
import torch

_kernels = pytest.importorskip("fusedopt._kernels")
from fusedopt import _C, functional  # noqa: E402
from fusedopt.flat import Segments  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
try:
    from tolerances import assert_close  # noqa: E402
except ImportError:  # pragma: no cover - tolerances.py is written by another engineer
    _TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}

    def assert_close(actual, expected, dtype=None, msg=""):
        rtol, atol = _TOL[dtype if dtype is not None else actual.dtype]
        torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m: f"{msg}\n{m}")

CHUNK = int(_C.build_info()["chunk_elements"])
SIZES = [1, 15, 16, 17, 4097, CHUNK - 1, CHUNK, CHUNK + 1]
ISAS = list(_C.supported_isas())
STEPS = 10

F32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16
# (param dtype, grad dtype, master weights): grad = param dtype or fp32; master weights only for 16-bit params.
DTYPE_COMBOS = [
    (F32, F32, False),
    (BF16, BF16, False), (BF16, F32, False), (BF16, BF16, True), (BF16, F32, True),
    (FP16, FP16, False), (FP16, F32, False), (FP16, FP16, True), (FP16, F32, True),
]
STATE_DTYPES = [F32, BF16]


@contextmanager
def cpu_isa(name: str):
    previous = _C.cpu_isa()
    _C.set_cpu_isa(name)
    try:
        yield
    finally:
        _C.set_cpu_isa(previous)


@contextmanager
def num_threads(n: int):
    previous = _C.get_num_threads()
    _C.set_num_threads(n)
    try:
        yield
    finally:
        _C.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _one_thread_by_default(request):
    """Comparisons run on one thread (fast and load-independent on a shared 2-core box); the determinism tests
    below switch between 1 and 2 threads themselves."""
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference side too: barriers of two thread pools on 2 busy cores are slow
    try:
        with num_threads(1):
            yield
    finally:
        torch.set_num_threads(torch_threads)


def assert_lion_param_close(actual, expected, dtype, lr, msg):
    """Lion moves each element by exactly +-lr: where lerp(m, g) is within an ulp of 0, a one-ulp difference between
    two correct implementations flips sign(c). Allow such flips on at most 0.1% of elements, nowhere else."""
    a, e = actual.double(), expected.double()
    from tolerances import tolerance  # noqa: PLC0415

    tol = tolerance(dtype)
    bad = (a - e).abs() > tol["atol"] + tol["rtol"] * e.abs()
    assert int(bad.sum()) <= max(1, actual.numel() // 1000), f"{msg}: {int(bad.sum())} elements differ"
    assert bool(((a - e).abs()[bad] <= 2 * lr * (1 + 1e-3) + tol["atol"] + tol["rtol"] * e.abs()[bad]).all()), msg


# --- case tables ---------------------------------------------------------------------------------------------------
# Each algorithm: state names, how to initialise each state (random, never zero), per-step extra kwargs, and cases.

def _pos(n, gen):  # second-moment-like states must be >= 0
    return torch.rand(n, generator=gen, dtype=torch.float64).float() + 0.1


def _sym(n, gen):
    return torch.randn(n, generator=gen, dtype=torch.float64).float()


ALGOS = {
    "adam": dict(
        states=("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), init=(_sym, _pos, _pos),
        base=dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
                  decoupled=False),
        cases=[
            ("default", {}),
            ("l2", dict(weight_decay=0.1)),
            ("adamw", dict(weight_decay=0.1, decoupled=True)),
            ("amsgrad", dict(amsgrad=True)),
            ("amsgrad-adamw-maximize", dict(amsgrad=True, decoupled=True, weight_decay=0.05, maximize=True)),
            ("maximize-scaled", dict(maximize=True, grad_scale=0.25)),
            ("betas", dict(beta1=0.5, beta2=0.9, eps=1e-3)),
        ],
        needs=lambda kw: {"max_exp_avg_sq": kw["amsgrad"]},
    ),
    "sgd": dict(
        states=("momentum_buffer",), init=(_sym,),
        base=dict(lr=1e-2, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
        cases=[
            ("plain", {}),
            ("weight-decay", dict(weight_decay=0.1)),
            ("momentum", dict(momentum=0.9)),
            ("dampening", dict(momentum=0.9, dampening=0.3)),
            ("nesterov-wd", dict(momentum=0.9, nesterov=True, weight_decay=0.01)),
            ("maximize-scaled", dict(momentum=0.5, maximize=True, grad_scale=2.0)),
        ],
        needs=lambda kw: {"momentum_buffer": kw["momentum"] != 0},
    ),
    "rmsprop": dict(
        states=("square_avg", "momentum_buffer", "grad_avg"), init=(None, _sym, None),
        base=dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, maximize=False),
        cases=[
            ("default", {}),
            ("weight-decay", dict(weight_decay=0.1)),
            ("momentum", dict(momentum=0.9)),
            ("centered", dict(centered=True)),
            ("centered-momentum-maximize", dict(centered=True, momentum=0.5, maximize=True, alpha=0.9)),
            ("scaled", dict(grad_scale=0.5, eps=1e-2)),
        ],
        needs=lambda kw: {"square_avg": True, "momentum_buffer": kw["momentum"] > 0, "grad_avg": kw["centered"]},
    ),
    "adagrad": dict(
        states=("sum",), init=(_pos,),
        base=dict(lr=1e-2, lr_decay=0.0, eps=1e-10, weight_decay=0.0, maximize=False),
        cases=[
            ("default", {}),
            ("lr-decay", dict(lr_decay=0.1)),
            ("weight-decay-maximize", dict(weight_decay=0.1, maximize=True)),
            ("scaled", dict(grad_scale=3.0, eps=1e-3)),
        ],
        needs=lambda kw: {"sum": True},
    ),
    "lion": dict(
        states=("exp_avg",), init=(_sym,),
        base=dict(lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.0, maximize=False),
        cases=[
            ("default", {}),
            ("weight-decay", dict(weight_decay=0.5)),
            ("maximize-betas", dict(maximize=True, beta1=0.5, beta2=0.9, grad_scale=0.5)),
        ],
        needs=lambda kw: {"exp_avg": True},
    ),
    "lamb": dict(
        states=("exp_avg", "exp_avg_sq"), init=(_sym, _pos),
        base=dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0, bias_correction=True,
                  max_trust_ratio=None, maximize=False),
        cases=[
            ("default", {}),
            ("weight-decay", dict(weight_decay=0.01)),
            ("no-bias-correction", dict(bias_correction=False)),
            ("max-trust-ratio", dict(max_trust_ratio=0.5, weight_decay=0.1)),
            ("maximize-scaled", dict(maximize=True, grad_scale=0.5)),
        ],
        needs=lambda kw: {"exp_avg": True, "exp_avg_sq": True},
    ),
}


def _init_states(algo, kw, n, dtype, gen):
    spec = ALGOS[algo]
    needs = spec["needs"](kw)
    states = {}
    for name, init in zip(spec["states"], spec["init"]):
        if not needs.get(name, True):
            states[name] = None
            continue
        if algo == "rmsprop" and name == "square_avg":
            t = _pos(n, gen) + 1.0
        elif algo == "rmsprop" and name == "grad_avg":
            t = 0.1 * _sym(n, gen)
        else:
            t = init(n, gen)
        states[name] = t.to(dtype)
    return states


def _call(backend, algo, param, grad, states, master, kw, segments):
    """One step of `algo` through functional.update; kw holds lr, grad_scale and the math header's fields."""
    hyper = dict(kw)
    lr, grad_scale = hyper.pop("lr"), hyper.pop("grad_scale", 1.0)
    s = [states[name] for name in ALGOS[algo]["states"]]
    functional.update(algo, param, grad, s, master, segments, hyper=hyper, lr=lr, grad_scale=grad_scale,
                      backend=backend)


def _table(segments, n):
    """A fresh Segments table (steps 0, all active) for (offsets, numels) or one segment of n elements."""
    if segments is None:
        return Segments([0], [n], torch.device("cpu"))
    table = Segments(segments[0].tolist(), segments[1].tolist(), torch.device("cpu"))
    return table


def run_and_compare(algo, case_kw, n, pdtype, gdtype, master, sdtype, seed, segments=None, steps=STEPS, msg=""):
    spec = ALGOS[algo]
    kw = dict(spec["base"], **case_kw)
    gen = torch.Generator().manual_seed(seed)
    p32 = _sym(n, gen)
    param = p32.to(pdtype)
    master_t = p32.clone() if master else None
    states = _init_states(algo, kw, n, sdtype, gen)
    table, ref_table = _table(segments, n), _table(segments, n)
    for t in (table, ref_table):
        t.set_all_active(True)

    ref_param = (master_t if master else param).clone()
    ref_states = {k: (v.clone() if v is not None else None) for k, v in states.items()}
    # LAMB with bf16 states: the kernel's update direction uses the stored (rounded) moments, the reference the
    # unrounded ones, so parameters agree to bf16 precision only.
    param_tol = BF16 if (algo == "lamb" and sdtype == BF16) else None

    for step in range(1, steps + 1):
        grad = (_sym(n, gen) * 0.5).to(gdtype)
        _call("cpu", algo, param, grad, states, master_t, kw, table)
        ref_master = ref_param if master else None
        ref_target = param.clone() if master else ref_param
        _call("reference", algo, ref_target, grad, ref_states, ref_master, kw, ref_table)
        assert torch.equal(table.steps, ref_table.steps) and bool((table.steps == step).all()), "step counts"

        where = f"{msg} step {step}"
        if algo == "lion":
            assert_lion_param_close(master_t if master else param, ref_param, F32 if master else pdtype,
                                    kw["lr"], msg=f"param {where}")
            ref_param.copy_(master_t if master else param)
        if master:
            assert_close(master_t, ref_param, param_tol or F32, msg=f"master {where}")
            assert_close(param, ref_param.to(pdtype), param_tol or pdtype, msg=f"param {where}")
            assert torch.equal(param, master_t.to(pdtype)), f"param != round(master) {where}"
        else:
            assert_close(param, ref_param, param_tol or pdtype, msg=f"param {where}")
        for name, t in states.items():
            if t is not None:
                assert_close(t, ref_states[name], sdtype, msg=f"{name} {where}")
        # Continue both sides from the compiled result: each step is compared from identical inputs.
        ref_param.copy_(master_t if master else param)
        for name, t in states.items():
            if t is not None:
                ref_states[name].copy_(t)
    return param, master_t, states


# --- the grid ------------------------------------------------------------------------------------------------------

def _grid():
    rows = []
    i = 0
    for algo, spec in ALGOS.items():
        for case_id, case_kw in spec["cases"]:
            for pd, gd, master in DTYPE_COMBOS:
                sd = STATE_DTYPES[(i + i // len(DTYPE_COMBOS)) % len(STATE_DTYPES)]
                size = SIZES[i % len(SIZES)]
                isa = ISAS[i % len(ISAS)]
                i += 1
                name = f"{algo}-{case_id}-p{str(pd)[6:]}-g{str(gd)[6:]}-s{str(sd)[6:]}" \
                       f"{'-master' if master else ''}-n{size}-{isa}"
                rows.append(pytest.param(algo, case_kw, size, pd, gd, master, sd, isa, id=name))
    return rows


@pytest.mark.parametrize("algo,case_kw,size,pdtype,gdtype,master,sdtype,isa", _grid())
def test_kernel_matches_reference(algo, case_kw, size, pdtype, gdtype, master, sdtype, isa):
    with cpu_isa(isa):
        run_and_compare(algo, case_kw, size, pdtype, gdtype, master, sdtype, seed=hash((algo, size)) % 1000,
                        msg=f"{algo} {case_kw} {isa}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("size", SIZES + [3 * CHUNK + 5])
@pytest.mark.parametrize("algo", list(ALGOS))
def test_every_size_and_isa_fp32_and_bf16_master(algo, size, isa):
    """Every size x every ISA for each algorithm's richest case.

    fp32, and bf16 params with fp32 master weights and bf16 grads.
    """
    case_kw = ALGOS[algo]["cases"][-1][1]
    with cpu_isa(isa):
        run_and_compare(algo, case_kw, size, F32, F32, False, F32, seed=size, steps=3, msg=f"{algo} fp32 {isa}")
        run_and_compare(algo, case_kw, size, BF16, BF16, True, F32, seed=size + 1, steps=3,
                        msg=f"{algo} bf16+master {isa}")


# --- LAMB segments -------------------------------------------------------------------------------------------------

def _segments(sizes, gap=16):
    offsets, numels, off = [], [], 0
    for s in sizes:
        offsets.append(off)
        numels.append(s)
        off += s + gap  # a gap that no segment covers: must stay untouched
    return torch.tensor(offsets, dtype=torch.int64), torch.tensor(numels, dtype=torch.int64), off


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("pdtype,gdtype,master,sdtype", [(F32, F32, False, F32), (BF16, F32, True, F32),
                                                         (FP16, FP16, False, BF16), (F32, F32, False, BF16)])
def test_lamb_segments(isa, pdtype, gdtype, master, sdtype):
    offsets, numels, n = _segments([1, 17, CHUNK + 3, 4097, 0, 2 * CHUNK, 15, CHUNK - 1])
    kw = dict(weight_decay=0.01, max_trust_ratio=10.0)
    with cpu_isa(isa):
        param, master_t, states = run_and_compare("lamb", kw, n, pdtype, gdtype, master, sdtype, seed=7,
                                                  segments=(offsets, numels), msg=f"lamb segments {isa}")
    # Elements in the gaps were never touched (re-create the initial parameter values to check).
    gen = torch.Generator().manual_seed(7)
    p0 = _sym(n, gen).to(pdtype)
    covered = torch.zeros(n, dtype=torch.bool)
    for o, k in zip(offsets.tolist(), numels.tolist()):
        covered[o:o + k] = True
    assert torch.equal(param[~covered], p0[~covered])


def test_rejects_bad_segments():
    n = 100
    p, g, m, v = (torch.randn(n) for _ in range(4))
    hyper = dict(beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0, bias_correction=True, max_trust_ratio=None,
                 maximize=False)
    before = p.clone()
    for offs, nums in [([90], [20]), ([-1], [5]), ([10, 5], [10, 10]), ([0, 5], [10, 10])]:
        table = Segments(offs, nums, torch.device("cpu"))
        table.set_all_active(True)
        with pytest.raises(ValueError, match="segment"):
            functional.update("lamb", p, g, [m, v], None, table, hyper=hyper, lr=1e-3, backend="cpu")
        assert table.steps.tolist() == [0.0] * len(offs), "a rejected call counted a step"
    assert torch.equal(p, before)


# --- per-segment steps and active flags ------------------------------------------------------------------------------

@pytest.mark.parametrize("algo", list(ALGOS))
def test_segments_with_different_steps_in_one_call(algo):
    """Parameters whose step counts differ (frozen then unfrozen, added later, experts without tokens) are updated in
    one call, each with its own bias corrections; inactive ones are neither read nor written and keep their step."""
    sizes = [5, CHUNK + 3, 40, 7, 2 * CHUNK, 33]
    table = Segments.packed(sizes)
    ref_table = Segments.packed(sizes)
    n = table.total
    kw = dict(ALGOS[algo]["base"], **ALGOS[algo]["cases"][-1][1])
    gen = torch.Generator().manual_seed(17)
    param = _sym(n, gen)
    states = _init_states(algo, kw, n, F32, gen)
    ref_param = param.clone()
    ref_states = {k: (v.clone() if v is not None else None) for k, v in states.items()}
    # Different histories: segment k has taken k steps before this test's steps start.
    for t in (table, ref_table):
        t.steps.copy_(torch.arange(len(sizes), dtype=torch.float32))
    for step in range(4):
        active = [(k + step) % 3 != 0 for k in range(len(sizes))]
        for t in (table, ref_table):
            for k, a in enumerate(active):
                t.flags[k] = int(a)
        grad = _sym(n, gen) * 0.5
        before = param.clone()
        before_states = {k: (v.clone() if v is not None else None) for k, v in states.items()}
        _call("cpu", algo, param, grad, states, None, kw, table)
        # The reference side, one segment at a time with its own step (the oracle of per-segment coefficients).
        for k, (off, num) in enumerate(zip(table.offsets.tolist(), sizes)):
            if not active[k]:
                continue
            one = Segments([0], [num], torch.device("cpu"))
            one.set_all_active(True)
            one.steps.fill_(ref_table.steps[k])
            r = slice(off, off + num)
            _call("reference", algo, ref_param[r], grad[r],
                  {name: (v[r] if v is not None else None) for name, v in ref_states.items()}, None, kw, one)
            ref_table.steps[k] = one.steps[0]
        assert torch.equal(table.steps, ref_table.steps), (table.steps, ref_table.steps)
        for k, (off, num) in enumerate(zip(table.offsets.tolist(), sizes)):
            r = slice(off, off + num)
            if not active[k]:
                assert torch.equal(param[r], before[r]), f"inactive segment {k} was written"
                for name, v in states.items():
                    if v is not None:
                        assert torch.equal(v[r], before_states[name][r]), f"inactive {name} {k} was written"
            elif algo != "lion":
                assert_close(param[r], ref_param[r], F32, msg=f"{algo} segment {k} step {step}")
        ref_param.copy_(param)
        for name, v in states.items():
            if v is not None:
                ref_states[name].copy_(v)


def test_master_weights_are_for_16_bit_parameters():
    table = Segments.packed([8])
    p, g, m, v = (torch.randn(table.total) for _ in range(4))
    hyper = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False, decoupled=False)
    with pytest.raises(ValueError, match="master"):
        functional.update("adam", p, g, [m, v, None], p.clone(), table, hyper=hyper, lr=1e-3, backend="cpu")
    assert table.steps.tolist() == [0.0]


# --- determinism ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("algo", list(ALGOS))
def test_bitwise_identical_for_1_and_2_threads(algo):
    n = 3 * CHUNK + 7
    case_kw = ALGOS[algo]["cases"][-1][1]
    segments = None
    if algo == "lamb":
        offsets, numels, n = _segments([CHUNK + 3, 5, 2 * CHUNK + 1, 100])
        segments = (offsets, numels)
    results = []
    for threads in (1, 2, 1):
        with num_threads(threads):
            results.append(run_and_compare(algo, case_kw, n, BF16, F32, True, F32, seed=3, segments=segments,
                                           steps=3, msg=f"{algo} threads={threads}"))
    for other in results[1:]:
        for a, b in zip(results[0][:2], other[:2]):
            assert torch.equal(a, b)
        for name, t in results[0][2].items():
            if t is not None:
                assert torch.equal(t, other[2][name]), name


@pytest.mark.parametrize("dtype", [F32, BF16, FP16])
@pytest.mark.parametrize("isa", ISAS)
def test_sum_of_squares(dtype, isa):
    gen = torch.Generator().manual_seed(11)
    with cpu_isa(isa):
        for n in [0, 1, 17, CHUNK + 1, 5 * CHUNK + 3]:
            t = _sym(n, gen).to(dtype)
            expected = float((t.float() * t.float()).double().sum())
            outs = []
            for threads in (1, 2):
                with num_threads(threads):
                    outs.append(_kernels.sum_of_squares(t))
            assert outs[0] == outs[1], "not bitwise identical across thread counts"
            total, bad = outs[0]
            assert not bad
            assert math.isclose(total, expected, rel_tol=1e-6, abs_tol=1e-9), (n, total, expected)
        t = _sym(2 * CHUNK, gen).to(dtype)
        for value in (float("inf"), float("nan"), float("-inf")):
            u = t.clone()
            u[CHUNK + 5] = value
            assert _kernels.sum_of_squares(u)[1] is True
        # Over active segments only: a non-finite value in an inactive segment is not seen.
        table = Segments([0, CHUNK + 32], [CHUNK, CHUNK - 32], torch.device("cpu"))
        table.flags[0] = 1
        u = t.clone()
        u[CHUNK + 40] = float("nan")
        total, bad = _kernels.sum_of_squares_segments(u, table)
        assert not bad
        assert math.isclose(total, float((t[:CHUNK].float() ** 2).double().sum()), rel_tol=1e-6)


# --- boundary checks -----------------------------------------------------------------------------------------------

def _raw_adam(ptrs, n, codes, table, hyper_values, lr=1e-3):
    s0, s1, s2 = ptrs[2], ptrs[3], 0
    return _C.adam(ptrs[0], ptrs[1], s0, s1, s2, 0, n, *codes, table.offsets.data_ptr(), table.numels.data_ptr(),
                   table.steps.data_ptr(), table.active.data_ptr(), len(table), hyper_values, lr, 1.0, 3, 0, 0)


def test_c_boundary_rejects_bad_arguments():
    table = Segments.packed([64])
    n = table.total
    p, g, m, v = (torch.randn(n) for _ in range(4))
    ptrs = [t.data_ptr() for t in (p, g, m, v)]
    hyper = [0.9, 0.999, 1e-8, 0.0, 0.0, 0.0, 0.0]
    before = p.clone()
    with pytest.raises(ValueError, match="dtype code"):
        _raw_adam(ptrs, n, (7, 0, 0), table, hyper)
    with pytest.raises(ValueError, match="grad dtype"):
        _raw_adam(ptrs, n, (1, 2, 0), table, hyper)
    with pytest.raises(ValueError, match="state dtype"):
        _raw_adam(ptrs, n, (0, 0, 2), table, hyper)
    with pytest.raises(ValueError, match="element count"):
        _raw_adam(ptrs, -1, (0, 0, 0), table, hyper)
    with pytest.raises(ValueError, match="exp_avg_sq pointer is null"):
        _raw_adam(ptrs[:3] + [0], n, (0, 0, 0), table, hyper)
    with pytest.raises(ValueError, match="max_exp_avg_sq pointer is null"):
        _raw_adam(ptrs, n, (0, 0, 0), table, hyper[:4] + [1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="hyperparameter count"):
        _raw_adam(ptrs, n, (0, 0, 0), table, hyper[:6])
    with pytest.raises(ValueError, match="outside the buffer"):
        _raw_adam(ptrs, n - 1, (0, 0, 0), table, hyper)
    with pytest.raises(ValueError, match="dtype code"):
        _C.sum_of_squares(p.data_ptr(), n, 3)
    with pytest.raises(ValueError, match="threads"):
        _C.set_num_threads(0)
    assert torch.equal(p, before)
    assert table.steps.tolist() == [0.0], "a rejected call counted a step"


def test_python_validation_names_the_argument():
    table = Segments.packed([32])
    n = table.total
    p, g, m, v = (torch.randn(n) for _ in range(4))
    hyper = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False, decoupled=False)

    def adam(param, grad, states, **kw):
        functional.update("adam", param, grad, states, None, table, hyper=dict(hyper, **kw), lr=1e-3, backend="cpu")

    with pytest.raises(ValueError, match="exp_avg_sq: numel"):
        adam(p, g, [m, torch.randn(n + 1), None])
    with pytest.raises(TypeError, match="grad dtype"):
        adam(p.bfloat16(), g.half(), [m, v, None])
    with pytest.raises(TypeError, match="exp_avg_sq dtype"):
        adam(p, g, [m, v.bfloat16(), None])
    with pytest.raises(ValueError, match="not contiguous"):
        adam(torch.randn(2 * n)[::2], g, [m, v, None])
    with pytest.raises(ValueError, match="1-D"):
        adam(p.view(n // 8, 8), g, [m, v, None])
    with pytest.raises(ValueError, match="max_exp_avg_sq"):
        adam(p, g, [m, v, None], amsgrad=True)
    with pytest.raises(ValueError, match="missing"):
        functional.update("adam", p, g, [m, v, None], None, table, hyper={"beta1": 0.9}, lr=1e-3, backend="cpu")
    with pytest.raises(ValueError, match="share memory"):
        adam(p, g, [m, m, None])
    with pytest.raises(ValueError, match="algorithm"):
        functional.update("bogus", p, g, [m, v, None], None, table, hyper=hyper, lr=1e-3, backend="cpu")
    assert table.steps.tolist() == [0.0]


def test_tensor_hyperparameters_and_empty_buffers():
    table, ref_table = Segments.packed([50]), Segments.packed([50])
    n = table.total
    gen = torch.Generator().manual_seed(5)
    p, g, m, v = (_sym(n, gen) for _ in range(4))
    v = v.abs()
    P, M, V = p.clone(), m.clone(), v.clone()
    hyper = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False, decoupled=False)
    functional.update("adam", p, g, [m, v, None], None, table, hyper=hyper, lr=torch.tensor(1e-2),
                      grad_scale=torch.tensor(0.5), backend="cpu")
    functional.update("adam", P, g, [M, V, None], None, ref_table, hyper=hyper, lr=1e-2, grad_scale=0.5,
                      backend="reference")
    assert_close(p, P, F32)
    e = torch.empty(0)
    empty = Segments.packed([0])
    functional.update("adam", e, e.clone(), [e.clone(), e.clone(), None], None, empty, hyper=hyper, lr=1e-2,
                      backend="cpu")
    assert empty.steps.tolist() == [1.0]
    assert _kernels.sum_of_squares(e) == (0.0, False)


def test_isa_selection():
    assert _C.cpu_isa() in ISAS
    assert ISAS[0] == "baseline"
    with pytest.raises(ValueError, match="bogus"):
        _C.set_cpu_isa("bogus")
    for name in _C.compiled_isas():
        if name not in ISAS:
            with pytest.raises(ValueError, match="not supported by this CPU"):
                _C.set_cpu_isa(name)
    info = _C.build_info()
    assert info["cpu_isa"] == _C.cpu_isa() and info["openmp"] in (True, False)
