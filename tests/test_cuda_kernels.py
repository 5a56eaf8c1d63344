"""CUDA kernels (fusedopt._compiled_cuda) against the reference backend, torch.optim fused, and themselves under CUDA
graphs, host-sync detection, AMP skip flags and buffers of more than 2**31 elements. Skipped without a CUDA device.

Every step starts the reference from a CPU copy of the kernel's state before the step, so each comparison is a
single-step one (per-dtype tolerances of tests/tolerances.py) and 10 steps cover the first-step and warm-state paths.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import pytest
import torch
from cases import ALGORITHMS, hyperparameters, state_names
from tolerances import assert_close

_HAVE_CUDA = torch.cuda.is_available()
try:
    from fusedopt import _compiled_cuda as cc
    from fusedopt import functional
    from fusedopt._compiled import build_info as _build_info

    _CUDA_BUILT = bool(_build_info().get("cuda_built", False))
except Exception:  # noqa: BLE001  (any failure to load the extension: nothing here can run)
    cc = None
    _CUDA_BUILT = False

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not _HAVE_CUDA, reason="CUDA not available"),
    pytest.mark.skipif(not _CUDA_BUILT, reason="fusedopt was built without CUDA kernels"),
]

STEPS = 10
ALIGN = 32  # elements: 64 bytes of fp16/bf16 (and 128 of fp32), as the flat buffers pad segments

# (param dtype, grad dtype, state dtype, master weights)
DTYPES = [
    pytest.param((torch.float32, torch.float32, torch.float32, False), id="fp32"),
    pytest.param((torch.float32, torch.float32, torch.bfloat16, False), id="fp32-bf16state"),
    pytest.param((torch.float32, torch.float32, torch.float32, True), id="fp32-master"),
    pytest.param((torch.bfloat16, torch.bfloat16, torch.float32, False), id="bf16"),
    pytest.param((torch.bfloat16, torch.float32, torch.float32, True), id="bf16-fp32grad-master"),
    pytest.param((torch.bfloat16, torch.bfloat16, torch.bfloat16, True), id="bf16-bf16state-master"),
    pytest.param((torch.float16, torch.float16, torch.float32, False), id="fp16"),
    pytest.param((torch.float16, torch.float32, torch.float32, True), id="fp16-fp32grad-master"),
]

SIZES = [
    pytest.param(1, id="n1"),
    pytest.param(15, id="n15"),
    pytest.param(4097, id="n4097"),
    pytest.param("segments", id="many-segments"),
]


# ---------------------------------------------------------------------------------------------------------------
# Problem construction


def _segments(count: int = 300, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A flat layout of `count` parameters of 1..300 elements, each starting on an ALIGN boundary."""
    gen = torch.Generator().manual_seed(seed)
    numels = torch.randint(1, 301, (count,), generator=gen, dtype=torch.int64)
    offsets = torch.zeros(count, dtype=torch.int64)
    cursor = 0
    for i, numel in enumerate(numels.tolist()):
        offsets[i] = cursor
        cursor += (numel + ALIGN - 1) // ALIGN * ALIGN
    return offsets, numels, cursor


def _mask(size: Any) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(n, segment offsets, segment numels, mask of elements inside a segment or None when all are)."""
    if size == "segments":
        offsets, numels, n = _segments()
        mask = torch.zeros(n, dtype=torch.bool)
        for o, k in zip(offsets.tolist(), numels.tolist()):
            mask[o : o + k] = True
        return n, offsets, numels, mask
    n = int(size)
    return n, torch.tensor([0], dtype=torch.int64), torch.tensor([n], dtype=torch.int64), None


def _state_init(name: str, n: int, hp: dict[str, Any]) -> torch.Tensor:
    """Warm, valid optimizer state: second moments and sums non-negative, centered RMSprop keeps sq >= ga^2."""
    if name in ("exp_avg_sq", "max_exp_avg_sq", "sum"):
        return torch.rand(n) * 0.5 + 0.01
    if name == "square_avg":
        return torch.rand(n) * 0.5 + 0.05
    if name == "grad_avg":
        return (torch.rand(n) - 0.5) * 0.2  # |ga| <= 0.1, ga^2 <= 0.01 < square_avg
    return torch.randn(n) * 0.1


class Problem:
    """One flat buffer set on the GPU (the kernel's) and the way to run the same step on the reference backend."""

    def __init__(
        self, algorithm: str, hp: dict[str, Any], dtypes: tuple, size: Any, device: str = "cuda"
    ) -> None:
        self.algorithm, self.hp = algorithm, hp
        self.param_dtype, self.grad_dtype, self.state_dtype, self.use_master = dtypes
        self.n, self.offsets, self.numels, self.mask = _mask(size)
        keep = self.mask if self.mask is not None else torch.ones(self.n, dtype=torch.bool)
        zero = (~keep).float()

        def padded(x: torch.Tensor) -> torch.Tensor:
            return x * (1.0 - zero)  # zero padding between segments, which every kernel must keep at zero

        master = padded(torch.randn(self.n))
        self.param = master.to(self.param_dtype).to(device)
        self.master = master.to(device) if self.use_master else None
        self.names = state_names(algorithm, hp)
        self.states: dict[str, torch.Tensor] = {}
        for name in self.names:
            init = padded(_state_init(name, self.n, hp))
            if name == "sum" and hp.get("initial_accumulator_value", 0.0):
                init = padded(init + hp["initial_accumulator_value"])
            self.states[name] = init.to(self.state_dtype).to(device)
        self.grad = torch.empty(self.n, dtype=self.grad_dtype, device=device)
        self.keep = keep

    def new_grad(self) -> None:
        g = torch.randn(self.n) * (1.0 - (~self.keep).float())
        self.grad.copy_(g.to(self.grad_dtype))

    def snapshot(self) -> dict[str, torch.Tensor | None]:
        snap: dict[str, torch.Tensor | None] = {
            "param": self.param.cpu().clone(),
            "grad": self.grad.cpu().clone(),
        }
        snap["master"] = self.master.cpu().clone() if self.master is not None else None
        for name, t in self.states.items():
            snap[name] = t.cpu().clone()
        return snap

    def kwargs(self, step: int) -> dict[str, Any]:
        hp, a = self.hp, self.algorithm
        if a in ("adam", "adamw"):
            b1, b2 = hp["betas"]
            return {
                "step": step,
                "lr": hp["lr"],
                "beta1": b1,
                "beta2": b2,
                "eps": hp["eps"],
                "weight_decay": hp["weight_decay"],
                "amsgrad": hp["amsgrad"],
                "maximize": hp["maximize"],
                "decoupled": a == "adamw",
            }
        if a == "sgd":
            return {
                "lr": hp["lr"],
                "momentum": hp["momentum"],
                "dampening": hp["dampening"],
                "weight_decay": hp["weight_decay"],
                "nesterov": hp["nesterov"],
                "maximize": hp["maximize"],
                "first_step": step == 1,
            }
        if a == "rmsprop":
            return {
                "lr": hp["lr"],
                "alpha": hp["alpha"],
                "eps": hp["eps"],
                "weight_decay": hp["weight_decay"],
                "momentum": hp["momentum"],
                "centered": hp["centered"],
                "maximize": hp["maximize"],
            }
        if a == "adagrad":
            return {
                "step": step,
                "lr": hp["lr"],
                "lr_decay": hp["lr_decay"],
                "eps": hp["eps"],
                "weight_decay": hp["weight_decay"],
                "maximize": hp["maximize"],
            }
        if a == "lion":
            b1, b2 = hp["betas"]
            return {
                "lr": hp["lr"],
                "beta1": b1,
                "beta2": b2,
                "weight_decay": hp["weight_decay"],
                "maximize": hp["maximize"],
            }
        if a == "lamb":
            b1, b2 = hp["betas"]
            return {
                "step": step,
                "lr": hp["lr"],
                "beta1": b1,
                "beta2": b2,
                "eps": hp["eps"],
                "weight_decay": hp["weight_decay"],
                "bias_correction": hp["bias_correction"],
                "max_trust_ratio": hp["max_trust_ratio"],
                "maximize": hp["maximize"],
            }
        raise KeyError(a)

    def _positional(self, t: dict[str, torch.Tensor | None]) -> list[torch.Tensor | None]:
        a = self.algorithm
        if a in ("adam", "adamw"):
            states = [t["exp_avg"], t["exp_avg_sq"], t.get("max_exp_avg_sq")]
        elif a == "sgd":
            states = [t.get("momentum_buffer")]
        elif a == "rmsprop":
            states = [t["square_avg"], t.get("momentum_buffer"), t.get("grad_avg")]
        elif a == "adagrad":
            states = [t["sum"]]
        elif a in ("lion",):
            states = [t["exp_avg"]]
        else:
            states = [t["exp_avg"], t["exp_avg_sq"]]
        args = [t["param"], t["grad"], *states, t["master"]]
        if a == "lamb":
            args += [self.offsets, self.numels]
        return args

    def cuda_step(self, step: int, **extra: Any) -> None:
        t: dict[str, torch.Tensor | None] = {
            "param": self.param,
            "grad": self.grad,
            "master": self.master,
            **self.states,
        }
        fn = getattr(cc, "adam" if self.algorithm == "adamw" else self.algorithm)
        fn(*self._positional(t), **self.kwargs(step), **extra)

    def reference_step(self, snap: dict[str, torch.Tensor | None], step: int) -> None:
        fn = getattr(functional, "adam" if self.algorithm == "adamw" else self.algorithm)
        fn(*self._positional(snap), **self.kwargs(step), backend="reference")

    def compare(self, snap: dict[str, torch.Tensor | None], msg: str) -> None:
        assert_close(self.param, snap["param"], self.param_dtype, msg=f"{msg}: param")
        if self.master is not None:
            assert_close(self.master, snap["master"], torch.float32, msg=f"{msg}: master")
        for name, t in self.states.items():
            assert_close(t, snap[name], self.state_dtype, msg=f"{msg}: {name}")
        if self.mask is not None:  # zero padding stays zero, bit for bit (LAMB never touches it)
            pad = ~self.mask
            assert torch.count_nonzero(self.param.cpu()[pad]) == 0, f"{msg}: padding of param changed"
            for name, t in self.states.items():
                assert torch.count_nonzero(t.cpu()[pad]) == 0, f"{msg}: padding of {name} changed"


def _case_params() -> list:
    return [
        pytest.param(name, case, id=f"{name}-{case.id}")
        for name, cases in ALGORITHMS.items()
        for case in cases
    ]


# ---------------------------------------------------------------------------------------------------------------
# Against the reference backend, every step


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("algorithm,case", _case_params())
def test_matches_reference_every_step(algorithm: str, case: Any, dtypes: tuple, size: Any) -> None:
    hp = hyperparameters(algorithm, case.kwargs)
    prob = Problem(algorithm, hp, dtypes, size)
    for step in range(1, STEPS + 1):
        prob.new_grad()
        snap = prob.snapshot()
        prob.cuda_step(step)
        prob.reference_step(snap, step)
        torch.cuda.synchronize()
        prob.compare(snap, f"{algorithm}/{case.id} step {step}")


@pytest.mark.parametrize("dtypes", [DTYPES[0], DTYPES[4]])
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_large_buffer_over_64mib(algorithm: str, dtypes: tuple) -> None:
    """One buffer of 17M elements (68 MB of fp32): many grid-stride iterations, and a tail."""
    case = ALGORITHMS[algorithm][0]
    hp = hyperparameters(algorithm, case.kwargs)
    prob = Problem(algorithm, hp, dtypes, 17 * 2**20 + 5)
    for step in range(1, 3):
        prob.new_grad()
        snap = prob.snapshot()
        prob.cuda_step(step)
        prob.reference_step(snap, step)
        torch.cuda.synchronize()
        prob.compare(snap, f"{algorithm} step {step}")


@pytest.mark.parametrize("dtypes", [DTYPES[0], DTYPES[5]])
def test_lamb_norm_reduce_between_the_passes(dtypes: tuple) -> None:
    """Sharded LAMB: the (2, segments) sums handed to norm_reduce between the passes set the trust ratios. A reduce
    that leaves them alone gives the one-call result bit for bit; one that scales them (as if the parameter had
    more shards) matches the reference backend given the same reduce."""
    hp = hyperparameters("lamb", ALGORITHMS["lamb"][0].kwargs)
    plain, split = Problem("lamb", hp, dtypes, "segments"), Problem("lamb", hp, dtypes, "segments")
    seen: list[torch.Tensor] = []
    for step in range(1, 4):
        plain.new_grad()
        split.grad.copy_(plain.grad)
        plain.cuda_step(step)
        split.cuda_step(step, norm_reduce=lambda sums: seen.append(sums.clone()))
        assert seen[-1].shape == (2, plain.offsets.numel()) and seen[-1].device.type == "cuda"
        torch.cuda.synchronize()
        for a, b in zip([plain.param, *plain.states.values()], [split.param, *split.states.values()]):
            assert torch.equal(a, b), f"step {step}"

    def widen(sums: torch.Tensor) -> None:
        sums[0].mul_(3.0)  # ||p||^2 as if two more shards held equal parts; ||u||^2 left as is
    for step in range(4, 7):
        split.new_grad()
        snap = split.snapshot()
        split.cuda_step(step, norm_reduce=widen)
        fn_args = split._positional(snap)
        functional.lamb(*fn_args, **split.kwargs(step), backend="reference", norm_reduce=widen)
        torch.cuda.synchronize()
        split.compare(snap, f"lamb norm_reduce step {step}")


def test_misaligned_views_take_the_scalar_path() -> None:
    """Buffers that start 4 bytes past a 16-byte boundary give the same result as aligned copies."""
    hp = hyperparameters("adam", {"lr": 1e-2, "weight_decay": 0.1})
    n = 4097
    base = [torch.randn(n + 1, device="cuda") for _ in range(4)]
    base[3] = base[3].abs()
    views = [b[1:] for b in base]
    copies = [v.clone() for v in views]
    kw = {
        "step": 3,
        "lr": hp["lr"],
        "beta1": 0.9,
        "beta2": 0.999,
        "eps": 1e-8,
        "weight_decay": 0.1,
        "amsgrad": False,
        "maximize": False,
        "decoupled": True,
    }
    cc.adam(views[0], views[1], views[2], views[3], None, None, **kw)
    cc.adam(copies[0], copies[1], copies[2], copies[3], None, None, **kw)
    for v, c in zip(views, copies):
        assert torch.equal(v, c)


# ---------------------------------------------------------------------------------------------------------------
# Against torch.optim fused=True (multi-step trajectories)


def _torch_fused(algorithm: str) -> Callable[..., torch.optim.Optimizer] | None:
    return {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}.get(algorithm)


@pytest.mark.parametrize(
    "algorithm,case", [p for p in _case_params() if p.values[0] in ("adam", "adamw", "sgd")]
)
def test_matches_torch_fused(algorithm: str, case: Any) -> None:
    hp = hyperparameters(algorithm, case.kwargs)
    prob = Problem(algorithm, hp, (torch.float32, torch.float32, torch.float32, False), 4097)
    p = torch.nn.Parameter(prob.param.clone())
    opt_cls = _torch_fused(algorithm)
    assert opt_cls is not None
    opt = opt_cls([p], fused=True, **case.kwargs)
    for step in range(1, STEPS + 1):
        prob.new_grad()
        p.grad = prob.grad.clone()
        if step == 1:  # torch.optim starts from zero states (SGD: the first gradient, as our first_step does)
            for t in prob.states.values():
                t.zero_()
        opt.step()
        prob.cuda_step(step)
        torch.cuda.synchronize()
        assert_close(prob.param, p.detach(), "fp32_trajectory", msg=f"step {step}: param")
        state = opt.state[p]
        for name, t in prob.states.items():
            assert_close(t, state[name], "fp32_trajectory", msg=f"step {step}: {name}")


# ---------------------------------------------------------------------------------------------------------------
# No host synchronisation; device scalars


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_step_never_synchronises(algorithm: str) -> None:
    hp = hyperparameters(algorithm, ALGORITHMS[algorithm][0].kwargs)
    prob = Problem(algorithm, hp, (torch.bfloat16, torch.float32, torch.float32, True), "segments")
    prob.new_grad()
    prob.cuda_step(1)  # first call may build (and cache) the LAMB work list
    coef = torch.full((), 0.5, device="cuda")
    found_inf = torch.zeros((), device="cuda")
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(2, 5):
            prob.cuda_step(step, grad_scale=coef, found_inf=found_inf)
        total, flag = cc.sum_of_squares_device(prob.grad)
        sums = torch.stack([total, total])
        flags = torch.stack([flag, flag])
        cc.clip_coefficient(sums, flags, 1.0, inv_scale=coef)
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_found_inf_skips_the_step(algorithm: str) -> None:
    hp = hyperparameters(algorithm, ALGORITHMS[algorithm][0].kwargs)
    prob = Problem(algorithm, hp, (torch.float16, torch.float32, torch.float32, True), 4097)
    prob.new_grad()
    before = prob.snapshot()
    prob.cuda_step(1, found_inf=torch.ones((), device="cuda"))
    after = prob.snapshot()
    for key, value in before.items():
        if value is not None:
            assert torch.equal(value, after[key]), f"{key} changed although found_inf was set"
    prob.cuda_step(1, found_inf=torch.zeros((), device="cuda"))
    assert not torch.equal(before["param"], prob.param.cpu())


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_device_grad_scale_equals_host_grad_scale(algorithm: str) -> None:
    hp = hyperparameters(algorithm, ALGORITHMS[algorithm][-1].kwargs)
    a = Problem(algorithm, hp, (torch.float32, torch.float32, torch.float32, False), 4097)
    b = Problem(algorithm, hp, (torch.float32, torch.float32, torch.float32, False), 4097)
    for t_a, t_b in zip([a.param, *a.states.values()], [b.param, *b.states.values()]):
        t_b.copy_(t_a)
    a.new_grad()
    b.grad.copy_(a.grad)
    a.cuda_step(2, grad_scale=0.25)
    b.cuda_step(2, grad_scale=torch.full((1,), 0.25, device="cuda"))
    for t_a, t_b in zip([a.param, *a.states.values()], [b.param, *b.states.values()]):
        assert torch.equal(t_a, t_b)


# ---------------------------------------------------------------------------------------------------------------
# Capturable step in a CUDA graph


@pytest.mark.parametrize("algorithm", ["adam", "adamw", "adagrad", "lamb", "sgd", "lion", "rmsprop"])
def test_cuda_graph_capturable_replay_matches_eager(algorithm: str) -> None:
    hp = hyperparameters(algorithm, ALGORITHMS[algorithm][-1].kwargs)
    lr_value = (
        2.0**-7
    )  # exact in fp32, so the device-side (fp32 lr) and host-side (double lr) coefficients agree
    hp = {**hp, "lr": lr_value}
    dtypes = (torch.bfloat16, torch.float32, torch.float32, True)
    graphed = Problem(algorithm, hp, dtypes, "segments")
    eager = Problem(algorithm, hp, dtypes, "segments")
    pairs = list(
        zip(
            [graphed.param, graphed.master, *graphed.states.values()],
            [eager.param, eager.master, *eager.states.values()],
        )
    )
    for g_t, e_t in pairs:
        e_t.copy_(g_t)
    initial = [g_t.clone() for g_t, _ in pairs]
    lr = torch.full((1,), lr_value, device="cuda")
    step = torch.zeros((1,), device="cuda")
    uses_step = algorithm in ("adam", "adamw", "adagrad", "lamb")

    def graphed_step() -> None:
        step.add_(1)
        kwargs = graphed.kwargs(2)  # first_step=False for SGD (graphs replay warm steps)
        kwargs["lr"] = lr
        if uses_step:
            kwargs["step"] = step
        t = {"param": graphed.param, "grad": graphed.grad, "master": graphed.master, **graphed.states}
        fn = getattr(cc, "adam" if algorithm == "adamw" else algorithm)
        fn(*graphed._positional(t), **kwargs)

    graphed.new_grad()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up (caches the LAMB work list, allocator pools)
            graphed_step()
    torch.cuda.current_stream().wait_stream(side)
    for (g_t, _), init in zip(pairs, initial):
        g_t.copy_(init)
    step.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed_step()
    for k in range(1, 21):
        eager.new_grad()
        graphed.grad.copy_(eager.grad)
        graph.replay()
        eager.cuda_step(
            k + 1 if algorithm == "sgd" else k
        )  # host lr and step: the coefficients come from Python
        torch.cuda.synchronize()
        for g_t, e_t in pairs:
            assert_close(g_t, e_t, g_t.dtype, msg=f"{algorithm} replay {k}")


# ---------------------------------------------------------------------------------------------------------------
# Reductions


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [0, 1, 15, 4097, 16384 * 3 + 7, 40_000_003])
def test_sum_of_squares(dtype: torch.dtype, n: int) -> None:
    t = torch.randn(n, device="cuda").to(dtype)
    total, nonfinite = cc.sum_of_squares(t)
    expected = float(t.float().square().double().sum()) if n else 0.0
    assert math.isclose(total, expected, rel_tol=1e-10, abs_tol=0.0)
    assert not nonfinite
    again, _ = cc.sum_of_squares(t)
    assert again == total  # deterministic, bit for bit
    dev_sum, dev_flag = cc.sum_of_squares_device(t)
    assert dev_sum.dtype == torch.float32 and dev_sum.device.type == "cuda"
    assert float(dev_sum) == float(torch.tensor(total, dtype=torch.float32))
    assert float(dev_flag) == 0.0
    if n > 1:
        view = t[1:]  # misaligned: scalar loads, same summation order
        assert cc.sum_of_squares(view)[0] == cc.sum_of_squares(view.clone())[0]
        bad = t.clone()
        bad[n // 2] = float("nan")
        assert cc.sum_of_squares(bad)[1]
        bad[n // 2] = float("inf")
        assert float(cc.sum_of_squares_device(bad)[1]) == 1.0


@pytest.mark.parametrize("inv_scale", [1.0, 2.0**-10])
@pytest.mark.parametrize("max_norm", [0.5, 1e9])
def test_clip_coefficient(max_norm: float, inv_scale: float) -> None:
    grads = [torch.randn(1000, device="cuda") * 3 for _ in range(3)]
    sums = torch.empty(3, device="cuda")
    flags = torch.empty(3, device="cuda")
    for i, g in enumerate(grads):
        cc.sum_of_squares_device(g, out_sum=sums[i], out_nonfinite=flags[i])
    scale_t = torch.full((1,), inv_scale, device="cuda")
    coef, norm, found_inf = cc.clip_coefficient(sums, flags, max_norm, inv_scale=scale_t)
    expected_norm = torch.cat(grads).double().norm().item() * inv_scale
    assert math.isclose(float(norm), expected_norm, rel_tol=1e-5)
    expected_coef = min(max_norm / (expected_norm + 1e-6), 1.0) * inv_scale
    assert math.isclose(float(coef), expected_coef, rel_tol=1e-5)
    assert float(found_inf) == 0.0
    flags[1] = 1.0
    assert float(cc.clip_coefficient(sums, flags, max_norm)[2]) == 1.0


# ---------------------------------------------------------------------------------------------------------------
# 64-bit indexing


def _free_bytes() -> int:
    free, _ = torch.cuda.mem_get_info()
    return free


def test_buffer_over_2_pow_31_elements() -> None:
    n = 2**31 + 8 * 1000 + 3
    need = n * 4 * 2 + n * 2  # fp32 param and grad, plus a bf16 copy for the reduction check
    if _free_bytes() < need * 1.2:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory")
    param = torch.empty(n, device="cuda")
    grad = torch.empty(n, device="cuda")
    chunk = 2**28
    for start in range(0, n, chunk):
        param[start : start + chunk].uniform_(-1, 1)
        grad[start : start + chunk].uniform_(-1, 1)
    probes = [slice(0, 4096), slice(2**31 - 4096, 2**31 + 4096), slice(n - 5000, n)]
    before = [(param[s].clone(), grad[s].clone()) for s in probes]
    lr = 0.125
    cc.sgd(
        param,
        grad,
        None,
        None,
        lr=lr,
        momentum=0.0,
        dampening=0.0,
        weight_decay=0.0,
        nesterov=False,
        maximize=False,
        first_step=True,
    )
    torch.cuda.synchronize()
    for s, (p0, g0) in zip(probes, before):
        assert torch.equal(param[s], p0 - lr * g0), f"wrong update in {s}"
    total, nonfinite = cc.sum_of_squares(grad)
    expected = sum(float(grad[i : i + chunk].square().double().sum()) for i in range(0, n, chunk))
    assert math.isclose(total, expected, rel_tol=1e-9)
    assert not nonfinite
    del param
    half = grad.to(torch.bfloat16)
    del grad
    total16, _ = cc.sum_of_squares(half)
    expected16 = sum(float(half[i : i + chunk].float().square().double().sum()) for i in range(0, n, chunk))
    assert math.isclose(total16, expected16, rel_tol=1e-9)
