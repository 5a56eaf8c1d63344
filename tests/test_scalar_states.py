"""Per-parameter scalar states (NAdam's mu_product, ASGD's eta and mu): 0-dim float32 tensors in optimizer.state, as
torch.optim keeps them, that are views of the segment table the kernels read and advance. Every way user code or a
checkpoint changes them is followed, checked against torch.optim doing the same thing."""
from __future__ import annotations

import copy
import io
import pickle

import fusedopt
import pytest
import torch
from cases import ROWS, Algorithm

SCALAR_ROWS = [row for row in ROWS if row.cls.spec.scalars]
# The case of each table whose scalar states change at every step (ASGD averages from step 3 on).
KWARGS = {"NAdam": {"lr": 1e-2, "momentum_decay": 0.3, "weight_decay": 0.1},
          "ASGD": {"lr": 5e-2, "lambd": 0.5, "t0": 2.0, "weight_decay": 0.1}}
BACKENDS = ["cpu", "reference"] if "cpu" in fusedopt.build_info()["backends"] else ["reference"]

pytestmark = pytest.mark.parametrize("row", SCALAR_ROWS, ids=[r.name for r in SCALAR_ROWS])


def twins(row: Algorithm, backend: str, shapes=((5, 4), (7,), (3, 3))):
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    kwargs = KWARGS[row.name]
    return params, copies, row.cls(params, backend=backend, **kwargs), row.torch_optimizer(copies, kwargs)


def run(params, copies, opt, ref, steps: int = 4) -> None:
    for _ in range(steps):
        for p, t in zip(params, copies):
            g = torch.randn(p.shape)
            p.grad, t.grad = g.clone(), g.clone()
        opt.step()
        ref.step()


def assert_same(row: Algorithm, params, copies, opt, ref) -> None:
    for p, t in zip(params, copies):
        torch.testing.assert_close(p.detach(), t.detach(), rtol=1e-5, atol=1e-6)
        state, expected = opt.state.get(p, {}), ref.state.get(t, {})
        assert list(state) == list(expected), (list(state), list(expected))  # torch's keys, in torch's order
        for name in row.cls.spec.scalar_names():
            assert state[name].dtype == torch.float32 and state[name].shape == torch.Size([]), name
            assert float(state[name]) == float(expected[name]), (name, state[name], expected[name])


@pytest.mark.parametrize("backend", BACKENDS)
def test_scalar_states_follow_torch(row: Algorithm, backend: str) -> None:
    """After every step each scalar state equals torch.optim's bit for bit, and is the value the next step uses."""
    params, copies, opt, ref = twins(row, backend)
    for _ in range(6):
        run(params, copies, opt, ref, steps=1)
        assert_same(row, params, copies, opt, ref)


@pytest.mark.parametrize("edit", ["assign", "fill-in-place", "assign-another", "del", "clear"])
def test_edits_of_scalar_states_are_followed(row: Algorithm, edit: str) -> None:
    """A scalar state replaced, written in place or dropped with its entry: the next steps use what user code wrote,
    as torch.optim does (a dropped entry starts afresh, with the first values at the current lr)."""
    params, copies, opt, ref = twins(row, "cpu")
    run(params, copies, opt, ref)
    name = row.cls.spec.scalar_names()[0]
    for optimizer, ps in ((opt, params), (ref, copies)):
        for group in optimizer.param_groups:
            group["lr"] = 0.7 * group["lr"]  # first values after a reset follow the lr of now
        if edit == "assign":
            optimizer.state[ps[0]][name] = torch.tensor(0.25)
        elif edit == "fill-in-place":
            optimizer.state[ps[1]][name].fill_(0.125)
        elif edit == "assign-another":
            optimizer.state[ps[2]][row.cls.spec.scalar_names()[-1]] = torch.tensor(0.5)
        elif edit == "del":
            del optimizer.state[ps[1]]
        else:
            optimizer.state.clear()
    run(params, copies, opt, ref)
    assert_same(row, params, copies, opt, ref)


def test_checkpoints_carry_scalar_states_both_ways(row: Algorithm) -> None:
    """torch.optim's checkpoint into fusedopt and back, through torch.save/torch.load(weights_only=True), mid-run:
    the scalar states arrive and the runs continue together."""
    params, copies, opt, ref = twins(row, "cpu")
    run(params, copies, opt, ref)
    buffer = io.BytesIO()
    torch.save(ref.state_dict(), buffer)
    buffer.seek(0)
    fresh = row.cls(params, backend="cpu", **KWARGS[row.name])
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    run(params, copies, fresh, ref)
    assert_same(row, params, copies, fresh, ref)
    saved = fresh.state_dict()
    for name in row.cls.spec.scalar_names():
        assert saved["state"][0][name].dtype == torch.float32 and saved["state"][0][name].dim() == 0
    back = row.torch_optimizer(copies, KWARGS[row.name])
    back.load_state_dict(copy.deepcopy(saved))
    run(params, copies, fresh, back)
    assert_same(row, params, copies, fresh, back)


def test_copies_and_pickles_keep_scalar_states(row: Algorithm) -> None:
    """copy.deepcopy and pickle of a running optimizer keep the scalar states, and the copy steps on its own."""
    params, copies, opt, ref = twins(row, "cpu")
    run(params, copies, opt, ref)
    for ps, o in (copy.deepcopy((params, opt)), pickle.loads(pickle.dumps((params, opt)))):
        theirs, theirs_opt = copy.deepcopy((copies, ref))
        assert_same(row, ps, theirs, o, theirs_opt)
        run(ps, theirs, o, theirs_opt)
        assert_same(row, ps, theirs, o, theirs_opt)


def test_rejects_a_scalar_state_that_is_no_number(row: Algorithm) -> None:
    params, copies, opt, ref = twins(row, "cpu")
    run(params, copies, opt, ref)
    name = row.cls.spec.scalar_names()[0]
    before = [p.detach().clone() for p in params]
    opt.state[params[0]][name] = torch.ones(3)
    with pytest.raises(ValueError, match=f"'{name}' must be a number or a 1-element tensor"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    saved = ref.state_dict()
    saved["state"][0][name] = torch.ones(2)
    fresh = row.cls(params, backend="cpu", **KWARGS[row.name])
    with pytest.raises(ValueError, match=f"loaded state '{name}' of parameter 0 must be a number or a 1-element"):
        fresh.load_state_dict(saved)
