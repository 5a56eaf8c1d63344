"""Adafactor's factored second moments, where the generic tests (vectors) do not reach: parameters of two or more
dimensions keep row and column factors in compact buffers. The compiled kernel against the reference step by step on
many shapes and dtypes, torch.optim.Adafactor on the same shapes (0-dim to 4-D), checkpoints both ways, the memory the
factors save, and the same bits for every thread count."""
from __future__ import annotations

import fusedopt
import pytest
import torch
from cases import TABLE
from tolerances import assert_close, assert_update_close

pytestmark = pytest.mark.skipif("cpu" not in fusedopt.build_info()["backends"], reason="compiled CPU backend not built")

ROW = TABLE[fusedopt.Adafactor]
F32, BF16, FP16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64

# Small and stacked matrices, rows that span work chunks (130 x 160 = 20800 > 16384), a row longer than a chunk (its
# column items see one row), a single column, a 4-D conv weight (factored over its last two dimensions), vectors and a
# scalar, in one buffer.
SHAPES = [(3, 5), (2, 3, 40), (130, 160), (1, 20000), (7, 1), (4, 2, 3, 3), (6,), (), (33,)]

# (param dtype, master weights, state dtype)
CONFIGS = [(F32, False, F32), (F32, False, BF16), (BF16, True, F32), (BF16, False, F32), (FP16, True, F32),
           (F64, False, None)]
STEPS = 8


def _params(dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    draw = F64 if dtype == F64 else F32
    return [torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=draw).to(dtype)) for shape in SHAPES]


def _grads(params: list[torch.Tensor], gen: torch.Generator) -> list[torch.Tensor]:
    """Random gradients, every third parameter's a thousand times smaller: its mean squares (~1e-6) fall below the
    cases' eps1 of 1e-3 and 1e-4, so the floors of the row mean and of the estimate bind there."""
    draw = F64 if params[0].dtype == F64 else F32
    return [(torch.randn(p.shape, generator=gen, dtype=draw) * (1e-3 if k % 3 == 1 else 1.0)).to(p.dtype)
            for k, p in enumerate(params)]


@pytest.mark.parametrize("dtype,master,state_dtype", CONFIGS,
                         ids=[f"{str(d)[6:]}{'-master' if m else ''}-state_{str(s or d)[6:]}" for d, m, s in CONFIGS])
@pytest.mark.parametrize("case", ROW.cases, ids=[c.id for c in ROW.cases])
def test_kernel_matches_reference_on_factored_shapes(case, dtype, master, state_dtype) -> None:
    """Each step from the same parameters and states (re-anchored on the kernel's after every step): the CPU kernel's
    parameters, master weights and factors equal the reference's to the precision of their dtypes."""
    ours, theirs = _params(dtype), _params(dtype)
    options = dict(master_weights=master, state_dtype=state_dtype, **case.kwargs)
    kernel = fusedopt.Adafactor(ours, backend="cpu", **options)
    reference = fusedopt.Adafactor(theirs, backend="reference", **options)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, STEPS + 1):
        before = [p.detach().clone() for p in ours]
        for p, q, g in zip(ours, theirs, _grads(ours, gen)):
            p.grad, q.grad = g.clone(), g.clone()
        kernel.step()
        reference.step()
        for k, (p, q) in enumerate(zip(ours, theirs)):
            where = f"step {step}, parameter {k} {tuple(p.shape)}"
            state, expected = kernel.state[p], reference.state[q]
            assert set(state) == set(expected), where
            names = ["row_var", "col_var"] if p.dim() > 1 else ["variance"]
            assert all(name in state for name in names), where
            for name in names:
                assert state[name].shape == expected[name].shape, where
                assert_close(state[name], expected[name], state[name].dtype, msg=f"{where}: {name}")
            # p * decay + step * u: one rounding (torch's add with alpha, a fused multiply-add) or two (the kernels), so
            # an ulp of p apart; with bf16 factors the update reads values that may be a bf16 ulp apart.
            if state_dtype == BF16:
                assert_update_close(p.reshape(-1), q.reshape(-1), before[k].reshape(-1), BF16, msg=f"{where}: param")
            else:
                assert_close(p, q, dtype, msg=f"{where}: param")
                if master:
                    assert_close(state["master_param"], expected["master_param"], F32, msg=f"{where}: master")
        with torch.no_grad():  # re-anchor: the next step starts both from the kernel's values
            for p, q in zip(ours, theirs):
                if not master:  # (a parameter written in place would replace its master weights)
                    q.copy_(p)
                for name, value in kernel.state[p].items():
                    reference.state[q][name].copy_(value)


@pytest.mark.parametrize("case", ROW.cases, ids=[c.id for c in ROW.cases])
def test_matches_torch_adafactor_on_every_shape(case) -> None:
    """20 steps of torch.optim.Adafactor (its single-tensor loop) and of fusedopt's kernel from the same parameters and
    gradients, a 0-dim scalar to a 4-D weight in one group: parameters and every state agree along the trajectory."""
    ours, theirs = _params(F32), _params(F32)
    fused = fusedopt.Adafactor(ours, backend="cpu", **case.kwargs)
    oracle = ROW.torch_optimizer(theirs, case.kwargs)
    gen = torch.Generator().manual_seed(2)
    for step in range(1, 21):
        for p, q, g in zip(ours, theirs, _grads(ours, gen)):
            p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        oracle.step()
        for k, (p, q) in enumerate(zip(ours, theirs)):
            where = f"step {step}, parameter {k} {tuple(p.shape)}"
            assert_close(p, q, "fp32_trajectory", msg=where)
            assert set(fused.state[p]) == set(oracle.state[q]), where
            for name, value in oracle.state[q].items():
                assert fused.state[p][name].shape == value.shape, f"{where}: {name}"
                assert_close(fused.state[p][name], value, "fp32_trajectory", msg=f"{where}: {name}")


@pytest.mark.parametrize("first", ["fusedopt", "torch"])
def test_checkpoints_swap_with_torch_mid_run(first: str) -> None:
    """Five steps on one library, its state_dict loaded into the other, five more: the same parameters as ten steps of
    torch.optim.Adafactor alone (factors of every shape cross in both directions)."""
    kwargs = ROW.cases[-1].kwargs
    make = {"fusedopt": lambda ps: fusedopt.Adafactor(ps, backend="cpu", **kwargs),
            "torch": lambda ps: ROW.torch_optimizer(ps, kwargs)}
    second = "torch" if first == "fusedopt" else "fusedopt"
    swapped, plain = _params(F32), _params(F32)
    opt, oracle = make[first](swapped), make["torch"](plain)
    gen = torch.Generator().manual_seed(3)
    for step in range(10):
        if step == 5:
            saved = opt.state_dict()
            opt = make[second](swapped)
            opt.load_state_dict(saved)
        for p, q, g in zip(swapped, plain, _grads(swapped, gen)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        oracle.step()
    for p, q in zip(swapped, plain):
        assert_close(p, q, "fp32_trajectory")
        for name, value in oracle.state[q].items():
            assert_close(opt.state[p][name], value, "fp32_trajectory", msg=name)


def test_factors_are_stored_compactly() -> None:
    """A 1024 x 512 matrix keeps 1024 row and 512 column factors, a 512-vector its variance: no state buffer is as
    long as the parameter buffer."""
    weight, bias = torch.nn.Parameter(torch.randn(1024, 512)), torch.nn.Parameter(torch.randn(512))
    opt = fusedopt.Adafactor([weight, bias], backend="cpu")
    weight.grad, bias.grad = torch.randn_like(weight), torch.randn_like(bias)
    opt.step()
    (buf,) = opt.flat_buffers[0]
    sizes = {name: flat.numel() for name, flat in buf.state.items()}
    assert sizes["row_var"] < 1024 + 64 and sizes["col_var"] < 512 + 64 and sizes["variance"] < 512 + 64, sizes
    assert opt.state[weight]["row_var"].shape == (1024, 1) and opt.state[weight]["col_var"].shape == (1, 512)
    assert "variance" not in opt.state[weight] and "row_var" not in opt.state[bias]


def test_same_bits_for_every_thread_count() -> None:
    """Row, column and norm sums have a fixed order: one thread and two give the same bits."""
    results = []
    for threads in (1, 2):
        fusedopt.set_num_threads(threads)
        try:
            params = _params(F32)
            opt = fusedopt.Adafactor(params, backend="cpu", **ROW.cases[-1].kwargs)
            gen = torch.Generator().manual_seed(4)
            for _ in range(5):
                for p, g in zip(params, _grads(params, gen)):
                    p.grad = g
                opt.step()
            results.append([p.detach().clone() for p in params] +
                           [v.clone() for p in params for v in opt.state[p].values()])
        finally:
            fusedopt.set_num_threads(None)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_layouts_that_do_not_fit_are_refused_before_any_write() -> None:
    """The segment layout is checked against the compact state buffers (once per layout and buffer lengths): a matrix
    that is not lead x rows x cols, or factors beyond a buffer's end, raise and change nothing."""
    from fusedopt import functional  # noqa: PLC0415
    from fusedopt.flat import Segments  # noqa: PLC0415

    table = Segments.packed([12])
    param, grad = torch.randn(table.total), torch.randn(table.total)
    row_var, col_var, variance = torch.rand(3) + 0.1, torch.rand(4) + 0.1, torch.rand(0)
    table.layout = torch.tensor([[1, 3, 4, 3, 0, 0, 0, 0, 3, 12]], dtype=torch.int64)
    table.factor_sums = 7
    hyper = ROW.hyper(ROW.cases[0].kwargs)
    before = [t.clone() for t in (param, row_var, col_var)]
    functional.update("adafactor", param, grad, [row_var, col_var, variance], None, table, hyper=hyper, lr=1e-2,
                      backend="cpu")
    assert not torch.equal(param, before[0]) and not torch.equal(row_var, before[1])
    for bad, message in (([1, 3, 5, 3, 0, 0, 0, 0, 3, 12], "is not 1 x 3 x 5"),
                         ([1, 3, 4, 3, 1, 0, 0, 0, 3, 12], "needs elements \\[1, 4\\) of state slot 0")):
        table.layout = torch.tensor([bad], dtype=torch.int64)
        after = [t.clone() for t in (param, row_var, col_var)]
        with pytest.raises(ValueError, match=message):
            functional.update("adafactor", param, grad, [row_var, col_var, variance], None, table, hyper=hyper,
                              lr=1e-2, backend="cpu")
        assert all(torch.equal(a, b) for a, b in zip(after, (param, row_var, col_var)))
    assert table.steps.tolist() == [1.0]
