"""CUDA kernels (fusedopt._C.cuda_*, called through fusedopt.functional.update) against the reference backend on
identical inputs, step by step, with the per-dtype tolerances of tests/tolerances.py.

One buffer set holds segments of many sizes (1 to several work items), different step counts (some taking their
first step) and, at every step, a rotating set of inactive segments, which must stay untouched bit for bit. After each
comparison the reference continues from the kernel's result, so every step is checked from identical inputs. Also:
misaligned buffers and unaligned item starts, LAMB's separate passes, non-default streams, a capture into a CUDA graph
without warm-up, device scalars (lr, grad_scale, found_inf), no host synchronisation, torch.optim's fused kernels,
the sum of squares and buffers of more than 2**31 elements. Skipped without a CUDA device.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import fusedopt
import pytest
import torch
from cases import ALGORITHMS, ROWS, TABLE, warm_state
from fusedopt import functional
from fusedopt.flat import CHUNK, Segments
from tolerances import assert_close, tolerance

pytestmark = pytest.mark.cuda
if not torch.cuda.is_available() or not fusedopt.build_info()["cuda_built"]:
    pytest.skip("needs a CUDA device and fusedopt built with its CUDA kernels", allow_module_level=True)

F32, BF16, FP16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
STEPS = 4

# One buffer set: single elements, a vector body with a tail, a segment of one item short of a chunk, segments of two
# and three work items (LAMB's per-segment sums over several items), and many small ones.
NUMELS = [1, 7, 4097, CHUNK - 1, CHUNK + 1, 2 * CHUNK + 5, 300, 33, 3, 64] + [17 * k + 1 for k in range(12)]
# Step counts before the first call: several segments take their first step (SGD's momentum starts there), the others
# are at different points of their bias corrections.
FIRST_STEPS = [(3 * k) % 5 for k in range(len(NUMELS))]

# (param dtype, grad dtype, state dtype, fp32 master weights)
DTYPES = [
    pytest.param((F32, F32, F32, False), id="fp32"),
    pytest.param((F32, F32, BF16, False), id="fp32-bf16state"),
    pytest.param((BF16, BF16, F32, False), id="bf16"),
    pytest.param((BF16, F32, F32, True), id="bf16-fp32grad-master"),
    pytest.param((BF16, BF16, BF16, True), id="bf16-bf16state-master"),
    pytest.param((FP16, FP16, F32, False), id="fp16"),
    pytest.param((FP16, F32, F32, True), id="fp16-fp32grad-master"),
    pytest.param((FP16, FP16, BF16, True), id="fp16-bf16state-master"),
    pytest.param((F64, F64, F64, False), id="fp64"),
]
MIXED = (BF16, F32, F32, True)
FP64 = (F64, F64, F64, False)


def compute_dtype(dtypes: tuple) -> torch.dtype:
    """The kernels' compute dtype, which device lr and grad_scale scalars have: float64 for float64 parameters."""
    return F64 if dtypes[0] == F64 else F32

OPTIMIZERS = {row.name.lower(): row.cls for row in ROWS}


def all_params() -> list:
    """pytest.param(algorithm, case) for every row and case of tests/cases.py (algorithm: the lower-case class name)."""
    return [pytest.param(row.name.lower(), case, id=f"{row.name}-{case.id}") for row in ROWS for case in row.cases]


@dataclass
class Call:
    """What functional.update takes for one case of tests/cases.py, as fusedopt's own spec maps the group."""

    kernel: str
    hyper: dict[str, Any]
    lr: float
    names: list[str]  # state slots, in the kernel's order
    kept: list[bool]  # whether this configuration keeps each slot
    scalars: list[float]  # first values of the per-parameter scalar states (none for most algorithms)


def call_of(algorithm: str, kwargs: dict[str, Any]) -> Call:
    opt = OPTIMIZERS[algorithm]([torch.nn.Parameter(torch.zeros(1))], **kwargs)
    group, spec = opt.param_groups[0], opt.spec
    return Call(spec.kernel, spec.hyper(group), float(group["lr"]), [s.name for s in spec.states],
                [bool(s.when(group)) for s in spec.states], [s.fill(group) for s in spec.scalars])


def first_case(algorithm: str) -> dict[str, Any]:
    return ALGORITHMS[algorithm][0].kwargs


def last_case(algorithm: str) -> dict[str, Any]:
    return ALGORITHMS[algorithm][-1].kwargs


def assert_lion_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, lr: float, msg: str) -> None:
    """Lion moves each element by exactly +-lr: where lerp(m, g) is within an ulp of 0, a one-ulp difference between
    two correct implementations flips sign(c). Allow such flips on at most 0.1% of elements, nowhere else."""
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    tol = tolerance(dtype)
    bad = (a - e).abs() > tol["atol"] + tol["rtol"] * e.abs()
    assert int(bad.sum()) <= max(1, a.numel() // 1000), f"{msg}: {int(bad.sum())} elements differ"
    assert bool(((a - e).abs()[bad] <= 2 * lr * (1 + 1e-3) + tol["atol"] + tol["rtol"] * e.abs()[bad]).all()), msg


def device_buffer(values: torch.Tensor, shift: int) -> torch.Tensor:
    """`values` on the GPU, `shift` elements past the start of its allocation (1: not 16-byte aligned)."""
    raw = torch.empty(values.numel() + shift, dtype=values.dtype, device="cuda")
    view = raw[shift:]
    view.copy_(values)
    return view


def make_segments(numels: list[int], offsets: list[int] | None, device: str) -> tuple[Segments, int]:
    if offsets is None:
        table = Segments.packed(numels, device)
        return table, table.total
    table = Segments(offsets, numels, torch.device(device))
    table.set_all_active(True)
    return table, max(o + k for o, k in zip(offsets, numels)) + 5


class Problem:
    """One flat buffer set on the GPU and its twin on the CPU for the reference backend, equal before every step."""

    def __init__(self, algorithm: str, kwargs: dict[str, Any], dtypes: tuple, numels: list[int] = NUMELS,
                 offsets: list[int] | None = None, shift: int = 0) -> None:
        self.call = call_of(algorithm, kwargs)
        self.pdtype, self.gdtype, self.sdtype, use_master = dtypes
        self.numels = list(numels)
        self.cuda_seg, n = make_segments(self.numels, offsets, "cuda")
        self.ref_seg, _ = make_segments(self.numels, offsets, "cpu")
        first = torch.tensor([FIRST_STEPS[k % len(FIRST_STEPS)] for k in range(len(numels))], dtype=torch.float32)
        self.cuda_seg.steps.copy_(first)
        self.ref_seg.steps.copy_(first)
        if self.call.scalars:  # warm scalar states, a different history per segment
            warm = torch.tensor(self.call.scalars) * torch.linspace(0.5, 1.0, len(numels))[:, None]
            for table in (self.cuda_seg, self.ref_seg):
                table.ensure_scalars(len(self.call.scalars)).copy_(warm)
        self.regions = [slice(o, o + k) for o, k in zip(self.cuda_seg.offsets.tolist(), self.numels)]
        self.mask = torch.zeros(n, dtype=torch.bool)
        for region in self.regions:
            self.mask[region] = True
        self.n, self.shift = n, shift
        self.draw = F64 if self.pdtype == F64 else F32  # float64 parameters get full float64 values
        keep = self.mask.to(self.draw)
        values = torch.randn(n, dtype=self.draw) * keep
        self.param = device_buffer(values.to(self.pdtype), shift)
        self.master = device_buffer(values, shift) if use_master and self.pdtype not in (F32, F64) else None
        # Warm states of valid values (second moments and Adadelta's acc_delta positive, ...): negative ones would
        # make NaN or divide by values near 0, and such elements compare as unequal or amplify one-ulp differences.
        gen = torch.Generator().manual_seed(int(torch.randint(2**31 - 1, (1,))))  # follows torch.manual_seed
        self.states = [device_buffer((warm_state(name, n, gen, self.draw) * keep).to(self.sdtype), shift) if kept
                       else None for name, kept in zip(self.call.names, self.call.kept)]
        self.grad = device_buffer(torch.zeros(n, dtype=self.gdtype), shift)
        self.ref: dict[str, torch.Tensor | None] = {}
        self.sync()

    def tensors(self) -> dict[str, torch.Tensor]:
        named = {"param": self.param, "master": self.master, **dict(zip(self.call.names, self.states))}
        return {k: v for k, v in named.items() if v is not None}

    def sync(self) -> None:
        """The reference side takes the kernel's values (and its gradient): the next step starts from equal inputs."""
        self.ref = {name: t.cpu().clone() for name, t in self.tensors().items()}
        self.ref["grad"] = self.grad.cpu().clone()
        self.ref_seg.steps.copy_(self.cuda_seg.steps.cpu())
        if self.ref_seg.scalars is not None:
            self.ref_seg.scalars.copy_(self.cuda_seg.scalars.cpu())

    def new_grad(self) -> None:
        self.grad.copy_((torch.randn(self.n, dtype=self.draw) * 0.5 * self.mask.to(self.draw)).to(self.gdtype))
        self.ref["grad"] = self.grad.cpu().clone()

    def set_active(self, step: int) -> None:
        """A different fifth of the parameters has no gradient at each step."""
        for k in range(len(self.numels)):
            flag = int((k + step) % 5 != 0)
            self.cuda_seg.flags[k] = flag
            self.ref_seg.flags[k] = flag

    def step(self, **kwargs: Any) -> None:
        kwargs.setdefault("lr", self.call.lr)
        functional.update(self.call.kernel, self.param, self.grad, self.states, self.master, self.cuda_seg,
                          hyper=self.call.hyper, backend="cuda", **kwargs)

    def reference_step(self, **kwargs: Any) -> None:
        kwargs.setdefault("lr", self.call.lr)
        states = [self.ref.get(name) if kept else None for name, kept in zip(self.call.names, self.call.kept)]
        functional.update(self.call.kernel, self.ref["param"], self.ref["grad"], states, self.ref.get("master"),
                          self.ref_seg, hyper=self.call.hyper, backend="reference", **kwargs)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {name: t.cpu().clone() for name, t in self.tensors().items()}

    def check_untouched(self, before: dict[str, torch.Tensor], msg: str) -> None:
        """Padding and the segments without a gradient keep their values bit for bit."""
        untouched = ~self.mask
        for k, region in enumerate(self.regions):
            if not self.cuda_seg.flags[k]:
                untouched[region] = True
        for name, t in self.tensors().items():
            assert torch.equal(t.cpu()[untouched], before[name][untouched]), f"{msg}: {name} changed where it must not"

    def compare(self, msg: str) -> None:
        # LAMB with bf16 states: the kernel's direction uses the stored (rounded) moments, the reference the unrounded
        # ones, so parameters agree to bf16 precision only (as on the CPU).
        loose = self.call.kernel == "lamb" and self.sdtype == BF16

        def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
            if self.call.kernel == "lion":
                assert_lion_close(actual, expected, dtype, self.call.lr, f"{msg}: {what}")
            else:
                assert_close(actual, expected, BF16 if loose else dtype, msg=f"{msg}: {what}")

        if self.master is not None:
            close(self.master, self.ref["master"], F32, "master")
            assert torch.equal(self.param.cpu(), self.master.cpu().to(self.pdtype)), f"{msg}: param != round(master)"
        else:
            close(self.param, self.ref["param"], self.pdtype, "param")
        for name, t in zip(self.call.names, self.states):
            if t is not None:
                assert_close(t, self.ref[name], self.sdtype, msg=f"{msg}: {name}")
        assert torch.equal(self.cuda_seg.steps.cpu(), self.ref_seg.steps), f"{msg}: steps"
        if self.ref_seg.scalars is not None:  # the device's pow may differ from the host's by an ulp of a double
            assert_close(self.cuda_seg.scalars, self.ref_seg.scalars, F32, msg=f"{msg}: scalar states")

    def run(self, steps: int, msg: str, **kwargs: Any) -> None:
        """`steps` steps, each compared with the reference from identical inputs."""
        for step in range(1, steps + 1):
            self.new_grad()
            self.set_active(step)
            before = self.snapshot()
            scale = 0.5 if step % 2 == 0 else 1.0
            self.step(grad_scale=scale, **kwargs)
            self.reference_step(grad_scale=scale, **kwargs)
            self.compare(f"{msg} step {step}")
            self.check_untouched(before, f"{msg} step {step}")
            self.sync()


@contextmanager
def no_host_sync():
    """torch raises on any call that makes the host wait for the GPU."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


# ---------------------------------------------------------------------------------------------------------------
# Against the reference backend


@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("algorithm,case", all_params())
def test_matches_reference_every_step(algorithm: str, case: Any, dtypes: tuple) -> None:
    Problem(algorithm, case.kwargs, dtypes).run(STEPS, f"{algorithm}/{case.id}")


@pytest.mark.parametrize("dtypes", [pytest.param((F32, F32, F32, False), id="fp32"), pytest.param(MIXED, id="mixed"),
                                    pytest.param(FP64, id="fp64")])
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_misaligned_buffers_take_the_scalar_path(algorithm: str, dtypes: tuple) -> None:
    """Every buffer one element past a 16-byte boundary: the scalar path matches the reference, and the aligned path
    bit for bit (the same per-element math; LAMB's sums in the same order on both paths)."""
    kwargs = last_case(algorithm)
    torch.manual_seed(5)
    misaligned = Problem(algorithm, kwargs, dtypes, shift=1)
    torch.manual_seed(5)
    aligned = Problem(algorithm, kwargs, dtypes)
    for step in range(1, STEPS + 1):
        misaligned.new_grad()
        aligned.grad.copy_(misaligned.grad)
        misaligned.set_active(step)
        aligned.set_active(step)
        misaligned.step()
        aligned.step()
        misaligned.reference_step()
        misaligned.compare(f"{algorithm} misaligned step {step}")
        for name, t in aligned.tensors().items():
            assert torch.equal(misaligned.tensors()[name], t), f"{algorithm} step {step}: {name} depends on alignment"
        misaligned.sync()


@pytest.mark.parametrize("dtypes", [pytest.param((F32, F32, F32, False), id="fp32"), pytest.param(MIXED, id="mixed"),
                                    pytest.param((FP16, FP16, BF16, False), id="fp16-bf16state"),
                                    pytest.param(FP64, id="fp64")])
def test_lamb_multi_item_segments_at_unaligned_offsets(dtypes: tuple) -> None:
    """Segments of several work items whose items start at offsets that are not multiples of 8 (no pack access):
    the reference's trust ratios, and bit for bit the result of the same segments laid out aligned."""
    kwargs = {"lr": 1e-2, "weight_decay": 0.05, "max_trust_ratio": 2.0}
    numels = [3 * CHUNK + 11, 2 * CHUNK - 3, CHUNK + 1, 5, 40_000]
    offsets, cursor = [], 3
    for k in numels:
        offsets.append(cursor)
        cursor += k + 5  # odd gaps: no segment starts on a multiple of 8
    torch.manual_seed(11)
    shifted = Problem("lamb", kwargs, dtypes, numels=numels, offsets=offsets)
    torch.manual_seed(11)
    packed = Problem("lamb", kwargs, dtypes, numels=numels)
    assert any(o % 8 for o in offsets)
    for step in range(1, STEPS + 1):
        shifted.new_grad()
        for a, b in zip(shifted.regions, packed.regions):
            packed.grad[b].copy_(shifted.grad[a])
            for name, t in packed.tensors().items():  # the same values, region by region
                t[b].copy_(shifted.tensors()[name][a])
        shifted.set_active(step)
        packed.set_active(step)
        shifted.step()
        packed.step()
        shifted.reference_step()
        shifted.compare(f"lamb unaligned items step {step}")
        for a, b in zip(shifted.regions, packed.regions):
            for name, t in packed.tensors().items():
                assert torch.equal(shifted.tensors()[name][a], t[b]), f"step {step}: {name} depends on the offset"
        shifted.sync()


@pytest.mark.parametrize("dtypes", [pytest.param((F32, F32, F32, False), id="fp32"),
                                    pytest.param((BF16, BF16, BF16, True), id="bf16-bf16state-master"),
                                    pytest.param(FP64, id="fp64")])
def test_lamb_norm_reduce_between_the_passes(dtypes: tuple) -> None:
    """Sharded LAMB: the (2, segments) sums handed to norm_reduce between a kPassMoments and a kPassApply call set the
    trust ratios. A reduce that leaves them alone gives the one-call result bit for bit, with the step counted once; one
    that scales them (as if the parameter had more shards) matches the reference given the same reduce."""
    kwargs = {"lr": 1e-2, "weight_decay": 0.01}
    torch.manual_seed(3)
    plain = Problem("lamb", kwargs, dtypes)
    torch.manual_seed(3)
    split = Problem("lamb", kwargs, dtypes)
    seen: list[torch.Tensor] = []
    for step in range(1, 4):
        plain.new_grad()
        split.grad.copy_(plain.grad)
        plain.set_active(step)
        split.set_active(step)
        plain.step()
        split.step(norm_reduce=lambda sums: seen.append(sums.clone()))
        assert seen[-1].shape == (2, len(NUMELS)) and seen[-1].dtype == torch.float64
        assert seen[-1].device.type == "cuda"
        inactive = [k for k in range(len(NUMELS)) if not split.cuda_seg.flags[k]]
        assert torch.count_nonzero(seen[-1][:, inactive]) == 0, "segments without a gradient have zero sums"
        for name, t in plain.tensors().items():
            assert torch.equal(split.tensors()[name], t), f"step {step}: {name}"
        assert torch.equal(plain.cuda_seg.steps, split.cuda_seg.steps), f"step {step}: steps counted twice"

    def widen(sums: torch.Tensor) -> None:
        sums[0].mul_(3.0)  # ||p||^2 as if two more shards held equal parts; ||u||^2 left as is

    split.sync()
    for step in range(4, 7):
        split.new_grad()
        split.set_active(step)
        split.step(norm_reduce=widen)
        split.reference_step(norm_reduce=widen)
        split.compare(f"lamb norm_reduce step {step}")
        split.sync()


# ---------------------------------------------------------------------------------------------------------------
# Streams, CUDA graphs, device scalars, host synchronisation


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_runs_on_the_current_non_default_stream(algorithm: str) -> None:
    """Every launch goes to the caller's stream: with the default stream kept busy, work queued on the side stream
    right after the step already sees its result."""
    prob = Problem(algorithm, first_case(algorithm), MIXED)
    side = torch.cuda.Stream()
    for step in range(1, STEPS + 1):
        prob.new_grad()
        prob.set_active(step)
        side.wait_stream(torch.cuda.current_stream())
        torch.cuda._sleep(50_000_000)  # the default stream stays busy: a launch that went there would come late
        with torch.cuda.stream(side):
            prob.step()
            right_after = {name: t.clone() for name, t in prob.tensors().items()}
            steps_after = prob.cuda_seg.steps.clone()
        torch.cuda.current_stream().wait_stream(side)
        prob.reference_step()
        prob.compare(f"{algorithm} side stream step {step}")
        for name, t in prob.tensors().items():
            assert torch.equal(right_after[name], t), f"{algorithm} step {step}: {name} written on another stream"
        assert torch.equal(steps_after, prob.cuda_seg.steps)
        prob.sync()


@pytest.mark.parametrize("dtypes", [pytest.param(MIXED, id="mixed"), pytest.param(FP64, id="fp64")])
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_cuda_graph_capture_without_warm_up(algorithm: str, dtypes: tuple) -> None:
    """The first step ever taken on the buffers is captured in a CUDA graph (only the segment table's device copy
    exists beforehand: it is data, not a launch). Replays with new gradients, a device lr changed in place, a device
    grad_scale and a device found_inf that skips one replay match the reference each time, step counts included
    (float64 parameters: float64 device lr and grad_scale)."""
    prob = Problem(algorithm, last_case(algorithm), dtypes)
    prob.set_active(2)  # fixed for the graph: captured as written
    prob.cuda_seg.on_device(prob.param.device)
    lr = torch.full((1,), prob.call.lr, device="cuda", dtype=compute_dtype(dtypes))
    scale = torch.full((1,), 0.5, device="cuda", dtype=compute_dtype(dtypes))
    found_inf = torch.zeros(1, device="cuda")
    before_capture = prob.snapshot()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        prob.step(lr=lr, grad_scale=scale, found_inf=found_inf)
    torch.cuda.synchronize()
    for name, t in prob.tensors().items():
        assert torch.equal(t.cpu(), before_capture[name]), f"{name} changed during the capture"
    assert torch.equal(prob.cuda_seg.steps.cpu(), prob.ref_seg.steps), "a step was counted during the capture"
    for replay in range(8):
        prob.new_grad()
        if replay == 4:
            lr.mul_(0.5)  # as a scheduler does to a tensor lr
        skipped = replay == 6
        found_inf.fill_(1.0 if skipped else 0.0)
        before = prob.snapshot()
        graph.replay()
        if skipped:
            torch.cuda.synchronize()
            for name, t in prob.tensors().items():
                assert torch.equal(t.cpu(), before[name]), f"replay {replay}: {name} written although found_inf"
        else:
            prob.reference_step(lr=float(lr.item()), grad_scale=0.5)
        prob.compare(f"{algorithm} replay {replay}")
        prob.check_untouched(before, f"{algorithm} replay {replay}")
        prob.sync()


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_found_inf_writes_nothing_and_counts_no_step(algorithm: str) -> None:
    prob = Problem(algorithm, last_case(algorithm), (FP16, F32, F32, True))
    prob.new_grad()
    prob.set_active(1)
    before = prob.snapshot()
    steps = prob.cuda_seg.steps.clone()
    prob.step(found_inf=torch.ones(1, device="cuda"))
    for name, t in prob.tensors().items():
        assert torch.equal(t.cpu(), before[name]), f"{name} changed although found_inf was set"
    assert torch.equal(prob.cuda_seg.steps, steps), "a skipped step was counted"
    prob.step(found_inf=torch.zeros(1, device="cuda"))
    prob.reference_step()
    prob.compare(f"{algorithm} after a skipped step")


# fp32: lr and grad_scale exact in fp32; float64: values float32 cannot hold, read as float64 from device memory.
DEVICE_SCALARS = [pytest.param((F32, F32, F32, False), 2.0**-7, 0.25, id="fp32"),
                  pytest.param(FP64, 0.01, 1.0 / 3.0, id="fp64")]


@pytest.mark.parametrize("dtypes,lr,scale", DEVICE_SCALARS)
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_device_lr_and_grad_scale_equal_host_values(algorithm: str, dtypes: tuple, lr: float, scale: float) -> None:
    """lr and grad_scale read from device memory give the bits of the same host values."""
    kwargs = {**last_case(algorithm), "lr": lr}
    torch.manual_seed(9)
    host = Problem(algorithm, kwargs, dtypes)
    torch.manual_seed(9)
    device = Problem(algorithm, kwargs, dtypes)
    scalar = compute_dtype(dtypes)
    for step in range(1, 4):
        host.new_grad()
        device.grad.copy_(host.grad)
        host.set_active(step)
        device.set_active(step)
        host.step(lr=lr, grad_scale=scale)
        device.step(lr=torch.full((1,), lr, device="cuda", dtype=scalar),
                    grad_scale=torch.full((1,), scale, device="cuda", dtype=scalar))
        for name, t in host.tensors().items():
            assert torch.equal(device.tensors()[name], t), f"step {step}: {name}"
        assert torch.equal(device.cuda_seg.steps, host.cuda_seg.steps)


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_step_never_synchronises(algorithm: str) -> None:
    prob = Problem(algorithm, first_case(algorithm), MIXED)
    prob.new_grad()
    prob.set_active(1)
    prob.step()  # builds the device copy of the segment table
    lr = torch.full((1,), prob.call.lr, device="cuda")
    scale = torch.full((1,), 0.5, device="cuda")
    found_inf = torch.zeros(1, device="cuda")
    out_sum, out_flag = torch.empty(1, device="cuda"), torch.empty(1, device="cuda")
    with no_host_sync():
        for step in range(2, 5):
            prob.set_active(step)
            found_inf.fill_(float(step == 3))
            prob.step(lr=lr, grad_scale=scale, found_inf=found_inf)
        functional.sum_of_squares_into(prob.grad, prob.cuda_seg, out_sum, out_flag, backend="cuda")
        functional.sum_of_squares_into(prob.grad, None, out_sum, out_flag, backend="cuda")


# ---------------------------------------------------------------------------------------------------------------
# Against torch.optim fused=True (multi-step trajectories)

TORCH_FUSED = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


@pytest.mark.parametrize("dtype", [F32, F64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("algorithm,case", [p for p in all_params() if p.values[0] in TORCH_FUSED])
def test_matches_torch_fused(algorithm: str, case: Any, dtype: torch.dtype) -> None:
    """From zero states, as torch.optim starts (SGD's momentum buffer is the first gradient in both); float64
    parameters against torch's fused float64 kernels."""
    call = call_of(algorithm, case.kwargs)
    n = 4097
    segments = Segments.packed([n], "cuda")
    param = torch.randn(segments.total, device="cuda", dtype=dtype)
    grad = torch.zeros_like(param)
    states = [torch.zeros_like(param) if kept else None for kept in call.kept]
    p = torch.nn.Parameter(param[:n].clone())
    opt = TORCH_FUSED[algorithm]([p], fused=True, **case.kwargs)
    tol = F64 if dtype == F64 else "fp32_trajectory"
    for step in range(1, 11):
        grad[:n] = torch.randn(n, device="cuda", dtype=dtype)
        p.grad = grad[:n].clone()
        opt.step()
        functional.update(call.kernel, param, grad, states, None, segments, hyper=call.hyper, lr=call.lr,
                          backend="cuda")
        assert_close(param[:n], p.detach(), tol, msg=f"step {step}: param")
        for name, t in zip(call.names, states):
            if t is not None:
                assert_close(t[:n], opt.state[p][name], tol, msg=f"step {step}: {name}")
        assert float(segments.steps[0]) == step


# ---------------------------------------------------------------------------------------------------------------
# Sum of squares


def device_sum_of_squares(t: torch.Tensor, segments: Segments | None = None) -> tuple[float, float]:
    """(sum, flag) of a device tensor: the sum of a float64 tensor into a float64 scalar (kept unrounded)."""
    out_dtype = F64 if t.dtype == F64 else F32
    out_sum, out_flag = torch.full((1,), -1.0, device="cuda", dtype=out_dtype), torch.full((1,), -1.0, device="cuda")
    functional.sum_of_squares_into(t, segments, out_sum, out_flag, backend="cuda")
    return float(out_sum), float(out_flag)


@pytest.mark.parametrize("dtype", [F32, BF16, FP16, F64])
@pytest.mark.parametrize("n", [0, 1, 15, 4097, 3 * CHUNK + 7, 40_000_003])
def test_sum_of_squares_of_a_whole_tensor(dtype: torch.dtype, n: int) -> None:
    """fp32 squares of fp32/bf16/fp16 data, float64 squares of float64 data (to 1e-12: fp32 squares or a float32
    result would be off by ~1e-8), summed in double."""
    t = torch.randn(n, device="cuda", dtype=F64 if dtype == F64 else F32).to(dtype)
    total, flag = device_sum_of_squares(t)
    if dtype == F64:
        expected = float(t.square().sum()) if n else 0.0
    else:
        expected = float(t.float().square().double().sum()) if n else 0.0
    assert math.isclose(total, expected, rel_tol=1e-12 if dtype == F64 else 1e-6, abs_tol=0.0)
    assert flag == 0.0
    assert device_sum_of_squares(t) == (total, flag)  # deterministic, bit for bit
    if n > 1:
        view = t[1:]  # misaligned: element by element, the same summation order
        assert device_sum_of_squares(view) == device_sum_of_squares(view.clone())
        bad = t.clone()
        bad[n // 2] = float("nan")
        assert device_sum_of_squares(bad)[1] == 1.0
        bad[n // 2] = float("inf")
        assert device_sum_of_squares(bad)[1] == 1.0


@pytest.mark.parametrize("dtype", [F32, BF16, F64])
def test_sum_of_squares_over_the_active_segments(dtype: torch.dtype) -> None:
    """Only segments with a gradient count: a NaN in an inactive one is neither summed nor flagged."""
    cuda_seg, ref_seg = Segments.packed(NUMELS, "cuda"), Segments.packed(NUMELS, "cpu")
    t = torch.randn(cuda_seg.total, device="cuda", dtype=F64 if dtype == F64 else F32).to(dtype)
    for k in range(len(NUMELS)):
        cuda_seg.flags[k] = ref_seg.flags[k] = int(k % 3 != 1)
    t[int(cuda_seg.offsets[1])] = float("nan")
    total, flag = device_sum_of_squares(t, cuda_seg)
    expected, nonfinite = functional.sum_of_squares(t.cpu(), ref_seg, backend="reference")
    assert math.isclose(total, expected, rel_tol=1e-12 if dtype == F64 else 1e-6) and not nonfinite and flag == 0.0
    assert device_sum_of_squares(t, cuda_seg) == (total, flag)
    cuda_seg.flags[1] = 1
    assert device_sum_of_squares(t, cuda_seg)[1] == 1.0


# ---------------------------------------------------------------------------------------------------------------
# 64-bit indexing


def test_buffer_over_2_pow_31_elements() -> None:
    n = 2**31 + 8 * 1000 + 3
    need = n * 4 * 2 + n * 2  # fp32 param and grad, plus a bf16 copy for the reduction check
    free, _ = torch.cuda.mem_get_info()
    if free < need * 1.2:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory")
    segments = Segments.packed([n], "cuda")
    param = torch.empty(n, device="cuda")
    grad = torch.empty(n, device="cuda")
    chunk = 2**28
    for start in range(0, n, chunk):
        param[start:start + chunk].uniform_(-1, 1)
        grad[start:start + chunk].uniform_(-1, 1)
    probes = [slice(0, 4096), slice(2**31 - 4096, 2**31 + 4096), slice(n - 5000, n)]
    before = [(param[s].clone(), grad[s].clone()) for s in probes]
    lr = 0.125
    call = call_of("sgd", {"lr": lr})
    functional.update("sgd", param, grad, [None], None, segments, hyper=call.hyper, lr=lr, backend="cuda")
    for s, (p0, g0) in zip(probes, before):
        assert torch.equal(param[s], p0 - lr * g0), f"wrong update in {s}"
    total, flag = device_sum_of_squares(grad)
    expected = sum(float(grad[i:i + chunk].square().double().sum()) for i in range(0, n, chunk))
    assert math.isclose(total, expected, rel_tol=1e-6) and flag == 0.0
    del param
    half = grad.to(torch.bfloat16)
    del grad
    total16, _ = device_sum_of_squares(half)
    expected16 = sum(float(half[i:i + chunk].float().square().double().sum()) for i in range(0, n, chunk))
    assert math.isclose(total16, expected16, rel_tol=1e-6)


@pytest.mark.parametrize("dtype,master,state_dtype", [(torch.float32, False, torch.float32),
                                                        (torch.float32, False, torch.bfloat16),
                                                        (torch.bfloat16, True, torch.float32),
                                                        (torch.float64, False, None)],
                         ids=["fp32", "fp32-bf16-states", "bf16-master", "fp64"])
def test_adafactor_factored_shapes_match_the_cpu_kernel(dtype: torch.dtype, master: bool,
                                                         state_dtype: torch.dtype | None) -> None:
    """Adafactor's factored kernels on the GPU against the CPU kernel, each step re-anchored on the GPU's values: 0-D to
    4-D parameters (rows spanning work items, a row longer than a block), every state at the precision of its dtype;
    and the step never waits for the host."""
    from test_adafactor import SHAPES  # noqa: PLC0415 (shared shapes, only once a GPU is here)

    row = TABLE[fusedopt.Adafactor]
    kwargs = {**row.cases[-1].kwargs, "master_weights": master, "state_dtype": state_dtype}
    gen = torch.Generator().manual_seed(0)
    draw = torch.float64 if dtype == torch.float64 else torch.float32
    init = [torch.randn(shape, generator=gen, dtype=draw).to(dtype) for shape in SHAPES]
    ours = [torch.nn.Parameter(t.cuda()) for t in init]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    gpu, cpu = row.cls(ours, **kwargs), row.cls(theirs, backend="cpu", **kwargs)
    assert gpu._backends == [["cuda"]]
    for step in range(6):
        for p, q in zip(ours, theirs):
            g = torch.randn(q.shape, generator=gen, dtype=draw).to(dtype)
            p.grad, q.grad = g.cuda(), g
        if step > 0:
            with no_host_sync():
                gpu.step()
        else:
            gpu.step()
        cpu.step()
        for k, (p, q) in enumerate(zip(ours, theirs)):
            tol = torch.bfloat16 if state_dtype == torch.bfloat16 else dtype
            assert_close(p.cpu(), q, tol, msg=f"step {step}, parameter {k}")
            for name, value in cpu.state[q].items():
                assert_close(gpu.state[p][name].cpu(), value, tol, msg=f"step {step}, parameter {k}: {name}")
        with torch.no_grad():  # re-anchor on the GPU's values
            for p, q in zip(ours, theirs):
                if not master:
                    q.copy_(p.cpu())
                for name, value in gpu.state[p].items():
                    cpu.state[q][name].copy_(value.cpu())
