"""Fidelity to torch.optim where the defaults differ by design: the default zero_grad loop skips parameters that
backward did not reach (as torch's None gradients do), checkpoints from torch.optim keep fusedopt's own settings, and
argument errors are torch's."""
from __future__ import annotations

import fusedopt
import pytest
import torch
from cases import EXAMPLE, TORCH_ROWS, Algorithm

pytestmark = pytest.mark.skipif("cpu" not in fusedopt.build_info()["backends"], reason="compiled CPU backend not built")


class Experts(torch.nn.Module):
    """Mixture-of-experts-like routing: each batch reaches some experts only, so the others get no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(4))
        self.unused = torch.nn.Linear(8, 8)  # a branch that backward never reaches

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        chosen = [e for k, e in enumerate(self.experts) if (k + step) % 3 != 0]
        return sum(e(x) for e in chosen).square().mean()


@pytest.mark.parametrize("row", TORCH_ROWS, ids=lambda row: row.name)
def test_default_zero_grad_loop_follows_torch(row: Algorithm) -> None:
    torch.manual_seed(0)
    model = Experts()
    twin = Experts()
    twin.load_state_dict(model.state_dict())
    unused = model.unused.weight.detach().clone()
    kwargs = row.descent_cases()[-1].kwargs  # the richest case that minimises (with weight decay where it has one)
    opt = row.cls(model.parameters(), backend="cpu", **kwargs)
    ref = row.torch_optimizer(twin.parameters(), kwargs)
    for step in range(8):
        x = torch.randn(4, 8)
        model(x, step).backward()
        twin(x, step).backward()
        opt.step()
        ref.step()
        opt.zero_grad()  # fusedopt's default keeps zeroed views
        ref.zero_grad()  # torch's default sets None
    for p, t in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.detach(), t.detach(), rtol=1e-5, atol=1e-6)
        assert set(opt.state.get(p, {})) == set(ref.state.get(t, {}))
        if "step" in ref.state.get(t, {}):
            assert float(opt.state[p]["step"]) == float(ref.state[t]["step"])
    assert torch.equal(model.unused.weight.detach(), unused)  # weight decay never touched the unreached branch


def test_gradients_written_in_place_after_zero_grad_count() -> None:
    p = torch.nn.Parameter(torch.randn(10))
    t = torch.nn.Parameter(p.detach().clone())
    opt, ref = EXAMPLE.cls([p], lr=0.1), EXAMPLE.torch_cls([t], lr=0.1)
    p.grad, t.grad = torch.ones(10), torch.ones(10)
    opt.step(), ref.step()
    opt.zero_grad(), ref.zero_grad(set_to_none=False)
    p.grad.fill_(2.0), t.grad.fill_(2.0)
    opt.step(), ref.step()
    torch.testing.assert_close(p.detach(), t.detach())


@pytest.mark.parametrize("row", TORCH_ROWS, ids=lambda row: row.name)
def test_loading_a_torch_checkpoint_keeps_fusedopt_settings(row: Algorithm) -> None:
    """A torch.optim checkpoint carries none of fusedopt's own settings: the optimizer keeps them. A class whose spec
    forces a group key (a decoupled variant) keeps it after loading its parent class's torch checkpoint."""
    parent = row.cls.__mro__[1]
    source = getattr(torch.optim, parent.__name__, None) if row.cls.spec.forced else row.torch_cls
    if source is None:
        pytest.skip(f"{parent.__name__} has no torch.optim counterpart")
    params = [torch.nn.Parameter(torch.randn(6)) for _ in range(2)]
    torch_opt = source(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn(6)
    torch_opt.step()
    opt = row.cls(params, lr=1e-3, max_grad_norm=1.0, skip_nonfinite=True)
    opt.load_state_dict(torch_opt.state_dict())
    group = opt.param_groups[0]
    assert group["max_grad_norm"] == 1.0 and group["skip_nonfinite"] is True
    for key, value in row.cls.spec.forced.items():
        assert group[key] == value, key


def test_a_bare_tensor_is_not_an_iterable_of_parameters() -> None:
    with pytest.raises(TypeError, match="iterable of Tensors or dicts"):
        EXAMPLE.cls(torch.nn.Parameter(torch.randn(3)))


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD", "Adagrad"])
def test_fused_true_on_the_meta_device_raises_like_torch(name: str) -> None:
    """torch.optim refuses fused=True for parameters on a device without fused kernels (at the first step; torch 2.4
    at construction); so do we, at the first step, with its message. Without fused=True both step on meta tensors."""
    messages = []
    for module in (torch.optim, fusedopt):
        p = torch.nn.Parameter(torch.randn(3, device="meta"))
        p.grad = torch.randn(3, device="meta")
        with pytest.raises(RuntimeError, match="requires all the params to be floating point") as info:
            getattr(module, name)([p], lr=0.1, fused=True).step()
        messages.append(str(info.value))
        getattr(module, name)([p], lr=0.1).step()
    assert messages[1].endswith("but torch.float32 and meta")
