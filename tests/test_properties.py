"""Property tests: random sizes, segment layouts, dtypes and hyperparameters; every compiled CPU kernel against the
reference backend on the same flat buffers, parameters and every state compared after each step."""
from __future__ import annotations

import fusedopt
import pytest
import torch
from fusedopt import functional
from fusedopt.flat import Segments
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tolerances import assert_close

pytestmark = pytest.mark.skipif("cpu" not in fusedopt.build_info()["backends"],
                                reason="compiled CPU backend not built")

PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
unit = st.floats(0.5, 0.999)
small = st.floats(0.0, 0.2)


def _state_names(algorithm: str, hp: dict) -> list[str | None]:
    """The state slots of the configuration, in the kernel's order (None for a slot it does not keep)."""
    if algorithm == "adam":
        return ["exp_avg", "exp_avg_sq", "max_exp_avg_sq" if hp["amsgrad"] else None]
    if algorithm == "sgd":
        return ["momentum_buffer" if hp["momentum"] else None]
    if algorithm == "rmsprop":
        return ["square_avg", "momentum_buffer" if hp["momentum"] else None, "grad_avg" if hp["centered"] else None]
    return ["sum"] if algorithm == "adagrad" else ["exp_avg"]


HYPERPARAMETERS = {
    "adam": st.fixed_dictionaries(dict(lr=st.floats(1e-4, 5e-2), beta1=unit, beta2=unit, eps=st.floats(1e-8, 1e-3),
                                       weight_decay=small, amsgrad=st.booleans(), maximize=st.booleans(),
                                       decoupled=st.booleans())),
    "sgd": st.fixed_dictionaries(dict(lr=st.floats(1e-4, 5e-2), momentum=st.sampled_from([0.0, 0.5, 0.9]),
                                      dampening=st.floats(0.0, 0.5), weight_decay=small, nesterov=st.just(False),
                                      maximize=st.booleans())),
    "rmsprop": st.fixed_dictionaries(dict(lr=st.floats(1e-4, 1e-2), alpha=unit, eps=st.floats(1e-3, 1e-1),
                                          weight_decay=small, momentum=st.sampled_from([0.0, 0.5]),
                                          centered=st.booleans(), maximize=st.booleans())),
    "adagrad": st.fixed_dictionaries(dict(lr=st.floats(1e-4, 5e-2), lr_decay=small, eps=st.floats(1e-10, 1e-3),
                                          weight_decay=small, maximize=st.booleans())),
    "lion": st.fixed_dictionaries(dict(lr=st.floats(1e-4, 1e-2), beta1=unit, beta2=unit, weight_decay=small,
                                       maximize=st.booleans())),
}


def _call(algorithm: str, backend: str, param, grad, states: dict, master, hp: dict, segments: Segments) -> None:
    hyper = dict(hp)
    lr = hyper.pop("lr")
    slots = [states.get(name) if name else None for name in _state_names(algorithm, hp)]
    functional.update(algorithm, param, grad, slots, master, segments, hyper=hyper, lr=lr, backend=backend)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    algorithm=st.sampled_from(sorted(HYPERPARAMETERS)),
    data=st.data(),
    n=st.integers(1, 70_000),
    param_dtype=st.sampled_from(sorted(PARAM_DTYPES)),
    state_dtype=st.sampled_from(sorted(STATE_DTYPES)),
    use_master=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_compiled_kernels_match_the_reference(algorithm, data, n, param_dtype, state_dtype, use_master, seed) -> None:
    hp = data.draw(HYPERPARAMETERS[algorithm])
    pdt, sdt = PARAM_DTYPES[param_dtype], STATE_DTYPES[state_dtype]
    use_master = use_master and pdt != torch.float32
    gen = torch.Generator().manual_seed(seed)
    init = torch.randn(n, generator=gen)
    sides = []
    for _ in range(2):
        master = init.clone() if use_master else None
        states = {name: torch.zeros(n, dtype=sdt) for name in _state_names(algorithm, hp) if name}
        sides.append((init.to(pdt).clone(), master, states))  # .to() of the same dtype returns init itself
    tables = [Segments([0], [n], torch.device("cpu")) for _ in sides]
    for table in tables:
        table.set_all_active(True)
    for step in range(1, 4):
        grad = torch.randn(n, generator=gen).to(pdt)
        for (param, master, states), backend, table in zip(sides, ("cpu", "reference"), tables):
            _call(algorithm, backend, param, grad, states, master, hp, table)
        assert tables[0].steps.tolist() == tables[1].steps.tolist() == [float(step)]
        (p_cpu, m_cpu, s_cpu), (p_ref, m_ref, s_ref) = sides
        tol = "fp32" if pdt == torch.float32 and sdt == torch.float32 else (sdt if pdt == torch.float32 else pdt)
        if algorithm == "lion":  # sign(c) flips where c is within rounding of 0: compare the rest
            keep = (p_cpu.float() - p_ref.float()).abs() <= 3 * hp["lr"]
            assert keep.float().mean() > 0.99
            p_cpu, p_ref = p_cpu[keep], p_ref[keep]
        assert_close(p_cpu.float(), p_ref.float(), tol, msg=f"{algorithm} param, step {step}")
        if use_master and algorithm != "lion":
            assert_close(m_cpu, m_ref, tol, msg=f"{algorithm} master, step {step}")
        for name in s_cpu:
            assert_close(s_cpu[name].float(), s_ref[name].float(), sdt if sdt != torch.float32 else tol,
                         msg=f"{algorithm} {name}, step {step}")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=40), seed=st.integers(0, 2**31 - 1),
       weight_decay=small, max_trust_ratio=st.one_of(st.none(), st.floats(0.1, 10.0)), bias_correction=st.booleans())
def test_lamb_segments_match_the_reference(sizes, seed, weight_decay, max_trust_ratio, bias_correction) -> None:
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total = (total + size + 31) // 32 * 32
    total = max(total, 1)
    gen = torch.Generator().manual_seed(seed)
    init = torch.randn(total, generator=gen)
    sides = [(init.clone(), torch.zeros(total), torch.zeros(total)) for _ in range(2)]
    tables = [Segments(offsets, sizes, torch.device("cpu")) for _ in sides]
    hyper = dict(beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=weight_decay, bias_correction=bias_correction,
                 max_trust_ratio=max_trust_ratio, maximize=False)
    for step in range(1, 4):
        grad = torch.randn(total, generator=gen)
        for (param, m, v), backend, table in zip(sides, ("cpu", "reference"), tables):
            for k in range(len(sizes)):  # a different subset of parameters has a gradient at every step
                table.flags[k] = int((k + step) % 4 != 0)
            functional.update("lamb", param, grad, [m, v], None, table, hyper=hyper, lr=1e-2, backend=backend)
        assert torch.equal(tables[0].steps, tables[1].steps)
        for a, b in zip(sides[0], sides[1]):
            assert_close(a, b, "fp32_trajectory", msg=f"lamb step {step}")
