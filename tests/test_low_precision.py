"""bf16/fp16 parameters without fp32 master weights: master_weights="kahan" (a 16-bit compensation buffer carries each
update's rounding error into the next) and master_weights="stochastic" (unbiased stochastic rounding of bfloat16
parameters, keyed on (seed, step, element)). The kernels against the reference backend (the same bits for stochastic
rounding), the statistics each mode promises, and the optimizer-level plumbing (state, checkpoints, validation)."""
from __future__ import annotations

import io
from typing import Any

import fusedopt
import pytest
import torch
from fusedopt import functional, reference
from fusedopt.flat import Segments
from torch import nn

pytestmark = pytest.mark.skipif("cpu" not in fusedopt.build_info()["backends"], reason="compiled CPU backend not built")

BF16_ULP_AT_ONE = 2.0**-7
NUMELS = [4096, 37, 20000]


def sgd_step(param: torch.Tensor, grad: torch.Tensor, segments: Segments, backend: str, lr: float = 1.0, **storage: Any
             ) -> None:
    functional.update("sgd", param, grad, [None], None, segments, backend=backend, lr=lr,
                      hyper=dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
                      **storage)


def packed(numels: list[int]) -> tuple[Segments, int]:
    segments = Segments.packed(numels)
    segments.set_all_active(True)
    return segments, int(segments.offsets[-1] + segments.numels[-1])


# Stochastic rounding ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm,hyper,states", [
    ("adam", dict(beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, amsgrad=False, maximize=False, decoupled=True), 2),
    ("sgd", dict(momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True, maximize=False), 1),
    ("lion", dict(beta1=0.9, beta2=0.99, weight_decay=0.1, maximize=False), 1),
])
def test_stochastic_rounding_kernel_writes_the_reference_bits(algorithm: str, hyper: dict[str, Any], states: int
                                                              ) -> None:
    """Same seed, same steps: the CPU kernel and the reference write the same bf16 bits (their fp32 updates agree
    bit for bit for these algorithms, and the random bits are one hash of (seed, step, segment, element))."""
    segments_pair = [packed(NUMELS) for _ in range(2)]
    total = segments_pair[0][1]
    generator = torch.Generator().manual_seed(0)
    param = torch.randn(total, generator=generator).bfloat16()
    grads = [torch.randn(total, generator=generator).bfloat16() for _ in range(4)]
    warm = [torch.rand(total, generator=generator) * 0.01 for _ in range(states)]
    results = []
    for backend, (segments, _) in zip(("cpu", "reference"), segments_pair):
        p = param.clone()
        slots = [w.clone() for w in warm] + [None] * (algorithm == "adam")  # Adam's max_exp_avg_sq slot
        for g in grads:
            functional.update(algorithm, p, g, slots, None, segments, hyper=hyper, lr=1e-2, backend=backend,
                              rounding_seed=12345)
        results.append(p)
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], param)


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour() -> None:
    """1 + d rounds to 1 + ulp with probability d/ulp and to 1 otherwise, for any d: over 200,000 elements the share
    rounded up is within 4 standard deviations of d/ulp, and the mean is 1 + d. Rounding to nearest would lose the
    update entirely (d < ulp/2)."""
    segments, total = packed([200_000])
    for fraction in (1 / 8, 0.3, 0.75):
        param = torch.ones(total, dtype=torch.bfloat16)
        grad = torch.full((total,), -fraction * BF16_ULP_AT_ONE)  # p - lr*g = 1 + fraction*ulp, exact in fp32
        sgd_step(param, grad, segments, "cpu", rounding_seed=7)
        values = param.float()
        up = values == 1 + BF16_ULP_AT_ONE
        assert bool((up | (values == 1.0)).all())
        share = float(up.double().mean())
        sigma = (fraction * (1 - fraction) / total) ** 0.5
        assert abs(share - fraction) < 4 * sigma, (fraction, share)
    nearest = torch.ones(total, dtype=torch.bfloat16)
    sgd_step(nearest, torch.full((total,), -BF16_ULP_AT_ONE / 8), segments, "cpu")
    assert bool((nearest == 1.0).all())


def test_stochastic_rounding_depends_on_seed_step_and_element() -> None:
    segments, total = packed([50_000])
    grad = torch.full((total,), -0.5 * BF16_ULP_AT_ONE)

    def run(seed: int, steps: int = 1) -> torch.Tensor:
        seg, _ = packed([50_000])
        p = torch.ones(total, dtype=torch.bfloat16)
        for _ in range(steps):
            sgd_step(p, grad, seg, "cpu", lr=0.0 if steps > 1 and _ == 0 else 1.0, rounding_seed=seed)
        return p

    first = run(1)
    assert torch.equal(first, run(1))  # reproducible
    assert not torch.equal(first, run(2))  # another seed
    assert not torch.equal(first, run(1, steps=2))  # the same update at step 2 draws other bits
    # Within one call, elements draw independent bits: neighbours agree about half the time.
    agree = float((first[1:] == first[:-1]).double().mean())
    assert 0.45 < agree < 0.55


def test_stochastic_reference_rounding_matches_its_definition() -> None:
    """The reference's bit trick against the definition: round up with probability (v - down) / (up - down)."""
    values = torch.tensor([1.0 + 2**-10, -3.0 - 2**-9, 1e-30, 65504.5, float("inf"), float("nan")])
    rounded = torch.stack([reference.stochastic_round_bf16(values, key, 0).float() for key in range(2000)])
    for k in range(4):
        down = values[k].to(torch.bfloat16).float()
        down = down if abs(float(down)) <= abs(float(values[k])) else torch.nextafter(
            down.to(torch.bfloat16), torch.tensor(0.0, dtype=torch.bfloat16)).float()
        candidates = set(rounded[:, k].tolist())
        assert len(candidates) <= 2 and float(down) in candidates, (k, candidates)
        assert float(rounded[:, k].double().mean()) == pytest.approx(float(values[k]), rel=2**-10, abs=1e-33)
    assert bool(torch.isinf(rounded[:, 4]).all()) and bool(torch.isnan(rounded[:, 5]).all())


# Kahan compensation -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kahan_carries_updates_below_half_an_ulp(dtype: torch.dtype) -> None:
    """Updates of 1/8 ulp each: rounding to nearest loses every one of them; with the compensation, param + comp
    follows the float64 sum of the updates to within the compensation's own rounding (16-bit, of the residual), and
    the parameter itself moves once the carried error passes half an ulp."""
    segments, total = packed([1000])
    ulp = float(torch.finfo(dtype).eps)
    generator = torch.Generator().manual_seed(3)
    start = (1 + torch.rand(total, generator=generator) * 0.5).to(dtype)
    param, comp = start.clone(), torch.zeros(total, dtype=dtype)
    nearest = start.clone()
    exact = start.double()
    for _ in range(64):
        update = torch.rand(total, generator=generator) * ulp / 8
        sgd_step(param, -update, segments, "cpu", comp=comp)
        sgd_step(nearest, -update, segments, "cpu")
        exact += update.double()
    carried = param.double() + comp.double()
    assert float((carried - exact).abs().max()) < 2 * ulp * ulp  # the residual's own 16-bit rounding, a few times
    assert float((nearest.double() - exact).abs().max()) > 2 * ulp  # nearest lost about 4 ulp of updates
    assert bool((param.double() > start.double()).all())


@pytest.mark.parametrize("algorithm,hyper,states", [
    ("adam", dict(beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, amsgrad=False, maximize=False, decoupled=True), 2),
    ("lamb", dict(beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.01, max_trust_ratio=10.0, maximize=False,
                  bias_correction=True), 2),
])
def test_kahan_kernel_follows_the_reference(algorithm: str, hyper: dict[str, Any], states: int) -> None:
    """The CPU kernel against the reference: param + comp agree to the precision the pair carries, about 16
    significant bits (when the two fp32 values differ by an ulp, the split may fall on the other side of a rounding
    boundary, and the residuals round to bf16 differently: 2^-9 of half an ulp of p, 2^-17 of p)."""
    generator = torch.Generator().manual_seed(1)
    total = packed(NUMELS)[1]
    param = torch.randn(total, generator=generator).bfloat16()
    grads = [torch.randn(total, generator=generator).bfloat16() for _ in range(3)]
    warm = [torch.rand(total, generator=generator) * 0.01 for _ in range(states)]
    if algorithm == "lamb":
        hyper = {k: v for k, v in hyper.items() if k in fusedopt._C.algorithms()["lamb"]["fields"]}
    carried = []
    for backend in ("cpu", "reference"):
        segments, _ = packed(NUMELS)
        p, comp = param.clone(), torch.zeros(total, dtype=torch.bfloat16)
        slots = [w.clone() for w in warm] + [None] * (algorithm == "adam")  # Adam's max_exp_avg_sq slot
        for g in grads:
            functional.update(algorithm, p, g, slots, None, segments, hyper=hyper, lr=1e-2, backend=backend,
                              comp=comp)
        carried.append(p.float() + comp.float())
    torch.testing.assert_close(carried[0], carried[1], rtol=2**-15, atol=1e-6)


# The optimizers ---------------------------------------------------------------------------------------------------

def test_kahan_state_and_checkpoint_roundtrip() -> None:
    torch.manual_seed(0)
    model = nn.Linear(16, 8).bfloat16()
    opt = fusedopt.AdamW(model.parameters(), lr=1e-3, master_weights="kahan")
    for _ in range(3):
        model(torch.randn(4, 16, dtype=torch.bfloat16)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    state = opt.state[model.weight]
    assert set(state) == {"step", "exp_avg", "exp_avg_sq", "kahan_comp"}
    assert state["kahan_comp"].dtype == torch.bfloat16 and state["kahan_comp"].shape == model.weight.shape
    assert float(state["kahan_comp"].abs().sum()) > 0
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    twin = nn.Linear(16, 8).bfloat16()
    twin.load_state_dict(model.state_dict())
    resumed = fusedopt.AdamW(twin.parameters(), lr=1e-3, master_weights="kahan")
    resumed.load_state_dict(saved)
    assert torch.equal(resumed.state[twin.weight]["kahan_comp"], state["kahan_comp"])
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    for m, o in ((model, opt), (twin, resumed)):
        m(x).square().mean().backward()
        o.step()
    assert torch.equal(model.weight, twin.weight)
    # torch.optim reads the checkpoint too (it ignores the compensation).
    torch_opt = torch.optim.AdamW(nn.Linear(16, 8).bfloat16().parameters(), lr=1e-3)
    torch_opt.load_state_dict(saved)


def test_a_parameter_written_in_place_drops_its_compensation() -> None:
    p = nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    opt = fusedopt.SGD([p], lr=1.0, master_weights="kahan")
    p.grad = torch.full((64,), -BF16_ULP_AT_ONE / 4, dtype=torch.bfloat16)
    opt.step()
    assert float(opt.state[p]["kahan_comp"].float().sum()) > 0
    with torch.no_grad():
        p.fill_(2.0)
    p.grad = torch.zeros(64, dtype=torch.bfloat16)
    opt.step()
    assert bool((p == 2.0).all()) and float(opt.state[p]["kahan_comp"].float().abs().sum()) == 0


def test_stochastic_optimizer_is_reproducible_under_manual_seed() -> None:
    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        p = nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        opt = fusedopt.SGD([p], lr=1e-3, master_weights="stochastic")
        assert opt.param_groups[0]["rounding_seed"] == seed
        for _ in range(3):
            p.grad = torch.full((4096,), -0.5, dtype=torch.bfloat16)
            opt.step()
        assert set(opt.state.get(p, {})) <= {"momentum_buffer"}  # no extra state
        return p.detach().clone()

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))
    # 3 steps of 5e-4 at 1.0 (ulp 2^-7): nearest keeps 1.0; stochastic moves the mean by about 1.5e-3.
    assert float(run(5).float().mean()) == pytest.approx(1 + 1.5e-3, abs=2e-4)


@pytest.mark.parametrize("kwargs,dtype,message", [
    ({"master_weights": "fp8"}, torch.bfloat16, "Invalid master_weights: 'fp8'"),
    ({"master_weights": "stochastic"}, torch.float16, "stochastic rounding is implemented for bfloat16"),
    ({"master_weights": "kahan"}, torch.float64, "for float64 parameters"),
    ({"rounding_seed": -1}, torch.bfloat16, "Invalid rounding_seed: -1"),
])
def test_invalid_modes_are_refused(kwargs: dict[str, Any], dtype: torch.dtype, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fusedopt.AdamW([nn.Parameter(torch.randn(4, dtype=dtype))], **kwargs)


def test_float32_parameters_ignore_the_modes() -> None:
    p = nn.Parameter(torch.randn(8))
    opt = fusedopt.AdamW([p], master_weights="kahan")
    p.grad = torch.randn(8)
    opt.step()
    assert "kahan_comp" not in opt.state[p]
