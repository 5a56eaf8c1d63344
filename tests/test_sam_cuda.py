"""fusedopt.SAM on a GPU: the CUDA perturbation, undo and ASAM reduction give the CPU kernels' bits (sums to 1e-12),
a SAM step never waits for the GPU, GradScaler's skip leaves nothing perturbed, and training follows the CPU run.
Skipped without a CUDA device."""
from __future__ import annotations

import copy

import fusedopt
import pytest
import torch
from test_sam import INPUTS, KINDS, SCALE, SIZES, TARGETS, Flat, make_model, run_sam, weights
from tolerances import assert_close

pytestmark = pytest.mark.cuda
if not torch.cuda.is_available() or not fusedopt.build_info()["cuda_built"]:
    pytest.skip("needs a CUDA device and fusedopt built with its CUDA kernels", allow_module_level=True)

from test_cuda_kernels import no_host_sync  # noqa: E402 (after the skip: it skips itself without a GPU)


def on_cuda(flat: Flat) -> Flat:
    moved = copy.deepcopy(flat)
    for name in ("param", "grad", "master", "backup"):
        value = getattr(moved, name)
        if value is not None:
            setattr(moved, name, value.cuda())
    return moved


@pytest.mark.parametrize("device_scale", [False, True], ids=["host-scale", "device-scale"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("n", SIZES)
def test_kernels_match_cpu(n: int, kind: str, adaptive: bool, device_scale: bool) -> None:
    cpu = Flat(n, kind)
    gpu = on_cuda(cpu)
    start = cpu.param.clone()
    total, bad = cpu.sum_of_squares("cpu")
    out_sum = torch.zeros(1, dtype=torch.float64, device="cuda")
    out_bad = torch.zeros(1, device="cuda")
    fusedopt.functional.sam_sum_of_squares_into(gpu.param, gpu.grad, gpu.master, gpu.segments, out_sum, out_bad,
                                                backend="cuda")
    assert float(out_sum) == pytest.approx(total, rel=1e-12) and bool(out_bad) == bad
    cpu.perturb("cpu", SCALE, adaptive)
    dtype = torch.float64 if cpu.param.dtype == torch.float64 else torch.float32
    scale = torch.tensor([SCALE], dtype=dtype, device="cuda") if device_scale else SCALE
    fusedopt.functional.sam_perturb(gpu.param, gpu.grad, gpu.master, gpu.backup, gpu.segments, scale=scale,
                                    adaptive=adaptive, backend="cuda")
    assert torch.equal(gpu.param.cpu(), cpu.param), "the GPU's w + e differs from the CPU's"
    gpu.restore("cuda")
    assert torch.equal(gpu.param.cpu(), start), "the GPU's undo is not bit-exact"


def test_found_inf_writes_nothing() -> None:
    flat = on_cuda(Flat(4097, "bf16"))
    start = flat.param.clone()
    found_inf = torch.ones(1, device="cuda")
    fusedopt.functional.sam_perturb(flat.param, flat.grad, None, flat.backup, flat.segments, scale=SCALE,
                                    adaptive=True, found_inf=found_inf, backend="cuda")
    assert torch.equal(flat.param, start)


def cuda_sam(adaptive: bool, master: bool = False, dtype: torch.dtype = torch.float32, device: str = "cuda"
             ) -> tuple[torch.nn.Module, fusedopt.SAM]:
    model = make_model(dtype).to(device)
    base = fusedopt.AdamW(model.parameters(), lr=0.01, weight_decay=0.1, max_grad_norm=0.5, master_weights=master)
    return model, fusedopt.SAM(base, rho=0.5 if adaptive else 0.1, adaptive=adaptive)


def test_training_follows_the_cpu() -> None:
    for adaptive in (False, True):
        runs = []
        for device in ("cpu", "cuda"):
            model, sam = cuda_sam(adaptive, device=device)
            runs.append([w.cpu() for w in run_sam(model, sam, 5)])
        for a, b in zip(*runs):
            assert_close(a, b, "fp32_trajectory")


@pytest.mark.parametrize("master", [False, True])
@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
def test_sam_step_never_synchronises(adaptive: bool, master: bool) -> None:
    """After a first step, SAM steps with GradScaler's device tensors (one of them skipped) never wait for the GPU, and
    the skipped one leaves the weights as they were."""
    dtype = torch.bfloat16 if master else torch.float32
    model, sam = cuda_sam(adaptive, master, dtype)
    run_sam(model, sam, 1)  # builds the device tables and backups
    scale, found_inf = torch.full((1,), 2.0**10, device="cuda"), torch.zeros(1, device="cuda")
    x, y = INPUTS.to("cuda", dtype), TARGETS.to("cuda", dtype)  # a copy from the host would wait

    def backward(model: torch.nn.Module, factor: float) -> None:
        (torch.nn.functional.mse_loss(model(x), y) * factor).backward()

    before = weights(model)
    backward(model, 2.0**10)
    with no_host_sync():
        sam.first_step(zero_grad=True, grad_scale=scale, found_inf=found_inf)
        backward(model, 2.0**10)
        sam.second_step(zero_grad=True, grad_scale=scale, found_inf=found_inf)
        found_inf.fill_(1.0)  # a skipped step: nothing may stay perturbed
        after = weights(model)
        backward(model, 2.0**10)
        sam.first_step(zero_grad=True, grad_scale=scale, found_inf=found_inf)
        backward(model, 2.0**10)
        sam.second_step(zero_grad=True, grad_scale=scale, found_inf=found_inf)
    assert all(not torch.equal(a, b) for a, b in zip(before, after))
    for a, b in zip(after, weights(model)):
        assert torch.equal(a, b), "a skipped SAM step changed the weights"
