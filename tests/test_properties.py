"""Property tests: random classes, hyperparameters (each row's ranges in tests/cases.py, mapped to kernel fields by the
class's spec), segment layouts with parameters that have no gradient on some steps, dtypes and master weights; every
compiled CPU kernel against the reference backend on the same flat buffers, parameters and every state compared after
each step."""
from __future__ import annotations

from typing import Any

import fusedopt
import pytest
import torch
from cases import ROWS, Algorithm, Range
from fusedopt import functional
from fusedopt.flat import Segments
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tolerances import assert_close, assert_update_close

COMPILED = "cpu" in fusedopt.build_info()["backends"]
pytestmark = pytest.mark.skipif(not COMPILED, reason="compiled CPU backend not built")

F64 = torch.float64
PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": F64}
STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # float64 parameters: float64 states, no master
# The rows drawn: two-pass kernels (per-segment reductions, what random segment layouts exercise most) four times as
# often as the others.
DRAWN = ROWS + [row for row in ROWS if COMPILED and row.two_pass] * 3


def strategy(spec: Any) -> st.SearchStrategy:
    """A hypothesis strategy for one entry of a row's `ranges`: a Range of floats, a list of alternatives, a tuple
    of specs (betas), or a plain value."""
    if isinstance(spec, Range):
        return st.floats(spec.low, spec.high)
    if isinstance(spec, list):
        return st.one_of(*[strategy(s) for s in spec])
    if isinstance(spec, tuple):
        return st.tuples(*[strategy(s) for s in spec])
    return st.just(spec)


def layouts() -> st.SearchStrategy:
    """Segment sizes: one or two long segments (several work chunks each) or up to 40 short ones, some empty."""
    return st.one_of(st.lists(st.integers(1, 70_000), min_size=1, max_size=2),
                     st.lists(st.integers(0, 5000), min_size=1, max_size=40))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    row=st.sampled_from(DRAWN),
    data=st.data(),
    sizes=layouts(),
    param_dtype=st.sampled_from(sorted(PARAM_DTYPES)),
    state_dtype=st.sampled_from(sorted(STATE_DTYPES)),
    use_master=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_compiled_kernels_match_the_reference(row: Algorithm, data, sizes, param_dtype, state_dtype, use_master,
                                              seed) -> None:
    kwargs = data.draw(st.fixed_dictionaries({k: strategy(v) for k, v in row.ranges.items()}), label="kwargs")
    group = row.group(kwargs)
    row.cls.spec.validate(group)  # the ranges only produce valid configurations
    hyper, lr = row.hyper(kwargs), group["lr"]
    kept = row.kept_states(kwargs)
    pdt, sdt = PARAM_DTYPES[param_dtype], STATE_DTYPES[state_dtype]
    if pdt == F64:
        sdt = F64
    use_master = use_master and pdt not in (torch.float32, F64)
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total = (total + size + 31) // 32 * 32
    total = max(total, 1)
    gen = torch.Generator().manual_seed(seed)
    init = torch.randn(total, generator=gen, dtype=F64 if pdt == F64 else torch.float32)
    sides = []
    for _ in range(2):
        master = init.clone() if use_master else None
        states = {s.name: torch.full((total,), s.fill(group), dtype=sdt) for s in kept}
        sides.append((init.to(pdt).clone(), master, states))  # .to() of the same dtype returns init itself
    tables = [Segments(offsets, sizes, torch.device("cpu")) for _ in sides]
    for table in tables:
        row.fill_scalars(table, lr)
    for step in range(1, 4):
        grad = torch.randn(total, generator=gen, dtype=F64 if pdt == F64 else torch.float32).to(pdt)
        param_before = sides[1][0].to(F64 if pdt == F64 else torch.float32).clone()
        master_before = sides[1][1].clone() if use_master else None
        for (param, master, states), backend, table in zip(sides, ("cpu", "reference"), tables):
            for k in range(len(sizes)):  # a different subset of parameters has a gradient at every step
                table.flags[k] = int((k + step) % 4 != 0)
            slots = [states.get(s.name) for s in row.cls.spec.states]
            functional.update(row.kernel, param, grad, slots, master, table, hyper=hyper, lr=lr, backend=backend)
        expected_steps = [float(sum((k + t) % 4 != 0 for t in range(1, step + 1))) for k in range(len(sizes))]
        assert tables[0].steps.tolist() == tables[1].steps.tolist() == expected_steps
        (p_cpu, m_cpu, s_cpu), (p_ref, m_ref, s_ref) = sides
        # Each step starts from equal sides (synchronised below), but a one-ulp difference inside it (the
        # reference's torch ops fuse some multiply-adds; two-pass kernels sum squares in another order) is amplified
        # where a ratio such as g / (sqrt(v) + eps) has a small denominator.
        fp32_tol = "fp32_trajectory"
        tol = fp32_tol if pdt == torch.float32 else pdt  # float64 all through: to float64 rounding
        if pdt != F64:
            p_cpu, p_ref = p_cpu.float(), p_ref.float()
        if row.sign_update:  # sign(c) flips where c is within rounding of 0: compare the rest
            keep = (p_cpu - p_ref).abs() <= 3 * lr
            assert keep.float().mean() > 0.99
            p_cpu, p_ref = p_cpu[keep], p_ref[keep]
            if use_master:
                m_cpu, m_ref = m_cpu[keep], m_ref[keep]
        # LAMB's direction reads the stored moments: with bf16 states their rounding boundaries show in the update
        # (see tolerances.assert_update_close).
        rounded_direction = row.two_pass and sdt == torch.bfloat16
        if rounded_direction:
            assert_update_close(p_cpu, p_ref, param_before, torch.bfloat16, msg=f"{row.name} param, step {step}",
                                stored=pdt)
        else:
            assert_close(p_cpu, p_ref, tol, msg=f"{row.name} param, step {step}")
        if use_master and rounded_direction:
            assert_update_close(m_cpu, m_ref, master_before, torch.bfloat16, msg=f"{row.name} master, step {step}")
        elif use_master:
            assert_close(m_cpu, m_ref, fp32_tol, msg=f"{row.name} master, step {step}")
        for name in s_cpu:
            state_tol = sdt if sdt != torch.float32 else fp32_tol
            assert_close(s_cpu[name], s_ref[name], state_tol, msg=f"{row.name} {name}, step {step}")
        if tables[0].scalars is not None:  # computed in double and stored as float32 on both sides
            assert torch.equal(tables[0].scalars, tables[1].scalars), f"{row.name} scalar states, step {step}"
        # The next step starts from equal sides: a 16-bit value one ulp apart would otherwise carry into every
        # later step, and only one step's rounding is under test.
        (param, master, states), (ref_param, ref_master, ref_states) = sides
        ref_param.copy_(param)
        if use_master:
            ref_master.copy_(master)
        for name in states:
            ref_states[name].copy_(states[name])
