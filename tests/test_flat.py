"""Flat storage: 64-byte alignment, parameters and gradients as views, aliasing repair, runs and 64-bit offsets."""
from __future__ import annotations

import fusedopt
import pytest
import torch
from cases import EXAMPLE
from fusedopt.flat import ALIGN_BYTES, FlatBuffer, build_flat_buffers

SHAPES = [(1,), (7,), (33, 5), (4097,), (3, 4, 5), ()]


def make_params(dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in SHAPES]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_every_region_of_every_buffer_is_64_byte_aligned(dtype: torch.dtype) -> None:
    params = make_params(dtype)
    buf = FlatBuffer(params, master_weights=True)
    buf.ensure_state("exp_avg", torch.float32)
    buf.ensure_state("exp_avg_sq", torch.bfloat16)
    flats = [buf.param, buf.grad, buf.state["exp_avg"], buf.state["exp_avg_sq"]]
    if dtype != torch.float32:
        flats.append(buf.master)
    for flat in flats:
        for i in range(len(params)):
            assert buf.region(flat, i).data_ptr() % ALIGN_BYTES == 0, (flat.dtype, i)


def test_parameters_become_views_with_their_values_kept() -> None:
    params = make_params()
    before = [p.detach().clone() for p in params]
    buf = FlatBuffer(params)
    start, end = buf.param.data_ptr(), buf.param.data_ptr() + buf.total * 4
    for p, old, i in zip(params, before, range(len(params))):
        assert torch.equal(p.detach(), old)
        assert start <= p.data_ptr() < end or p.numel() == 0
        assert p.data_ptr() == buf.region(buf.param, i).data_ptr()
    # Padding between regions stays zero: kernels run over it harmlessly.
    mask = torch.ones(buf.total, dtype=torch.bool)
    for i in range(len(params)):
        mask[buf.offsets[i]:buf.offsets[i] + buf.numels[i]] = False
    assert torch.count_nonzero(buf.param[mask]) == 0


def test_backward_accumulates_into_the_flat_gradient_buffer() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(9, 17), torch.nn.Tanh(), torch.nn.Linear(17, 3))
    opt = EXAMPLE.cls(model.parameters(), lr=1e-2)
    x = torch.randn(8, 9)
    model(x).square().sum().backward()
    opt.step()  # first step adopts the autograd-created gradients and installs the views
    opt.zero_grad()
    buf = opt.flat_buffers[0][0]
    for i, p in enumerate(buf.params):
        assert p.grad.data_ptr() == buf.region(buf.grad, i).data_ptr()
    assert torch.count_nonzero(buf.grad) == 0
    model(x).square().sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    for i, p in enumerate(buf.params):  # still views: backward accumulated in place
        assert p.grad.data_ptr() == buf.region(buf.grad, i).data_ptr()
        assert torch.equal(buf.view(buf.grad, i), expected[i])


def test_zero_grad_keeps_none_and_set_to_none_drops_views() -> None:
    params = make_params()
    buf = FlatBuffer(params)
    for p in params[:3]:
        p.grad = torch.randn_like(p)
    assert buf.prepare_step() is True
    assert list(buf.segments.flags) == [1, 1, 1, 0, 0, 0]
    buf.zero_grad(set_to_none=False)
    assert all(p.grad is None for p in params[3:])
    assert all(torch.count_nonzero(p.grad) == 0 for p in params[:3])
    buf.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in params)


def test_replaced_parameter_data_is_copied_back_in() -> None:
    params = make_params()
    buf = FlatBuffer(params)
    new = torch.randn(33, 5)
    params[2].data = new.clone()
    buf.prepare_step()
    assert params[2].data_ptr() == buf.region(buf.param, 2).data_ptr()
    assert torch.equal(buf.view(buf.param, 2), new)


def test_moved_parameter_is_a_clear_error() -> None:
    params = make_params()
    buf = FlatBuffer(params)
    params[1].data = torch.randn(7, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="parameter 1 changed"):
        buf.prepare_step()


def test_segment_table_matches_the_layout() -> None:
    buf = FlatBuffer(make_params())
    assert buf.segments.offsets.tolist() == buf.offsets
    assert buf.segments.numels.tolist() == buf.numels
    assert buf.segments.steps.data_ptr() == buf.steps.data_ptr() and buf.steps.dtype == torch.float32
    buf.segments.flags[2] = 1
    assert buf.segments.active.tolist() == [0, 0, 1, 0, 0, 0]  # the tensor the kernels read shares the flags
    assert buf.prepare_step() is False and not buf.segments.any_active()


def test_one_buffer_per_device_and_dtype_in_parameter_order() -> None:
    params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3).bfloat16()),
              torch.nn.Parameter(torch.randn(4))]
    buffers = build_flat_buffers(params)
    assert [(b.dtype, len(b.params)) for b in buffers] == [(torch.float32, 2), (torch.bfloat16, 1)]
    assert buffers[0].params[0] is params[0] and buffers[0].params[1] is params[2]


def test_offsets_beyond_32_bits() -> None:
    # Meta tensors have shapes but no memory, so offsets past 2**31 can be checked without allocating 12 GiB.
    big = 3 * 2**30 + 5
    params = [torch.nn.Parameter(torch.empty(big, device="meta")) for _ in range(2)] + [
        torch.nn.Parameter(torch.empty(7, device="meta"))]
    buf = FlatBuffer(params)
    assert buf.offsets[1] > 2**31 and buf.offsets[2] > 2**32
    assert buf.offsets[2] % 32 == 0 and buf.total >= buf.offsets[2] + 7
    assert buf.region(buf.param, 2).numel() == 7


def test_a_gradient_handed_back_each_step_is_left_in_place_and_copied_from() -> None:
    """Like DDP with gradient_as_bucket_view: after every backward something re-points `.grad` at its own persistent
    storage. The second time it comes back, the step stops re-pointing it: it copies from it, zero_grad zeroes it in
    place, and the trajectory stays torch.optim's."""
    params = make_params()
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    bucket = [torch.zeros_like(p) for p in params]  # the keeper's storage
    opt = EXAMPLE.cls(params, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)
    reference = EXAMPLE.torch_optimizer(twins, dict(lr=1e-2, weight_decay=0.1))
    buf = opt.flat_buffers[0][0]
    for step in range(6):
        grads = [torch.randn_like(p) for p in params]
        for p, b, g in zip(params, bucket, grads):
            if p.grad is not None and p.grad.data_ptr() != b.data_ptr():
                b.copy_(p.grad)  # the keeper takes over what was accumulated elsewhere
            b.add_(g)
            p.grad = b
        for q, g in zip(twins, grads):
            q.grad = g.clone()
        opt.step()
        torch.nn.utils.clip_grad_norm_(twins, 1.0)  # torch's sequence: clip, then step
        reference.step()
        kept = [p.grad is b for p, b in zip(params, bucket)]
        assert all(kept) == (step >= 1), f"step {step}: {kept}"
        opt.zero_grad()
        reference.zero_grad(set_to_none=True)
        for i, (p, q) in enumerate(zip(params, twins)):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=f"step {step}, param {i}")
            assert not p.grad.any()
        if step >= 1:
            assert all(p.grad is b for p, b in zip(params, bucket))  # zeroed in place, not re-pointed
    assert [buf.is_kept(i, p.grad) for i, p in enumerate(params)] == [True] * len(params)


def test_a_fresh_gradient_after_kept_ones_is_adopted_again() -> None:
    params = make_params()[:2]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = EXAMPLE.cls(params, lr=0.1)
    reference = EXAMPLE.torch_optimizer(twins, dict(lr=0.1))
    bucket = [torch.zeros_like(p) for p in params]
    for _ in range(2):
        for p, q, b in zip(params, twins, bucket):
            b.fill_(1.0)
            p.grad = b
            q.grad = torch.ones_like(q)
        opt.step()
        reference.step()
    buf = opt.flat_buffers[0][0]
    assert [buf.is_kept(i, p.grad) for i, p in enumerate(params)] == [True, True]
    params[0].grad = torch.full_like(params[0], 2.0)  # a new tensor: copied in and replaced by our view again
    twins[0].grad = torch.full_like(twins[0], 2.0)
    opt.step()
    reference.step()
    assert params[0].grad.data_ptr() == buf.region(buf.grad, 0).data_ptr()
    assert [buf.is_kept(i, p.grad) for i, p in enumerate(params)] == [False, True]
    for p, q in zip(params, twins):  # the new gradient was used, and the kept one again
        torch.testing.assert_close(p.detach(), q.detach())


@pytest.mark.skipif("cpu" not in fusedopt.build_info()["backends"], reason="compiled CPU backend not built")
def test_one_kernel_call_per_buffer_when_step_counts_differ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parameters that received gradients at different steps (frozen then unfrozen, experts without tokens) have
    different step counts; every step is still one kernel call per flat buffer set, and the trajectory is
    torch.optim's, which keeps a step per parameter."""
    from fusedopt import _C

    calls = []
    kernel = getattr(_C, EXAMPLE.kernel)
    monkeypatch.setattr(_C, EXAMPLE.kernel, lambda *args: calls.append(args[9]) or kernel(*args))  # n
    params = [torch.nn.Parameter(torch.randn(n)) for n in (5, 300, 17, 4097)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = EXAMPLE.cls(params, lr=1e-2, weight_decay=0.1, backend="cpu")
    assert EXAMPLE.torch_cls is not None
    ref = EXAMPLE.torch_cls(twins, lr=1e-2, weight_decay=0.1)
    for step in range(6):
        grads = [torch.randn(p.shape) if (i + step) % 3 != 0 or step >= 4 else None for i, p in enumerate(params)]
        for p, t, g in zip(params, twins, grads):
            p.grad = None if g is None else g.clone()
            t.grad = None if g is None else g.clone()
        opt.step()
        ref.step()
    assert len(calls) == 6, calls  # one call per step: one flat buffer set
    steps = [float(opt.state[p]["step"]) for p in params]
    assert steps == [float(ref.state[t]["step"]) for t in twins] and len(set(steps)) > 1, steps
    for p, t in zip(params, twins):
        torch.testing.assert_close(p.detach(), t.detach(), rtol=1e-6, atol=1e-7)
