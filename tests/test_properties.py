"""Property tests: random sizes, segment layouts, dtypes and hyperparameters; every compiled CPU kernel against the
reference backend on the same flat buffers, parameters and every state compared after each step."""
from __future__ import annotations

import fusedopt
import pytest
import torch
from fusedopt import functional
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tolerances import assert_close

pytestmark = pytest.mark.skipif("cpu" not in fusedopt.build_info()["backends"],
                                reason="compiled CPU backend not built")

PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
unit = st.floats(0.5, 0.999)
small = st.floats(0.0, 0.2)


def _state_names(algorithm: str, hp: dict) -> list[str]:
    if algorithm == "adam":
        return ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if hp["amsgrad"] else [])
    if algorithm == "sgd":
        return ["momentum_buffer"] if hp["momentum"] else []
    if algorithm == "rmsprop":
        optional = [("momentum_buffer", hp["momentum"]), ("grad_avg", hp["centered"])]
        return ["square_avg"] + [name for name, used in optional if used]
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


def _call(algorithm: str, backend: str, param, grad, states: dict, master, hp: dict, step: int) -> None:
    if algorithm == "adam":
        functional.adam(param, grad, states["exp_avg"], states["exp_avg_sq"], states.get("max_exp_avg_sq"), master,
                        step=step, backend=backend, **hp)
    elif algorithm == "sgd":
        functional.sgd(param, grad, states.get("momentum_buffer"), master, first_step=step == 1, backend=backend, **hp)
    elif algorithm == "rmsprop":
        functional.rmsprop(param, grad, states["square_avg"], states.get("momentum_buffer"), states.get("grad_avg"),
                           master, backend=backend, **hp)
    elif algorithm == "adagrad":
        functional.adagrad(param, grad, states["sum"], master, step=step, backend=backend, **hp)
    else:
        functional.lion(param, grad, states["exp_avg"], master, backend=backend, **hp)


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
        states = {name: torch.zeros(n, dtype=sdt) for name in _state_names(algorithm, hp)}
        sides.append((init.to(pdt).clone(), master, states))  # .to() of the same dtype returns init itself
    for step in range(1, 4):
        grad = torch.randn(n, generator=gen).to(pdt)
        for (param, master, states), backend in zip(sides, ("cpu", "reference")):
            _call(algorithm, backend, param, grad, states, master, hp, step)
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
    seg_offsets, seg_numels = torch.tensor(offsets, dtype=torch.int64), torch.tensor(sizes, dtype=torch.int64)
    sides = [(init.clone(), torch.zeros(total), torch.zeros(total)) for _ in range(2)]
    for step in range(1, 4):
        grad = torch.randn(total, generator=gen)
        for (param, m, v), backend in zip(sides, ("cpu", "reference")):
            functional.lamb(param, grad, m, v, None, seg_offsets, seg_numels, step=step, lr=1e-2, beta1=0.9,
                            beta2=0.99, eps=1e-6, weight_decay=weight_decay, bias_correction=bias_correction,
                            max_trust_ratio=max_trust_ratio, maximize=False, backend=backend)
        for a, b in zip(sides[0], sides[1]):
            assert_close(a, b, "fp32_trajectory", msg=f"lamb step {step}")
