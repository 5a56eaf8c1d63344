"""torch.amp on CPU: autocast in fp16 and bf16 with GradScaler in its classic sequence (unscale_, clip, step) and
in its fused contract, including steps skipped for inf/nan gradients, against torch.optim running the same loop."""
from __future__ import annotations

import copy

import fusedopt
import pytest
import torch
from cases import EXAMPLE
from tolerances import assert_close
from torch import nn

COMPILED = "cpu" in fusedopt.build_info()["backends"]


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 1))


def train(model: nn.Module, opt: torch.optim.Optimizer, clip: object, dtype: torch.dtype,
          classic: bool, steps: int = 12) -> list[float]:
    """Run an autocast + GradScaler loop; step 4 feeds an inf input, so its gradients are not finite."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    torch.manual_seed(99)
    scales = []
    for step in range(steps):
        x, y = torch.randn(8, 16), torch.randn(8, 1)
        if step == 4:
            x[0, 0] = float("inf")
        opt.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        if classic:
            scaler.unscale_(opt)
            clip(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return scales


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("classic", [True, False], ids=["unscale-clip-step", "fused-contract"])
def test_autocast_grad_scaler_matches_torch(dtype: torch.dtype, classic: bool) -> None:
    model = make_model()
    twin = copy.deepcopy(model)
    # The reference backend is bitwise torch.optim, so the trajectories must agree exactly: this isolates GradScaler's
    # handling (unscale, inf checks, skipped steps, scale updates) from kernel rounding.
    ours = EXAMPLE.cls(model.parameters(), lr=1e-2, weight_decay=0.1, backend="reference")
    theirs = EXAMPLE.torch_optimizer(twin.parameters(), dict(lr=1e-2, weight_decay=0.1))
    scales_ours = train(model, ours, fusedopt.clip_grad_norm_, dtype, classic)
    scales_theirs = train(twin, theirs, torch.nn.utils.clip_grad_norm_, dtype, classic)
    assert scales_ours == scales_theirs
    assert scales_ours[4] < scales_ours[3]  # the inf step was seen and skipped
    for p, q in zip(model.parameters(), twin.parameters()):
        assert_close(p.detach(), q.detach(), "fp32_trajectory")
    assert ours.state[next(model.parameters())]["step"].item() == theirs.state[next(twin.parameters())]["step"].item()


@pytest.mark.skipif(not COMPILED, reason="compiled CPU backend not built")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_autocast_grad_scaler_on_compiled_kernels(dtype: torch.dtype) -> None:
    model = make_model()
    twin = copy.deepcopy(model)
    ours = EXAMPLE.cls(model.parameters(), lr=1e-2, backend="cpu", max_grad_norm=1.0)
    theirs = EXAMPLE.torch_optimizer(twin.parameters(), dict(lr=1e-2))
    scales_ours = train(model, ours, None, dtype, classic=False)
    scales_theirs = train(twin, theirs, torch.nn.utils.clip_grad_norm_, dtype, classic=True)
    assert scales_ours == scales_theirs  # the same steps were skipped
    steps = [ours.state[p]["step"].item() for p in model.parameters()]
    assert steps == [11.0] * len(steps)  # 12 steps, one skipped
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.isfinite(p).all()
        assert_close(p.detach(), q.detach(), torch.bfloat16)  # the models feed back their own 16-bit rounding
