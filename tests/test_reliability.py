"""Reliability: bad input is refused with a clear error and changes nothing; non-finite gradients; memory that
does not grow; optimizers stepping in parallel threads."""
from __future__ import annotations

import copy
import gc
import threading
from collections.abc import Callable
from typing import Any

import fusedopt
import pytest
import torch
from cases import EXAMPLE, Algorithm, row_params
from tolerances import assert_close

COMPILED = "cpu" in fusedopt.build_info()["backends"]
BACKENDS = [
    pytest.param("reference", id="reference"),
    pytest.param("cpu", id="cpu", marks=pytest.mark.skipif(not COMPILED, reason="compiled CPU backend not built")),
]
# Checkpoint keys of the example's states (kept with its default configuration, which `trained` uses below).
STATES = EXAMPLE.state_names({})


def trained(cls: type, kwargs: dict[str, Any], backend: str, steps: int = 3) -> tuple[Any, list[torch.Tensor]]:
    params = [torch.nn.Parameter(torch.randn(n)) for n in (7, 4097, 33)]
    opt = cls(params, backend=backend, **kwargs)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return opt, params


def snapshot(opt: Any, params: list[torch.Tensor]) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for p in params] + [p.grad.clone() for p in params if p.grad is not None]
    for p in params:
        tensors += [v.clone() for v in opt.state.get(p, {}).values() if isinstance(v, torch.Tensor)]
    return tensors


def assert_unchanged(before: list[torch.Tensor], after: list[torch.Tensor]) -> None:
    assert len(before) == len(after)
    for a, b in zip(before, after):
        assert torch.equal(a, b) or (a.isnan().any() and torch.equal(a.isnan(), b.isnan()))


def _sparse_grad(opt: Any, params: list[torch.Tensor]) -> None:
    params[1].grad = torch.randn(4097).to_sparse()
    opt.step()


def _wrong_group_count(opt: Any, params: list[torch.Tensor]) -> None:
    state = opt.state_dict()
    state["param_groups"] = state["param_groups"] * 2
    opt.load_state_dict(state)


def _wrong_state_size(opt: Any, params: list[torch.Tensor]) -> None:
    state = copy.deepcopy(opt.state_dict())
    state["state"][1][STATES[0]] = torch.zeros(10)
    opt.load_state_dict(state)


def _wrong_state_dtype(opt: Any, params: list[torch.Tensor]) -> None:
    state = copy.deepcopy(opt.state_dict())
    state["state"][0][STATES[0]] = torch.zeros(7, dtype=torch.int64)
    opt.load_state_dict(state)


def _missing_state_key(opt: Any, params: list[torch.Tensor]) -> None:
    state = copy.deepcopy(opt.state_dict())
    del state["state"][2][STATES[-1]]
    opt.load_state_dict(state)


def _unknown_state_key(opt: Any, params: list[torch.Tensor]) -> None:
    state = copy.deepcopy(opt.state_dict())
    state["state"][2]["momentum"] = torch.zeros(33)
    opt.load_state_dict(state)


def _nan_lr_in_checkpoint(opt: Any, params: list[torch.Tensor]) -> None:
    state = copy.deepcopy(opt.state_dict())
    state["param_groups"][0]["lr"] = float("nan")
    opt.load_state_dict(state)


def _grad_data_of_other_dtype(opt: Any, params: list[torch.Tensor]) -> None:
    # torch refuses `p.grad = t` with another dtype, shape or device, but `p.grad.data = t` swaps dtype and shape.
    params[2].grad.data = torch.randn(33, dtype=torch.float64)
    opt.step()


def _grad_data_of_other_shape(opt: Any, params: list[torch.Tensor]) -> None:
    params[1].grad.data = torch.randn(4096)
    opt.step()


BAD_CALLS: list[tuple[str, Callable[[Any, list[torch.Tensor]], None], type, str]] = [
    ("sparse-gradient", _sparse_grad, RuntimeError, "sparse gradients"),
    ("gradient-dtype", _grad_data_of_other_dtype, RuntimeError,
     r"gradient of parameter 2 is \(33,\) torch.float64 on cpu, the parameter is 33 elements torch.float32"),
    ("gradient-shape", _grad_data_of_other_shape, RuntimeError,
     r"gradient of parameter 1 is \(4096,\) torch.float32 on cpu, the parameter is 4097 elements"),
    ("load-wrong-group-count", _wrong_group_count, ValueError, "parameter groups"),
    ("load-wrong-state-size", _wrong_state_size, ValueError, f"'{STATES[0]}' of parameter 1 has 10 elements"),
    ("load-wrong-state-dtype", _wrong_state_dtype, ValueError, "must be a floating-point tensor, got torch.int64"),
    ("load-missing-key", _missing_state_key, ValueError, rf"missing \['{STATES[-1]}'\]"),
    ("load-unknown-key", _unknown_state_key, ValueError, r"unknown \['momentum'\]"),
    ("load-nan-lr", _nan_lr_in_checkpoint, ValueError, "Invalid learning rate: nan"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,call,error,message", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_call_raises_and_changes_nothing(backend: str, name: str, call: Callable, error: type, message: str):
    opt, params = trained(EXAMPLE.cls, dict(lr=1e-2), backend)
    before = snapshot(opt, params)
    with pytest.raises(error, match=message):
        call(opt, params)
    if name in ("sparse-gradient", "gradient-dtype", "gradient-shape"):  # the bad gradient stays where it was put
        after = snapshot(opt, params)
        assert_unchanged(before[:3] + before[6:], after[:3] + after[6:])
    else:
        assert_unchanged(before, snapshot(opt, params))


def _float64() -> list[Any]:
    return [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(5, dtype=torch.float64))]


# (name, parameters, fusedopt options, message). float64 parameters keep float64 states and take no master weights
# (both would round them to float32); float64 states are for float64 parameters only.
BAD_PARAMETERS: list[tuple[str, Callable[[], list[Any]], dict[str, Any], str]] = [
    ("empty-list", lambda: [], {}, "empty parameter list"),
    ("complex", lambda: [torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))], {}, "complex parameters"),
    ("expanded", lambda: [torch.randn(1).expand(5).requires_grad_()], {}, "overlap in memory"),
    ("duplicate-in-group", lambda: [torch.nn.Parameter(torch.randn(3))] * 2, {}, "appears twice"),
    ("integer", lambda: [torch.arange(3)], {}, "float32, bfloat16, float16 and float64 parameters, got torch.int64"),
    ("float64-master-weights", _float64, dict(master_weights=True),
     "Invalid master_weights: True for float64 parameters"),
    ("float64-bf16-states", _float64, dict(state_dtype=torch.bfloat16),
     "Invalid state_dtype: torch.bfloat16 for float64 parameters"),
    ("float64-fp32-states", _float64, dict(state_dtype=torch.float32),
     "Invalid state_dtype: torch.float32 for float64 parameters"),
    ("float32-fp64-states", lambda: [torch.nn.Parameter(torch.randn(3))], dict(state_dtype=torch.float64),
     "Invalid state_dtype: torch.float64 for torch.float32 parameters"),
]


@pytest.mark.parametrize("name,make,options,message", BAD_PARAMETERS, ids=[c[0] for c in BAD_PARAMETERS])
def test_bad_parameters_are_refused(name: str, make: Callable[[], list[Any]], options: dict[str, Any],
                                    message: str) -> None:
    params = make()
    pointers = [p.data_ptr() for p in params]
    with pytest.raises((ValueError, TypeError), match=message):
        EXAMPLE.cls(params, **options)
    assert [p.data_ptr() for p in params] == pointers
    if params and name.startswith("float"):  # a group added later is refused the same way, and changes nothing
        opt = EXAMPLE.cls([torch.nn.Parameter(torch.randn(2))])
        with pytest.raises(ValueError, match=message):
            opt.add_param_group({"params": params, **options})
        assert len(opt.param_groups) == 1 and [p.data_ptr() for p in params] == pointers
        first = torch.nn.Parameter(torch.randn(4))
        first_pointer = first.data_ptr()
        with pytest.raises(ValueError, match=message):  # so is a second group of the constructor, before the first
            EXAMPLE.cls([{"params": [first]}, {"params": params, **options}])  # moves into flat storage
        assert first.data_ptr() == first_pointer and [p.data_ptr() for p in params] == pointers


def test_shared_memory_and_duplicates_across_groups_are_refused() -> None:
    storage = torch.randn(10)
    a, b = torch.nn.Parameter(torch.empty(0)), torch.nn.Parameter(torch.empty(0))
    a.data, b.data = storage[:6], storage[4:]
    with pytest.raises(ValueError, match="share memory"):
        EXAMPLE.cls([a, b])
    c = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="more than one parameter group"):
        EXAMPLE.cls([{"params": [c]}, {"params": [c]}])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("row", row_params())
@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_skip_nonfinite_makes_the_step_a_no_op(backend: str, row: Algorithm, bad: float) -> None:
    """Every class in the case of its table that keeps the most states."""
    cls, kwargs = row.cls, row.richest_case().kwargs
    torch.manual_seed(7)
    opt, params = trained(cls, dict(kwargs, skip_nonfinite=True), backend)
    torch.manual_seed(7)
    twin, twin_params = trained(cls, kwargs, backend)  # the same data as `opt` so far, without the bad step
    before = snapshot(opt, params)
    for p in params:
        p.grad = torch.randn_like(p)
    params[1].grad[100] = bad
    opt.step()
    assert opt.skipped_steps == 1
    assert_unchanged(before[:3], snapshot(opt, params)[:3])
    state_after = snapshot(opt, params)[6:]
    assert_unchanged(before[6:], state_after)
    # The next finite step proceeds as if the bad one never happened.
    grads = [torch.randn_like(p) for p in params]
    for p, q, g in zip(params, twin_params, grads):
        p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    twin.step()
    for p, q in zip(params, twin_params):
        assert_close(p.detach(), q.detach(), "fp32_trajectory")


def test_nonfinite_gradient_without_skip_behaves_like_torch() -> None:
    init = [torch.randn(5), torch.randn(9)]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    opt = EXAMPLE.cls(ours, lr=1e-2)
    assert EXAMPLE.torch_cls is not None
    ref = EXAMPLE.torch_cls(theirs, lr=1e-2)
    grads = [torch.randn(5), torch.randn(9)]
    grads[1][3] = float("inf")
    for p, q, g in zip(ours, theirs, grads):
        p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    ref.step()
    for p, q in zip(ours, theirs):
        assert torch.equal(p.isnan(), q.isnan())
        assert_close(p[~p.isnan()].detach(), q[~q.isnan()].detach(), torch.float32)


def test_clip_grad_norm_error_if_nonfinite_raises_like_torch() -> None:
    p = torch.nn.Parameter(torch.randn(10))
    p.grad = torch.randn(10)
    p.grad[2] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        fusedopt.clip_grad_norm_([p], 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_([p], 1.0, error_if_nonfinite=True)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.parametrize("backend", BACKENDS)
def test_steps_allocate_nothing_after_warm_up(backend: str) -> None:
    # The reference backend is plain torch code: a smaller buffer keeps 1,000 steps quick.
    size = 1 << 20 if backend == "cpu" else 1 << 16
    params = [torch.nn.Parameter(torch.randn(n)) for n in (size, 3000, 17)]
    opt = EXAMPLE.cls(params, lr=1e-3, max_grad_norm=1.0, backend=backend)
    for p in params:
        p.grad = torch.randn_like(p)
    for _ in range(20):
        opt.step()
    gc.collect()
    start = _rss_bytes()
    for _ in range(1000):
        opt.step()
    gc.collect()
    growth = _rss_bytes() - start
    # Anything a step kept alive would add up over 1,000 steps: 1 KiB per step is already 1 MiB.
    assert growth < 1024 * 1024, f"resident memory grew by {growth} bytes over 1,000 steps"


@pytest.mark.cuda
def test_cuda_steps_allocate_nothing_after_warm_up() -> None:
    params = [torch.nn.Parameter(torch.randn(n, device="cuda")) for n in (1 << 20, 3000, 17)]
    opt = EXAMPLE.cls(params, lr=1e-3, max_grad_norm=1.0)
    for p in params:
        p.grad = torch.randn_like(p)
    for _ in range(3):
        opt.step()
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    for _ in range(100):
        opt.step()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == start


@pytest.mark.cuda
def test_parameters_on_several_devices_in_one_group_match_torch() -> None:
    """One group, a CPU and a CUDA parameter: one flat buffer set per device, each updated on its own backend."""
    ours = [torch.nn.Parameter(torch.randn(4097)), torch.nn.Parameter(torch.randn(33, device="cuda"))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = EXAMPLE.cls(ours, lr=1e-2, weight_decay=0.1)
    reference = EXAMPLE.torch_optimizer(theirs, dict(lr=1e-2, weight_decay=0.1))
    assert [buf.device.type for buf in opt.flat_buffers[0]] == ["cpu", "cuda"]
    for _ in range(20):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt.step()
        reference.step()
    for a, b in zip(ours, theirs):
        assert a.device == b.device
        assert_close(a, b, "fp32_trajectory")


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_optimizers_in_two_threads_match_sequential_steps(backend: str) -> None:
    init = [[torch.randn(50_000), torch.randn(77)] for _ in range(2)]
    grads = [[[torch.randn_like(t) for t in ts] for _ in range(20)] for ts in init]

    def run(ts: list[torch.Tensor], gs: list[list[torch.Tensor]], out: list[torch.Tensor]) -> None:
        params = [torch.nn.Parameter(t.clone()) for t in ts]
        opt = EXAMPLE.cls(params, lr=1e-2, max_grad_norm=0.5, backend=backend)
        for step_grads in gs:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        out.extend(p.detach() for p in params)

    sequential: list[list[torch.Tensor]] = [[], []]
    for i in range(2):
        run(init[i], grads[i], sequential[i])
    threaded: list[list[torch.Tensor]] = [[], []]
    threads = [threading.Thread(target=run, args=(init[i], grads[i], threaded[i])) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seq, thr in zip(sequential, threaded):
        assert len(seq) == len(thr) == 2
        for a, b in zip(seq, thr):
            assert torch.equal(a, b)
