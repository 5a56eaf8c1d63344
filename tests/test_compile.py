"""torch.compile: `step()` traces as the custom op fusedopt::optimizer_step and `zero_grad()` as in-place zeroes, with
no graph break, and compiled training steps (inductor and aot_eager) or a compiled `opt.step` give eager's parameters,
states, clip norms, skipped steps and state_dict."""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import fusedopt
import pytest
import torch
import torch.nn.functional as F
from cases import EXAMPLE, Algorithm, params
from test_dropin import TinyTransformer, flatten_all, make_data
from tolerances import assert_close
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

COMPILED = "cpu" in fusedopt.build_info()["backends"]
BACKEND = "cpu" if COMPILED else "reference"
STEPS = 10

# Tensor hyperparameters and fusedopt's own options used by the tests below on the example optimizer.
EXAMPLE_KWARGS = dict(lr=1e-3, weight_decay=0.1, max_grad_norm=1.0)


@pytest.fixture(autouse=True)
def fresh_dynamo(single_thread_torch: None) -> Iterator[None]:
    """Each test compiles from scratch (no graphs or guards left over from another test's optimizers)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    F.mse_loss(model(x), y).backward()


def fusedopt_ops(graphs: list[torch.fx.GraphModule]) -> list[str]:
    """Names of the fusedopt custom ops called in dynamo's graphs, in order."""
    targets = [str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"]
    return [t.split(".")[1] for t in targets if t.startswith("fusedopt.")]


def assert_same_state(ours_model: nn.Module, ours: torch.optim.Optimizer, twin: nn.Module,
                      eager: torch.optim.Optimizer, msg: str = "") -> None:
    """Bitwise: every parameter and every state tensor of the eager run (step counts included)."""
    mine, reference = flatten_all(ours_model, ours, twin, eager)
    assert torch.equal(mine, reference), f"{msg}: max difference {(mine - reference).abs().max().item()}"


# The default run keeps one class per kind of state (moments, trust ratio, per-parameter scalar states, a state whose
# first value is not zero); the others are in the slow set, for time (about 1.5 s each).
EXPLAINED_BY_DEFAULT = {"AdamW", "LAMB", "NAdam", "Rprop"}
EXPLAIN_PARAMS = [p if p.values[0].name in EXPLAINED_BY_DEFAULT else pytest.param(*p.values, id=p.id,
                                                                                  marks=pytest.mark.slow)
                  for p in params(cases=lambda row: [row.descent_cases()[-1]])]


@pytest.mark.parametrize("row,case", EXPLAIN_PARAMS)
def test_explain_reports_no_graph_break_in_step(row: Algorithm, case) -> None:
    """Every class, in the minimising case of its table that combines most modes (states compared too), clipping."""
    cls, kwargs, name = row.cls, {**case.kwargs, "max_grad_norm": 1.0}, f"{row.name}-{case.id}"
    model = TinyTransformer()
    twin = copy.deepcopy(model)
    opt = cls(model.parameters(), backend=BACKEND, **kwargs)
    eager = cls(twin.parameters(), backend=BACKEND, **kwargs)
    for x, y in make_data(2):
        backward(model, x, y)
        backward(twin, x, y)
        explanation = torch._dynamo.explain(opt.step)()  # traces and runs the step
        eager.step()
        assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
        assert explanation.graph_count == 1
        assert fusedopt_ops(explanation.graphs) == ["optimizer_step"]
        explanation = torch._dynamo.explain(opt.zero_grad)()
        eager.zero_grad()
        assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
        assert_same_state(model, opt, twin, eager, name)


def make_train_step(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    def train_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()
    return train_step


@pytest.fixture
def own_buffers(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records, for every run of fusedopt::optimizer_step, whether it was handed the optimizer's own flat parameter
    buffers (True: updated in place) or functionalization's copies of them (False)."""
    calls: list[bool] = []
    step_from_op = fusedopt._torch_ops.step_from_op

    def spy(optimizer: Any, flat_params: list[torch.Tensor], *args: Any) -> None:
        own = [buf.param for buffers in optimizer.flat_buffers for buf in buffers]
        calls.append(all(a.data_ptr() == b.data_ptr() for a, b in zip(flat_params, own)))
        step_from_op(optimizer, flat_params, *args)

    monkeypatch.setattr(fusedopt._torch_ops, "step_from_op", spy)
    return calls


# inductor's whole-step compile costs 25 s with a cold compile cache (a fresh CI machine): slow set. Its other tests
# here still run inductor by default.
@pytest.mark.parametrize("backend", [pytest.param("inductor", marks=pytest.mark.slow), "aot_eager"])
def test_compiled_train_step_matches_eager(backend: str, own_buffers: list[bool]) -> None:
    kwargs = EXAMPLE_KWARGS
    model = TinyTransformer()
    twin, torch_model = copy.deepcopy(model), copy.deepcopy(model)
    opt = EXAMPLE.cls(model.parameters(), backend=BACKEND, **kwargs)
    eager = EXAMPLE.cls(twin.parameters(), backend=BACKEND, **kwargs)
    reference = EXAMPLE.torch_optimizer(torch_model.parameters(), dict(lr=1e-3, weight_decay=0.1))
    counter = CompileCounterWithBackend(backend)
    compiled_step = torch.compile(make_train_step(model, opt), backend=counter)
    eager_step = make_train_step(twin, eager)
    for step, (x, y) in enumerate(make_data(STEPS)):
        compiled_loss, eager_loss = compiled_step(x, y), eager_step(x, y)
        F.mse_loss(torch_model(x), y).backward()
        torch_norm = torch.nn.utils.clip_grad_norm_(torch_model.parameters(), 1.0)
        reference.step()
        reference.zero_grad()
        if backend == "aot_eager":
            # aot_eager runs the same aten kernels as eager, and the step is the same fused kernel: bitwise.
            assert torch.equal(compiled_loss, eager_loss)
            assert opt.last_grad_norm == eager.last_grad_norm
            assert_same_state(model, opt, twin, eager, f"step {step}")
        else:
            # Inductor fuses the forward and backward kernels, which rounds differently from eager in the last
            # bits of the gradients; the optimizer step itself is the same kernel (bitwise in test_compiled_step).
            assert_close(*flatten_all(model, opt, twin, eager), "fp32_trajectory", msg=f"step {step}")
            assert opt.last_grad_norm == pytest.approx(eager.last_grad_norm, rel=1e-5)
        assert opt.last_grad_norm == pytest.approx(torch_norm.item(), rel=1e-5)
        assert_close(*flatten_all(model, opt, torch_model, reference), "fp32_trajectory", msg=f"step {step}")
    # The forward, and the frame resumed after loss.backward() (which dynamo does not trace) twice: step 0 sees the
    # gradients autograd created, which step() copies in and replaces by flat-buffer views; from step 1 on the
    # gradients are those views. No graph break inside step() or zero_grad(), no recompilation after that.
    assert counter.frame_count == 3
    assert fusedopt_ops(counter.graphs) == ["optimizer_step"] * 2
    # Inductor lets the op update the flat parameter buffers in place (no copies, the fast path); aot_eager does not
    # re-inplace, so the op gets copies and writes the results back through them.
    assert len(own_buffers) == STEPS and all(own_buffers) == (backend == "inductor")
    # The compiled zero_grad left every gradient zero and aliasing the flat buffer (the fast path); `aux`, which the
    # loss never uses, has none.
    buf = opt.flat_buffers[0][0]
    for i, p in enumerate(buf.params):
        if p is model.aux.weight or p is model.aux.bias:
            assert p.grad is None
        else:
            assert p.grad.data_ptr() == buf.region(buf.grad, i).data_ptr() and not p.grad.any()


@pytest.mark.parametrize("lr_kind", ["tensor-lr-scheduler", "float-lr-changing"])
def test_compiled_step_matches_eager(lr_kind: str) -> None:
    """torch.compile(opt.step) (inductor) called every step, with gradients that break the aliasing on some steps
    (set_to_none) and a parameter without a gradient on some steps: bitwise eager's trajectory."""
    tensor_lr = lr_kind.startswith("tensor")
    kwargs = dict(EXAMPLE_KWARGS, lr=torch.tensor(1e-3) if tensor_lr else 1e-3)
    model = TinyTransformer()
    twin = copy.deepcopy(model)
    opt = EXAMPLE.cls(model.parameters(), backend=BACKEND, **kwargs)
    eager = EXAMPLE.cls(twin.parameters(), backend=BACKEND, **{**kwargs, "lr": copy.deepcopy(kwargs["lr"])})
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (s + 1)) for o in (opt, eager)]
    counter = CompileCounterWithBackend("inductor")
    compiled_step = torch.compile(opt.step, backend=counter)  # the scheduler's wrapper around step, traced too
    for step, (x, y) in enumerate(make_data(STEPS)):
        for m, o in ((model, opt), (twin, eager)):
            o.zero_grad(set_to_none=step % 3 == 1)
            F.mse_loss(m(x, use_aux=step % 2 == 0), y).backward()
        compiled_step()
        eager.step()
        if tensor_lr:
            for sched in scheds:
                sched.step()
        else:
            for o in (opt, eager):
                o.param_groups[0]["lr"] = 1e-3 / (step + 2)
        assert opt.last_grad_norm == eager.last_grad_norm
        assert_same_state(model, opt, twin, eager, f"step {step}")
    assert opt.param_groups[0]["lr"] == eager.param_groups[0]["lr"]
    # One graph per pattern of gradients: None (aux on steps 1 and 7) or not, and created by autograd (after
    # set_to_none; the graph copies them into the flat buffer) or the flat buffer's views. A tensor lr adds no
    # recompilation. A float lr is a constant to dynamo: once it changes, the patterns are compiled again with the
    # lr no longer specialised (how many times depends on dynamo's automatic-dynamic bookkeeping); every step still
    # ran compiled code, below dynamo's recompile limit, after which it would silently run step() eagerly.
    if tensor_lr:
        assert counter.frame_count <= 4
    else:
        config = torch._dynamo.config
        if hasattr(config, "recompile_limit"):
            assert counter.frame_count < config.recompile_limit
        else:  # torch 2.5 recompiles more often and reaches its limit (cache_size_limit); then steps run eagerly
            assert counter.frame_count <= config.cache_size_limit


def compare_state_dicts(ours: torch.optim.Optimizer, eager: torch.optim.Optimizer) -> None:
    ours_sd, eager_sd = ours.state_dict(), eager.state_dict()
    assert ours_sd["param_groups"] == eager_sd["param_groups"]
    assert ours_sd["state"].keys() == eager_sd["state"].keys()
    for key, state in eager_sd["state"].items():
        for name, value in state.items():
            assert torch.equal(ours_sd["state"][key][name], value), (key, name)


def test_grad_scaler_and_state_dict_through_the_op() -> None:
    """GradScaler's fused contract with opt.step compiled (aot_eager, which hands the op functionalized copies of the
    parameters): grad_scale and found_inf reach the op (unscale inside the step, skip on inf), and last_grad_norm,
    the scale and state_dict follow eager's."""
    kwargs = dict(EXAMPLE_KWARGS, lr=1e-2)
    model = TinyTransformer()
    twin = copy.deepcopy(model)
    opt, eager = (EXAMPLE.cls(m.parameters(), backend=BACKEND, **kwargs) for m in (model, twin))
    counter = CompileCounterWithBackend("aot_eager")
    opt.step = torch.compile(opt.step, backend=counter)  # what GradScaler.step(opt) calls
    scalers = [torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2) for _ in range(2)]
    scales = []
    for step, (x, y) in enumerate(make_data(8)):
        for m, o, scaler in ((model, opt, scalers[0]), (twin, eager, scalers[1])):
            o.zero_grad()
            loss = F.mse_loss(m(x), y)
            if step == 3:
                loss = loss * float("inf")  # found_inf: the step is skipped and the scale halved
            scaler.scale(loss).backward()
            scaler.step(o)
            scaler.update()
        scales.append(scalers[0].get_scale())
        assert scales[-1] == scalers[1].get_scale()
        assert opt.last_grad_norm == eager.last_grad_norm
        assert_same_state(model, opt, twin, eager, f"step {step}")
    assert scales[3] == scales[2] / 2
    compare_state_dicts(opt, eager)
    assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")
    assert counter.frame_count >= 1 and fusedopt_ops(counter.graphs) == ["optimizer_step"] * counter.frame_count


def test_skip_nonfinite_through_the_op() -> None:
    """skip_nonfinite with opt.step compiled: a step whose gradients hold inf changes nothing and is counted."""
    kwargs = dict(EXAMPLE_KWARGS, lr=1e-2, skip_nonfinite=True)
    model = TinyTransformer()
    twin = copy.deepcopy(model)
    opt, eager = (EXAMPLE.cls(m.parameters(), backend=BACKEND, **kwargs) for m in (model, twin))
    compiled_step = torch.compile(opt.step, backend="aot_eager")
    for step, (x, y) in enumerate(make_data(6)):
        for m, o in ((model, opt), (twin, eager)):
            o.zero_grad()
            loss = F.mse_loss(m(x), y)
            (loss * float("inf") if step == 2 else loss).backward()
        compiled_step()
        eager.step()
        assert opt.last_grad_norm == eager.last_grad_norm
        assert_same_state(model, opt, twin, eager, f"step {step}")
    assert opt.skipped_steps == eager.skipped_steps == 1
    compare_state_dicts(opt, eager)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_graph_writes_before_step_reach_the_op(backend: str) -> None:
    """A compiled function that writes a tensor lr, a tensor beta and the parameters before calling step(): the op
    must see the written values even when functionalization defers the writes to the end of the graph."""
    model = nn.Linear(16, 8)
    twin = copy.deepcopy(model)
    opt, eager = (EXAMPLE.cls(m.parameters(), lr=torch.tensor(1e-2), betas=(torch.tensor(0.9), torch.tensor(0.99)),
                              backend=BACKEND) for m in (model, twin))

    def rescale_and_step(o: torch.optim.Optimizer, lr: torch.Tensor) -> None:
        with torch.no_grad():
            o.param_groups[0]["lr"].copy_(lr)
            o.param_groups[0]["betas"][1].fill_(0.95)
            for p in o.param_groups[0]["params"]:
                p.mul_(0.5)
        o.step()

    compiled = torch.compile(rescale_and_step, backend=backend)
    for step in range(3):
        x, y = torch.randn(4, 16), torch.randn(4, 8)
        backward(model, x, y)
        backward(twin, x, y)
        lr = torch.tensor(0.1 / (step + 1))
        compiled(opt, lr)
        rescale_and_step(eager, lr)
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p, q), f"step {step}"
        assert torch.equal(opt.param_groups[0]["lr"], eager.param_groups[0]["lr"])


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_parameters_read_after_step_in_the_same_graph(backend: str) -> None:
    """An EMA of the parameters updated right after step() in the same compiled function: the graph holds both the
    parameters and the flat buffer the op writes (aliases of one storage), and the EMA must see the new values."""
    model = mlp()
    twin = copy.deepcopy(model)
    opt, eager = (EXAMPLE.cls(m.parameters(), lr=1e-2, backend=BACKEND) for m in (model, twin))
    emas = [[p.detach().clone() for p in m.parameters()] for m in (model, twin)]

    def step_and_average(m: nn.Module, o: torch.optim.Optimizer, ema: list[torch.Tensor]) -> None:
        o.step()
        with torch.no_grad():
            for e, p in zip(ema, m.parameters()):
                e.lerp_(p, 0.1)
        o.zero_grad()

    compiled = torch.compile(step_and_average, backend=backend)
    for step in range(3):
        x, y = torch.randn(8, 16), torch.randn(8, 1)
        backward(model, x, y)
        backward(twin, x, y)
        compiled(model, opt, emas[0])
        step_and_average(twin, eager, emas[1])
        assert_same_state(model, opt, twin, eager, f"step {step}")
        # Inductor's own lerp kernel may round differently from eager's (one fp32 ulp).
        assert_close(torch.cat([e.reshape(-1) for e in emas[0]]), torch.cat([e.reshape(-1) for e in emas[1]]),
                     "fp32", msg=f"step {step}")


def test_recompiled_graphs_that_clip_and_zero_the_gradient_views() -> None:
    """zero_grad first, gradient clipping in the graph, and a flag that makes dynamo recompile the graph long after
    the gradients became flat-buffer views: the graphs write those views in place, which must neither fail to
    compile nor change the trajectory."""
    model = mlp()
    twin = copy.deepcopy(model)
    opt, eager = (EXAMPLE.cls(m.parameters(), lr=1e-2, weight_decay=0.1, backend=BACKEND) for m in (model, twin))

    def train_step(m: nn.Module, o: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, double: bool) -> None:
        o.zero_grad()
        (F.mse_loss(m(x), y) * (2.0 if double else 1.0)).backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
        o.step()

    compiled = torch.compile(train_step, backend="aot_eager")
    for step in range(8):
        x, y = torch.randn(8, 16), torch.randn(8, 1)
        double = step % 3 == 2  # False on step 0, True (a recompilation) first on step 2
        compiled(model, opt, x, y, double)
        train_step(twin, eager, x, y, double)
        assert_same_state(model, opt, twin, eager, f"step {step}")
