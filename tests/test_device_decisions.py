"""The step decided on the device: how a GPU step avoids waiting for the GPU.

On one CUDA device the step keeps AMP's found_inf, the global norm, the clip coefficient, skip_nonfinite's verdict and
the step counts in device tensors, and groups parameters into kernel calls by host-side step keys. Here that same
path runs on CPU tensors (`_device_decisions = True`), and on a GPU where one is present, and must give what the
host-decided step gives: same parameters, states, step counts, skipped-step count and norm, through AMP skips,
skip_nonfinite skips and parameters whose gradient comes and goes. The other GPU checks of this path (no
synchronisation, CUDA graphs) are in test_cuda_optim.py.
"""
from __future__ import annotations

import math
from typing import Any

import fusedopt
import pytest
import torch
from cases import EXAMPLE, ROWS
from tolerances import assert_close

COMPILED = "cpu" in fusedopt.build_info()["backends"]
BACKENDS = ["cpu", "reference"] if COMPILED else ["reference"]
CUDA = pytest.param("cuda", marks=[
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available"),
    pytest.mark.skipif("cuda" not in fusedopt.build_info()["backends"], reason="built without CUDA kernels"),
])
STEPS = 20
SCALE = 2.0**10
AMP_SKIPS = {0, 5, 12}  # GradScaler found inf on these steps (a first step too: AMP often skips those)
INF_GRADS = {8, 15}  # a gradient holds inf on these steps (only with skip_nonfinite)

# fusedopt's step-deciding options: AMP alone, clipping, skip_nonfinite (which also feeds inf gradients), both.
OPTIONS: dict[str, dict[str, Any]] = {
    "amp": {},
    "clip": dict(max_grad_norm=0.5),
    "skip": dict(skip_nonfinite=True),
    "clip-skip": dict(max_grad_norm=1.0, skip_nonfinite=True),
}


def _cases() -> dict[str, tuple[type, dict[str, Any]]]:
    """Two configurations per class: the case of its table that keeps the most states and its first case, the option
    sets rotating through the rows so that every class meets two of them and every option set several classes."""
    names = list(OPTIONS)
    out: dict[str, tuple[type, dict[str, Any]]] = {}
    for i, row in enumerate(ROWS):
        for j, case in enumerate((row.richest_case(), row.cases[0])):
            option = names[(i + 2 * j) % len(names)]
            out[f"{row.name}-{case.id}-{option}"] = (row.cls, {**case.kwargs, **OPTIONS[option]})
    return out


CASES = _cases()

SHAPES = [(7, 5), (33,), (4, 4, 3), (1,), (65,), (16, 9)]


def make_params(device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator, dtype=dtype).to(device).requires_grad_() for shape in SHAPES]


def has_grad(step: int, k: int) -> bool:
    """Parameter k skips some steps, so that parameters differ in which skipped steps they took part in."""
    return (step + k) % 4 != 0 or k == 0


def feed(params: list[torch.Tensor], opt: torch.optim.Optimizer, step: int, inf_grads: bool) -> None:
    """Give the parameters this step's (scaled) gradients and the optimizer GradScaler's tensors, as
    GradScaler.step does for an optimizer with `_step_supports_amp_scaling`."""
    generator = torch.Generator().manual_seed(1000 + step)
    for k, p in enumerate(params):
        grad = torch.randn(p.shape, generator=generator, dtype=p.dtype) * SCALE
        if inf_grads and step in INF_GRADS and k == 0:  # k = 0 always has a gradient
            grad.view(-1)[0] = math.inf
        grad = grad.to(p.device)
        if has_grad(step, k):
            if p.grad is None:
                p.grad = grad
            else:
                p.grad.copy_(grad)
        else:
            p.grad = None
    opt.grad_scale = torch.full((1,), SCALE, device=params[0].device)
    opt.found_inf = torch.full((1,), 1.0 if step in AMP_SKIPS else 0.0, device=params[0].device)


def state_values(params: list[torch.Tensor], opt: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor]]:
    values = []
    for k, p in enumerate(params):
        values.append((f"param {k}", p.detach().reshape(-1)))
        for key, value in sorted(opt.state.get(p, {}).items()):
            values.append((f"param {k} {key}", value.reshape(-1) if value.dtype == torch.float64 else
                           value.reshape(-1).float()))
    return values


def assert_same_as_host(device_params: list[torch.Tensor], device: torch.optim.Optimizer,
                        host_params: list[torch.Tensor], host: torch.optim.Optimizer, msg: str) -> None:
    """The device-decided optimizer holds what the host-decided one holds: step counts exactly, parameters and
    states to fp32 trajectory tolerance (the clip coefficient comes from fp32 sums of squares in tensors, a few
    ulps from the host's float64), float64 ones to the float64 tolerance (their sums, norm, coefficient and device
    scalars are all float64), and the same skipped-step count."""
    expected, actual = dict(state_values(host_params, host)), dict(state_values(device_params, device))
    assert set(expected) <= set(actual)
    for name, mine in actual.items():
        reference = expected.get(name)
        if reference is None:
            # A step skipped on the device still created its states, as torch's fused optimizers do: at their
            # initial values (each state's first value, e.g. Rprop's step_size = lr), with step 0. The host-decided
            # step returned before creating them.
            firsts = {s.name: s.fill(device.param_groups[0]) for s in device.spec.states + device.spec.scalars}
            first = firsts.get(name.split(" ", 2)[2], 0)
            assert bool((mine == first).all()), f"{msg}, {name}: {mine}"
        elif name.endswith(" step"):
            assert mine.device == device_params[0].device and torch.equal(mine, reference), f"{msg}, {name}"
        else:
            tol = torch.float64 if mine.dtype == torch.float64 else "fp32_trajectory"
            assert_close(mine, reference, tol, msg=f"{msg}, {name}")
    assert device.skipped_steps == host.skipped_steps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend", [*BACKENDS, CUDA])
@pytest.mark.parametrize("case", list(CASES))
def test_device_decisions_match_host_decisions(case: str, backend: str, dtype: torch.dtype) -> None:
    cls, kwargs = CASES[case]
    device_name = "cuda" if backend == "cuda" else "cpu"
    host_params, device_params = make_params(device_name, dtype), make_params(device_name, dtype)
    host = cls(host_params, backend=backend, **kwargs)
    device = cls(device_params, backend=backend, **kwargs)
    if backend == "cuda":  # on one GPU the step decides on the device by itself
        host._device_decisions = False
        assert device._decides_on_device()
    else:
        device._device_decisions = True
    inf_grads = bool(kwargs.get("skip_nonfinite"))
    for step in range(STEPS):
        feed(host_params, host, step, inf_grads)
        feed(device_params, device, step, inf_grads)
        host.step()
        device.step()
        assert_same_as_host(device_params, device, host_params, host, f"step {step}")
        if kwargs.get("max_grad_norm") is not None and host.last_grad_norm is not None:
            assert isinstance(device.last_grad_norm, torch.Tensor)
            if step not in AMP_SKIPS and not (inf_grads and step in INF_GRADS):
                rel = 1e-13 if dtype == torch.float64 else 1e-6
                assert device.last_grad_norm.item() == pytest.approx(host.last_grad_norm, rel=rel)
    assert host.skipped_steps == (len(INF_GRADS - AMP_SKIPS) if inf_grads else 0)


def test_parameters_with_different_skipped_steps_get_their_own_step_counts() -> None:
    """p0 takes part in a step the device skips and p1 does not; p1 then takes a step alone. Both have tried two
    steps but only p1 has taken two, so the next step must not hand them to one kernel call with one step count
    (a bias correction would be wrong for one of them)."""
    tracking = next(row for row in ROWS if row.cls.spec.tracks_step and row.torch_cls is not None)
    results = []
    for on_device in (False, True):
        params = [torch.randn(9, generator=torch.Generator().manual_seed(k)).requires_grad_() for k in range(2)]
        opt = tracking.cls(params, lr=0.1, backend=BACKENDS[0])
        opt._device_decisions = on_device
        for grads, found_inf in [((1, 1), 0.0), ((1, 0), 1.0), ((0, 1), 0.0), ((1, 1), 0.0)]:
            for p, given in zip(params, grads):
                p.grad = torch.full_like(p, 0.5) if given else None
            opt.grad_scale, opt.found_inf = torch.ones(1), torch.full((1,), found_inf)
            opt.step()
        results.append((torch.cat([p.detach() for p in params]), [opt.state[p]["step"].item() for p in params]))
    (host_values, host_steps), (device_values, device_steps) = results
    assert host_steps == device_steps == [2.0, 3.0]
    assert_close(device_values, host_values, "fp32")


def test_loaded_step_counts_key_the_device_step() -> None:
    """A checkpoint's step counts (taken on the host) are what the next device-decided step continues from."""
    params = make_params()
    saved = EXAMPLE.cls(params, lr=1e-2, backend=BACKENDS[0])
    for step in range(3):
        feed(params, saved, step, inf_grads=False)
        saved.step()
    twin_host, twin_device = make_params(), make_params()
    for twin in (twin_host, twin_device):
        with torch.no_grad():
            for p, q in zip(twin, params):
                p.copy_(q)
    host = EXAMPLE.cls(twin_host, lr=1e-2, backend=BACKENDS[0])
    device = EXAMPLE.cls(twin_device, lr=1e-2, backend=BACKENDS[0])
    device._device_decisions = True
    for opt, twin in ((host, twin_host), (device, twin_device)):
        opt.load_state_dict(saved.state_dict())
        for step in range(3, 8):
            feed(twin, opt, step, inf_grads=False)
            opt.step()
    for (name, mine), (_, reference) in zip(state_values(twin_device, device), state_values(twin_host, host)):
        assert_close(mine, reference, "fp32_trajectory", msg=name)
