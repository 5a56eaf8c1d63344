"""The optimizer classes' contract: validation, backend selection and fallback, fused clipping, precisions,
checkpoints in both directions, and GradScaler's fused-step contract."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import fusedopt
import pytest
import torch
from cases import EXAMPLE, ROWS, TORCH_ROWS, Algorithm, params
from tolerances import assert_close

COMPILED = "cpu" in fusedopt.build_info()["backends"]
F32, F64 = torch.float32, torch.float64
# Parameter dtypes of the comparisons with torch.optim, and the multi-step tolerance of each.
DTYPES = [pytest.param(F32, id="fp32"), pytest.param(F64, id="fp64")]
TRAJECTORY_TOL = {F32: "fp32_trajectory", F64: F64}
BACKENDS = [
    pytest.param("reference", id="reference"),
    pytest.param("cpu", id="cpu", marks=pytest.mark.skipif(not COMPILED, reason="compiled CPU backend not built")),
]

# (class, kwargs, exception, message): torch.optim's messages where torch has the check. Every class checks its
# learning rate and the bad values its table row lists; fusedopt's own keywords are checked by the base class.
INVALID = [
    *[(row.cls, kwargs, ValueError, message) for row in ROWS
      for kwargs, message in [(dict(lr=-1.0), row.invalid_lr.format(-1.0)),
                              (dict(lr=float("nan")), row.invalid_lr.format(float("nan"))), *row.invalid]],
    (EXAMPLE.cls, dict(backend="gpu"), ValueError, "Invalid backend: 'gpu'"),
    (EXAMPLE.cls, dict(max_grad_norm=-1.0), ValueError, "Invalid max_grad_norm value: -1.0"),
    (EXAMPLE.cls, dict(state_dtype=torch.float16), ValueError, "Invalid state_dtype: torch.float16"),
    *[(row.cls, dict(differentiable=True), ValueError, "Invalid differentiable: True") for row in ROWS
      if "differentiable" in row.cls.torch_defaults],
]


@pytest.mark.parametrize("cls,kwargs,error,message", INVALID,
                         ids=[f"{c.__name__}-" + "-".join(f"{k}={v}" for k, v in kw.items()) for c, kw, *_ in INVALID])
def test_invalid_hyperparameters_are_rejected_and_change_nothing(cls, kwargs, error, message) -> None:
    params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3))]
    pointers = [p.data_ptr() for p in params]
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        cls(params, **kwargs)
    assert [p.data_ptr() for p in params] == pointers


def test_a_bad_second_group_changes_nothing() -> None:
    first, second = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3))
    pointer = first.data_ptr()
    with pytest.raises(ValueError, match="Invalid learning rate: -2"):
        EXAMPLE.cls([{"params": [first]}, {"params": [second], "lr": -2}])
    assert first.data_ptr() == pointer


def test_build_info_reports_what_was_built() -> None:
    info = fusedopt.build_info()
    assert info["version"] == fusedopt.__version__
    assert "reference" in info["backends"]
    if COMPILED:
        assert info["load_error"] is None
        assert info["cpu_isa"] in info["cpu_isas_supported"]
    else:
        assert info["load_error"]


def test_missing_extension_falls_back_to_reference_with_one_warning() -> None:
    # A meta-path finder that refuses fusedopt._C reproduces a wheel whose extension cannot load. Two optimizers of
    # different classes are built: still one warning.
    other = next(row for row in ROWS if row is not EXAMPLE)
    code = textwrap.dedent(f"""
        import sys, warnings
        class Refuse:
            def find_spec(self, name, path=None, target=None):
                if name == "fusedopt._C":
                    raise ImportError("simulated: libstdc++.so.6 not found")
        sys.meta_path.insert(0, Refuse())
        import torch, fusedopt
        info = fusedopt.build_info()
        assert info["backends"] == ["reference"], info
        assert "simulated: libstdc++.so.6 not found" in info["load_error"], info
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            p = torch.nn.Parameter(torch.randn(10))
            opt = fusedopt.{EXAMPLE.name}([p], lr=0.1)
            fusedopt.{other.name}([torch.nn.Parameter(torch.randn(3))], lr=0.1)
        messages = [str(w.message) for w in caught if "fusedopt" in str(w.message)]
        assert len(messages) == 1 and "simulated" in messages[0], messages
        q = torch.nn.Parameter(p.detach().clone())
        ref = torch.optim.{EXAMPLE.name}([q], lr=0.1)
        for _ in range(5):
            g = torch.randn(10)
            p.grad = g.clone(); q.grad = g.clone()
            opt.step(); ref.step()
        assert torch.equal(p, q)
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "FUSEDOPT_BACKEND"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_environment_variable_overrides_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FUSEDOPT_BACKEND", "reference")
    opt = EXAMPLE.cls([torch.nn.Parameter(torch.randn(4))], backend="auto")
    assert opt._backends == [["reference"]]
    monkeypatch.setenv("FUSEDOPT_BACKEND", "tpu")
    with pytest.raises(ValueError, match="Invalid FUSEDOPT_BACKEND: 'tpu'"):
        EXAMPLE.cls([torch.nn.Parameter(torch.randn(4))])


def test_auto_picks_the_compiled_cpu_backend_when_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FUSEDOPT_BACKEND", raising=False)
    opt = EXAMPLE.cls([torch.nn.Parameter(torch.randn(4))])
    assert opt._backends == [["cpu" if COMPILED else "reference"]]


def _random_params(count: int = 5, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    sizes = [1, 7, 4097, 300, 64][:count]
    return [torch.randn(n, dtype=dtype) for n in sizes]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_norm", [0.5, 1e6], ids=["clipped", "unclipped"])
def test_max_grad_norm_equals_clip_grad_norm_then_step(backend: str, max_norm: float, dtype: torch.dtype) -> None:
    """max_grad_norm inside the step is torch's clip_grad_norm_ then torch.optim's step: float64 gradients give a
    float64 norm and clip coefficient (as torch's), and the float64 step follows torch's to float64 rounding."""
    init = _random_params(dtype=dtype)
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    opt = EXAMPLE.cls(ours, lr=1e-2, weight_decay=0.1, max_grad_norm=max_norm, backend=backend)
    ref = EXAMPLE.torch_optimizer(theirs, dict(lr=1e-2, weight_decay=0.1))
    for _ in range(30):
        grads = [torch.randn_like(t) * 3 for t in init]
        for p, q, g in zip(ours, theirs, grads):
            p.grad = g.clone()
            q.grad = g.clone()
        expected_norm = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
        opt.step()
        ref.step()
        assert opt.last_grad_norm == pytest.approx(expected_norm.item(), rel=1e-6 if dtype == F32 else 1e-13)
        for p, q in zip(ours, theirs):
            assert_close(p.detach(), q.detach(), TRAJECTORY_TOL[dtype])
            assert torch.equal(p.grad, q.grad) or max_norm < 1e6  # gradients are never rewritten by clipping


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("row,case", params(TORCH_ROWS, lambda row: [row.richest_case()]))
def test_every_class_clips_like_clip_grad_norm_then_step(backend: str, row: Algorithm, case) -> None:
    """Each class's max_grad_norm (the clip coefficient folded into its kernel's gradient scale) is torch's
    clip_grad_norm_ followed by torch.optim's step of that class, in the case of its table that keeps the most
    states; one parameter misses its gradient on some steps."""
    init = _random_params()
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    opt = row.cls(ours, max_grad_norm=0.5, backend=backend, **case.kwargs)
    ref = row.torch_optimizer(theirs, case.kwargs)
    for step in range(15):
        for k, (p, q) in enumerate(zip(ours, theirs)):
            g = None if k == 3 and step % 3 == 0 else torch.randn_like(p) * 3
            p.grad, q.grad = (None, None) if g is None else (g.clone(), g.clone())
        expected_norm = torch.nn.utils.clip_grad_norm_(theirs, 0.5)
        opt.step()
        ref.step()
        assert opt.last_grad_norm == pytest.approx(expected_norm.item(), rel=1e-6)
        for p, q in zip(ours, theirs):
            assert_close(p.detach(), q.detach(), "fp32_trajectory", msg=f"step {step}")
            for key, value in ref.state[q].items():
                assert_close(torch.as_tensor(opt.state[p][key]), value, "fp32_trajectory", msg=f"step {step}: {key}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("row", [pytest.param(row, id=row.name) for row in TORCH_ROWS])
def test_state_created_late_starts_from_the_group_of_its_first_step(backend: str, row: Algorithm) -> None:
    """A parameter whose first gradient comes after the learning rate changed gets its state as torch.optim creates
    it then: from the group's values at that step (Rprop's step_size starts at the lr of the parameter's first step,
    not at the lr of the step that allocated the flat state buffer)."""
    kwargs = row.cases[0].kwargs
    init = _random_params(3)
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    opt = row.cls(ours, backend=backend, **kwargs)
    ref = row.torch_optimizer(theirs, kwargs)
    for step in range(5):
        for k, (p, q) in enumerate(zip(ours, theirs)):
            g = None if k == 1 and step < 3 else torch.randn_like(p)
            p.grad, q.grad = (None, None) if g is None else (g.clone(), g.clone())
        opt.step()
        ref.step()
        for p, q in zip(ours, theirs):
            assert_close(p.detach(), q.detach(), "fp32_trajectory", msg=f"step {step}")
            for key, value in ref.state.get(q, {}).items():
                assert_close(torch.as_tensor(opt.state[p][key]), value, "fp32_trajectory", msg=f"step {step}: {key}")
        for optimizer in (opt, ref):
            optimizer.param_groups[0]["lr"] *= 0.5  # a scheduler's decay


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_master_weights_follow_the_fp32_trajectory(backend: str, dtype: torch.dtype) -> None:
    init = [t.to(dtype) for t in _random_params()]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    fp32 = [torch.nn.Parameter(t.float()) for t in init]
    opt = EXAMPLE.cls(ours, lr=1e-2, weight_decay=0.1, master_weights=True, backend=backend)
    ref = EXAMPLE.torch_optimizer(fp32, dict(lr=1e-2, weight_decay=0.1))
    for _ in range(20):
        for p, q in zip(ours, fp32):
            g = torch.randn(p.shape).to(dtype)
            p.grad = g.clone()
            q.grad = g.float()
        opt.step()
        ref.step()
    for p, q in zip(ours, fp32):
        master = opt.state[p]["master_param"]
        assert master.dtype == torch.float32
        assert_close(master, q.detach(), "fp32_trajectory")
        assert torch.equal(p.detach(), master.to(dtype))  # the 16-bit copy is the master rounded once


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_states_stay_close_to_fp32_states(backend: str) -> None:
    init = _random_params()
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    opt = EXAMPLE.cls(ours, lr=1e-3, state_dtype=torch.bfloat16, backend=backend)
    ref = EXAMPLE.torch_optimizer(theirs, dict(lr=1e-3))
    for _ in range(20):
        for p, q in zip(ours, theirs):
            g = torch.randn_like(p)
            p.grad = g.clone()
            q.grad = g.clone()
        opt.step()
        ref.step()
    # Each step rounds the states once more: after 20 steps they are a few bf16 ulps off elementwise, a random walk
    # whose relative RMS error over a tensor of >= 64 elements stays below one ulp (2**-7; 30 seeds: at most 0.0056
    # for the states, 0.0030 for the parameters' total update). A halved step (0.5 off) or a dropped term cannot pass.
    def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    for p, q, p0 in zip(ours, theirs, init):
        for name in EXAMPLE.state_names(dict(lr=1e-3)):
            assert opt.state[p][name].dtype == torch.bfloat16
            if p.numel() >= 64:
                assert relative_error(opt.state[p][name], ref.state[q][name]) < 2**-7, name
        if p.numel() >= 64:
            assert relative_error(p.detach() - p0, q.detach() - p0) < 2**-7




def _train(opt: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[list[torch.Tensor]]) -> None:
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        opt.step()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("row,case", params(TORCH_ROWS, lambda row: [row.descent_cases()[-1]]))
@pytest.mark.parametrize("direction", ["torch-to-fusedopt", "fusedopt-to-torch"])
def test_checkpoint_switch_continues_the_same_trajectory(backend, row: Algorithm, case, direction, dtype, tmp_path):
    """Each class with a torch.optim counterpart, in the minimising case of its table that combines most modes;
    float64 checkpoints keep their float64 states both ways."""
    init = _random_params(dtype=dtype)
    grads = [[torch.randn_like(t) for t in init] for _ in range(20)]
    straight = [torch.nn.Parameter(t.clone()) for t in init]
    _train(row.torch_optimizer(straight, case.kwargs), straight, grads)

    switched = [torch.nn.Parameter(t.clone()) for t in init]
    make_ours = lambda: row.cls(switched, backend=backend, **case.kwargs)  # noqa: E731
    make_torch = lambda: row.torch_optimizer(switched, case.kwargs)  # noqa: E731
    first, second = (make_torch, make_ours) if direction == "torch-to-fusedopt" else (make_ours, make_torch)
    opt = first()
    _train(opt, switched, grads[:10])
    torch.save(opt.state_dict(), tmp_path / "optim.pt")
    opt = second()
    opt.load_state_dict(torch.load(tmp_path / "optim.pt", map_location="cpu"))
    _train(opt, switched, grads[10:])
    expected = straight
    if direction == "fusedopt-to-torch":
        # torch.optim's load casts its 0-dim float32 states (NAdam's mu_product) to the parameter's dtype, which
        # changes a float64 trajectory: the run to match is torch's own, through its own checkpoint.
        expected = [torch.nn.Parameter(t.clone()) for t in init]
        torch_opt = row.torch_optimizer(expected, case.kwargs)
        _train(torch_opt, expected, grads[:10])
        saved = torch_opt.state_dict()
        torch_opt = row.torch_optimizer(expected, case.kwargs)
        torch_opt.load_state_dict(saved)
        _train(torch_opt, expected, grads[10:])
    for p, q in zip(switched, expected):
        assert_close(p.detach(), q.detach(), TRAJECTORY_TOL[dtype])
    scalars = row.cls.spec.scalar_names()
    for p in switched:
        for k, v in opt.state[p].items():
            if k in scalars and isinstance(opt, row.cls):
                assert v.dtype == torch.float32, k  # as torch.optim creates them
            elif k != "step" and k not in scalars:
                assert v.dtype == dtype, k  # per-element states keep the parameter's dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("row,case", params(ROWS, lambda row: [row.descent_cases()[-1]]))
def test_own_layouts_round_trip_exactly(backend, row: Algorithm, case, tmp_path) -> None:
    """fusedopt's own state_dict (torch.optim's layout, or the documented one where torch.optim lacks the class)
    saved mid-training and loaded into a fresh optimizer continues bitwise."""
    cls, kwargs = row.cls, case.kwargs
    init = _random_params()
    grads = [[torch.randn_like(t) for t in init] for _ in range(12)]
    straight = [torch.nn.Parameter(t.clone()) for t in init]
    _train(cls(straight, backend=backend, **kwargs), straight, grads)
    resumed = [torch.nn.Parameter(t.clone()) for t in init]
    opt = cls(resumed, backend=backend, **kwargs)
    _train(opt, resumed, grads[:6])
    torch.save(opt.state_dict(), tmp_path / "optim.pt")
    opt = cls(resumed, backend=backend, **kwargs)
    opt.load_state_dict(torch.load(tmp_path / "optim.pt"))
    _train(opt, resumed, grads[6:])
    for p, q in zip(resumed, straight):
        assert torch.equal(p, q)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_fused_contract_unscales_and_skips_nonfinite(backend: str) -> None:
    init = _random_params()
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    opt = EXAMPLE.cls(ours, lr=1e-2, backend=backend)
    ref = EXAMPLE.torch_optimizer(theirs, dict(lr=1e-2))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    for step in range(8):
        grads = [torch.randn_like(t) for t in init]
        if step == 3:
            grads[2][5] = float("inf")
        opt.zero_grad()
        loss = sum((p * g).sum() for p, g in zip(ours, grads))  # d loss / d p = g, scaled by the scaler
        scaler.scale(loss).backward()
        for q, g in zip(theirs, grads):
            q.grad = g.clone()
        before = [p.detach().clone() for p in ours]
        steps_before = [opt.state[p]["step"].item() if p in opt.state else 0 for p in ours]
        scaler.step(opt)
        scaler.update()
        if step == 3:  # skipped: parameters, states and step counts unchanged
            assert all(torch.equal(p, b) for p, b in zip(ours, before))
            assert [opt.state[p]["step"].item() for p in ours] == steps_before
        else:
            ref.step()
        for p, q in zip(ours, theirs):
            assert_close(p.detach(), q.detach(), "fp32_trajectory")
    assert scaler.get_scale() < 1024.0 * 2**8  # the inf step halved the scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row,case", params(TORCH_ROWS))
def test_reference_backend_is_bitwise_torch_single_tensor(row: Algorithm, case, dtype: torch.dtype) -> None:
    # The reference backend applies torch.optim's per-element operations in the same order to the flat buffer, in
    # float32, and in float64 for float64 parameters.
    init = _random_params(dtype=dtype)
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    opt = row.cls(ours, backend="reference", **case.kwargs)
    ref = row.torch_optimizer(theirs, case.kwargs)
    for _ in range(20):
        for p, q in zip(ours, theirs):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)
        for key, value in ref.state[q].items():
            assert opt.state[p][key].dtype == value.dtype, key
            assert torch.equal(opt.state[p][key], value), key


@pytest.mark.parametrize("dtypes", [(F32,), (F64,), (F32, F64)], ids=["fp32", "fp64", "mixed"])
@pytest.mark.parametrize("max_norm", [0.5, 1e6], ids=["clips", "no-clip"])
def test_fusedopt_clip_grad_norm_matches_torch(max_norm: float, dtypes: tuple[torch.dtype, ...]) -> None:
    """fusedopt.clip_grad_norm_ (the deterministic sum of squares on the CPU): torch's norm (float64 when float64
    gradients take part: float64 squares, a float64 norm and coefficient) and clipped gradients, at the tolerance of
    each gradient's dtype. Mixed: torch rounds each float32 gradient's norm to float32 before combining it with the
    float64 ones, fusedopt sums their squares in double, so the shared norm and coefficient agree to float32 rounding
    only (README, differences from torch.optim)."""
    sizes = [1, 7, 4097, 300, 20011]
    ours, theirs = [], []
    for k, n in enumerate(sizes):
        dtype = dtypes[k % len(dtypes)]
        g = torch.randn(n, dtype=dtype) * 3
        for group in (ours, theirs):
            p = torch.nn.Parameter(torch.zeros(n, dtype=dtype))
            p.grad = g.clone()
            group.append(p)
    norm = fusedopt.clip_grad_norm_(ours, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    assert norm.dtype == expected.dtype
    tol = F64 if dtypes == (F64,) else F32
    assert_close(norm, expected, tol, msg="norm")
    for p, q in zip(ours, theirs):
        assert_close(p.grad, q.grad, tol, msg="clipped gradient")
