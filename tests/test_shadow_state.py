"""torch's visible objects are the truth: every way user code changes parameters, optimizer.state, param_groups or the
thread setup is followed by fusedopt's flat copies, checked against torch.optim doing the same thing (or refused with
a clear error that changes nothing)."""
from __future__ import annotations

import copy
import io
import multiprocessing as mp

import fusedopt
import pytest
import torch
from cases import EXAMPLE

# Every scenario runs the example optimizer of tests/cases.py (any algorithm would do: what is tested is the shadow
# state around the kernels) against its torch.optim counterpart.
OURS, THEIRS = EXAMPLE.cls, EXAMPLE.torch_cls

pytestmark = pytest.mark.skipif("cpu" not in fusedopt.build_info()["backends"], reason="compiled CPU backend not built")


def twins(shapes=((5, 4), (7,), (3, 3)), **kwargs):
    """Parameters and copies for torch.optim, the example optimizer and its torch.optim counterpart over them."""
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    return (params, copies, OURS(params, lr=1e-2, weight_decay=0.1, **kwargs),
            THEIRS(copies, lr=1e-2, weight_decay=0.1))


def run(params, copies, opt, ref, steps=3) -> None:
    for _ in range(steps):
        for p, t in zip(params, copies):
            g = torch.randn(p.shape)
            p.grad, t.grad = g.clone(), g.clone()
        opt.step()
        ref.step()


def assert_same(params, copies, opt, ref) -> None:
    for p, t in zip(params, copies):
        torch.testing.assert_close(p.detach(), t.detach(), rtol=1e-6, atol=1e-7)
        state, expected = opt.state.get(p, {}), ref.state.get(t, {})
        assert set(state) == set(expected), (set(state), set(expected))
        for key, value in expected.items():
            torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize("edit", ["clear", "del", "assign-moment", "step-zero", "step-inplace"])
def test_edits_of_optimizer_state_are_followed(edit: str) -> None:
    params, copies, opt, ref = twins()
    run(params, copies, opt, ref)
    for optimizer, ps in ((opt, params), (ref, copies)):
        if edit == "clear":
            optimizer.state.clear()
        elif edit == "del":
            del optimizer.state[ps[1]]
        elif edit == "assign-moment":
            optimizer.state[ps[0]]["exp_avg"] = torch.full(ps[0].shape, 0.5)
        elif edit == "step-zero":
            optimizer.state[ps[2]]["step"] = torch.tensor(0.0)
        else:
            optimizer.state[ps[2]]["step"].fill_(1.0)
    run(params, copies, opt, ref)
    assert_same(params, copies, opt, ref)
    assert len(opt.state_dict()["state"]) == len(ref.state_dict()["state"]) == 3


@pytest.mark.parametrize("when", ["initial", "partial"])
def test_loading_empty_or_partial_state_resets(when: str) -> None:
    params, copies, opt, ref = twins()
    if when == "partial":
        params[1].grad, copies[1].grad = None, None
        for p, t in zip(params[::2], copies[::2]):
            g = torch.randn(p.shape)
            p.grad, t.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    saved, saved_ref = opt.state_dict(), ref.state_dict()
    run(params, copies, opt, ref, steps=5)
    opt.load_state_dict(saved)
    ref.load_state_dict(saved_ref)
    run(params, copies, opt, ref)
    assert_same(params, copies, opt, ref)


@pytest.mark.parametrize("edit", ["append", "subset", "new-group-dict"])
def test_edits_of_param_groups_are_followed(edit: str) -> None:
    params, copies, opt, ref = twins()
    run(params, copies, opt, ref)
    extra = torch.nn.Parameter(torch.randn(6))
    extra_copy = torch.nn.Parameter(extra.detach().clone())
    if edit == "append":
        opt.param_groups[0]["params"].append(extra)
        ref.param_groups[0]["params"].append(extra_copy)
        params, copies = params + [extra], copies + [extra_copy]
    elif edit == "subset":
        opt.param_groups[0]["params"] = params[1:]
        ref.param_groups[0]["params"] = copies[1:]
        params, copies = params[1:], copies[1:]
    else:
        opt.param_groups.append({**{k: v for k, v in opt.param_groups[0].items() if k != "params"},
                                 "params": [extra]})
        ref.param_groups.append({**{k: v for k, v in ref.param_groups[0].items() if k != "params"},
                                 "params": [extra_copy]})
        params, copies = params + [extra], copies + [extra_copy]
    run(params, copies, opt, ref)
    assert_same(params, copies, opt, ref)


@pytest.mark.parametrize("write", ["load_state_dict", "clamp_", "zeros_"])
def test_in_place_parameter_writes_reach_master_weights(write: str) -> None:
    """A bf16 model with fp32 master weights: a write to the parameters after the optimizer was created is the new
    truth (torch.optim has no second copy to lose it); the next step starts from it."""
    model = torch.nn.Linear(16, 8).bfloat16()
    opt = OURS(model.parameters(), lr=1e-3, master_weights=True)
    model(torch.randn(4, 16).bfloat16()).sum().backward()
    opt.step()
    with torch.no_grad():
        if write == "load_state_dict":
            pretrained = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
            model.load_state_dict(pretrained)
        elif write == "clamp_":
            for p in model.parameters():
                p.clamp_(-0.01, 0.01)
        else:
            torch.nn.init.zeros_(model.weight)
    written = [p.detach().float().clone() for p in model.parameters()]
    model(torch.randn(4, 16).bfloat16()).sum().backward()
    opt.step()
    for p, before in zip(model.parameters(), written):
        # One step moves each element by about lr (1e-3) at most, never back to the old values.
        assert (p.detach().float() - before).abs().max() < 5e-3
        assert torch.equal(opt.state[p]["master_param"].bfloat16(), p.detach())


def _hogwild_worker(model: torch.nn.Module, x: torch.Tensor) -> None:
    opt = OURS(model.parameters(), lr=0.1)
    model(x).square().sum().backward()
    opt.step()


def test_shared_memory_model_is_updated_by_a_worker_process() -> None:
    torch.manual_seed(3)
    model = torch.nn.Linear(6, 3)
    expected = copy.deepcopy(model)
    model.share_memory()
    x = torch.randn(4, 6)
    worker = mp.get_context("fork").Process(target=_hogwild_worker, args=(model, x))
    worker.start()
    worker.join(60)
    assert worker.exitcode == 0
    ref = THEIRS(expected.parameters(), lr=0.1)
    expected(x).square().sum().backward()
    ref.step()
    for p, q in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


def test_parameters_that_are_views_of_a_user_tensor_stay_views() -> None:
    base = torch.randn(30)
    params = [torch.nn.Parameter(base[0:10]), torch.nn.Parameter(base[10:30].view(4, 5))]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, ref = OURS(params, lr=1e-2), THEIRS(copies, lr=1e-2)
    run(params, copies, opt, ref)
    assert_same(params, copies, opt, ref)
    torch.testing.assert_close(base, torch.cat([c.detach().reshape(-1) for c in copies]), rtol=1e-6, atol=1e-7)


def test_kernels_follow_torch_threads_and_a_forked_child_can_step() -> None:
    params, copies, opt, ref = twins(shapes=((70_000,),), max_grad_norm=1.0)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        run(params, copies, opt, ref, steps=1)
        assert fusedopt._C.get_num_threads() == 1
        fusedopt.set_num_threads(2)
        assert fusedopt._C.get_num_threads() == 2
        fusedopt.set_num_threads(None)
        torch.set_num_threads(2)
        run(params, copies, opt, ref, steps=1)
        assert fusedopt._C.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
    # The parent's kernels ran on two threads; the child steps on the gradients already in the flat buffer (a torch
    # op large enough to run on torch's own pool could hang in the child by itself).
    child = mp.get_context("fork").Process(target=opt.step)
    child.start()
    child.join(60)
    assert child.exitcode == 0, "a forked child hung or failed in step()"


@pytest.mark.parametrize("bad", [None, "two-elements", 5.5, -1])
def test_a_rejected_load_changes_nothing(bad) -> None:
    params, copies, opt, ref = twins()
    run(params, copies, opt, ref)
    saved = copy.deepcopy(opt.state_dict())
    broken = copy.deepcopy(saved)
    last = max(broken["state"])
    broken["state"][last]["step"] = torch.tensor([1.0, 2.0]) if bad == "two-elements" else bad
    before = opt.state_dict()
    with pytest.raises(ValueError, match="step"):
        opt.load_state_dict(broken)
    after = opt.state_dict()
    for key in before["state"]:
        for name, value in before["state"][key].items():
            assert torch.equal(after["state"][key][name], value)
    run(params, copies, opt, ref)
    assert_same(params, copies, opt, ref)


def test_copies_and_pickles_step() -> None:
    params, copies, opt, ref = twins()
    run(params, copies, opt, ref)
    twin = copy.deepcopy(opt)
    buffer = io.BytesIO()
    torch.save(opt, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (twin, loaded):
        other_params = other.param_groups[0]["params"]
        for p, q in zip(other_params, params):
            q.grad = torch.randn(q.shape)
            p.grad = q.grad.clone()
        other.step()
        other.zero_grad()
    run(params, copies, opt, ref)
    assert_same(params, copies, opt, ref)


def test_huge_finite_gradients_clip_as_torch() -> None:
    params = [torch.nn.Parameter(torch.zeros(1000)) for _ in range(2)]
    copies = [torch.nn.Parameter(torch.zeros(1000)) for _ in range(2)]
    for p, t in zip(params, copies):
        p.grad, t.grad = torch.full((1000,), 1e18), torch.full((1000,), 1e18)
    norm = fusedopt.clip_grad_norm_(params, 1.0)
    expected = torch.nn.utils.clip_grad_norm_(copies, 1.0)
    assert torch.equal(norm, expected) and bool(torch.isinf(norm))
    for p, t in zip(params, copies):
        assert torch.equal(p.grad, t.grad)


def test_a_rejected_gradient_then_none_or_a_good_one_recovers() -> None:
    p = torch.nn.Parameter(torch.randn(3))
    t = torch.nn.Parameter(p.detach().clone())
    opt, ref = OURS([p], lr=0.1), THEIRS([t], lr=0.1)
    p.grad, t.grad = torch.ones(3), torch.ones(3)
    opt.step(), ref.step()
    p.grad.data = torch.randn(4)  # torch lets .data change the size
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="gradient of parameter 0"):
        opt.step()
    assert torch.equal(p.detach(), before)
    p.grad = None
    opt.step()
    p.grad, t.grad = torch.full((3,), 2.0), torch.full((3,), 2.0)
    opt.step(), ref.step()
    torch.testing.assert_close(p.detach(), t.detach())


def test_an_expanded_view_of_the_gradient_assigned_back_keeps_training() -> None:
    torch.manual_seed(2)
    model, twin = torch.nn.Linear(4, 1, bias=False), torch.nn.Linear(4, 1, bias=False)
    twin.load_state_dict(model.state_dict())
    opt, ref = OURS(model.parameters(), lr=0.1), THEIRS(twin.parameters(), lr=0.1)
    for step in range(4):
        x = torch.randn(2, 4)
        model(x).sum().backward()
        twin(x).sum().backward()
        if step == 0:
            model.weight.grad = model.weight.grad[:1].expand(1, 4)
            twin.weight.grad = twin.weight.grad[:1].expand(1, 4)
        opt.step(), ref.step()
        opt.zero_grad(), ref.zero_grad()
    torch.testing.assert_close(model.weight.detach(), twin.weight.detach())


def test_minor_edits_are_refused_or_followed() -> None:
    p = torch.nn.Parameter(torch.randn(3, 4))
    opt = OURS([p], lr=0.1)
    p.data = p.data.t().contiguous()
    p.grad = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="changed shape"):
        opt.step()
    with pytest.raises(ValueError, match="master_weights"):
        OURS([torch.nn.Parameter(torch.randn(3).bfloat16())], master_weights="fp8")
