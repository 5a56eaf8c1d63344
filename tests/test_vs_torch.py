"""Every public optimizer class against torch.optim's class of the same name, or against its float64 paper formulas
(tests/cases.py) where torch.optim has none, on random tensors and on a small Transformer trained with real backward
passes; every parameter and every state tensor is compared after every step, on each available backend. float32
parameters follow torch to the fp32 trajectory tolerance, float64 parameters torch's float64 computation to the
float64 tolerance (also with clipping, in groups mixing both, and with values where any float32 rounding shows). Also
checks that gradient aliasing, broken by the user in every documented way, never changes the result.
"""
from __future__ import annotations

import copy
from typing import Any

import fusedopt
import pytest
import torch
from cases import BIG_SIZE, EXAMPLE, ORACLE_ROWS, TORCH_ROWS, Algorithm, params
from tolerances import assert_close, tolerance
from torch import Tensor

pytestmark = pytest.mark.usefixtures("single_thread_torch")

STEPS = 50
MODEL_STEPS = 30
F32, F64 = torch.float32, torch.float64
# Parameter dtypes of the random-tensor comparisons, and the tolerance of each: float32 trajectories drift by
# float32 roundings, float64 ones agree with torch's float64 computation to float64 rounding.
DTYPES = [pytest.param(F32, id="fp32"), pytest.param(F64, id="fp64")]
TRAJECTORY_TOL = {F32: "fp32_trajectory", F64: F64}
STEP_TOL = {F32: "fp32", F64: F64}

def _available_backends() -> list[str]:
    return list(fusedopt.build_info().get("backends", ["reference"]))


BACKENDS = [pytest.param("reference", id="reference"), pytest.param("cpu", id="cpu")]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name = request.param
    if name not in _available_backends():
        pytest.skip(f"backend {name!r} not built (fusedopt.build_info()['backends'] = {_available_backends()})")
    return name


def make_fused(row: Algorithm, params: Any, kwargs: dict[str, Any], backend: str) -> torch.optim.Optimizer:
    return row.cls(params, **kwargs, backend=backend)


def random_shapes(big: bool) -> list[tuple[int, ...]]:
    shapes = [(1,), (7,), (4097,), (13, 17)]
    return shapes + [(BIG_SIZE,)] if big else shapes


def case_params(rows: list[Algorithm]) -> list:
    """Every case, with float32 and with float64 parameters; the first and the last (most modes combined) case of each
    table also with a 1,000,003 tensor in float32 (sizes, chunks and threads are the compiled kernels' business, and
    tests/test_cpu_kernels.py covers them in float64), a `slow` test except for the example row's first case."""
    out = []
    for row in rows:
        for i, case in enumerate(row.cases):
            name = f"{row.name}-{case.id}"
            fast_big = row is EXAMPLE and i == 0
            if not fast_big:
                out.append(pytest.param(row, case, False, F32, id=f"{name}-fp32"))
            if i in (0, len(row.cases) - 1):
                out.append(pytest.param(row, case, True, F32, id=f"{name}-big-fp32",
                                        marks=() if fast_big else pytest.mark.slow))
            out.append(pytest.param(row, case, False, F64, id=f"{name}-fp64"))
    return out


def compare_with_torch(row: Algorithm, kwargs: dict[str, Any], fused: torch.optim.Optimizer,
                       ours: list[Tensor], torch_opt: torch.optim.Optimizer, theirs: list[Tensor], where: str,
                       skip: list[Tensor] | None = None) -> None:
    """Every parameter, every state tensor and the step count equal torch.optim's (the trajectory tolerance of the
    parameter's dtype), except elements marked in `skip` (one mask per parameter, see `IllConditioned`)."""
    names = row.state_names(kwargs)

    def same(a: Tensor, b: Tensor, i: int, msg: str) -> None:
        if skip is not None and b.shape == skip[i].shape:  # per-parameter scalar states have no ill elements
            b = torch.where(skip[i], a.detach(), b.detach())
        assert a.dtype == b.dtype, f"{msg}: {a.dtype} vs torch's {b.dtype}"
        assert_close(a, b, TRAJECTORY_TOL[ours[i].dtype], msg=msg)

    for i, (p, q) in enumerate(zip(ours, theirs)):
        at = f"{where}, parameter {i} {tuple(p.shape)}"
        assert p.shape == q.shape
        same(p, q, i, f"{at}: param")
        torch_state = torch_opt.state.get(q, {})
        fused_state = fused.state.get(p, {})
        for name in names:
            assert (name in fused_state) == (name in torch_state), f"{at}: state {name} presence"
            if name in torch_state:
                assert fused_state[name].shape == torch_state[name].shape, f"{at}: state {name} shape"
                same(fused_state[name], torch_state[name], i, f"{at}: state {name}")
        if "step" in torch_state:
            assert float(fused_state["step"]) == float(torch_state["step"]), f"{at}: step"


# ------------------------------------------------------------------------------------- float64 oracles
def oracle64_step(row: Algorithm, kwargs: dict[str, Any], fused: torch.optim.Optimizer, params: list[Tensor]
                  ) -> list[tuple[Tensor, dict[str, Tensor], Tensor | None]]:
    """The row's float64 paper formulas for one step, started from the optimizer's current parameters, states and
    gradients (parameters without a gradient must not move: expected = current). Per parameter: (param, states,
    skip mask)."""
    assert row.oracle64 is not None
    hp = row.group(kwargs)
    out = []
    for p in params:
        state = fused.state.get(p, {})
        current = {s.name: state[s.name].detach().to(F64).clone() if s.name in state
                   else torch.full(p.shape, s.fill(hp), dtype=F64) for s in row.kept_states(kwargs)}
        if p.grad is None:
            out.append((p.detach().to(F64).clone(), current, None))
            continue
        step = int(state["step"]) + 1 if "step" in state else 1
        out.append(row.oracle64(p.detach(), p.grad, current, step, hp))
    return out


def compare_with_oracle(row: Algorithm, kwargs: dict[str, Any], fused: torch.optim.Optimizer,
                        params: list[Tensor], expected: list[tuple[Tensor, dict[str, Tensor], Tensor | None]],
                        where: str, tol: object = "fp32") -> int:
    """Parameters and states equal the oracle's; returns how many (sign-ambiguous) elements were skipped."""
    skipped = 0
    for i, (p, (exp_p, exp_state, skip)) in enumerate(zip(params, expected)):
        at = f"{where}, parameter {i} {tuple(p.shape)}"
        if skip is not None:
            exp_p = torch.where(skip, p.detach().to(F64), exp_p)
            skipped += int(skip.sum())
        assert_close(p, exp_p, tol, msg=f"{at}: param")
        state = fused.state.get(p, {})
        for name, value in exp_state.items():
            if name in state:
                assert_close(state[name], value, tol, msg=f"{at}: state {name}")
            else:
                fill = next(s.fill(row.group(kwargs)) for s in row.kept_states(kwargs) if s.name == name)
                assert torch.all(value == fill), f"{at}: state {name} missing"
    return skipped


def backend_case_params(rows: list[Algorithm]) -> list:
    """`case_params` on each backend. The reference backend's cases are `slow` except for the example row: its
    functions equal torch.optim's bit for bit in test_reference.py, and the optimizer around them is the one the cpu
    backend's cases run."""
    out = []
    for p in case_params(rows):
        row = p.values[0]
        for backend in ("reference", "cpu"):
            slow = backend == "reference" and row is not EXAMPLE
            out.append(pytest.param(*p.values, backend, id=f"{backend}-{p.id}",
                                    marks=[*p.marks, *([pytest.mark.slow] if slow else [])]))
    return out


# ------------------------------------------------------------------------------------- (a) random tensors
@pytest.mark.parametrize("row,case,big,dtype,backend", backend_case_params(TORCH_ROWS), indirect=["backend"])
def test_random_tensors_match_torch_optim(row: Algorithm, case, big: bool, backend: str, dtype: torch.dtype) -> None:
    """Several parameters (sizes 1, 7, 4097, a 13x17 matrix, 1,000,003 for some cases), 50 steps of fresh random
    gradients accumulated into .grad after opt.zero_grad() (the flat-buffer fast path); float32 parameters, and
    float64 ones against torch's float64 computation (states float64 like torch's)."""
    shapes = random_shapes(big)
    init = [torch.randn(s, dtype=dtype) for s in shapes]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    fused = make_fused(row, ours, case.kwargs, backend)
    reference = row.torch_optimizer(theirs, case.kwargs)
    for step in range(1, STEPS + 1):
        fused.zero_grad()
        reference.zero_grad()
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape, dtype=dtype)
            q.grad = g.clone()
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.add_(g)  # what backward does with an existing gradient
        fused.step()
        reference.step()
        compare_with_torch(row, case.kwargs, fused, ours, reference, theirs, f"step {step}")


@pytest.mark.parametrize("row,case,big,dtype", case_params(ORACLE_ROWS))
def test_random_tensors_match_float64_paper(row: Algorithm, case, big: bool, backend: str, dtype: torch.dtype) -> None:
    """Algorithms torch.optim lacks: each of 50 steps equals the float64 paper formulas started from the optimizer's
    own parameters and states (per-step tolerance of the parameters' dtype; per-tensor quantities such as trust ratios
    per tensor)."""
    shapes = random_shapes(big)
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]
    fused = make_fused(row, params, case.kwargs, backend)
    skipped = 0
    for step in range(1, STEPS + 1):
        fused.zero_grad()
        for p in params:
            g = torch.randn(p.shape, dtype=dtype)
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
        expected = oracle64_step(row, case.kwargs, fused, params)
        fused.step()
        skipped += compare_with_oracle(row, case.kwargs, fused, params, expected, f"step {step}", STEP_TOL[dtype])
    total = sum(p.numel() for p in params) * STEPS
    assert skipped <= max(2, 1e-5 * total), f"{skipped} sign-ambiguous elements"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row,case", params([r for r in ORACLE_ROWS if r.smooth_trajectory]))
def test_whole_trajectory_float64(row: Algorithm, case, backend: str, dtype: torch.dtype) -> None:
    """A smooth update over 50 steps against a float64 trajectory that is never re-anchored (trajectory tolerance of
    the parameters' dtype: float64 parameters follow it to float64 rounding)."""
    assert row.oracle64 is not None
    hp = row.group(case.kwargs)
    shapes = random_shapes(False)
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]
    p64 = [p.detach().to(F64).clone() for p in params]
    s64 = [{s.name: torch.full(shape, s.fill(hp), dtype=F64) for s in row.kept_states(case.kwargs)}
           for shape in shapes]
    fused = make_fused(row, params, case.kwargs, backend)
    for step in range(1, STEPS + 1):
        fused.zero_grad()
        for i, p in enumerate(params):
            g = torch.randn(p.shape, dtype=dtype)
            p.grad = g if p.grad is None else p.grad.add_(g)
            p64[i], s64[i], _ = row.oracle64(p64[i], p.grad, s64[i], step, hp)
        fused.step()
        expected = [(p64[i], s64[i], None) for i in range(len(params))]
        compare_with_oracle(row, case.kwargs, fused, params, expected, f"step {step}", tol=TRAJECTORY_TOL[dtype])


# ------------------------------------------------------------------------------------- (b) small model
class TinyTransformer(torch.nn.Module):
    """2-layer TransformerEncoder (d_model 32, 4 heads, feed-forward 64, no dropout) and a linear head (with bias).

    The encoder layers have bias=False because attention is invariant to the key bias: its exact gradient is 0, so
    the computed one is pure rounding noise, and normalising optimizers turn that noise into lr-sized steps whose
    sign any 1-ulp difference elsewhere (a clip coefficient, an FMA) flips. Such a parameter cannot be compared.
    """

    def __init__(self) -> None:
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0,
                                                 batch_first=True, bias=False)
        self.encoder = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(32, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


def model_pair(dtype: torch.dtype = F32) -> tuple[torch.nn.Module, torch.nn.Module, list[tuple[Tensor, Tensor]]]:
    model = TinyTransformer().to(dtype)
    twin = copy.deepcopy(model)
    data = [(torch.randn(4, 6, 32).to(dtype), torch.randn(4, 6, 3).to(dtype)) for _ in range(MODEL_STEPS)]
    return model, twin, data


def loss_fn(model: torch.nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return torch.nn.functional.mse_loss(model(x), y)


class IllConditioned:
    """Elements whose effective gradient grad + wd*p (coupled weight decay) cancelled to below 1e-3 of its terms.

    There a one-rounding difference in forming grad + wd*p (e.g. an FMA in a compiled kernel, which the design
    allows) is a >1e-4 relative difference of g, which normalising optimizers carry into their states and every
    later step. Real gradients hit this (weights whose gradient balances their decay: ~1% of this model's
    elements over 30 steps); such elements are excluded from then on, and there must be few of them (< 3%)."""

    def __init__(self, row: Algorithm, kwargs: dict[str, Any], params: list[Tensor]) -> None:
        hp = row.group(kwargs)
        self.wd = float(hp["weight_decay"]) if row.decay_enters_gradient(kwargs) else 0.0
        eps = hp.get("eps", 0.0)
        self.eps = float(eps) if isinstance(eps, (int, float)) else 0.0  # centered RMSprop's; Adafactor's is a pair
        self.masks = [torch.zeros(p.shape, dtype=torch.bool) for p in params]

    def update(self, params: list[Tensor]) -> None:
        for mask, p in zip(self.masks, params):
            if p.grad is None:
                continue
            g = p.grad.detach().double()
            if self.wd != 0.0:
                decay = self.wd * p.detach().double()
                mask |= (g + decay).abs() < 1e-3 * (g.abs() + decay.abs())

    def update_centered(self, torch_opt: torch.optim.Optimizer, theirs: list[Tensor]) -> None:
        """A centered second moment: sqrt(square_avg - grad_avg^2) cancels when a gradient barely varies (same
        argument)."""
        for mask, q in zip(self.masks, theirs):
            st = torch_opt.state.get(q, {})
            if "grad_avg" in st:
                sq, ga = st["square_avg"].double(), st["grad_avg"].double()
                # fp32 rounding leaves var = sq - ga^2 uncertain by dv ~ 1.2e-7*sq, so sqrt(var) by dv/(2 sqrt(var))
                # (or sqrt(dv) when var ~ 0); marked where that exceeds 2e-6 of the denominator sqrt(var) + eps.
                var = (sq - ga * ga).clamp(min=0)
                dv = 1.2e-7 * sq
                err = torch.where(var > dv, dv / (2 * var.sqrt()), dv.sqrt())
                mask |= err > 2e-6 * (var.sqrt() + self.eps)

    def check_few(self) -> None:
        marked = sum(int(m.sum()) for m in self.masks)
        total = sum(m.numel() for m in self.masks)
        assert marked <= 0.03 * total, f"{marked} of {total} elements ill-conditioned"


def share_grads(ours: list[Tensor], theirs: list[Tensor]) -> None:
    """Give torch's twin model exactly our gradients (None stays None).

    Both sides must see the same gradients: backward through a Transformer amplifies a 1-ulp parameter difference
    into a relative gradient difference of up to ~1e-3 in small components, and normalising optimizers (those that
    divide by a root of a second moment) pass that straight into their update, so recomputing gradients on the twin
    would test the model's conditioning instead of the optimizer. Our gradients still come from real backward passes
    into the optimizer's gradient views."""
    for p, q in zip(ours, theirs):
        q.grad = None if p.grad is None else p.grad.detach().clone()


def model_case_params(rows: list[Algorithm]) -> list:
    """First case and the minimising case that combines most modes, per table (maximize is gradient ascent on the
    loss: the model diverges, so it is covered on random tensors, where updates do not feed back into gradients)."""
    return params(rows, Algorithm.descent_cases)


@pytest.mark.parametrize("row,case", model_case_params(TORCH_ROWS))
def test_transformer_matches_torch_optim(row: Algorithm, case, backend: str) -> None:
    """30 training steps with real backward passes (opt.zero_grad(); loss.backward(); opt.step()), torch.optim fed
    the same gradients: every parameter and state equal torch.optim's after every step."""
    model, twin, data = model_pair()
    fused = make_fused(row, model.parameters(), case.kwargs, backend)
    reference = row.torch_optimizer(twin.parameters(), case.kwargs)
    ours, theirs = list(model.parameters()), list(twin.parameters())
    ill = IllConditioned(row, case.kwargs, ours)
    for step, (x, y) in enumerate(data, start=1):
        fused.zero_grad()
        reference.zero_grad()
        loss_fn(model, x, y).backward()
        share_grads(ours, theirs)
        ill.update(ours)
        fused.step()
        reference.step()
        ill.update_centered(reference, theirs)
        compare_with_torch(row, case.kwargs, fused, ours, reference, theirs, f"step {step}", ill.masks)
    ill.check_few()


@pytest.mark.parametrize("row,case", model_case_params(ORACLE_ROWS))
def test_transformer_matches_float64_paper(row: Algorithm, case, backend: str) -> None:
    """Algorithms torch.optim lacks, on the Transformer: each of 30 steps equals the float64 paper formulas applied
    to the model's own gradients, parameters and states before the step."""
    model, _, data = model_pair()
    params = list(model.parameters())
    fused = make_fused(row, params, case.kwargs, backend)
    for step, (x, y) in enumerate(data, start=1):
        fused.zero_grad()
        loss_fn(model, x, y).backward()
        expected = oracle64_step(row, case.kwargs, fused, params)
        fused.step()
        compare_with_oracle(row, case.kwargs, fused, params, expected, f"step {step}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("max_grad_norm", [0.05, 1e3], ids=["clips", "no-clip"])
def test_transformer_max_grad_norm_matches_torch_clip(max_grad_norm: float, backend: str, dtype: torch.dtype) -> None:
    """The example optimizer with max_grad_norm=c equals torch.nn.utils.clip_grad_norm_(c) followed by torch.optim's
    step; opt.last_grad_norm is the norm before clipping. A float64 model: the norm (of float64 gradients, so a
    float64 norm), the clip coefficient and the step all follow torch's float64 computation."""
    kwargs = {"lr": 1e-2, "weight_decay": 0.1}
    model, twin, data = model_pair(dtype)
    fused = EXAMPLE.cls(model.parameters(), **kwargs, max_grad_norm=max_grad_norm, backend=backend)
    reference = EXAMPLE.torch_optimizer(twin.parameters(), kwargs)
    ours, theirs = list(model.parameters()), list(twin.parameters())
    for step, (x, y) in enumerate(data[:10], start=1):
        fused.zero_grad()
        reference.zero_grad()
        loss_fn(model, x, y).backward()
        share_grads(ours, theirs)
        norm = torch.nn.utils.clip_grad_norm_(theirs, max_grad_norm, foreach=False)
        fused.step()
        reference.step()
        assert fused.last_grad_norm is not None
        assert norm.dtype == dtype
        assert_close(torch.tensor(fused.last_grad_norm, dtype=F64), norm, TRAJECTORY_TOL[dtype],
                     msg=f"step {step}: grad norm")
        compare_with_torch(EXAMPLE, kwargs, fused, ours, reference, theirs, f"step {step}")


# ------------------------------------------------------------------------------------- float64
@pytest.mark.parametrize("row,case", params(TORCH_ROWS, lambda row: [row.cases[0], row.richest_case()]))
def test_mixed_float32_and_float64_group_matches_torch(row: Algorithm, case, backend: str) -> None:
    """One param group mixing float32 and float64 parameters, as torch.optim takes it: each dtype gets its own flat
    buffer set (and kernel call), float32 parameters follow torch to the fp32 trajectory tolerance, float64 ones to
    the float64 tolerance, over 30 steps."""
    shapes = [(7,), (4097,), (13, 17), (1,), (300,)]
    dtypes = [F32, F64, F32, F64, F64]
    init = [torch.randn(s, dtype=d) for s, d in zip(shapes, dtypes)]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    fused = make_fused(row, ours, case.kwargs, backend)
    assert sorted(str(buf.dtype) for buf in fused.flat_buffers[0]) == ["torch.float32", "torch.float64"]
    reference = row.torch_optimizer(theirs, case.kwargs)
    for step in range(1, 31):
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape, dtype=p.dtype)
            p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        reference.step()
        compare_with_torch(row, case.kwargs, fused, ours, reference, theirs, f"step {step}")


def _rounded_to_float32(values: list[Tensor]) -> list[Tensor]:
    return [v.float().double() for v in values]


@pytest.mark.parametrize("row,case", params(TORCH_ROWS, lambda row: [row.richest_case()]))
def test_float64_is_computed_in_float64(row: Algorithm, case, backend: str) -> None:
    """Values that float32 cannot hold: parameters of 1e-2 with full float64 mantissas, a learning rate of 0.1 (not a
    float32 number) and so updates of the size of the parameters. Rounding the elements, or only the learning rate,
    to float32 moves the result by far more than 1e-9 relative (checked first, on torch.optim, so this test cannot
    quietly stop testing anything); fusedopt's float64 step stays within the float64 tolerance of torch's over 5
    steps."""
    kwargs = {**case.kwargs, "lr": 0.1}
    shapes = [(1,), (7,), (4097,)]
    init = [1e-2 * torch.randn(s, dtype=F64) for s in shapes]
    grads = [[torch.randn(s, dtype=F64) for s in shapes] for _ in range(5)]

    def torch_run(values: list[Tensor], lr: float, rounded: bool) -> list[Tensor]:
        params = [torch.nn.Parameter(v.clone()) for v in values]
        opt = row.torch_optimizer(params, {**kwargs, "lr": lr})
        for step_grads in grads:
            for p, g in zip(params, _rounded_to_float32(step_grads) if rounded else step_grads):
                p.grad = g.clone()
            opt.step()
            if rounded:  # a float32 computation stores float32 elements
                with torch.no_grad():
                    for p in params:
                        p.copy_(p.float())
        return [p.detach() for p in params]

    expected = torch_run(init, 0.1, rounded=False)
    tol = tolerance(F64)

    def relative(a: list[Tensor]) -> float:
        return max(float(((x - e).abs() / (tol["atol"] + tol["rtol"] * e.abs())).max()) for x, e in zip(a, expected))

    float32_lr = float(torch.tensor(0.1, dtype=F32))
    if not row.float32_step_size:
        assert relative(torch_run(init, float32_lr, rounded=False)) > 1e3, "an lr rounded to float32 would pass"
    assert relative(torch_run(_rounded_to_float32(init), 0.1, rounded=True)) > 1e3, "float32 elements would pass"
    ours = [torch.nn.Parameter(v.clone()) for v in init]
    fused = make_fused(row, ours, kwargs, backend)
    for step_grads in grads:
        for p, g in zip(ours, step_grads):
            p.grad = g.clone()
        fused.step()
    for i, (p, e) in enumerate(zip(ours, expected)):
        assert p.dtype == F64
        assert_close(p, e, F64, msg=f"parameter {i}")


# ------------------------------------------------------------------------------------- aliasing
def _flat_grad_buffers(fused: torch.optim.Optimizer) -> list[Tensor]:
    """The flat gradient buffers of every group (FusedOptimizer.flat_buffers)."""
    return [buf.grad for group in fused.flat_buffers for buf in group]


def _inside(t: Tensor, flat: Tensor) -> bool:
    start, end = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
    return start <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= end


def one_per_state_keeping() -> list[Algorithm]:
    """The first torch.optim-backed row for each way of keeping state that flat storage handles: a step count or
    none, states created at construction or at the first step."""
    kinds: dict[tuple[bool, bool], Algorithm] = {}
    for row in TORCH_ROWS:
        kinds.setdefault((row.cls.spec.tracks_step, row.cls.spec.state_at_init), row)
    return list(kinds.values())


ALIASING_ROWS = [pytest.param(row, row.descent_cases()[-1], id=row.name) for row in one_per_state_keeping()]


@pytest.mark.parametrize("row,case", ALIASING_ROWS)
def test_gradients_are_views_of_the_flat_buffer(row: Algorithm, case, backend: str) -> None:
    """After the first step, opt.zero_grad(); loss.backward() accumulates into views of the flat gradient buffer
    and zero_grad() zeroes them in place; results equal torch.optim."""
    model, twin, data = model_pair()
    fused = make_fused(row, model.parameters(), case.kwargs, backend)
    reference = row.torch_optimizer(twin.parameters(), case.kwargs)
    ours, theirs = list(model.parameters()), list(twin.parameters())
    for step, (x, y) in enumerate(data[:8], start=1):
        fused.zero_grad()
        reference.zero_grad()
        if step > 1:
            assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in ours)
        loss_fn(model, x, y).backward()
        share_grads(ours, theirs)
        fused.step()
        reference.step()
        flats = _flat_grad_buffers(fused)
        assert flats, "the optimizer has no flat gradient buffer"
        for p in ours:
            assert any(_inside(p.grad, f) for f in flats), f"step {step}: p.grad is not a flat-buffer view"
        compare_with_torch(row, case.kwargs, fused, ours, reference, theirs, f"step {step}")


BREAKERS = ["model.zero_grad(set_to_none=True)", "opt.zero_grad(set_to_none=True)", "assign p.grad",
            "alternate"]


@pytest.mark.parametrize("breaker", BREAKERS)
@pytest.mark.parametrize("row,case", ALIASING_ROWS)
def test_broken_aliasing_still_matches_torch(row: Algorithm, case, breaker: str, backend: str) -> None:
    """Users that drop or replace gradients (set_to_none, assigning a fresh p.grad, or alternating with the fast
    path) get exactly torch.optim's results."""
    model, twin, data = model_pair()
    fused = make_fused(row, model.parameters(), case.kwargs, backend)
    reference = row.torch_optimizer(twin.parameters(), case.kwargs)
    ours, theirs = list(model.parameters()), list(twin.parameters())
    for step, (x, y) in enumerate(data[:10], start=1):
        mode = breaker if breaker != "alternate" else BREAKERS[step % 3]
        if mode == "model.zero_grad(set_to_none=True)":
            model.zero_grad(set_to_none=True)
            loss_fn(model, x, y).backward()
        elif mode == "opt.zero_grad(set_to_none=True)":
            fused.zero_grad(set_to_none=True)
            loss_fn(model, x, y).backward()
        else:
            grads = torch.autograd.grad(loss_fn(model, x, y), ours)
            for p, g in zip(ours, grads):
                p.grad = g  # a fresh tensor that is not a view of the flat buffer
        share_grads(ours, theirs)
        fused.step()
        reference.step()
        compare_with_torch(row, case.kwargs, fused, ours, reference, theirs, f"step {step} ({mode})")


@pytest.mark.parametrize("row,case", ALIASING_ROWS + model_case_params(ORACLE_ROWS))
def test_parameter_without_grad_is_untouched(row: Algorithm, case, backend: str) -> None:
    """A parameter whose grad is None for a step (here: the head's bias on odd steps, the first layer's weights on
    step 4) keeps its value, its state and its step count; the others move exactly as in torch.optim (or as the
    float64 formulas say, where torch.optim lacks the algorithm)."""
    model, twin, data = model_pair()
    fused = make_fused(row, model.parameters(), case.kwargs, backend)
    ours, theirs = list(model.parameters()), list(twin.parameters())
    names = dict(model.named_parameters())
    reference = row.torch_optimizer(twin.parameters(), case.kwargs) if row.torch_cls is not None else None
    for step, (x, y) in enumerate(data[:8], start=1):
        fused.zero_grad()
        loss_fn(model, x, y).backward()
        dropped = ["head.bias"] if step % 2 else []
        if step == 4:
            dropped.append("encoder.layers.0.linear1.weight")
        for name in dropped:
            names[name].grad = None
        before = {name: (names[name].detach().clone(),
                         {k: (v.clone() if isinstance(v, Tensor) else v)
                          for k, v in fused.state.get(names[name], {}).items()})
                  for name in dropped}
        if reference is not None:
            share_grads(ours, theirs)  # including the dropped (None) gradients
            fused.step()
            reference.step()
            compare_with_torch(row, case.kwargs, fused, ours, reference, theirs, f"step {step}")
        else:
            expected = oracle64_step(row, case.kwargs, fused, ours)
            fused.step()
            compare_with_oracle(row, case.kwargs, fused, ours, expected, f"step {step}")
        for name, (value, state) in before.items():
            p = names[name]
            assert torch.equal(p.detach(), value), f"step {step}: {name} moved without a gradient"
            now = fused.state.get(p, {})
            assert set(now) == set(state), f"step {step}: {name} state keys changed"
            for k, v in state.items():
                if isinstance(v, Tensor):
                    assert torch.equal(now[k], v), f"step {step}: {name} state {k} moved without a gradient"
