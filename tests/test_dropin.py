"""Drop-in behaviour on a real training loop: a small transformer trained with fusedopt and with torch.optim
side by side, through LR schedulers, param groups, frozen and unused parameters, closures and hooks."""
from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import fusedopt
import pytest
import torch
import torch.nn.functional as F
from cases import EXAMPLE
from tolerances import assert_close
from torch import nn

# Schedulers, groups, hooks and checkpoints live in the Python layer that every backend shares, so these loops run
# on the default backend (the compiled CPU kernels when built); the kernels themselves are compared with torch.optim
# per algorithm and per backend in test_vs_torch.py and test_cpu_kernels.py. The example optimizer of tests/cases.py
# stands for all of them here.
COMPILED = "cpu" in fusedopt.build_info()["backends"]
BACKENDS = ["cpu" if COMPILED else "reference"]
STEPS = 30


class TinyTransformer(nn.Module):
    """2-layer encoder + linear head; `aux` is only used on even steps (a parameter with no grad on odd steps)."""

    def __init__(self) -> None:
        super().__init__()
        # bias=False: an attention key bias has a gradient of pure rounding noise (softmax ignores it), which a
        # normalising optimizer turns into +-lr steps of random sign, so no two correct implementations could agree
        # on it.
        layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, bias=False)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 1)
        self.aux = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor, use_aux: bool = False) -> torch.Tensor:
        h = self.encoder(x).mean(0)
        out = self.head(h)
        return out + self.aux(h) if use_aux else out


def make_data(steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(6, 4, 32), torch.randn(4, 1)) for _ in range(steps)]


def param_groups(model: nn.Module, split: bool) -> Any:
    if not split:
        return model.parameters()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0, "lr": 3e-3}]


def run_pair(make_opt: Callable[[Any, bool], torch.optim.Optimizer], *, split: bool = False,
             make_sched: Callable[[torch.optim.Optimizer], Any] | None = None, aux_every_other: bool = False,
             set_to_none: bool = False, plateau: bool = False) -> None:
    """Train two identical models, one with each optimizer, and compare parameters and states at every step."""
    ours_model = TinyTransformer()
    torch_model = copy.deepcopy(ours_model)
    ours = make_opt(param_groups(ours_model, split), True)
    theirs = make_opt(param_groups(torch_model, split), False)
    scheds = [make_sched(ours), make_sched(theirs)] if make_sched else []
    for step, (x, y) in enumerate(make_data()):
        use_aux = not aux_every_other or step % 2 == 0
        losses = []
        for model, opt in ((ours_model, ours), (torch_model, theirs)):
            opt.zero_grad(set_to_none=set_to_none)
            loss = F.mse_loss(model(x, use_aux), y)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        for sched, loss in zip(scheds, losses):
            sched.step(loss) if plateau else sched.step()
        assert_close(*flatten_all(ours_model, ours, torch_model, theirs), "fp32_trajectory", msg=f"step {step}")
    for g_ours, g_theirs in zip(ours.param_groups, theirs.param_groups):
        assert g_ours["lr"] == pytest.approx(g_theirs["lr"])


def flatten_all(ours_model: nn.Module, ours: torch.optim.Optimizer, torch_model: nn.Module,
                theirs: torch.optim.Optimizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Every parameter and every torch.optim state tensor, concatenated: one comparison per step."""
    mine, reference = [], []
    for p, q in zip(ours_model.parameters(), torch_model.parameters()):
        mine.append(p.detach().reshape(-1))
        reference.append(q.detach().reshape(-1))
        for key, value in theirs.state.get(q, {}).items():
            if isinstance(value, torch.Tensor):
                assert key in ours.state[p], key
                mine.append(ours.state[p][key].reshape(-1).float())
                reference.append(value.reshape(-1).float())
    return torch.cat(mine), torch.cat(reference)


def example(backend: str, **kwargs: Any) -> Callable[[Any, bool], torch.optim.Optimizer]:
    def make(params: Any, ours: bool) -> torch.optim.Optimizer:
        if ours:
            return EXAMPLE.cls(params, backend=backend, **kwargs)
        return EXAMPLE.torch_optimizer(params, kwargs)
    return make


SCHEDULERS = {
    "LambdaLR-warmup": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10)),
    "CosineAnnealingLR": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS, eta_min=1e-5),
    "OneCycleLR-betas": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=STEPS),
    "SequentialLR": lambda opt: torch.optim.lr_scheduler.SequentialLR(
        opt, [torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=5),
              torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)], milestones=[5]),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_lr_schedulers(backend: str, name: str) -> None:
    run_pair(example(backend, lr=1e-3, weight_decay=0.05), make_sched=SCHEDULERS[name])


@pytest.mark.parametrize("backend", BACKENDS)
def test_reduce_lr_on_plateau(backend: str) -> None:
    run_pair(example(backend, lr=1e-3), plateau=True,
             make_sched=lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=1, factor=0.5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_decay_param_groups(backend: str) -> None:
    run_pair(example(backend, lr=1e-3), split=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unused_parameter_with_none_grad_is_left_untouched(backend: str) -> None:
    # set_to_none=True gives `aux` no gradient on odd steps: torch.optim skips it and so must we.
    run_pair(example(backend, lr=1e-3, weight_decay=0.1), aux_every_other=True, set_to_none=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_lr(backend: str) -> None:
    run_pair(lambda params, ours: (EXAMPLE.cls(params, lr=torch.tensor(2e-3), backend=backend) if ours
                                   else EXAMPLE.torch_optimizer(params, dict(lr=torch.tensor(2e-3)))))


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_parameters_add_param_group_and_empty_group(backend: str) -> None:
    ours_model = TinyTransformer()
    torch_model = copy.deepcopy(ours_model)
    for model in (ours_model, torch_model):
        model.encoder.layers[0].requires_grad_(False)
    frozen_before = [p.detach().clone() for p in ours_model.encoder.layers[0].parameters()]
    ours = EXAMPLE.cls([{"params": list(ours_model.encoder.parameters())}, {"params": []}], lr=1e-3,
                       backend=backend)
    theirs = EXAMPLE.torch_optimizer([{"params": list(torch_model.encoder.parameters())}, {"params": []}],
                                     dict(lr=1e-3))
    for step, (x, y) in enumerate(make_data()):
        if step == 10:  # the head joins mid-training with its own hyperparameters
            ours.add_param_group({"params": list(ours_model.head.parameters()), "lr": 5e-3})
            theirs.add_param_group({"params": list(torch_model.head.parameters()), "lr": 5e-3})
        for model, opt in ((ours_model, ours), (torch_model, theirs)):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
        for p, q in zip(ours_model.parameters(), torch_model.parameters()):
            assert_close(p.detach(), q.detach(), "fp32_trajectory")
    for p, before in zip(ours_model.encoder.layers[0].parameters(), frozen_before):
        assert torch.equal(p.detach(), before) and p not in ours.state


def test_per_group_backend() -> None:
    a, b = torch.nn.Parameter(torch.randn(8)), torch.nn.Parameter(torch.randn(8))
    opt = EXAMPLE.cls([{"params": [a], "backend": "reference"}, {"params": [b]}])
    assert opt._backends[0] == ["reference"]
    assert opt._backends[1] == ["cpu" if COMPILED else "reference"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_closure_hooks_and_repr(backend: str) -> None:
    model = TinyTransformer()
    opt = EXAMPLE.cls(model.parameters(), lr=1e-3, backend=backend)
    calls: list[str] = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd-pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    x, y = make_data(1)[0]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    opt.load_state_dict(opt.state_dict())
    assert calls == ["pre", "post", "sd-pre", "load-post"]
    text = repr(opt)
    assert text.startswith(f"{EXAMPLE.name} (") and "lr: 0.001" in text and "max_grad_norm" in text
