"""fusedopt.SAM (SAM and ASAM over any fusedopt optimizer): trajectories against float64 formulas, the perturbation and
undo kernels and ASAM's reduction against the reference on flat buffers, the bit-exact undo, GradScaler's skip,
step(closure), checkpoints and FSDP2. Backends reference and cpu; the CUDA kernels are in test_sam_cuda.py."""
from __future__ import annotations

import copy
import io
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import fusedopt
import pytest
import torch
from cases import ROWS, Algorithm
from fusedopt import _kernels, functional
from fusedopt.flat import CHUNK, Segments
from tolerances import assert_close, tolerance
from torch import Tensor, nn

F32, BF16, FP16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
BACKENDS = ["reference", "cpu"]
STEPS = 5

# ------------------------------------------------------------------------------------------------ a small model

X = torch.Generator().manual_seed(7)
INPUTS, TARGETS = torch.randn(16, 6, generator=X), torch.randn(16, 3, generator=X)


def make_model(dtype: torch.dtype = F32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).to(dtype)


def groups(model: nn.Module, lr: float) -> list[dict[str, Any]]:
    """Two param groups (weights, biases at half the lr): the norm must be the global one over both."""
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if n.endswith("weight")]},
            {"params": [p for n, p in named if n.endswith("bias")], "lr": lr / 2}]


def backward(model: nn.Module, scale: float = 1.0) -> Tensor:
    param = next(model.parameters())
    loss = nn.functional.mse_loss(model(INPUTS.to(param.device, param.dtype)), TARGETS.to(param.device, param.dtype))
    (loss * scale).backward()
    return loss.detach()


def weights(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def run_sam(model: nn.Module, sam: fusedopt.SAM, steps: int) -> list[Tensor]:
    for _ in range(steps):
        backward(model)
        sam.first_step(zero_grad=True)
        backward(model)
        sam.second_step(zero_grad=True)
    return weights(model)


# ---------------------------------------------------------------------- trajectories against float64 formulas

# name -> (fusedopt class, torch.optim class of the float64 oracle, kwargs); "clip" adds the base's max_grad_norm.
BASES: dict[str, tuple[type, type, dict[str, Any]]] = {
    "SGD-momentum": (fusedopt.SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}),
    "AdamW": (fusedopt.AdamW, torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
    "AdamW-clip": (fusedopt.AdamW, torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1, "max_grad_norm": 0.3}),
}
# SAM's rho is smaller than ASAM's, whose ascent is scaled by w^2 (|w| < 1 here).
VARIANTS = {"SAM": {"rho": 0.1, "adaptive": False}, "ASAM": {"rho": 0.5, "adaptive": True}}


def oracle64(base: str, rho: float, adaptive: bool, steps: int = STEPS, w_factor: bool = True) -> list[Tensor]:
    """The paper's formulas in float64: e = rho g / (||g|| + 1e-12), ASAM e = rho w^2 g / (|| |w| g || + 1e-12) over
    every parameter; the gradient at w + e, clipped as torch.nn.utils.clip_grad_norm_ when the base clips, drives
    torch.optim's float64 step from w. `w_factor=False` drops ASAM's |w| factors (a wrong formula)."""
    _, torch_cls, kwargs = BASES[base]
    max_norm = kwargs.get("max_grad_norm")
    model = make_model(F64)
    opt = torch_cls(groups(model, kwargs["lr"]), **{k: v for k, v in kwargs.items() if k != "max_grad_norm"})
    params = list(model.parameters())
    for _ in range(steps):
        opt.zero_grad()
        backward(model)
        with torch.no_grad():
            scale_w = [p.abs() if adaptive and w_factor else torch.ones_like(p) for p in params]
            norm = torch.sqrt(sum((s * p.grad).square().sum() for s, p in zip(scale_w, params)))
            eps = [rho * s * s * p.grad / (norm + 1e-12) for s, p in zip(scale_w, params)]
            for p, e in zip(params, eps):
                p.add_(e)
        opt.zero_grad()
        backward(model)
        with torch.no_grad():
            for p, e in zip(params, eps):
                p.sub_(e)
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        opt.step()
    return weights(model)


def fusedopt_run(base: str, variant: dict[str, Any], backend: str, steps: int = STEPS) -> list[Tensor]:
    cls, _, kwargs = BASES[base]
    model = make_model()
    sam = fusedopt.SAM(cls(groups(model, kwargs["lr"]), backend=backend, **kwargs), **variant)
    return run_sam(model, sam, steps)


def max_relative_error(actual: list[Tensor], expected: list[Tensor], key: str) -> float:
    """The largest |actual - expected| / (atol + rtol |expected|) (1.0: at the tolerance)."""
    tol = tolerance(key)
    return max(float(((a.double() - e).abs() / (tol["atol"] + tol["rtol"] * e.abs())).max())
               for a, e in zip(actual, expected))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("base", list(BASES))
def test_matches_float64_formulas(base: str, variant: str, backend: str) -> None:
    expected = oracle64(base, **VARIANTS[variant])
    actual = fusedopt_run(base, VARIANTS[variant], backend)
    for a, e in zip(actual, expected):
        assert_close(a, e, "fp32_trajectory", msg=f"{base} {variant} {backend}")
    # Measured: within 1% of the tolerance (max |error| < 1e-7 after 5 steps).
    assert max_relative_error(actual, expected, "fp32_trajectory") < 0.05


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("base", list(BASES))
def test_tolerance_catches_wrong_formulas(base: str, variant: str) -> None:
    """Half the rho, no SAM at all, or (ASAM) a dropped |w| factor moves the trajectory 1000x the tolerance."""
    rho, adaptive = VARIANTS[variant]["rho"], VARIANTS[variant]["adaptive"]
    actual = fusedopt_run(base, VARIANTS[variant], "cpu")
    wrong = [oracle64(base, rho / 2, adaptive), oracle64(base, 0.0, adaptive)]
    if adaptive:
        wrong.append(oracle64(base, rho, adaptive, w_factor=False))
    for expected in wrong:
        assert max_relative_error(actual, expected, "fp32_trajectory") > 100
        with pytest.raises(AssertionError):
            for a, e in zip(actual, expected):
                assert_close(a, e, "fp32_trajectory")


def every_base() -> list[Any]:
    return [pytest.param(row, id=row.name) for row in ROWS]


@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
@pytest.mark.parametrize("row", every_base())
def test_every_base_optimizer(row: Algorithm, adaptive: bool) -> None:
    """SAM wraps any fusedopt optimizer: the compiled run follows the reference backend's."""
    kwargs = row.descent_cases()[-1].kwargs
    runs = []
    for backend in BACKENDS:
        model = make_model()
        sam = fusedopt.SAM(row.cls(model.parameters(), backend=backend, **kwargs), rho=0.05, adaptive=adaptive)
        runs.append(run_sam(model, sam, 3))
    for a, e in zip(*runs):
        if row.sign_update:  # an element whose sign input is within an ulp of 0 may step the other way
            assert float((a - e).abs().gt(1e-5).float().mean()) < 0.05
        else:
            assert_close(a, e, "fp32_trajectory", msg=row.name)


# ------------------------------------------------------------------------- kernels on flat buffers (functional)

SIZES = [1, 7, 4097, CHUNK - 1, CHUNK + 1]
# id -> (param dtype, grad dtype, master weights)
KINDS: dict[str, tuple[torch.dtype, torch.dtype, bool]] = {
    "fp32": (F32, F32, False),
    "fp64": (F64, F64, False),
    "bf16": (BF16, BF16, False),
    "bf16-master": (BF16, BF16, True),
    "bf16-fp32grad": (BF16, F32, False),
    "fp16": (FP16, FP16, False),
    "fp16-master": (FP16, FP16, True),
}


class Flat:
    """One flat buffer set: segments (n, 5, n) with the middle one inactive, random weights and gradients (master
    weights random in fp32, the parameter their rounding, as a step leaves them)."""

    def __init__(self, n: int, kind: str) -> None:
        dtype, grad_dtype, master = KINDS[kind]
        self.segments = Segments.packed([n, 5, n])
        self.segments.flags[1] = 0
        total = self.segments.total
        self.master = torch.randn(total) if master else None
        self.param = self.master.to(dtype) if master else torch.randn(total, dtype=dtype)
        self.grad = torch.randn(total, dtype=grad_dtype)
        self.backup = None if master else torch.empty_like(self.param)
        o, k = self.segments.offsets.tolist(), self.segments.numels.tolist()
        self.active = torch.zeros(total, dtype=torch.bool)
        for s in (0, 2):
            self.active[o[s]:o[s] + k[s]] = True

    def clone(self) -> Flat:
        return copy.deepcopy(self)

    def weights64(self) -> Tensor:
        return (self.master if self.master is not None else self.param).double()

    def perturb(self, backend: str, scale: float, adaptive: bool) -> None:
        functional.sam_perturb(self.param, self.grad, self.master, self.backup, self.segments, scale=scale,
                               adaptive=adaptive, backend=backend)

    def restore(self, backend: str) -> None:
        functional.sam_restore(self.param, self.master, self.backup, self.segments, backend=backend)

    def sum_of_squares(self, backend: str) -> tuple[float, bool]:
        return functional.sam_sum_of_squares(self.param, self.grad, self.master, self.segments, backend=backend)


SCALE = 0.0371


@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("n", SIZES)
def test_perturb_and_restore_match_reference(n: int, kind: str, adaptive: bool) -> None:
    start = Flat(n, kind)
    ours, ref = start.clone(), start.clone()
    ours.perturb("cpu", SCALE, adaptive)
    ref.perturb("reference", SCALE, adaptive)
    assert torch.equal(ours.param, ref.param), "the kernel's w + e differs from the reference's"
    # Against float64: w + e rounded once to the parameter dtype (fp32 compute: a few fp32 ulps).
    w, g = start.weights64(), start.grad.double()
    expected = w + SCALE * (w * w * g if adaptive else g)
    dtype = start.param.dtype
    assert_close(ours.param[ours.active], expected[ours.active].to(dtype), dtype)
    moved = (ours.param != start.param)[ours.active].float().mean()
    assert moved > 0.5, "the perturbation left most weights where they were"
    assert torch.equal(ours.param[~ours.active], start.param[~ours.active]), "an inactive segment was written"
    if start.master is None:
        assert torch.equal(ours.backup[ours.active], start.param[ours.active]), "the backup is not p's bits"
    else:
        assert torch.equal(ours.master, start.master), "the master weights were perturbed"
    ours.restore("cpu")
    ref.restore("reference")
    assert torch.equal(ours.param, start.param), "the undo is not bit-exact"
    assert torch.equal(ref.param, start.param)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("n", SIZES)
def test_adaptive_sum_of_squares(n: int, kind: str) -> None:
    flat = Flat(n, kind)
    total, bad = flat.sum_of_squares("cpu")
    ref_total, ref_bad = flat.sum_of_squares("reference")
    w, g = flat.weights64()[flat.active], flat.grad.double()[flat.active]
    exact = float(((w.abs() * g) ** 2).sum())
    assert not bad and not ref_bad
    assert total == pytest.approx(ref_total, rel=1e-12)  # the same fp32 squares, summed in another order
    assert total == pytest.approx(exact, rel=1e-12 if kind == "fp64" else 1e-6)
    # inf/nan in an active segment raises the flag; in the inactive one it is not read.
    flat.grad[flat.segments.offsets[1]] = float("nan")
    assert flat.sum_of_squares("cpu") == (total, False)
    flat.grad[int(flat.active.nonzero()[-1])] = float("inf")
    assert flat.sum_of_squares("cpu")[1] and flat.sum_of_squares("reference")[1]


@pytest.fixture
def restore_threads_and_isa():
    isa = _kernels.cpu_isa()
    yield
    _kernels.set_cpu_isa(isa)
    fusedopt.set_num_threads(None)


@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_bitwise_across_threads_and_isas(kind: str, adaptive: bool, restore_threads_and_isa: None) -> None:
    """Perturbation, undo and ASAM's sum are bitwise identical for 1, 2 and 3 threads and on every ISA."""
    start = Flat(3 * CHUNK + 5, kind)
    results = []
    for isa in _kernels.supported_isas():
        _kernels.set_cpu_isa(isa)
        for threads in (1, 2, 3):
            fusedopt.set_num_threads(threads)
            flat = start.clone()
            total = flat.sum_of_squares("cpu")
            flat.perturb("cpu", SCALE, adaptive)
            perturbed = flat.param.clone()
            flat.restore("cpu")
            assert torch.equal(flat.param, start.param)
            results.append((isa, threads, total, perturbed))
    for isa, threads, total, perturbed in results[1:]:
        assert total == results[0][2], f"{isa}, {threads} threads: the sum differs"
        assert torch.equal(perturbed, results[0][3]), f"{isa}, {threads} threads: w + e differs"


def test_kernel_arguments_are_checked() -> None:
    flat = Flat(7, "bf16")
    before = flat.param.clone()
    cases: list[tuple[Callable[[], Any], type, str]] = [
        (lambda: functional.sam_perturb(flat.param, flat.grad, None, None, flat.segments, scale=0.1, adaptive=False,
                                        backend="cpu"), ValueError, "Invalid backup: None without master weights"),
        (lambda: functional.sam_perturb(flat.param, flat.grad, None, flat.backup.float(), flat.segments, scale=0.1,
                                        adaptive=False, backend="cpu"), TypeError, "Invalid backup dtype"),
        (lambda: functional.sam_perturb(flat.param, flat.grad.half(), None, flat.backup, flat.segments, scale=0.1,
                                        adaptive=False, backend="cpu"), TypeError, "Invalid grad dtype"),
        (lambda: functional.sam_perturb(flat.param, flat.grad, None, flat.param, flat.segments, scale=0.1,
                                        adaptive=False, backend="cpu"), ValueError, "must not share memory"),
        (lambda: functional.sam_restore(flat.param.float(), torch.zeros(flat.param.numel()), None, flat.segments,
                                        backend="cpu"), ValueError, "Invalid master"),
        (lambda: fusedopt._kernels._C.sam_perturb(flat.param.data_ptr(), flat.grad.data_ptr(), 0,
                                                  flat.backup.data_ptr(), flat.param.numel(), 7, 1, 0, 0, 0, 0, 0.1,
                                                  False), ValueError, "Invalid dtype code for param: 7"),
        (lambda: fusedopt._kernels._C.sam_restore(flat.param.data_ptr(), 0, 0, flat.param.numel(), 1, 0, 0, 0, 0),
         ValueError, "backup pointer is null"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
        assert torch.equal(flat.param, before), "a rejected call wrote"


MIB = 1 << 20
# Calls of the CUDA entry points that pass every host-side check (plausible 64-byte aligned addresses, one segment of
# one work item); each case changes one argument, and the call must be refused before the CUDA runtime is asked.
CUDA_VALID = {
    "cuda_sam_perturb": dict(param=1 * MIB, grad=2 * MIB, master=0, backup=3 * MIB, n=4096, param_dtype=0,
                             grad_dtype=0, work=4 * MIB, items=1, active=5 * MIB, seg_count=1, scale=0.1, scale_ptr=0,
                             found_inf_ptr=0, adaptive=False, device=0, stream=0),
    "cuda_sam_restore": dict(param=1 * MIB, master=0, backup=3 * MIB, n=4096, param_dtype=0, work=4 * MIB, items=1,
                             active=5 * MIB, seg_count=1, found_inf_ptr=0, device=0, stream=0),
    "cuda_sam_sum_of_squares": dict(param=1 * MIB, grad=2 * MIB, master=0, n=4096, param_dtype=0, grad_dtype=0,
                                    work=4 * MIB, items=1, active=5 * MIB, seg_count=1, scratch=6 * MIB,
                                    out_sum=7 * MIB, out_sum_dtype=0, out_nonfinite=8 * MIB, device=0, stream=0),
}
CUDA_REJECTED = [
    ("cuda_sam_perturb", dict(param_dtype=5), "Invalid dtype code for param: 5"),
    ("cuda_sam_perturb", dict(grad_dtype=1), "grad dtype code 1 must equal the param dtype code 0"),
    ("cuda_sam_perturb", dict(backup=0), "backup pointer is null"),
    ("cuda_sam_perturb", dict(master=6 * MIB), "master weights are for 16-bit parameters"),
    ("cuda_sam_perturb", dict(param=1 * MIB + 2), "param pointer .* is not 4-byte aligned"),
    ("cuda_sam_perturb", dict(scale_ptr=7 * MIB + 2), "scale pointer .* is not 4-byte aligned"),
    ("cuda_sam_perturb", dict(items=5000), "Invalid items: 5000"),
    ("cuda_sam_perturb", dict(n=-1), "Invalid element count n: -1"),
    ("cuda_sam_restore", dict(backup=0), "backup pointer is null"),
    ("cuda_sam_restore", dict(seg_count=0), "Invalid items: 1 need the work list"),
    ("cuda_sam_sum_of_squares", dict(out_sum_dtype=1), "Invalid dtype code for out_sum: 1"),
    ("cuda_sam_sum_of_squares", dict(scratch=0), "scratch pointer is null"),
    ("cuda_sam_sum_of_squares", dict(grad=0), "grad pointer is null"),
]


@pytest.mark.skipif(not fusedopt.build_info()["cuda_built"], reason="fusedopt was built without its CUDA kernels")
@pytest.mark.parametrize("name,change,message", CUDA_REJECTED, ids=[m for _, _, m in CUDA_REJECTED])
def test_cuda_entry_points_check_arguments(name: str, change: dict[str, Any], message: str) -> None:
    """Run wherever the CUDA kernels were compiled, GPU or not: nothing is dereferenced, every call is refused."""
    with pytest.raises(ValueError, match=f"{name}: {message}"):
        getattr(_kernels._C, name)(**{**CUDA_VALID[name], **change})


# -------------------------------------------------------------------------------------------- the SAM optimizer

# id -> (param dtype, master weights)
PARAM_KINDS = {"fp32": (F32, False), "bf16": (BF16, False), "bf16-master": (BF16, True)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
@pytest.mark.parametrize("kind", list(PARAM_KINDS))
def test_second_step_restores_the_weights_bit_for_bit(kind: str, adaptive: bool, backend: str) -> None:
    dtype, master = PARAM_KINDS[kind]
    model = make_model(dtype)
    base = fusedopt.AdamW(model.parameters(), lr=0.01, master_weights=master, backend=backend)
    sam = fusedopt.SAM(base, rho=0.5, adaptive=adaptive)
    run_sam(model, sam, 2)
    masters = [buf.master.clone() for bufs in base.flat_buffers for buf in bufs if buf.master is not None]
    seen: list[list[Tensor]] = []
    base_step = base.step
    base.step = lambda: (seen.append(weights(model)), base_step())[1]  # the weights the base step starts from
    before = weights(model)
    backward(model)
    sam.first_step(zero_grad=True)
    perturbed = weights(model)
    backward(model)
    sam.second_step(zero_grad=True)
    assert len(seen) == 1
    for b, p, s in zip(before, perturbed, seen[0]):
        assert not torch.equal(b, p), "first_step did not perturb"
        assert torch.equal(b, s), "the undo is not bit-exact"
    for m, buf in zip(masters, [b for bufs in base.flat_buffers for b in bufs if b.master is not None]):
        assert not torch.equal(m, buf.master)  # the base step moved the master, from the unperturbed value
    assert (len(sam._backups) == 0) == master  # a backup only without master weights


def base_state(opt: fusedopt.optim.FusedOptimizer) -> list[Tensor]:
    return [v.clone() for state in opt.state.values() for v in state.values() if isinstance(v, Tensor)]


@pytest.mark.parametrize("device_decisions", [False, True], ids=["host", "device"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_inf_skips_the_whole_step(backend: str, device_decisions: bool) -> None:
    """GradScaler on SAM (`scaler.step(sam, closure)`): inf in the gradient at w skips everything, nothing stays
    perturbed; inf at w + e restores the weights and skips the base step. The device path (a step decided on the
    GPU) runs on CPU tensors here."""
    model = make_model()
    base = fusedopt.SGD(model.parameters(), lr=0.1, momentum=0.9, backend=backend)
    base._device_decisions = device_decisions
    sam = fusedopt.SAM(base, rho=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    poison = {"first": False, "second": False}

    def scaled_backward() -> Tensor:
        loss = nn.functional.mse_loss(model(INPUTS), TARGETS)
        scaler.scale(loss).backward()
        return loss.detach()

    def closure() -> Tensor:
        loss = scaled_backward()
        if poison["second"]:
            next(model.parameters()).grad[0, 0] = float("inf")
        return loss

    def iteration() -> None:
        scaled_backward()
        if poison["first"]:
            next(model.parameters()).grad[1, 1] = float("inf")
        scaler.step(sam, closure)
        scaler.update()
        sam.zero_grad()

    iteration()
    for which in ("first", "second"):
        poison[which] = True
        before, state, scale = weights(model), base_state(base), scaler.get_scale()
        iteration()
        poison[which] = False
        for b, a in zip(before, weights(model)):
            assert torch.equal(a, b), f"inf in the {which} gradient left the weights changed"
        for b, a in zip(state, base_state(base)):
            assert torch.equal(a, b), f"inf in the {which} gradient changed the base optimizer's state"
        if which == "first":
            assert scaler.get_scale() == scale / 2  # GradScaler saw it
    before = weights(model)
    iteration()
    assert all(not torch.equal(a, b) for a, b in zip(before, weights(model)))
    scaled_backward()
    scaler.unscale_(sam)  # the closure's gradients would then reach the base step scaled: refused, nothing changed
    before = weights(model)
    with pytest.raises(RuntimeError, match="scaler.unscale_\\(optimizer\\) before scaler.step"):
        scaler.step(sam, closure)
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model)))


@pytest.mark.parametrize("device_decisions", [False, True], ids=["host", "device"])
def test_grad_scaler_matches_unscaled_run(device_decisions: bool) -> None:
    """Gradients scaled by 2^10 (exact) give the unscaled run's trajectory."""
    runs = []
    for scale in (1.0, 2.0**10):
        model = make_model()
        base = fusedopt.AdamW(model.parameters(), lr=0.01, backend="cpu")
        base._device_decisions = device_decisions
        sam = fusedopt.SAM(base, rho=0.5, adaptive=True)
        found_inf = torch.zeros(1)
        for _ in range(3):
            backward(model, scale)
            sam.first_step(zero_grad=True, grad_scale=torch.tensor(scale), found_inf=found_inf)
            backward(model, scale)
            sam.second_step(zero_grad=True, grad_scale=torch.tensor(scale), found_inf=found_inf)
        runs.append(weights(model))
    for a, b in zip(*runs):
        assert_close(a, b, "fp32")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
def test_step_closure_equals_two_step_api(adaptive: bool, backend: str) -> None:
    two_step = run_sam(model := make_model(), fusedopt.SAM(fusedopt.AdamW(model.parameters(), lr=0.01,
                                                                          backend=backend), adaptive=adaptive), 4)
    model = make_model()
    sam = fusedopt.SAM(fusedopt.AdamW(model.parameters(), lr=0.01, backend=backend), adaptive=adaptive)
    losses = []
    for _ in range(4):
        backward(model)
        losses.append(sam.step(lambda: backward(model)))
        sam.zero_grad()
    for a, b in zip(two_step, weights(model)):
        assert torch.equal(a, b)
    assert all(isinstance(loss, Tensor) for loss in losses) and losses[-1] < losses[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["SGD-momentum", "AdamW"])
def test_state_dict_round_trip_resumes(base: str, backend: str) -> None:
    cls, _, kwargs = BASES[base]
    model = make_model()
    sam = fusedopt.SAM(cls(model.parameters(), backend=backend, **kwargs), rho=0.2, adaptive=True)
    run_sam(model, sam, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "sam": sam.state_dict()}, buffer)
    expected = run_sam(model, sam, 3)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["sam"]["sam"] == {"rho": 0.2, "adaptive": True}
    resumed = make_model()
    resumed.load_state_dict(saved["model"])
    other = fusedopt.SAM(cls(resumed.parameters(), backend=backend, **kwargs), rho=0.05)
    other.load_state_dict(saved["sam"])
    assert (other.rho, other.adaptive) == (0.2, True)
    for a, b in zip(expected, run_sam(resumed, other, 3)):
        assert torch.equal(a, b), "the resumed run left the trajectory"


def test_plain_base_checkpoint_loads() -> None:
    model = make_model()
    base = fusedopt.SGD(model.parameters(), lr=0.1, momentum=0.9)
    run_sam(model, fusedopt.SAM(base, rho=0.1), 2)
    saved = base.state_dict()
    other_model = make_model()
    sam = fusedopt.SAM(fusedopt.SGD(other_model.parameters(), lr=0.1, momentum=0.9), rho=0.3)
    sam.load_state_dict(saved)
    assert sam.rho == 0.3
    assert [float(s["step"]) if "step" in s else None for s in sam.state_dict()["state"].values()] == \
        [float(s["step"]) if "step" in s else None for s in saved["state"].values()]
    for a, b in zip(base_state(sam.base_optimizer), base_state(base)):
        assert torch.equal(a, b)


INVALID: list[tuple[dict[str, Any], type, str]] = [
    ({"rho": -0.1}, ValueError, "Invalid rho value: -0.1"),
    ({"rho": math.nan}, ValueError, "Invalid rho value: nan"),
    ({"rho": "0.05"}, ValueError, "Invalid rho value: 0.05"),
    ({"adaptive": 1}, ValueError, "Invalid adaptive: 1"),
]


@pytest.mark.parametrize("kwargs,error,message", INVALID, ids=[m for _, _, m in INVALID])
def test_invalid_arguments(kwargs: dict[str, Any], error: type, message: str) -> None:
    model = make_model()
    with pytest.raises(error, match=message):
        fusedopt.SAM(fusedopt.SGD(model.parameters(), lr=0.1), **kwargs)


def test_misuse_is_refused_and_changes_nothing() -> None:
    model = make_model()
    with pytest.raises(TypeError, match="Invalid base_optimizer: expected a fusedopt optimizer, got SGD"):
        fusedopt.SAM(torch.optim.SGD(model.parameters(), lr=0.1))
    sam = fusedopt.SAM(fusedopt.SGD(model.parameters(), lr=0.1, momentum=0.9))
    run_sam(model, sam, 1)
    before, state = weights(model), base_state(sam.base_optimizer)
    with pytest.raises(RuntimeError, match="second_step\\(\\) was called without first_step\\(\\)"):
        sam.second_step()
    with pytest.raises(ValueError, match="Invalid closure: None"):
        sam.step()
    saved = sam.state_dict()
    saved["sam"] = {"rho": -1.0, "adaptive": False}
    with pytest.raises(ValueError, match="Invalid rho value: -1.0"):
        sam.load_state_dict(saved)
    assert sam.rho == 0.05
    backward(model)
    sam.first_step()
    with pytest.raises(RuntimeError, match="first_step\\(\\) was called twice"):
        sam.first_step()
    with pytest.raises(RuntimeError, match="load_state_dict\\(\\) between"):
        sam.load_state_dict(sam.base_optimizer.state_dict())
    sam.second_step()  # the refused calls left the perturbation to undo
    for a, b in zip(state, base_state(sam.base_optimizer)):
        assert not torch.equal(a, b)  # the base step ran once
    sam.zero_grad()
    assert all(not torch.equal(a, b) for a, b in zip(before, weights(model)))


def test_scheduler_and_param_groups_are_the_base_optimizers() -> None:
    model = make_model()
    base = fusedopt.SGD(model.parameters(), lr=0.1)
    sam = fusedopt.SAM(base)
    assert sam.param_groups is base.param_groups and sam.state is base.state
    scheduler = torch.optim.lr_scheduler.StepLR(sam, step_size=1, gamma=0.5)
    backward(model)
    sam.step(lambda: backward(model))
    scheduler.step()
    assert base.param_groups[0]["lr"] == 0.05


def test_parameters_without_gradient_are_left_alone() -> None:
    model = make_model()
    frozen = model[0].bias
    sam = fusedopt.SAM(fusedopt.SGD(model.parameters(), lr=0.1), rho=0.5)
    before = frozen.detach().clone()
    for _ in range(2):
        backward(model)
        frozen.grad = None
        sam.first_step(zero_grad=True)
        assert torch.equal(frozen, before)
        backward(model)
        frozen.grad = None
        sam.second_step(zero_grad=True)
    assert torch.equal(frozen, before)
    assert not torch.equal(model[0].weight, make_model()[0].weight)


# ------------------------------------------------------------------------------------------------------- FSDP2

@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_fsdp2_matches_single_process() -> None:
    """SAM and ASAM over FSDP2 shards on 2 gloo ranks follow a single process: the norms are all-reduced."""
    import torch.multiprocessing as mp
    from sam_workers import SCENARIOS, single_process, worker

    with tempfile.TemporaryDirectory() as out_dir:
        store = os.path.join(out_dir, "store")
        mp.start_processes(worker, args=(2, store, out_dir), nprocs=2, start_method="spawn")
        ranks = [torch.load(os.path.join(out_dir, f"sam.rank{r}.pt"), weights_only=False) for r in range(2)]
    for name in SCENARIOS:
        expected = single_process(name)
        for rank in ranks:
            assert rank[name].keys() == expected.keys()
            for key in expected:
                assert_close(rank[name][key], expected[key], "fp32_trajectory", msg=f"{name} {key}")


@pytest.mark.slow  # a smoke run of examples/sam_vs_sgd.py; the API it uses is tested above
def test_example_runs() -> None:
    """examples/sam_vs_sgd.py as README documents it, shortened: both runs print their final losses."""
    example = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "sam_vs_sgd.py")
    result = subprocess.run([sys.executable, example, "--epochs", "2", "--train", "128"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["SGD", "SAM+SGD"]
    assert all(math.isfinite(float(line.split()[3])) for line in lines)
