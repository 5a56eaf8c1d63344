"""CPU kernels against the reference where one term (LAMB's eps, the trust ratio of a zero parameter, which of Rprop's
step-size bounds wins when they are inverted) changes the result far beyond the fp32 tolerance: each test catches a
tools/mutate.py mutant the other kernel tests let through.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from tolerances import assert_close, tolerance
from torch import Tensor

pytest.importorskip("fusedopt._kernels")
from fusedopt import _C, functional  # noqa: E402
from fusedopt.flat import Segments  # noqa: E402

F32 = torch.float32
STEPS = 3
# A term that matters moves some element by this many times the fp32 tolerance (atol + rtol*|value|).
SENSITIVITY = 100.0

LAMB = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-6, "weight_decay": 0.0, "bias_correction": True,
        "max_trust_ratio": None, "maximize": False}
RPROP = {"lr": 1e-2, "etaminus": 0.5, "etaplus": 1.2, "step_size_min": 1e-6, "step_size_max": 50.0, "maximize": False}


@dataclass(frozen=True)
class Row:
    """`hyper` (every field of the math header, plus lr) makes `term` matter; `neutral` is the same with the term
    removed. Gradients and first moments are N(0, scale^2), second moments scale^2 * U(0.1, 1.1). The test first
    checks on the reference that the term matters, so that a row cannot quietly stop testing anything."""

    id: str
    algorithm: str
    term: str
    hyper: dict[str, Any]
    neutral: dict[str, Any]
    scale: float = 1.0
    sizes: list[int] = field(default_factory=lambda: [100, 4097])


ROWS = [
    # eps is added to sqrt(v_hat): with the default 1e-6 and moments of order 1 it changes u by ~1e-6 relative, below
    # the tolerance. Gradients of 1e-2 and eps 1e-2 make it half of the denominator.
    Row("lamb-eps", "lamb", "eps", dict(LAMB, eps=1e-2), dict(LAMB, eps=0.0), scale=1e-2),
    # torch does not check step_sizes: with min > max, torch.clamp_(step_size, min, max) gives max everywhere. Which
    # bound wins shows only then; the neutral row has the same bounds the right way round.
    Row("rprop-inverted-step-sizes", "rprop", "step_size_max winning over a larger step_size_min",
        dict(RPROP, step_size_min=1e-2, step_size_max=1e-3), dict(RPROP, step_size_min=1e-3, step_size_max=1e-2)),
]


def _states(algorithm: str, n: int, scale: float, gen: torch.Generator) -> list[Tensor]:
    """Random states in the algorithm's slot order: second-moment-like ones (name ending in _sq) positive, step sizes
    positive (1e-3 to 1.1e-2)."""
    out = []
    for name in _C.algorithms()[algorithm]["states"]:
        if name.endswith("_sq"):
            out.append(scale * scale * (torch.rand(n, generator=gen) + 0.1))
        elif name == "step_size":
            out.append(1e-2 * (torch.rand(n, generator=gen) + 0.1))
        else:
            out.append(scale * torch.randn(n, generator=gen))
    return out


def _step(backend: str, algorithm: str, param: Tensor, grad: Tensor, states: list[Tensor], table: Segments,
          hyper: dict[str, Any]) -> None:
    kw = dict(hyper)
    lr = kw.pop("lr")
    functional.update(algorithm, param, grad, states, None, table, hyper=kw, lr=lr, backend=backend)


def _distance(a: Tensor, b: Tensor) -> float:
    """The largest difference between a and b, in units of the fp32 tolerance."""
    tol = tolerance(F32)
    return float(((a - b).abs() / (tol["atol"] + tol["rtol"] * b.abs())).max())


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id) for r in ROWS])
def test_kernel_matches_reference_where_the_term_matters(row: Row) -> None:
    gen = torch.Generator().manual_seed(2024)
    table, ref_table, neutral_table = (Segments.packed(row.sizes) for _ in range(3))
    n = table.total
    param = torch.randn(n, generator=gen)
    states = _states(row.algorithm, n, row.scale, gen)
    for step in range(1, STEPS + 1):
        grad = row.scale * torch.randn(n, generator=gen)
        ref_param, ref_states = param.clone(), [s.clone() for s in states]
        neutral_param, neutral_states = param.clone(), [s.clone() for s in states]
        _step("reference", row.algorithm, ref_param, grad, ref_states, ref_table, row.hyper)
        _step("reference", row.algorithm, neutral_param, grad, neutral_states, neutral_table, row.neutral)
        assert _distance(neutral_param, ref_param) > SENSITIVITY, f"{row.term} does not matter in this row"

        _step("cpu", row.algorithm, param, grad, states, table, row.hyper)
        assert_close(param, ref_param, F32, msg=f"{row.id} step {step}: param")
        for name, s, r in zip(_C.algorithms()[row.algorithm]["states"], states, ref_states):
            assert_close(s, r, F32, msg=f"{row.id} step {step}: {name}")


def test_lamb_zero_parameter_takes_the_plain_step() -> None:
    """A parameter that is all zeros (a freshly initialised bias) has ||p|| = 0, so its trust ratio is 1 and it moves
    by lr * u: neither stays at 0 nor becomes nan. Next to it, random parameters with their own ratios."""
    gen = torch.Generator().manual_seed(7)
    sizes = [33, 100, 17]
    table, ref_table = Segments.packed(sizes), Segments.packed(sizes)
    n = table.total
    param = torch.randn(n, generator=gen)
    zero = slice(int(table.offsets[0]), int(table.offsets[0]) + sizes[0])
    param[zero] = 0
    states = [torch.zeros(n), torch.zeros(n)]
    ref_param, ref_states = param.clone(), [s.clone() for s in states]
    grad = torch.randn(n, generator=gen)
    _step("cpu", "lamb", param, grad, states, table, LAMB)
    _step("reference", "lamb", ref_param, grad, ref_states, ref_table, LAMB)
    assert bool((ref_param[zero] != 0).all()), "the reference left the zero parameter in place"
    assert_close(param, ref_param, F32, msg="param")
    for s, r in zip(states, ref_states):
        assert_close(s, r, F32)
