"""The optimizer classes on a GPU: the step decided on the device never waits for the GPU, matches torch.optim's
fused AdamW (with clipping and under AMP), and a whole training step captured in a CUDA graph replays like eager
steps. Skipped without a CUDA device. test_device_decisions.py checks the same step against the host-decided one,
on CPU tensors and on a GPU.
"""
from __future__ import annotations

import copy

import fusedopt
import pytest
import torch
from cases import TORCH_ROWS, Algorithm, row_params
from test_device_decisions import CASES, make_params
from tolerances import assert_close
from torch import nn

pytestmark = pytest.mark.cuda
if not torch.cuda.is_available() or not fusedopt.build_info()["cuda_built"]:
    pytest.skip("needs a CUDA device and fusedopt built with its CUDA kernels", allow_module_level=True)

from test_cuda_kernels import no_host_sync  # noqa: E402 (after the skip: it skips itself without a GPU)

STEPS = 20


@pytest.mark.parametrize("case", list(CASES))
def test_step_never_synchronises(case: str) -> None:
    """After the first step, steps with AMP tensors, a skipped step, clipping and a tensor lr on the GPU never make
    the host wait (torch raises on any synchronising call in "error" mode)."""
    cls, kwargs = CASES[case]
    params = make_params("cuda")
    opt = cls(params, **{**kwargs, "lr": torch.tensor(1e-3, device="cuda")})
    grads = [torch.randn(STEPS, *p.shape, device="cuda") for p in params]
    found_inf = torch.zeros(1, device="cuda")
    opt.grad_scale, opt.found_inf = torch.full((1,), 1024.0, device="cuda"), found_inf
    for p, g in zip(params, grads):
        p.grad = g[0].clone()
    opt.step()  # the first step copies the gradients in and creates states and caches
    with no_host_sync():
        for step in range(1, STEPS):
            for p, g in zip(params, grads):
                p.grad.copy_(g[step])
            found_inf.fill_(1.0 if step == 7 else 0.0)
            opt.step()
            opt.zero_grad()
    assert opt.skipped_steps == 0  # AMP's skip is not skip_nonfinite's
    assert all(opt.state[p]["step"].item() == STEPS - 1 for p in params if "step" in opt.state.get(p, {}))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.LayerNorm(256), nn.Linear(256, 256), nn.GELU(),
                         nn.Linear(256, 8)).cuda()


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator(device="cuda").manual_seed(1)
    return [(torch.randn(32, 64, device="cuda", generator=generator),
             torch.randn(32, 8, device="cuda", generator=generator)) for _ in range(n)]


def test_clipped_adamw_matches_torch_clip_then_fused_step() -> None:
    model = mlp()
    twin = copy.deepcopy(model)
    ours = fusedopt.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, max_grad_norm=0.5)
    theirs = torch.optim.AdamW(twin.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    for x, y in batches(STEPS):
        nn.functional.mse_loss(model(x), y).backward()
        nn.functional.mse_loss(twin(x), y).backward()
        ours.step()
        norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
        theirs.step()
        ours.zero_grad()
        theirs.zero_grad()
        assert ours.last_grad_norm.item() == pytest.approx(norm.item(), rel=1e-5)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert_close(p, q, "fp32_trajectory")
        assert_close(ours.state[p]["exp_avg_sq"], theirs.state[q]["exp_avg_sq"], "fp32_trajectory")
        assert torch.equal(ours.state[p]["step"], theirs.state[q]["step"])


@pytest.mark.parametrize("row", row_params(TORCH_ROWS))
def test_float64_clipped_step_decided_on_the_device_matches_torch(row: Algorithm) -> None:
    """A float64 model on one GPU (the step decided on the device: norm, clip coefficient and a tensor lr stay there,
    as float64 device scalars): each class's first case with max_grad_norm equals torch's clip_grad_norm_ followed by
    torch.optim's float64 for-loop step, to float64 rounding, over 20 steps; the norm is a float64 one."""
    model = mlp().double()
    twin = copy.deepcopy(model)
    kwargs = row.cases[0].kwargs
    lr = float(kwargs["lr"])
    ours = row.cls(model.parameters(), **{**kwargs, "lr": torch.tensor(lr, device="cuda", dtype=torch.float64)},
                   max_grad_norm=0.5)
    theirs = row.torch_optimizer(twin.parameters(), kwargs)
    assert ours._decides_on_device()
    for x, y in batches(STEPS):
        ours.zero_grad()
        theirs.zero_grad()
        nn.functional.mse_loss(model(x.double()), y.double()).backward()
        for p, q in zip(model.parameters(), twin.parameters()):
            q.grad = p.grad.detach().clone()  # the same gradients on both sides
        ours.step()
        norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
        theirs.step()
        assert ours.last_grad_norm.dtype == torch.float64 and norm.dtype == torch.float64
        assert_close(ours.last_grad_norm, norm, torch.float64, msg="grad norm")
        for p, q in zip(model.parameters(), twin.parameters()):
            assert p.dtype == torch.float64
            assert_close(p, q, torch.float64)
            for key, value in theirs.state[q].items():
                assert_close(ours.state[p][key], value, torch.float64, msg=key)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_autocast_grad_scaler_matches_torch_fused(dtype: torch.dtype) -> None:
    """Under autocast and GradScaler (one step skipped for inf gradients), fusedopt's AdamW follows torch's fused one
    as closely as torch's own foreach AdamW does. The forward runs in 16 bits: a one-ulp difference in a parameter
    can change its 16-bit copy, and the gradients after it, so the trajectories part by more than fp32 rounding; the
    bound is the spread between torch's two implementations, or 2% of the distance travelled, whichever is larger
    (a halved step would be 50% off)."""
    model = mlp()
    start = [p.detach().clone() for p in model.parameters()]
    makers = {
        "fusedopt": lambda params: fusedopt.AdamW(params, lr=1e-3, weight_decay=0.1),
        "fused": lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, fused=True),
        "foreach": lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, foreach=True),
    }
    runs = {}
    for name, make in makers.items():
        m = copy.deepcopy(model)
        opt = make(m.parameters())
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12, growth_interval=3)
        history = []
        for step, (x, y) in enumerate(batches(12)):
            if step == 4:
                x = x.clone()
                x[0, 0] = float("inf")  # this step's gradients are not finite: GradScaler skips it
            opt.zero_grad()
            with torch.autocast("cuda", dtype=dtype):
                loss = nn.functional.mse_loss(m(x).float(), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            history.append(scaler.get_scale())
        runs[name] = (list(m.parameters()), opt, history)
    ours, theirs, spread = runs["fusedopt"], runs["fused"], runs["foreach"]
    assert ours[2] == theirs[2] == spread[2]
    assert ours[2][4] < ours[2][3]
    for p, q, r, p0 in zip(ours[0], theirs[0], spread[0], start):
        assert torch.isfinite(p).all()
        travelled = float((q - p0).norm())
        bound = max(float((r - q).norm()), 0.02 * travelled)
        assert float((p - q).norm()) <= bound, (float((p - q).norm()), float((r - q).norm()), travelled)
        assert torch.equal(ours[1].state[p]["step"], theirs[1].state[q]["step"])


OPTIMIZERS = {
    "AdamW-capturable-clip": lambda params, lr: fusedopt.AdamW(params, lr=lr, weight_decay=0.1, capturable=True,
                                                               max_grad_norm=1.0),
    "SGD-nesterov": lambda params, lr: fusedopt.SGD(params, lr=lr, momentum=0.9, nesterov=True),
    "LAMB": lambda params, lr: fusedopt.LAMB(params, lr=lr, weight_decay=0.01),
    "Adagrad": lambda params, lr: fusedopt.Adagrad(params, lr=lr, lr_decay=0.01),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_captured_training_step_replays_like_eager_steps(name: str) -> None:
    """Forward, backward and `opt.step()` captured in one CUDA graph and replayed on new data, with the lr changed
    in place half-way (as a scheduler does to a tensor lr), against the same steps taken eagerly."""
    model = mlp()
    twin = copy.deepcopy(model)
    lr, twin_lr = torch.tensor(1e-3, device="cuda"), torch.tensor(1e-3, device="cuda")
    opt, eager = OPTIMIZERS[name](model.parameters(), lr), OPTIMIZERS[name](twin.parameters(), twin_lr)
    data = batches(3 + STEPS)
    static_x, static_y = data[0][0].clone(), data[0][1].clone()

    def train_step(m: nn.Module, o: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
        o.zero_grad()
        nn.functional.mse_loss(m(x), y).backward()
        o.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in data[:3]:  # warm-up: gradients adopted, states and caches created
            static_x.copy_(x)
            static_y.copy_(y)
            train_step(model, opt, static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    for x, y in data[:3]:
        train_step(twin, eager, x, y)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        train_step(model, opt, static_x, static_y)
    for k, (x, y) in enumerate(data[3:]):
        if k == STEPS // 2:
            lr.mul_(0.5)
            twin_lr.mul_(0.5)
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        train_step(twin, eager, x, y)
        for p, q in zip(model.parameters(), twin.parameters()):
            assert_close(p, q, "fp32_trajectory", msg=f"{name} replay {k}")
    for p, q in zip(model.parameters(), twin.parameters()):
        for key, value in eager.state[q].items():
            assert_close(opt.state[p][key].float(), value.float(), "fp32_trajectory", msg=key)


def test_clip_grad_norm_stays_on_the_gpu_and_matches_torch() -> None:
    """fusedopt.clip_grad_norm_ on GPU gradients: torch's norm and clipped gradients, and no synchronisation; float64
    gradients give torch's float64 norm and clipped gradients to float64 rounding."""
    for dtype in (torch.float32, torch.float64):
        _clip_on_the_gpu(dtype)


def _clip_on_the_gpu(dtype: torch.dtype) -> None:
    grads = [torch.randn(shape, device="cuda", dtype=dtype) * 3 for shape in [(300, 7), (1,), (4097,), (64, 64)]]
    ours = [torch.zeros_like(g, requires_grad=True) for g in grads]
    theirs = [torch.zeros_like(g, requires_grad=True) for g in grads]
    for p, q, g in zip(ours, theirs, grads):
        p.grad, q.grad = g.clone(), g.clone()
    with no_host_sync():
        norm = fusedopt.clip_grad_norm_(ours, 1.0)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert norm.device == expected.device and norm.dtype == expected.dtype
    assert norm.item() == pytest.approx(expected.item(), rel=1e-6 if dtype == torch.float32 else 1e-13)
    for p, q in zip(ours, theirs):
        assert_close(p.grad, q.grad, "fp32" if dtype == torch.float32 else dtype)


def test_parameters_and_gradients_live_in_the_flat_buffers() -> None:
    """CUDA parameters are re-pointed into the flat parameter buffer and their .grad are views of the flat gradient
    buffer, as on the CPU, so a step copies nothing in or out. (torch calls every CUDA tensor shared; fusedopt once
    took that for shared memory and copied every parameter and gradient in and out at every step.)"""
    model = mlp()
    opt = fusedopt.AdamW(model.parameters(), lr=1e-3)
    for x, y in batches(2):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    (buf,) = [b for buffers in opt.flat_buffers for b in buffers]
    assert not buf.external
    for i, p in enumerate(buf.params):
        assert p.data_ptr() == buf.view(buf.param, i).data_ptr()
        assert p.grad is not None and p.grad.data_ptr() == buf.view(buf.grad, i).data_ptr()


def test_unreached_parameters_are_skipped_without_waiting() -> None:
    """After a backward that does not reach every parameter (an unused layer), the step skips the unreached ones, as
    torch.optim skips a None gradient, and decides so without reading the gradients back: the host never waits."""
    model, unused = mlp(), nn.Linear(8, 8).cuda()
    twin, twin_unused = copy.deepcopy(model), copy.deepcopy(unused)
    ours = fusedopt.AdamW([*model.parameters(), *unused.parameters()], lr=1e-3, weight_decay=0.1)
    theirs = torch.optim.AdamW([*twin.parameters(), *twin_unused.parameters()], lr=1e-3, weight_decay=0.1,
                               fused=True)
    before = [p.detach().clone() for p in unused.parameters()]
    for step, (x, y) in enumerate(batches(4)):
        for m, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
        theirs.step()
        if step == 0:  # the first step builds the flat buffers and the states
            ours.step()
            continue
        with no_host_sync():
            ours.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert_close(p, q, "fp32_trajectory")
    for p, b in zip(unused.parameters(), before):
        assert torch.equal(p, b)
        assert not dict.get(ours.state, p)


@pytest.mark.parametrize("adjust_lr_fn", [None, "match_rms_adamw"])
def test_muon_on_the_gpu_matches_torch(adjust_lr_fn: str | None) -> None:
    """fusedopt.Muon's CUDA phases and batched Newton-Schulz against torch.optim.Muon on the same GPU: displacements
    within 1% after 15 steps (bf16 Newton-Schulz roundings apart), momentum buffers to float32 trajectory rounding;
    and an AdamW group in the same optimizer against torch's fused AdamW."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(96, 64), (64, 96), (80, 80), (96, 64), (4, 48, 32)]
    start = [torch.randn(s, device="cuda", generator=generator) for s in shapes]
    ours = [nn.Parameter(t.clone()) for t in start]
    theirs = [nn.Parameter(t.clone()) for t in start[:4]] + [nn.Parameter(start[4][e].clone()) for e in range(4)]
    bias, bias_twin = nn.Parameter(torch.zeros(64, device="cuda")), nn.Parameter(torch.zeros(64, device="cuda"))
    opt = fusedopt.Muon([{"params": ours}, {"params": [bias], "use_muon": False, "lr": 1e-2}], lr=0.02,
                        weight_decay=0.2, adjust_lr_fn=adjust_lr_fn)
    ref = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.2, adjust_lr_fn=adjust_lr_fn)
    ref_adamw = torch.optim.AdamW([bias_twin], lr=1e-2, weight_decay=0.2, fused=True)
    for _ in range(15):
        grads = [torch.randn(s, device="cuda", generator=generator) for s in shapes]
        for p, g in zip(ours, grads):
            p.grad = g.clone()
        for p, g in zip(theirs, grads[:4] + list(grads[4].unbind(0))):
            p.grad = g.clone()
        bias.grad = grads[0][0].clone()
        bias_twin.grad = grads[0][0].clone()
        opt.step()
        ref.step()
        ref_adamw.step()
    moved = [(ours[k].detach(), theirs[k].detach(), start[k]) for k in range(4)]
    moved += [(ours[4].detach()[e], theirs[4 + e].detach(), start[4][e]) for e in range(4)]
    for a, b, s in moved:
        assert float((a - b).norm() / (b - s).norm()) < 1e-2
    for k in range(4):
        assert_close(opt.state[ours[k]]["momentum_buffer"], ref.state[theirs[k]]["momentum_buffer"],
                     "fp32_trajectory")
    assert_close(bias, bias_twin, "fp32_trajectory")


@pytest.mark.parametrize("mode", ["stochastic", "kahan"])
def test_low_precision_modes_write_the_cpu_bits(mode: str) -> None:
    """bf16 parameters without master weights: an SGD step (p - lr*g, the same fp32 value on both devices) writes the
    same bits on the GPU as on the CPU, for stochastic rounding (one hash of seed, step, segment and element) and for
    Kahan's split into the parameter and its compensation; over several steps and segments."""
    from fusedopt import functional
    from fusedopt.flat import Segments

    numels = [4096, 37, 20011]
    generator = torch.Generator().manual_seed(0)
    total = sum(numels) + 64 * len(numels)
    start = torch.randn(total, generator=generator).bfloat16()
    grads = [torch.randn(total, generator=generator).bfloat16() for _ in range(4)]
    results = {}
    for device in ("cpu", "cuda"):
        segments = Segments.packed(numels, device)
        segments.set_all_active(True)
        n = int(segments.offsets[-1] + segments.numels[-1])
        p = start[:n].clone().to(device)
        comp = torch.zeros(n, dtype=torch.bfloat16, device=device) if mode == "kahan" else None
        for g in grads:
            functional.update("sgd", p, g[:n].to(device), [None], None, segments, lr=1e-3, backend=device,
                              hyper=dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                                         maximize=False),
                              comp=comp, rounding_seed=99 if mode == "stochastic" else None)
        results[device] = (p.cpu(), None if comp is None else comp.cpu())
    assert torch.equal(results["cpu"][0], results["cuda"][0])
    if mode == "kahan":
        assert torch.equal(results["cpu"][1], results["cuda"][1])


EIGHT_BIT_HYPER = {
    "adam": dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, maximize=False, decoupled=True),
    "lamb": dict(beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, bias_correction=True, max_trust_ratio=10.0,
                 maximize=False),
}


def run_8bit(algorithm: str, device: str, numels: list[int], param_dtype: torch.dtype, amsgrad: bool = False,
             misaligned: bool = False, steps: int = 6) -> list[torch.Tensor]:
    """Adam or LAMB with 8-bit states (quant8.h) over segments whose offsets are rounded up to the 256-element block,
    from the same seeded inputs on any device; returns the parameters, codes and block absmaxes on the CPU.
    `misaligned` puts the codes one byte off a 16-byte boundary (the kernels' element-by-element path)."""
    from fusedopt import functional
    from fusedopt.flat import Segments

    offsets, n = [], 0
    for numel in numels:
        offsets.append(n)
        n = -(-(n + numel) // 256) * 256
    segments = Segments(offsets, numels, torch.device(device))
    segments.set_all_active(True)
    generator = torch.Generator().manual_seed(0)
    p = torch.randn(n, generator=generator).to(param_dtype).to(device)
    # Gradients over many binades, so that the codes use both parts of the grid.
    grads = [(torch.randn(n, generator=generator) * torch.exp(3 * torch.randn(n, generator=generator))).to(device)
             for _ in range(steps)]
    slots = 3 if amsgrad else 2
    shift = 1 if misaligned else 0
    codes = [torch.zeros(n + shift, dtype=torch.uint8, device=device)[shift:] for _ in range(slots)]
    absmax = [torch.zeros(n // 256, dtype=torch.float32, device=device) for _ in range(slots)]
    hyper = dict(EIGHT_BIT_HYPER[algorithm], **(dict(amsgrad=amsgrad) if algorithm == "adam" else {}))
    stochastic = param_dtype == torch.bfloat16
    for g in grads:
        functional.update(algorithm, p, g.to(param_dtype), [*codes, None][:3], None, segments, lr=1e-2,
                          backend=device, hyper=hyper, rounding_seed=7 if stochastic else None, absmax=absmax,
                          signed=[True, False, False])
    return [t.cpu() for t in (p, *codes, *absmax)]


@pytest.mark.parametrize("param_dtype,amsgrad", [(torch.float32, False), (torch.bfloat16, True)])
def test_8bit_states_write_the_cpu_bits(param_dtype: torch.dtype, amsgrad: bool) -> None:
    """Adam with 8-bit states: the CUDA kernel decodes, updates and encodes each 256-element block as the CPU driver
    does, so parameters, codes and block absmaxes are bitwise equal over several steps and segments of odd sizes
    (partial last blocks, a segment over several work items; bf16 parameters rounded stochastically)."""
    numels = [5, 300, 4097, 20011]
    cpu = run_8bit("adam", "cpu", numels, param_dtype, amsgrad)
    cuda = run_8bit("adam", "cuda", numels, param_dtype, amsgrad)
    assert any(bool((t != 0).any()) for t in cpu[1:])  # the states moved
    for ours, theirs in zip(cuda, cpu):
        assert torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8))


@pytest.mark.parametrize("param_dtype,misaligned", [(torch.float32, False), (torch.float32, True),
                                                    (torch.bfloat16, False)])
def test_8bit_lamb_states_write_the_cpu_bits(param_dtype: torch.dtype, misaligned: bool) -> None:
    """LAMB with 8-bit moments: pass 1 decodes, moves and encodes each 256-element block as the CPU driver does, so
    codes and block absmaxes are bitwise equal over several steps (the moments do not depend on p); the direction
    comes from the decoded codes on both, but the trust-ratio sums are reduced in different orders on CPU and GPU,
    so parameters agree to rounding (fp32: rtol 1e-6, with an atol of 1e-6 for values near zero; bf16 parameters,
    rounded stochastically: one bf16 step where the rounding of a slightly different value differs). Segments of
    odd sizes (partial last blocks and runs, a segment over two work items); misaligned codes take the
    element-by-element path of both passes."""
    numels = [5, 300, 4097, 20011]
    cpu = run_8bit("lamb", "cpu", numels, param_dtype, misaligned=misaligned)
    cuda = run_8bit("lamb", "cuda", numels, param_dtype, misaligned=misaligned)
    assert any(bool((t != 0).any()) for t in cpu[1:])  # the states moved
    for ours, theirs in zip(cuda[1:], cpu[1:]):
        assert torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8))
    rtol, atol = (1e-6, 1e-6) if param_dtype == torch.float32 else (2.0**-7, 0.0)
    torch.testing.assert_close(cuda[0].float(), cpu[0].float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_8bit_states_need_block_aligned_segments(device: str) -> None:
    from fusedopt import functional
    from fusedopt.flat import Segments

    segments = Segments([0, 100], [100, 300], torch.device(device))
    segments.set_all_active(True)
    p, g = torch.zeros(400, device=device), torch.ones(400, device=device)
    codes = [torch.zeros(400, dtype=torch.uint8, device=device) for _ in range(2)]
    absmax = [torch.zeros(2, device=device) for _ in range(2)]
    with pytest.raises(ValueError, match="multiple of 256"):
        functional.update("adam", p, g, [*codes, None], None, segments, lr=1e-3, backend=device,
                          hyper=dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False,
                                     maximize=False, decoupled=False),
                          absmax=absmax, signed=[True, False, False])
