"""fusedopt.Muon against torch.optim.Muon (and torch.optim.AdamW for its use_muon=False groups): trajectories,
kernels against the reference, 3-D expert stacks, checkpoints both ways, whole-model groups, validation.

Muon's update goes through a Newton-Schulz iteration in bfloat16, which turns a one-ulp difference in its input into
bf16-rounding differences in its output; trajectories are therefore compared by their displacement from the start,
within 1% of its norm (the issue's bound), while each kernel phase is compared with the reference element by element
at fp32 precision."""
from __future__ import annotations

import io
from typing import Any

import fusedopt
import pytest
import torch
from fusedopt import functional
from fusedopt._newton_schulz import newton_schulz, orthogonalize_
from fusedopt.flat import Segments
from fusedopt.reference import muon_lr_ratio
from tolerances import assert_close
from torch import nn

BACKENDS = ["cpu", "reference"]
# Square, tall and wide matrices, two of one shape (one batch), an odd size.
SHAPES = [(24, 16), (16, 24), (20, 20), (24, 16), (7, 13)]
STEPS = 15
CASES: dict[str, dict[str, Any]] = {
    "default": {"lr": 0.02},
    "no-nesterov": {"lr": 0.02, "nesterov": False},
    "momentum-weight_decay": {"lr": 0.03, "momentum": 0.8, "weight_decay": 0.5},
    "match_rms_adamw": {"lr": 0.01, "adjust_lr_fn": "match_rms_adamw", "weight_decay": 0.2},
    "ns-args": {"lr": 0.02, "ns_steps": 3, "ns_coefficients": (3.0, -3.2, 1.2), "eps": 1e-5},
}


def displacement_error(ours: torch.Tensor, theirs: torch.Tensor, start: torch.Tensor) -> float:
    """|d_ours - d_theirs| / |d_theirs|, d the displacement from the start."""
    d_theirs = (theirs.double() - start.double())
    return float((ours.double() - theirs.double()).norm() / d_theirs.norm())


def random_grads(shapes: list[tuple[int, ...]], steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=generator) for s in shapes] for _ in range(steps)]


def run(opt: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[list[torch.Tensor]]) -> None:
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.to(p.dtype).clone()
        opt.step()


def twins(shapes: list[tuple[int, ...]], dtype: torch.dtype = torch.float32, seed: int = 0
          ) -> tuple[list[nn.Parameter], list[nn.Parameter], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    start = [torch.randn(s, generator=generator, dtype=torch.float64).to(dtype) for s in shapes]
    return ([nn.Parameter(t.clone()) for t in start], [nn.Parameter(t.clone()) for t in start], start)


# Trajectories ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_trajectory_matches_torch(case: str, backend: str) -> None:
    ours, theirs, start = twins(SHAPES)
    opt = fusedopt.Muon(ours, backend=backend, **CASES[case])
    ref = torch.optim.Muon(theirs, **CASES[case])
    grads = random_grads(SHAPES, STEPS)
    run(opt, ours, grads)
    run(ref, theirs, grads)
    for i, (a, b, s) in enumerate(zip(ours, theirs, start)):
        assert displacement_error(a.detach(), b.detach(), s) < 1e-2, f"parameter {i} {tuple(s.shape)}"
        assert_close(opt.state[a]["momentum_buffer"], ref.state[b]["momentum_buffer"], "fp32_trajectory")


def test_float64_parameters_follow_torch() -> None:
    """float64 parameters keep float64 momentum and step in float64 (Newton-Schulz still in bf16), as torch."""
    ours, theirs, start = twins(SHAPES, torch.float64)
    opt = fusedopt.Muon(ours, lr=0.02, weight_decay=0.3)
    ref = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.3)
    grads = random_grads(SHAPES, STEPS)
    run(opt, ours, grads)
    run(ref, theirs, grads)
    for a, b, s in zip(ours, theirs, start):
        assert opt.state[a]["momentum_buffer"].dtype == torch.float64
        assert displacement_error(a.detach(), b.detach(), s) < 1e-2


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_bf16_parameters_follow_the_reference(state_dtype: torch.dtype) -> None:
    """bf16 parameters round once per step (decay and update together), where torch.optim.Muon rounds twice (its
    separate mul_ loses a weight decay below half an ulp): the kernel follows the reference backend, which rounds
    once too."""
    ours, theirs, start = twins(SHAPES, torch.bfloat16)
    opt = fusedopt.Muon(ours, lr=0.02, weight_decay=0.3, state_dtype=state_dtype)
    ref = fusedopt.Muon(theirs, lr=0.02, weight_decay=0.3, state_dtype=state_dtype, backend="reference")
    grads = random_grads(SHAPES, STEPS)
    run(opt, ours, grads)
    run(ref, theirs, grads)
    # bf16 momentum: an fp32-ulp difference of the two lerps flips a bf16 rounding now and then, and the
    # orthogonalization spreads it (1.6% at worst over six seeds; a halved step or a dropped decay is tens of %).
    bound = 1e-2 if state_dtype == torch.float32 else 3e-2
    for a, b, s in zip(ours, theirs, start):
        assert opt.state[a]["momentum_buffer"].dtype == state_dtype
        assert displacement_error(a.detach(), b.detach(), s) < bound


def test_master_weights_follow_an_fp32_run() -> None:
    """bf16 parameters with fp32 master weights step like fp32 parameters (read back through bf16)."""
    shapes = SHAPES[:3]
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=generator).bfloat16() for s in shapes]
    ours = [nn.Parameter(t.clone()) for t in start]
    theirs = [nn.Parameter(t.float()) for t in start]
    opt = fusedopt.Muon(ours, lr=0.02, master_weights=True)
    ref = torch.optim.Muon(theirs, lr=0.02)
    grads = random_grads(shapes, STEPS)
    run(opt, ours, [[g.bfloat16() for g in step] for step in grads])
    run(ref, theirs, [[g.bfloat16().float() for g in step] for step in grads])
    for a, b, s in zip(ours, theirs, start):
        assert displacement_error(opt.state[a]["master_param"], b.detach(), s) < 1e-2
        assert torch.equal(a.detach(), opt.state[a]["master_param"].bfloat16())


def test_experts_match_per_expert_torch() -> None:
    """A 3-D parameter (experts, out, in) is orthogonalized per expert with each expert's shape adjustment: like
    torch.optim.Muon on each expert matrix as its own parameter (which torch needs, refusing 3-D)."""
    experts = 4
    shapes = [(experts, 24, 16), (experts, 16, 24)]
    ours, _, start = twins(shapes)
    theirs = [nn.Parameter(s[e].clone()) for s in start for e in range(experts)]
    opt = fusedopt.Muon(ours, lr=0.02, weight_decay=0.2)
    ref = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.2)
    for step_grads in random_grads(shapes, STEPS):
        for p, g in zip(ours, step_grads):
            p.grad = g.clone()
        for p, g in zip(theirs, [g[e] for g in step_grads for e in range(experts)]):
            p.grad = g.clone()
        opt.step()
        ref.step()
    for k, (a, s) in enumerate(zip(ours, start)):
        for e in range(experts):
            b = theirs[k * experts + e]
            assert displacement_error(a.detach()[e], b.detach(), s[e]) < 1e-2, f"parameter {k} expert {e}"


def test_clipping_matches_torch_clip_then_muon() -> None:
    ours, theirs, start = twins(SHAPES)
    opt = fusedopt.Muon(ours, lr=0.02, max_grad_norm=1.0)
    ref = torch.optim.Muon(theirs, lr=0.02)
    generator = torch.Generator().manual_seed(3)
    for _ in range(STEPS):
        scale = float(torch.rand((), generator=generator)) * 10  # the clip binds at some steps, not others
        grads = [torch.randn(s, generator=generator) * scale for s in SHAPES]
        for a, b, g in zip(ours, theirs, grads):
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        norm = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        ref.step()
        assert opt.last_grad_norm == pytest.approx(float(norm), rel=1e-5)
        for a, b in zip(ours, theirs):
            assert_close(opt.state[a]["momentum_buffer"], ref.state[b]["momentum_buffer"], "fp32_trajectory")
    for a, b, s in zip(ours, theirs, start):
        assert displacement_error(a.detach(), b.detach(), s) < 1e-2


def test_nonfinite_step_is_skipped() -> None:
    ours, _, _ = twins(SHAPES[:2])
    opt = fusedopt.Muon(ours, lr=0.02, skip_nonfinite=True)
    run(opt, ours, random_grads(SHAPES[:2], 2))
    before = [p.detach().clone() for p in ours]
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in ours]
    grads = random_grads(SHAPES[:2], 1, seed=5)
    grads[0][1][3, 2] = float("inf")
    run(opt, ours, grads)
    assert opt.skipped_steps == 1
    for p, b, m in zip(ours, before, momentum):
        assert torch.equal(p.detach(), b)
        assert torch.equal(opt.state[p]["momentum_buffer"], m)


# Kernels against the reference ---------------------------------------------------------------------------------

@pytest.mark.parametrize("param_dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                     (torch.bfloat16, torch.bfloat16), (torch.float64, torch.float64)])
@pytest.mark.parametrize("nesterov", [True, False])
def test_phases_match_reference(param_dtype: torch.dtype, state_dtype: torch.dtype, nesterov: bool) -> None:
    """Each phase of the kernel (momentum and Nesterov blend; decay and the adjusted step) against the reference on
    warm random buffers, over segments with different lr ratios, one of them inactive."""
    numels = [3000, 17, 40000, 513]
    segments = Segments.packed(numels)
    segments.set_all_active(True)
    segments.flags[1] = 0
    total = int(segments.offsets[-1] + segments.numels[-1])
    generator = torch.Generator().manual_seed(7)
    # Matrix shapes (rows, cols): square, tall, wide, tall with an inexact ratio.
    segments.ensure_scalars(2)[:] = torch.tensor([[50.0, 60.0], [17.0, 1.0], [200.0, 200.0], [27.0, 19.0]])

    def draw(dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(total, generator=generator, dtype=torch.float64).to(dtype)

    param, grad, momentum_buffer, update = draw(param_dtype), draw(param_dtype), draw(state_dtype), draw(state_dtype)
    for phase, adjust_lr in ((0, 0), (1, 0), (1, 1)):
        hyper = dict(momentum=0.9, nesterov=nesterov, weight_decay=0.3, adjust_lr=adjust_lr, maximize=False)
        results = {}
        for backend in ("cpu", "reference"):
            tensors = [t.clone() for t in (param, grad, momentum_buffer, update)]
            functional.update("muon", tensors[0], tensors[1], tensors[2:], None, segments,
                              hyper={**hyper, "phase": phase}, lr=0.05, grad_scale=0.5, backend=backend)
            results[backend] = tensors
        for name, k in (("param", 0), ("momentum_buffer", 2), ("update", 3)):
            assert_close(results["cpu"][k], results["reference"][k], msg=f"phase {phase} {name}")
        changed = [not torch.equal(results["cpu"][k], t) for k, t in ((0, param), (2, momentum_buffer), (3, update))]
        assert changed == ([False, True, True] if phase == 0 else [True, False, False])
        inactive = slice(int(segments.offsets[1]), int(segments.offsets[1] + segments.numels[1]))
        for k, t in ((0, param), (2, momentum_buffer), (3, update)):
            assert torch.equal(results["cpu"][k][inactive], t[inactive])


def test_lr_ratio_is_each_shapes_adjustment() -> None:
    assert muon_lr_ratio(None, 64, 16) == 2.0
    assert muon_lr_ratio("original", 16, 64) == 1.0
    assert muon_lr_ratio("match_rms_adamw", 16, 64) == pytest.approx(0.2 * 8.0)
    # The group's adjust_lr_fn is read at every step: a changed one applies from the next step on.
    ours, theirs, start = twins(SHAPES)
    opt = fusedopt.Muon(ours, lr=0.01)
    ref = torch.optim.Muon(theirs, lr=0.01)
    grads = random_grads(SHAPES, 6)
    run(opt, ours, grads[:3])
    run(ref, theirs, grads[:3])
    opt.param_groups[0]["adjust_lr_fn"] = ref.param_groups[0]["adjust_lr_fn"] = "match_rms_adamw"
    run(opt, ours, grads[3:])
    run(ref, theirs, grads[3:])
    for a, b, s in zip(ours, theirs, start):
        assert displacement_error(a.detach(), b.detach(), s) < 1e-2


def test_batched_newton_schulz_is_torchs_per_matrix() -> None:
    """One bmm chain over matrices of a shape gives each matrix torch's own result (bf16 rounding apart), with small
    batches forced so that a stack is split across batches."""
    from torch.optim._muon import _zeropower_via_newtonschulz
    generator = torch.Generator().manual_seed(4)
    stacks = [torch.randn(5, 24, 16, generator=generator), torch.randn(3, 16, 24, generator=generator),
              torch.randn(2, 24, 16, generator=generator)]
    expected = [torch.stack([_zeropower_via_newtonschulz(m, (3.4445, -4.7750, 2.0315), 5, 1e-7).float() for m in s])
                for s in stacks]
    import fusedopt._newton_schulz as ns
    old = ns.BATCH_ELEMENTS
    ns.BATCH_ELEMENTS = 3 * 24 * 16
    try:
        orthogonalize_(stacks, (3.4445, -4.7750, 2.0315), 5, 1e-7)
    finally:
        ns.BATCH_ELEMENTS = old
    for got, want in zip(stacks, expected):
        torch.testing.assert_close(got, want, rtol=2**-7, atol=2**-7 * float(want.abs().max()))
    # And the iteration itself: its result has singular values near 1 (torch's coefficients give 0.7 to 1.2).
    x = torch.randn(2, 16, 24, generator=generator).bfloat16()
    singular = torch.linalg.svdvals(newton_schulz(x, (3.4445, -4.7750, 2.0315), 5, 1e-7).float())
    assert float(singular.min()) > 0.5 and float(singular.max()) < 1.3


# Checkpoints ---------------------------------------------------------------------------------------------------

def _roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("direction", ["torch-to-fusedopt", "fusedopt-to-torch"])
def test_checkpoints_swap_both_ways_mid_run(direction: str) -> None:
    kwargs = {"lr": 0.02, "weight_decay": 0.2}
    first, second, start = twins(SHAPES)
    straight = [nn.Parameter(t.clone()) for t in start]
    make_first, make_second = ((torch.optim.Muon, fusedopt.Muon) if direction == "torch-to-fusedopt"
                               else (fusedopt.Muon, torch.optim.Muon))
    grads = random_grads(SHAPES, 10)
    opt = make_first(first, **kwargs)
    run(opt, first, grads[:5])
    saved = _roundtrip(opt.state_dict())
    assert set(saved["state"][0]) == {"momentum_buffer"}
    with torch.no_grad():
        for p, q in zip(second, first):
            p.copy_(q)
    resumed = make_second(second, **kwargs)
    resumed.load_state_dict(saved)
    run(resumed, second, grads[5:])
    reference = torch.optim.Muon(straight, **kwargs)
    run(reference, straight, grads)
    for a, b, s in zip(second, straight, start):
        assert displacement_error(a.detach(), b.detach(), s) < 1e-2
        assert_close(resumed.state[a]["momentum_buffer"], reference.state[b]["momentum_buffer"], "fp32_trajectory")


# Whole models: Muon and AdamW groups in one optimizer --------------------------------------------------------

class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.hidden = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 50)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        return self.head(self.norm(x + self.hidden(x)))


def split(model: TinyLM) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The common recipe: hidden matrices to Muon; embeddings, the head, norms and biases to AdamW."""
    muon = [p for p in model.hidden.parameters() if p.dim() >= 2]
    return muon, [p for p in model.parameters() if all(p is not q for q in muon)]


def test_whole_model_matches_muon_plus_adamw() -> None:
    torch.manual_seed(0)
    ours_model, theirs_model = TinyLM(), TinyLM()
    theirs_model.load_state_dict(ours_model.state_dict())
    start = {k: v.clone() for k, v in ours_model.state_dict().items()}
    muon, other = split(ours_model)
    opt = fusedopt.Muon([{"params": muon}, {"params": other, "use_muon": False, "lr": 3e-3, "weight_decay": 0.01,
                                            "betas": (0.9, 0.95)}], lr=0.02)
    t_muon, t_other = split(theirs_model)
    opts = [torch.optim.Muon(t_muon, lr=0.02),
            torch.optim.AdamW(t_other, lr=3e-3, weight_decay=0.01, betas=(0.9, 0.95))]
    generator = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        tokens = torch.randint(0, 50, (4, 12), generator=generator)
        for model in (ours_model, theirs_model):
            logits = model(tokens[:, :-1])
            nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
        for o in opts:
            o.step()
            o.zero_grad()
    theirs = theirs_model.state_dict()
    for name, value in ours_model.state_dict().items():
        assert displacement_error(value, theirs[name], start[name]) < 1e-2, name
    # Each group keeps its own algorithm's state, in torch's layout.
    assert set(opt.state[muon[0]]) == {"momentum_buffer"}
    assert set(opt.state[other[0]]) == {"step", "exp_avg", "exp_avg_sq"}
    assert opt.param_groups[1]["eps"] == 1e-8 and opt.param_groups[0]["eps"] == 1e-7


def test_whole_model_checkpoint_roundtrip() -> None:
    torch.manual_seed(0)
    model = TinyLM()
    muon, other = split(model)

    def make(params_model: TinyLM) -> fusedopt.Muon:
        m, o = split(params_model)
        return fusedopt.Muon([{"params": m}, {"params": o, "use_muon": False, "lr": 3e-3}], lr=0.02)

    opt = make(model)
    tokens = torch.randint(0, 50, (4, 12))
    for _ in range(3):
        nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    twin = TinyLM()
    twin.load_state_dict(model.state_dict())
    resumed = make(twin)
    resumed.load_state_dict(_roundtrip(opt.state_dict()))
    for a, b in zip(model.parameters(), twin.parameters()):
        for key, value in opt.state[a].items():
            assert torch.equal(resumed.state[b][key], value), key
    assert resumed.param_groups[1]["use_muon"] is False and resumed.param_groups[1]["betas"] == (0.9, 0.999)


# Validation ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    ({"lr": -1.0}, "Learning rate should be >= 0 but is: -1.0"),
    ({"momentum": -0.5}, "momentum should be >= 0 but is: -0.5"),
    ({"weight_decay": -0.1}, "weight decay should be >= 0 but is: -0.1"),
    ({"adjust_lr_fn": "spectral"}, "Adjust learning rate function spectral is not supported"),
    ({"ns_steps": 100}, "Number of steps must be less than 100"),
    ({"ns_coefficients": (1.0, 2.0)}, "Coefficients must be a tuple of exactly 3 values"),
])
def test_invalid_arguments_raise_torchs_messages(kwargs: dict[str, Any], message: str) -> None:
    p = nn.Parameter(torch.randn(4, 4))
    if "ns_" not in next(iter(kwargs)):  # torch checks these at construction too
        with pytest.raises(ValueError, match=message):
            torch.optim.Muon([p], **kwargs)
    with pytest.raises(ValueError, match=message):
        fusedopt.Muon([p], **kwargs)


def test_non_matrices_need_an_adamw_group() -> None:
    with pytest.raises(ValueError, match=r"Muon only supports 2D parameters .* size: torch.Size\(\[8\]\).*use_muon"):
        fusedopt.Muon([nn.Parameter(torch.randn(8))])
    with pytest.raises(ValueError, match="Muon only supports 2D"):
        fusedopt.Muon([nn.Parameter(torch.randn(2, 3, 4, 5))])
    opt = fusedopt.Muon([nn.Parameter(torch.randn(4, 4))])
    with pytest.raises(ValueError, match="Muon only supports 2D"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(3))]})
    assert len(opt.param_groups) == 1
    vector = nn.Parameter(torch.randn(3))
    opt.add_param_group({"params": [vector], "use_muon": False})
    vector.grad = torch.randn(3)
    opt.step()
    assert set(opt.state[vector]) == {"step", "exp_avg", "exp_avg_sq"}


def test_char_gpt_recipe_trains_like_muon_plus_adamw() -> None:
    """The README's recipe on the character-level GPT of bench/train_muon.py (short run): the loss curve of one
    fusedopt.Muon with an AdamW group follows torch.optim.Muon + torch.optim.AdamW, and the model learns."""
    from fusedopt.bench.char_gpt import matrix_split, train

    def ours(model: nn.Module) -> list[torch.optim.Optimizer]:
        hidden, rest = matrix_split(model)
        return [fusedopt.Muon([{"params": hidden}, {"params": rest, "use_muon": False, "lr": 3e-3}], lr=0.02,
                              weight_decay=0.01)]

    def theirs(model: nn.Module) -> list[torch.optim.Optimizer]:
        hidden, rest = matrix_split(model)
        return [torch.optim.Muon(hidden, lr=0.02, weight_decay=0.01),
                torch.optim.AdamW(rest, lr=3e-3, weight_decay=0.01)]

    our_losses, our_held_out = train(ours, 30)
    their_losses, their_held_out = train(theirs, 30)
    assert our_losses[-1] < 0.75 * our_losses[0]
    for step, (a, b) in enumerate(zip(our_losses, their_losses)):
        assert a == pytest.approx(b, rel=1e-2), step
    assert our_held_out == pytest.approx(their_held_out, rel=1e-2)


def recipe_twins() -> list[tuple[TinyLM, fusedopt.Muon]]:
    """Two TinyLMs with the same weights, each with the whole-model recipe's optimizer."""
    torch.manual_seed(0)
    model, twin = TinyLM(), TinyLM()
    twin.load_state_dict(model.state_dict())
    pairs = []
    for m in (model, twin):
        hidden, rest = split(m)
        pairs.append((m, fusedopt.Muon([{"params": hidden}, {"params": rest, "use_muon": False, "lr": 3e-3}],
                                       lr=0.02)))
    return pairs


def test_grad_scaler_unscales_inside_the_step() -> None:
    """torch.amp.GradScaler: the step unscales inside the momentum phase (a power-of-two scale is exact, so the
    trajectory is the unscaled one bit for bit) and skips a step whose scaled gradients overflowed."""
    (model, opt), (twin, plain) = recipe_twins()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    tokens = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(1))

    def loss_of(m: TinyLM) -> torch.Tensor:
        return nn.functional.cross_entropy(m(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())

    for _ in range(3):
        scaler.scale(loss_of(model)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        loss_of(twin).backward()
        plain.step()
        plain.zero_grad()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    before = [p.detach().clone() for p in model.parameters()]
    (loss_of(model) * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.slow
def test_compiled_training_step_matches_eager() -> None:
    """A whole training step under torch.compile (the step is fusedopt's custom op, Newton-Schulz included) follows
    the eager one."""
    (model, opt), (twin, eager) = recipe_twins()

    @torch.compile
    def step(tokens: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        tokens = torch.randint(0, 50, (4, 12), generator=generator)
        step(tokens)
        nn.functional.cross_entropy(twin(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
        eager.step()
        eager.zero_grad()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
