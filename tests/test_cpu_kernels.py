"""CPU kernels (fusedopt._kernels on fusedopt._C) against fusedopt.reference, step by step, through
fusedopt.functional.update on both sides.

The cases are those of tests/cases.py, turned into kernel fields by each class's spec, run over param/grad/state
dtype x master weights x size x ISA x grad_scale (state dtype, size, ISA and grad_scale rotate through the cross
product so every mode meets every param/grad/master combination, both state dtypes, several sizes and every ISA,
within the time budget). Each test runs 10 steps from random (never zero) states with fresh random gradients and
compares the parameters, master weights and every state tensor after every step; both sides then continue from the
compiled result, so each step is checked from identical inputs. Also: segments whose step counts differ updated in
one call, inactive segments and gaps left untouched, bitwise determinism across thread counts, sum_of_squares, and
argument checks at the boundary.
"""
from __future__ import annotations

import math
import os
import sys
import zlib
from contextlib import contextmanager
from typing import Any

import pytest
import torch

_kernels = pytest.importorskip("fusedopt._kernels")
from fusedopt import _C, functional  # noqa: E402
from fusedopt.flat import Segments  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from cases import EXAMPLE, ROWS, Algorithm, row_params, warm_state  # noqa: E402
from tolerances import assert_close, assert_update_close, tolerance  # noqa: E402

CHUNK = int(_C.build_info()["chunk_elements"])
SIZES = [1, 15, 16, 17, 4097, CHUNK - 1, CHUNK, CHUNK + 1]
ISAS = list(_C.supported_isas())
STEPS = 10
THREAD_COUNTS = (1, 2, 3, 7)  # the determinism tests' thread counts
GRAD_SCALES = [1.0, 0.5, 2.0, 0.25, 3.0]  # case k of a table runs with GRAD_SCALES[k % 5] (AMP's unscale factor)

F32, BF16, FP16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
# (param dtype, grad dtype, master weights): grad = param dtype or fp32; master weights only for 16-bit params; float64
# params with float64 grads (and float64 states) only.
DTYPE_COMBOS = [
    (F32, F32, False),
    (BF16, BF16, False), (BF16, F32, False), (BF16, BF16, True), (BF16, F32, True),
    (FP16, FP16, False), (FP16, F32, False), (FP16, FP16, True), (FP16, F32, True),
    (F64, F64, False),
]
STATE_DTYPES = [F32, BF16]  # of 32- and 16-bit params; float64 params keep float64 states


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
    below switch between thread counts themselves."""
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference side too: barriers of two thread pools on 2 busy cores are slow
    _C.set_num_threads(1)
    try:
        yield
    finally:
        _C.reset_num_threads()  # fusedopt follows torch's count again, as outside these tests
        torch.set_num_threads(torch_threads)


def assert_sign_update_close(actual, expected, dtype, lr, msg):
    """A sign update moves each element by exactly +-lr: where the signed quantity is within an ulp of 0, a one-ulp
    difference between two correct implementations flips its sign. Allow such flips on at most 0.1% of elements,
    nowhere else."""
    a, e = actual.double(), expected.double()
    tol = tolerance(dtype)
    bad = (a - e).abs() > tol["atol"] + tol["rtol"] * e.abs()
    assert int(bad.sum()) <= max(1, actual.numel() // 1000), f"{msg}: {int(bad.sum())} elements differ"
    assert bool(((a - e).abs()[bad] <= 2 * lr * (1 + 1e-3) + tol["atol"] + tol["rtol"] * e.abs()[bad]).all()), msg


# --- kernel cases --------------------------------------------------------------------------------------------------

def _sym(n, gen, dtype=F32):
    """n random values from `gen`: rounded to fp32, or full float64 values for float64 (the same draws)."""
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    return x if dtype == F64 else x.float()


def kernel_args(row: Algorithm, kwargs: dict[str, Any], grad_scale: float = 1.0) -> dict[str, Any]:
    """lr, grad_scale and the kernel fields of a case (what functional.update takes besides the buffers)."""
    return dict(row.hyper(kwargs), lr=row.group(kwargs)["lr"], grad_scale=grad_scale)


def _init_states(row, kwargs, n, dtype, gen):
    """Every state slot of the kernel: a random warm state where the configuration keeps one, else None."""
    kept = set(row.state_names(kwargs))
    return {s.name: warm_state(s.name, n, gen, dtype).to(dtype) if s.name in kept else None
            for s in row.cls.spec.states}


def _call(backend, row, param, grad, states, master, kw, segments):
    """One step of the row's kernel through functional.update; kw holds lr, grad_scale and the kernel fields."""
    hyper = dict(kw)
    lr, grad_scale = hyper.pop("lr"), hyper.pop("grad_scale", 1.0)
    s = [states[state.name] for state in row.cls.spec.states]
    row.fill_scalars(segments, lr)
    functional.update(row.kernel, param, grad, s, master, segments, hyper=hyper, lr=lr, grad_scale=grad_scale,
                      backend=backend)


def _table(segments, n):
    """A fresh Segments table (steps 0, all active) for (offsets, numels) or one segment of n elements."""
    if segments is None:
        return Segments([0], [n], torch.device("cpu"))
    table = Segments(segments[0].tolist(), segments[1].tolist(), torch.device("cpu"))
    return table


def run_and_compare(row, kw, n, pdtype, gdtype, master, sdtype, seed, segments=None, steps=STEPS, msg="",
                    kwargs=None):
    """`kw`: kernel_args of the case whose constructor kwargs are `kwargs` (which decide the states kept)."""
    gen = torch.Generator().manual_seed(seed)
    p32 = _sym(n, gen, pdtype)
    param = p32.to(pdtype)
    master_t = p32.clone() if master else None
    states = _init_states(row, kwargs, n, sdtype, gen)
    table, ref_table = _table(segments, n), _table(segments, n)
    for t in (table, ref_table):
        t.set_all_active(True)

    ref_param = (master_t if master else param).clone()
    ref_states = {k: (v.clone() if v is not None else None) for k, v in states.items()}

    for step in range(1, steps + 1):
        grad = (_sym(n, gen, gdtype) * 0.5).to(gdtype)
        before = ref_param.clone()
        _call("cpu", row, param, grad, states, master_t, kw, table)
        ref_master = ref_param if master else None
        ref_target = param.clone() if master else ref_param
        _call("reference", row, ref_target, grad, ref_states, ref_master, kw, ref_table)
        assert torch.equal(table.steps, ref_table.steps) and bool((table.steps == step).all()), "step counts"

        where = f"{msg} step {step}"
        # LAMB's direction reads the stored moments: bf16 rounding boundaries show in the update (see tolerances).
        rounded_direction = row.two_pass and sdtype == BF16
        if row.sign_update:
            assert_sign_update_close(master_t if master else param, ref_param, F32 if master else pdtype,
                                     kw["lr"], msg=f"param {where}")
            ref_param.copy_(master_t if master else param)
        fp32_param = master_t if master else (param if pdtype == F32 else None)
        if fp32_param is not None and rounded_direction:
            assert_update_close(fp32_param, ref_param, before, BF16, msg=f"fp32 param {where}")
        elif fp32_param is not None:
            assert_close(fp32_param, ref_param, F32, msg=f"fp32 param {where}")
        if pdtype != F32 and rounded_direction:
            assert_update_close(param, ref_param, before, BF16, msg=f"param {where}", stored=pdtype)
        elif pdtype != F32:
            assert_close(param, ref_param.to(pdtype), pdtype, msg=f"param {where}")
        if master:
            assert torch.equal(param, master_t.to(pdtype)), f"param != round(master) {where}"
        for name, t in states.items():
            if t is not None:
                assert_close(t, ref_states[name], sdtype, msg=f"{name} {where}")
        if table.scalars is not None:  # computed in double and stored as float32 on both sides
            assert torch.equal(table.scalars, ref_table.scalars), f"scalar states {where}"
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
    for row in ROWS:
        for k, case in enumerate(row.cases):
            grad_scale = GRAD_SCALES[k % len(GRAD_SCALES)]
            for pd, gd, master in DTYPE_COMBOS:
                sd = F64 if pd == F64 else STATE_DTYPES[(i + i // len(DTYPE_COMBOS)) % len(STATE_DTYPES)]
                size = SIZES[i % len(SIZES)]
                isa = ISAS[i % len(ISAS)]
                i += 1
                name = f"{row.name}-{case.id}-p{str(pd)[6:]}-g{str(gd)[6:]}-s{str(sd)[6:]}" \
                       f"{'-master' if master else ''}-n{size}-{isa}"
                rows.append(pytest.param(row, case, grad_scale, size, pd, gd, master, sd, isa, id=name))
    return rows


@pytest.mark.parametrize("row,case,grad_scale,size,pdtype,gdtype,master,sdtype,isa", _grid())
def test_kernel_matches_reference(row, case, grad_scale, size, pdtype, gdtype, master, sdtype, isa):
    with cpu_isa(isa):
        run_and_compare(row, kernel_args(row, case.kwargs, grad_scale), size, pdtype, gdtype, master, sdtype,
                        seed=zlib.crc32(f"{row.name} {size}".encode()) % 1000,
                        msg=f"{row.name} {case.id} x{grad_scale} {isa}",
                        kwargs=case.kwargs)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("size", SIZES + [3 * CHUNK + 5])
@pytest.mark.parametrize("row", row_params())
def test_every_size_and_isa_fp32_bf16_master_and_fp64(row, size, isa):
    """Every size x every ISA for each class's richest case.

    fp32, bf16 params with fp32 master weights and bf16 grads, and float64 params, grads and states.
    """
    kwargs = row.richest_case().kwargs
    kw = kernel_args(row, kwargs)
    with cpu_isa(isa):
        run_and_compare(row, kw, size, F32, F32, False, F32, seed=size, steps=3, msg=f"{row.name} fp32 {isa}",
                        kwargs=kwargs)
        run_and_compare(row, kw, size, BF16, BF16, True, F32, seed=size + 1, steps=3,
                        msg=f"{row.name} bf16+master {isa}", kwargs=kwargs)
        run_and_compare(row, kw, size, F64, F64, False, F64, seed=size + 2, steps=3, msg=f"{row.name} fp64 {isa}",
                        kwargs=kwargs)


# --- segments ------------------------------------------------------------------------------------------------------

def _segments(sizes, gap=16):
    offsets, numels, off = [], [], 0
    for s in sizes:
        offsets.append(off)
        numels.append(s)
        off += s + gap  # a gap that no segment covers: must stay untouched
    return torch.tensor(offsets, dtype=torch.int64), torch.tensor(numels, dtype=torch.int64), off


SEGMENT_DTYPES = [(F32, F32, False, F32), (BF16, F32, True, F32), (FP16, FP16, False, BF16), (F32, F32, False, BF16),
                  (F64, F64, False, F64)]


def _segment_grid():
    """Two-pass kernels (per-segment reductions, where the layout matters most) over every ISA x dtype combination;
    the others over every ISA, the dtype combinations rotating."""
    out, k = [], 0
    for row in ROWS:
        for isa in ISAS:
            combos = SEGMENT_DTYPES if row.two_pass else [SEGMENT_DTYPES[k % len(SEGMENT_DTYPES)]]
            k += not row.two_pass
            for pd, gd, master, sd in combos:
                name = f"{row.name}-p{str(pd)[6:]}-g{str(gd)[6:]}-s{str(sd)[6:]}{'-master' if master else ''}-{isa}"
                out.append(pytest.param(row, isa, pd, gd, master, sd, id=name))
    return out


@pytest.mark.parametrize("row,isa,pdtype,gdtype,master,sdtype", _segment_grid())
def test_segments_and_gaps(row, isa, pdtype, gdtype, master, sdtype):
    """Many segments of one buffer (per-segment quantities such as trust ratios come from each segment alone), with
    gaps between them that no segment covers and no kernel may touch."""
    offsets, numels, n = _segments([1, 17, CHUNK + 3, 4097, 0, 2 * CHUNK, 15, CHUNK - 1])
    kwargs = row.richest_case().kwargs
    with cpu_isa(isa):
        param, master_t, states = run_and_compare(row, kernel_args(row, kwargs, 0.5), n, pdtype, gdtype, master,
                                                  sdtype, seed=7, segments=(offsets, numels),
                                                  msg=f"{row.name} segments {isa}", kwargs=kwargs)
    # Elements in the gaps were never touched (re-create the initial parameter values to check).
    gen = torch.Generator().manual_seed(7)
    p0 = _sym(n, gen, pdtype).to(pdtype)
    covered = torch.zeros(n, dtype=torch.bool)
    for o, k in zip(offsets.tolist(), numels.tolist()):
        covered[o:o + k] = True
    assert torch.equal(param[~covered], p0[~covered])


def test_rejects_bad_segments():
    n = 100
    p, g = torch.randn(n), torch.randn(n)
    states = [torch.rand(n) + 0.1 for _ in EXAMPLE.state_names({})]
    before = p.clone()
    for offs, nums in [([90], [20]), ([-1], [5]), ([10, 5], [10, 10]), ([0, 5], [10, 10])]:
        table = Segments(offs, nums, torch.device("cpu"))
        table.set_all_active(True)
        with pytest.raises(ValueError, match="segment"):
            functional.update(EXAMPLE.kernel, p, g, states, None, table, hyper=EXAMPLE.hyper({}), lr=1e-3,
                              backend="cpu")
        assert table.steps.tolist() == [0.0] * len(offs), "a rejected call counted a step"
    assert torch.equal(p, before)


# --- per-segment steps and active flags ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F32, F64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("row", row_params())
def test_segments_with_different_steps_in_one_call(row, dtype):
    """Parameters whose step counts differ (frozen then unfrozen, added later, experts without tokens) are updated in
    one call, each with its own bias corrections (float64 ones for float64 parameters); inactive ones are neither read
    nor written and keep their step."""
    sizes = [5, CHUNK + 3, 40, 7, 2 * CHUNK, 33]
    table = Segments.packed(sizes)
    ref_table = Segments.packed(sizes)
    n = table.total
    kwargs = row.richest_case().kwargs
    kw = kernel_args(row, kwargs)
    gen = torch.Generator().manual_seed(17)
    param = _sym(n, gen, dtype)
    states = _init_states(row, kwargs, n, dtype, gen)
    ref_param = param.clone()
    ref_states = {k: (v.clone() if v is not None else None) for k, v in states.items()}
    # Different histories: segment k has taken k steps before this test's steps start.
    for t in (table, ref_table):
        t.steps.copy_(torch.arange(len(sizes), dtype=torch.float32))
        row.fill_scalars(t, kw["lr"])
        if t.scalars is not None:  # different histories of the scalar states too (the last segment's are fresh)
            t.scalars.mul_(torch.linspace(0.5, 1.0, len(sizes))[:, None])
    for step in range(4):
        active = [(k + step) % 3 != 0 for k in range(len(sizes))]
        for t in (table, ref_table):
            for k, a in enumerate(active):
                t.flags[k] = int(a)
        grad = _sym(n, gen, dtype) * 0.5
        before = param.clone()
        before_states = {k: (v.clone() if v is not None else None) for k, v in states.items()}
        _call("cpu", row, param, grad, states, None, kw, table)
        # The reference side, one segment at a time with its own step (the oracle of per-segment coefficients).
        for k, (off, num) in enumerate(zip(table.offsets.tolist(), sizes)):
            if not active[k]:
                continue
            one = Segments([0], [num], torch.device("cpu"))
            one.set_all_active(True)
            one.steps.fill_(ref_table.steps[k])
            if ref_table.scalars is not None:
                one.ensure_scalars(ref_table.scalars.shape[1])[0] = ref_table.scalars[k]
            r = slice(off, off + num)
            _call("reference", row, ref_param[r], grad[r],
                  {name: (v[r] if v is not None else None) for name, v in ref_states.items()}, None, kw, one)
            ref_table.steps[k] = one.steps[0]
            if ref_table.scalars is not None:
                ref_table.scalars[k] = one.scalars[0]
        assert torch.equal(table.steps, ref_table.steps), (table.steps, ref_table.steps)
        if table.scalars is not None:
            assert torch.equal(table.scalars, ref_table.scalars), (table.scalars, ref_table.scalars)
        for k, (off, num) in enumerate(zip(table.offsets.tolist(), sizes)):
            r = slice(off, off + num)
            if not active[k]:
                assert torch.equal(param[r], before[r]), f"inactive segment {k} was written"
                for name, v in states.items():
                    if v is not None:
                        assert torch.equal(v[r], before_states[name][r]), f"inactive {name} {k} was written"
            elif row.sign_update:
                assert_sign_update_close(param[r], ref_param[r], dtype, kw["lr"],
                                         msg=f"{row.name} segment {k} step {step}")
            else:
                assert_close(param[r], ref_param[r], dtype, msg=f"{row.name} segment {k} step {step}")
        ref_param.copy_(param)
        for name, v in states.items():
            if v is not None:
                ref_states[name].copy_(v)


# (step, element, value): inf, -inf and nan in the gradients, some elements hit twice, so that a non-finite state is
# read back by a later step.
NONFINITE = [(1, 3, math.inf), (1, 7, -math.inf), (1, 11, math.nan), (2, 3, 1.0), (2, 15, math.nan),
             (2, 19, math.inf), (3, 7, -1.0), (3, 23, -math.inf)]


@pytest.mark.parametrize("dtype", [F32, F64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("row", row_params())
def test_nonfinite_gradients_propagate_as_in_the_reference(row, dtype):
    """Without skip_nonfinite, inf and nan in the gradients reach the parameters and states exactly where the
    reference (torch.optim's operations) lets them: the same elements nan, the same infinities, and the finite
    elements equal. Each kernel's comparisons and selects must treat nan as torch's ops do."""
    kwargs = row.richest_case().kwargs
    kw = kernel_args(row, kwargs)
    table, ref_table = Segments.packed([40]), Segments.packed([40])
    n = table.total
    gen = torch.Generator().manual_seed(29)
    param = _sym(n, gen, dtype)
    states = _init_states(row, kwargs, n, dtype, gen)
    ref_param = param.clone()
    ref_states = {k: (v.clone() if v is not None else None) for k, v in states.items()}
    for step in (1, 2, 3):
        grad = _sym(n, gen, dtype)
        for when, i, value in NONFINITE:
            if when == step:
                grad[i] = value
        _call("cpu", row, param, grad, states, None, kw, table)
        _call("reference", row, ref_param, grad, ref_states, None, kw, ref_table)
        pairs = [("param", param, ref_param)] + [(k, v, ref_states[k]) for k, v in states.items() if v is not None]
        for name, actual, expected in pairs:
            where = f"{row.name} {name} step {step}"
            assert torch.equal(actual.isnan(), expected.isnan()), f"{where}: nan at {actual.isnan().nonzero()}, " \
                f"reference {expected.isnan().nonzero()}"
            finite = ~expected.isnan()
            assert torch.equal(actual[finite].isinf(), expected[finite].isinf()), f"{where}: infinities"
            if row.sign_update and name == "param":
                assert_sign_update_close(actual[finite], expected[finite], dtype, kw["lr"], msg=where)
            else:
                assert_close(actual[finite], expected[finite], dtype, msg=where)
        ref_param.copy_(param)  # each step from identical inputs
        for k, v in states.items():
            if v is not None:
                ref_states[k].copy_(v)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["fp32", "fp64"])
def test_master_weights_are_for_16_bit_parameters(dtype):
    table = Segments.packed([8])
    p, g = torch.randn(table.total, dtype=dtype), torch.randn(table.total, dtype=dtype)
    states = [torch.rand(table.total, dtype=dtype) + 0.1 for _ in EXAMPLE.state_names({})]
    before = p.clone()
    with pytest.raises(ValueError, match=f"master weights are for bfloat16/float16 parameters, param is "
                                         f"{str(dtype)[6:]}"):
        functional.update(EXAMPLE.kernel, p, g, states, p.clone().float(), table, hyper=EXAMPLE.hyper({}), lr=1e-3,
                          backend="cpu")
    assert table.steps.tolist() == [0.0]
    assert torch.equal(p, before)


# --- determinism ---------------------------------------------------------------------------------------------------

# (param, grad, master, states) of the determinism test: the mixed-precision path and the float64 one.
THREAD_DTYPES = {"bf16-master": (BF16, F32, True, F32), "fp64": (F64, F64, False, F64)}


@pytest.mark.parametrize("dtypes", list(THREAD_DTYPES))
@pytest.mark.parametrize("layout", ["one-segment", "segments"])
@pytest.mark.parametrize("row", row_params())
def test_bitwise_identical_for_any_thread_count(row, layout, dtypes):
    # 4 work items (one segment) or 7 (segments): 2, 3 and 7 threads split them unevenly, 7 threads leave some idle.
    pdtype, gdtype, master, sdtype = THREAD_DTYPES[dtypes]
    n = 3 * CHUNK + 7
    kwargs = row.richest_case().kwargs
    segments = None
    if layout == "segments":
        offsets, numels, n = _segments([CHUNK + 3, 5, 2 * CHUNK + 1, 100])
        segments = (offsets, numels)
    results = []
    for threads in THREAD_COUNTS + (1,):
        with num_threads(threads):
            results.append(run_and_compare(row, kernel_args(row, kwargs), n, pdtype, gdtype, master, sdtype, seed=3,
                                           segments=segments, steps=3, msg=f"{row.name} threads={threads}",
                                           kwargs=kwargs))
    for other in results[1:]:
        for a, b in zip(results[0][:2], other[:2]):
            assert (a is None and b is None) or torch.equal(a, b)
        for name, t in results[0][2].items():
            if t is not None:
                assert torch.equal(t, other[2][name]), name


@pytest.mark.parametrize("dtype", [F32, BF16, FP16, F64])
@pytest.mark.parametrize("isa", ISAS)
def test_sum_of_squares(dtype, isa):
    """Thread-count independent sums of squares: fp32 squares of fp32/bf16/fp16 elements, float64 squares of float64
    ones (to 1e-13: fp32 squares of float64 values would be off by ~1e-8), all summed in double."""
    gen = torch.Generator().manual_seed(11)
    rel = 1e-13 if dtype == F64 else 1e-6
    with cpu_isa(isa):
        for n in [0, 1, 17, CHUNK + 1, 5 * CHUNK + 3]:
            t = _sym(n, gen, dtype).to(dtype)
            w = t if dtype == F64 else t.float()
            expected = float((w * w).double().sum())
            outs = []
            for threads in THREAD_COUNTS:
                with num_threads(threads):
                    outs.append(_kernels.sum_of_squares(t))
            assert all(out == outs[0] for out in outs), f"not bitwise identical across thread counts: {outs}"
            total, bad = outs[0]
            assert not bad
            assert math.isclose(total, expected, rel_tol=rel, abs_tol=1e-9), (n, total, expected)
        t = _sym(2 * CHUNK, gen, dtype).to(dtype)
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
        w = t if dtype == F64 else t.float()
        assert math.isclose(total, float((w[:CHUNK] ** 2).double().sum()), rel_tol=rel)


# --- boundary checks -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("row", row_params())
def test_c_boundary_rejects_bad_arguments(row):
    """The compiled entry point of every kernel, called directly: bad codes, counts and pointers are refused and the
    call changes nothing (in the richest case, so that every state slot the kernel has is checked)."""
    kwargs = row.richest_case().kwargs
    table = Segments.packed([64])
    n = table.total
    p, g = torch.randn(n), torch.randn(n)
    states = {s.name: torch.rand(n) + 0.1 for s in row.kept_states(kwargs)}
    values = _kernels.hyper_values(row.kernel, row.hyper(kwargs))
    kernel = getattr(_C, row.kernel)
    row.fill_scalars(table, 1e-3)
    scalars = 0 if table.scalars is None else table.scalars.data_ptr()
    layout = table.layout_or_vectors()  # read by a factored kernel only
    passes = 7 if _kernels.ALGORITHMS[row.kernel]["kind"] == "factored" else 3  # every pass of the kind

    def raw(n=n, codes=(0, 0, 0), values=values, null=None, master=0, scalars=scalars, comp=0, mode=0):
        slots = [states[s.name].data_ptr() if s.name in states and s.name != null else 0
                 for s in row.cls.spec.states]
        slots += [0] * (3 - len(slots))
        return kernel(p.data_ptr(), g.data_ptr(), *slots, master, comp, mode, 0, n, *codes, table.offsets.data_ptr(),
                      table.numels.data_ptr(), table.steps.data_ptr(), table.active.data_ptr(), len(table), scalars,
                      layout.data_ptr(), values, 1e-3, 1.0, passes, 0, 0, 0, table.factor_sums, 0, 0, 0, 0)

    before = p.clone()
    if scalars:
        with pytest.raises(ValueError, match="segment scalars must not be null"):
            raw(scalars=0)
    with pytest.raises(ValueError, match="dtype code"):
        raw(codes=(7, 0, 0))
    with pytest.raises(ValueError, match="grad dtype"):
        raw(codes=(1, 2, 0))
    with pytest.raises(ValueError, match="state dtype"):
        raw(codes=(0, 0, 2))
    # float64 parameters: float64 gradients and states, no master weights; float64 states and gradients for them only.
    with pytest.raises(ValueError, match=r"grad dtype code 0 must be 3 \(float64\) with float64 parameters"):
        raw(codes=(3, 0, 3))
    with pytest.raises(ValueError, match=r"state dtype code 1 must be 3 \(float64\) with float64 parameters"):
        raw(codes=(3, 3, 1))
    with pytest.raises(ValueError, match=r"master weights are for 16-bit parameters \(param dtype code 3 is float64"):
        raw(codes=(3, 3, 3), master=g.data_ptr(), mode=1)
    # Param modes (param_io.h): master weights with mode 1 only, a Kahan compensation with mode 2 only, 16-bit
    # parameters only, stochastic rounding for bfloat16 only.
    with pytest.raises(ValueError, match="master pointer given with param mode 0"):
        raw(codes=(1, 0, 0), master=g.data_ptr())
    with pytest.raises(ValueError, match="compensation pointer null with param mode 2"):
        raw(codes=(1, 0, 0), mode=2)
    with pytest.raises(ValueError, match="param mode 2 is for 16-bit parameters"):
        raw(comp=g.data_ptr(), mode=2)
    with pytest.raises(ValueError, match=r"stochastic rounding \(param mode 3\) is for bfloat16"):
        raw(codes=(2, 0, 0), mode=3)
    with pytest.raises(ValueError, match="Invalid param mode 5"):
        raw(mode=5)
    with pytest.raises(ValueError, match="float64 states are for float64 parameters"):
        raw(codes=(0, 0, 3))
    with pytest.raises(ValueError, match="grad dtype code 3 must equal the param dtype code 1"):
        raw(codes=(1, 3, 0))
    with pytest.raises(ValueError, match="element count"):
        raw(n=-1)
    for name in states:
        with pytest.raises(ValueError, match=f"{name} pointer is null"):
            raw(null=name)
    with pytest.raises(ValueError, match="hyperparameter count"):
        raw(values=values[:-1])
    with pytest.raises(ValueError, match="outside the buffer"):
        raw(n=n - 1)
    assert torch.equal(p, before)
    assert table.steps.tolist() == [0.0], "a rejected call counted a step"


def test_c_boundary_rejects_bad_global_arguments():
    p = torch.randn(64)
    with pytest.raises(ValueError, match="dtype code"):
        _C.sum_of_squares(p.data_ptr(), p.numel(), 4)
    with pytest.raises(ValueError, match="threads"):
        _C.set_num_threads(0)


def test_python_validation_names_the_argument():
    table = Segments.packed([32])
    n = table.total
    p, g = torch.randn(n), torch.randn(n)
    m, v = (torch.rand(n) + 0.1 for _ in range(2))
    # The example's default configuration keeps two states; a later slot is kept only in some configurations.
    names = EXAMPLE.state_names({})
    slots = [s.name for s in EXAMPLE.cls.spec.states]
    conditional = next(name for name in slots if name not in names)
    keeps_it = next(c.kwargs for c in EXAMPLE.cases if conditional in EXAMPLE.state_names(c.kwargs))
    hyper = EXAMPLE.hyper({})

    def update(param, grad, states, hyper=hyper):
        states = list(states) + [None] * (len(slots) - len(states))
        functional.update(EXAMPLE.kernel, param, grad, states, None, table, hyper=hyper, lr=1e-3, backend="cpu")

    with pytest.raises(ValueError, match=f"{names[1]}: numel"):
        update(p, g, [m, torch.randn(n + 1)])
    with pytest.raises(TypeError, match="grad dtype"):
        update(p.bfloat16(), g.half(), [m, v])
    with pytest.raises(TypeError, match=f"{names[1]} dtype"):
        update(p, g, [m, v.bfloat16()])
    with pytest.raises(ValueError, match="not contiguous"):
        update(torch.randn(2 * n)[::2], g, [m, v])
    with pytest.raises(ValueError, match="1-D"):
        update(p.view(n // 8, 8), g, [m, v])
    with pytest.raises(ValueError, match=conditional):
        update(p, g, [m, v], hyper=EXAMPLE.hyper(keeps_it))
    with pytest.raises(ValueError, match="missing"):
        first = next(iter(hyper))
        update(p, g, [m, v], hyper={first: hyper[first]})
    with pytest.raises(ValueError, match="share memory"):
        update(p, g, [m, m])
    with pytest.raises(ValueError, match="algorithm"):
        functional.update("bogus", p, g, [m, v, None], None, table, hyper=hyper, lr=1e-3, backend="cpu")
    # float64 parameters take float64 gradients and states only, and float64 states belong to float64 parameters.
    d, dm, dv = p.double(), m.double(), v.double()
    with pytest.raises(TypeError, match="Invalid grad dtype: torch.float32 \\(expected torch.float64 like param\\)"):
        update(d, g, [dm, dv])
    with pytest.raises(TypeError, match=f"Invalid {names[0]} dtype: torch.float32 \\(expected torch.float64"):
        update(d, g.double(), [m, v])
    with pytest.raises(TypeError, match=f"Invalid {names[0]} dtype: torch.float64 \\(expected torch.float32 or "):
        update(p, g, [dm, dv])
    with pytest.raises(TypeError, match="Invalid grad dtype: torch.float64"):
        update(p, g.double(), [m, v])
    assert table.steps.tolist() == [0.0]


def test_tensor_hyperparameters_and_empty_buffers():
    table, ref_table = Segments.packed([50]), Segments.packed([50])
    n = table.total
    gen = torch.Generator().manual_seed(5)
    p, g = _sym(n, gen), _sym(n, gen)
    names = EXAMPLE.state_names({})
    states = [warm_state(name, n, gen) if name in names else None for name in
              (s.name for s in EXAMPLE.cls.spec.states)]
    P, ref_states = p.clone(), [None if t is None else t.clone() for t in states]
    hyper = EXAMPLE.hyper({})
    functional.update(EXAMPLE.kernel, p, g, states, None, table, hyper=hyper, lr=torch.tensor(1e-2),
                      grad_scale=torch.tensor(0.5), backend="cpu")
    functional.update(EXAMPLE.kernel, P, g, ref_states, None, ref_table, hyper=hyper, lr=1e-2, grad_scale=0.5,
                      backend="reference")
    assert_close(p, P, F32)
    e = torch.empty(0)
    empty = Segments.packed([0])
    functional.update(EXAMPLE.kernel, e, e.clone(), [None if t is None else e.clone() for t in states], None, empty,
                      hyper=hyper, lr=1e-2, backend="cpu")
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
    assert info["cpu_isa"] == _C.cpu_isa()
