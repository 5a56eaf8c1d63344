"""8-bit optimizer states (state_dtype="8bit", csrc/include/fusedopt/quant8.h): the code against a float64 model of the
same quantizer, the kernels against the float64 reference update (quantization error bounded per block), and the
optimizers' states, checkpoints (torch.optim's layout both ways, the compact form) and refusals."""
from __future__ import annotations

import io
import math

import fusedopt
import pytest
import torch
from cases import ROWS, Algorithm, warm_state
from fusedopt import functional, reference
from fusedopt.flat import QUANT_BLOCK, Segments
from torch import Tensor

F64 = torch.float64
HAS_CPU = "cpu" in fusedopt.build_info()["backends"]
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="compiled CPU backend not built")

QUANTIZED_ROWS = [row for row in ROWS if not row.cls.spec.no_8bit and not row.cls.spec.factored()]
SIZES = [7, 300, 4097]  # shorter than a block, a block and a partial one, 16 blocks and a tail


def grid(signed: bool) -> Tensor:
    """Every magnitude the code can hold, in units of absmax / top (float64, increasing): 0..7, then three mantissa
    bits of q + 8."""
    m = torch.arange(128 if signed else 256, dtype=torch.int64)
    exponent, mantissa = (m + 1040) >> 3, m & 7
    return (1 + mantissa / 8).to(F64) * torch.pow(2.0, (exponent - 127).to(F64)) - 8


def top(signed: bool) -> float:
    return reference.SIGNED_TOP if signed else reference.UNSIGNED_TOP


def log_uniform(n: int, gen: torch.Generator, signed: bool, decades: float = 8.0) -> Tensor:
    magnitude = torch.exp(torch.rand(n, generator=gen, dtype=F64) * -decades * math.log(10))
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).to(F64) if signed else 1.0
    return (magnitude * sign).float()


def quantization_bound(values: Tensor, absmax: Tensor, signed: bool) -> Tensor:
    """Half the gap of the grid around each value: (|v| in grid units + 8) / 16, in value units."""
    scale = (absmax.to(F64) / top(signed)).repeat_interleave(QUANT_BLOCK)[:values.numel()]
    return (values.abs().to(F64) + 8 * scale) / 16


# --- the code ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("signed", [True, False])
def test_code_rounds_to_the_nearest_grid_point(signed: bool) -> None:
    """Each value is stored as the grid point nearest to it (float64 model of the grid), within its block's absmax,
    over eight decades of magnitudes; and decode(encode(x)) is within the bound that the kernel tests use."""
    gen = torch.Generator().manual_seed(1)
    values = log_uniform(64 * QUANT_BLOCK + 77, gen, signed)
    codes, absmax = reference.quantize8(values, signed)
    assert torch.equal(absmax, reference.block_absmax(values))
    decoded = reference.dequantize8(codes, absmax, signed).to(F64)
    scale = (absmax.to(F64) / top(signed)).repeat_interleave(QUANT_BLOCK)[:values.numel()]
    points = grid(signed)
    target = values.abs().to(F64) / scale
    nearest = points[(target[:, None] - points[None, :]).abs().argmin(dim=1)]
    chosen = decoded.abs() / scale
    # the chosen point is as close as the nearest one (ties may go either way)
    assert torch.all((chosen - target).abs() <= (nearest - target).abs() + 1e-6 * target + 1e-9)
    assert torch.all((decoded - values.to(F64)).abs() <= quantization_bound(values, absmax, signed) * (1 + 1e-6))
    if signed:
        assert torch.equal(torch.sign(decoded[decoded != 0]), torch.sign(values.to(F64)[decoded != 0]))
    # the block's largest magnitude is stored exactly
    for b in range(absmax.numel()):
        block = decoded[b * QUANT_BLOCK:(b + 1) * QUANT_BLOCK]
        assert block.abs().max().item() == pytest.approx(absmax[b].item(), rel=1e-6)


def test_unsigned_code_keeps_small_second_moments() -> None:
    """A second moment 1e-9 of its block's largest still decodes to a nonzero value within 1/8 (where the signed
    code, whose smallest nonzero value is 1/491512 of the absmax, flushes it to zero, which would blow up
    m / sqrt(v))."""
    values = torch.full((QUANT_BLOCK,), 1e-9)
    values[0] = 1.0
    codes, absmax = reference.quantize8(values, signed=False)
    decoded = reference.dequantize8(codes, absmax, signed=False)
    assert decoded[1].item() == pytest.approx(1e-9, rel=1 / 8)
    signed_codes, signed_absmax = reference.quantize8(values, signed=True)
    assert reference.dequantize8(signed_codes, signed_absmax, signed=True)[1].item() == 0.0


def test_blocks_with_inf_or_nan_decode_to_nan() -> None:
    values = torch.randn(2 * QUANT_BLOCK)
    values[3] = math.inf
    codes, absmax = reference.quantize8(values, signed=True)
    decoded = reference.dequantize8(codes, absmax, signed=True)
    assert torch.isnan(decoded[:QUANT_BLOCK]).all() and torch.isfinite(decoded[QUANT_BLOCK:]).all()


# --- the kernels against the float64 model -------------------------------------------------------------------------

def layout(sizes: list[int]) -> tuple[list[int], int]:
    offsets, total = [], 0
    for n in sizes:
        offsets.append(total)
        total = -(-(total + n) // QUANT_BLOCK) * QUANT_BLOCK
    return offsets, total


def model_step(row: Algorithm, kwargs: dict, p: Tensor, g: Tensor, states: dict[str, Tensor],
               scalars: dict[str, Tensor], step: int, lr: float) -> tuple[Tensor, dict[str, Tensor]]:
    """The reference update in float64 from the decoded states: what an exact kernel would compute before encoding."""
    p64 = p.to(F64).clone()
    s64 = {name: v.to(F64).clone() for name, v in states.items()}
    names = [s.name for s in row.cls.spec.states]
    slots = [s64.get(name) for name in names]
    getattr(reference, row.kernel)(p64, g.to(F64), *slots, step=step, lr=lr, grad_scale=1.0,
                                    **{k: v.clone() for k, v in scalars.items()}, **row.hyper(kwargs, F64))
    return p64, s64


def trust_ratio_param(row: Algorithm, kwargs: dict, p: Tensor, step: int, lr: float,
                      stored: dict[str, Tensor]) -> Tensor:
    """LAMB's new parameter in float64 from the moments as the kernel stored them."""
    hyper = row.hyper(kwargs, F64)
    u, w2, u2 = reference.lamb_direction(
        p.to(F64), stored["exp_avg"].to(F64), stored["exp_avg_sq"].to(F64), step=step,
        **{k: hyper[k] for k in ("beta1", "beta2", "eps", "weight_decay", "bias_correction")})
    p64 = p.to(F64).clone()
    reference.lamb_apply(p64, u, w2, u2, lr=lr, max_trust_ratio=hyper["max_trust_ratio"])
    return p64


def cases_of(row: Algorithm) -> list:
    chosen = [row.cases[0]] + ([row.richest_case()] if row.richest_case() is not row.cases[0] else [])
    return [pytest.param(row, case, id=f"{row.name}-{case.id}") for case in chosen]


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("row,case", [c for row in QUANTIZED_ROWS for c in cases_of(row)])
def test_kernel_matches_the_float64_model(row: Algorithm, case, dtype: torch.dtype) -> None:
    """Four steps of the compiled kernel from warm random states: each step's new states are within half a grid gap of
    the float64 update of the previous step's decoded states (and each block's absmax is the largest of its new
    values), and the parameters follow that update to the precision of their dtype."""
    gen = torch.Generator().manual_seed(7)
    offsets, total = layout(SIZES)
    segments = Segments(offsets, SIZES, torch.device("cpu"))
    segments.set_all_active(True)
    lr = 1e-2
    row.fill_scalars(segments, lr)
    kept = row.kept_states(case.kwargs)
    signed = [s.signed for s in row.cls.spec.states]
    codes: dict[str, Tensor] = {}
    absmax: dict[str, Tensor] = {}
    for s in kept:
        codes[s.name] = torch.zeros(total, dtype=torch.uint8)
        absmax[s.name] = torch.zeros(total // QUANT_BLOCK)
        for o, n in zip(offsets, SIZES):
            c, a = reference.quantize8(warm_state(s.name, n, gen), s.signed)
            codes[s.name][o:o + n] = c
            absmax[s.name][o // QUANT_BLOCK:-(-(o + n) // QUANT_BLOCK)] = a
    param = torch.randn(total, generator=gen).to(dtype)
    hyper = row.hyper(case.kwargs, dtype)
    for step in range(1, 5):
        grad = torch.randn(total, generator=gen).to(dtype)
        before = {name: {k: reference.dequantize8(codes[name][o:o + n],
                                                  absmax[name][o // QUANT_BLOCK:-(-(o + n) // QUANT_BLOCK)],
                                                  spec_signed(row, name))
                         for k, (o, n) in enumerate(zip(offsets, SIZES))} for name in codes}
        p_before = param.clone()
        scalars_before = None if segments.scalars is None else segments.scalars.clone()
        functional.update(row.kernel, param, grad, [codes.get(s.name) for s in row.cls.spec.states], None, segments,
                          hyper=hyper, lr=lr, backend="cpu", absmax=[absmax.get(s.name) for s in row.cls.spec.states],
                          signed=signed)
        for k, (o, n) in enumerate(zip(offsets, SIZES)):
            scalars = {} if scalars_before is None else {
                name: scalars_before[k, j] for j, name in enumerate(row.cls.spec.scalar_names())}
            expected_p, expected = model_step(row, case.kwargs, p_before[o:o + n], grad[o:o + n],
                                              {name: before[name][k] for name in codes}, scalars, step, lr)
            blocks = slice(o // QUANT_BLOCK, -(-(o + n) // QUANT_BLOCK))
            if row.two_pass:  # a trust-ratio update reads the moments as encoded: its direction from the kernel's
                expected_p = trust_ratio_param(row, case.kwargs, p_before[o:o + n], step, lr, {
                    name: reference.dequantize8(codes[name][o:o + n], absmax[name][blocks], spec_signed(row, name))
                    for name in codes})
            for name in codes:
                is_signed = spec_signed(row, name)
                got_absmax = absmax[name][blocks]
                got = reference.dequantize8(codes[name][o:o + n], got_absmax, is_signed).to(F64)
                want = expected[name]
                bound = quantization_bound(want.float(), got_absmax, is_signed) * 1.001 + 1e-5 * want.abs() + 1e-30
                worst = ((got - want).abs() / bound).max().item()
                assert worst <= 1.0, f"{name} of segment {k} at step {step}: {worst:.3f} of the bound"
                want_absmax = reference.block_absmax(want.float()).to(F64)
                assert torch.allclose(got_absmax.to(F64), want_absmax, rtol=1e-5, atol=1e-30), name
            ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -20
            close = (param[o:o + n].to(F64) - expected_p).abs() <= ulp * expected_p.abs() + 1e-7
            if row.sign_update:  # an update through sign(): where its argument is within an ulp of 0 it may flip
                assert close.float().mean().item() >= 0.99
            else:
                assert close.all(), f"param of segment {k} at step {step}"


def spec_signed(row: Algorithm, name: str) -> bool:
    return next(s.signed for s in row.cls.spec.states if s.name == name)


@needs_cpu
@pytest.mark.parametrize("row", [r for r in QUANTIZED_ROWS if r.name in ("AdamW", "SGD", "RMSprop", "LAMB")],
                         ids=repr)
def test_kernel_writes_the_reference_backend_codes(row: Algorithm) -> None:
    """The compiled kernel and the reference backend (which runs the same API with nothing compiled) agree on the
    codes: equal bits but for rare one-code differences where the fp32 update orders its operations differently."""
    case = row.richest_case()
    offsets, total = layout(SIZES)
    results = []
    for backend in ("cpu", "reference"):
        gen = torch.Generator().manual_seed(3)
        segments = Segments(offsets, SIZES, torch.device("cpu"))
        segments.set_all_active(True)
        states = [torch.zeros(total, dtype=torch.uint8) if s.when(row.group(case.kwargs)) else None
                  for s in row.cls.spec.states]
        absmax = [None if s is None else torch.zeros(total // QUANT_BLOCK) for s in states]
        param = torch.randn(total, generator=gen)
        for _ in range(6):
            functional.update(row.kernel, param, torch.randn(total, generator=gen), states, None, segments,
                              hyper=row.hyper(case.kwargs), lr=1e-2, backend=backend, absmax=absmax,
                              signed=[s.signed for s in row.cls.spec.states])
        results.append((param, [s for s in states if s is not None]))
    (p_cpu, s_cpu), (p_ref, s_ref) = results
    assert torch.allclose(p_cpu, p_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(s_cpu, s_ref):
        diff = (a.int() - b.int()).abs()
        assert diff.max().item() <= 1 and (diff > 0).float().mean().item() < 1e-3


@needs_cpu
def test_kernel_blocks_with_inf_decode_to_nan() -> None:
    """An inf gradient makes its block's states non-finite: that block's absmax is NaN (it decodes to NaN, as torch's
    states would hold inf or NaN), and every other block stays finite."""
    n = 4 * QUANT_BLOCK
    segments = Segments([0], [n], torch.device("cpu"))
    segments.set_all_active(True)
    codes = [torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)]
    absmax = [torch.zeros(n // QUANT_BLOCK), torch.zeros(n // QUANT_BLOCK)]
    grad = torch.randn(n)
    grad[QUANT_BLOCK + 5] = math.inf
    functional.update("adam", torch.randn(n), grad, [*codes, None], None, segments,
                      hyper=dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
                                 decoupled=True), lr=1e-3, backend="cpu", absmax=[*absmax, None],
                      signed=[True, False, False])
    for a in absmax:
        assert torch.isnan(a[1]) and torch.isfinite(a[[0, 2, 3]]).all()


# --- optimizers ----------------------------------------------------------------------------------------------------

def small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 300), torch.nn.Tanh(), torch.nn.Linear(300, 10))


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> float:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 32, generator=gen)
    y = (x[:, :10] * 3).argmax(dim=1)  # learnable: the largest of the first ten inputs
    loss = torch.tensor(0.0)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return float(loss.detach())


@needs_cpu
def test_8bit_adamw_trains_like_torch_fp32() -> None:
    """A classifier trained 60 steps with 8-bit AdamW reaches the loss of torch's fp32 AdamW within 10%, and its
    states take 2 bytes per parameter and 2 absmaxes per 256 (each parameter padded to whole blocks)."""
    model, twin = small_model(), small_model()
    opt = fusedopt.AdamW(model.parameters(), lr=3e-3, state_dtype="8bit")
    ours, theirs = train(model, opt, 60), train(twin, torch.optim.AdamW(twin.parameters(), lr=3e-3), 60)
    assert theirs < 0.2  # the task is learnt
    assert ours == pytest.approx(theirs, rel=0.1)
    buf = opt.flat_buffers[0][0]
    state_bytes = sum(t.numel() * t.element_size() for t in [*buf.state.values(), *buf.absmax.values()])
    params = list(model.parameters())
    padded = sum(-(-p.numel() // QUANT_BLOCK) * QUANT_BLOCK for p in params)  # each parameter in whole blocks
    assert buf.total == padded
    assert state_bytes == 2 * padded + 2 * 4 * padded // QUANT_BLOCK


@needs_cpu
def test_state_holds_codes_and_absmaxes() -> None:
    model = small_model()
    opt = fusedopt.AdamW(model.parameters(), state_dtype="8bit")
    train(model, opt, 2)
    state = opt.state[model[0].weight]
    assert state["exp_avg"].dtype == torch.uint8 and state["exp_avg"].shape == model[0].weight.shape
    assert state["exp_avg_absmax"].dtype == torch.float32
    assert state["exp_avg_absmax"].numel() == -(-model[0].weight.numel() // QUANT_BLOCK)
    assert state["exp_avg_sq_absmax"].min() > 0


@needs_cpu
def test_checkpoints_swap_with_torch_both_ways() -> None:
    """state_dict() is torch.optim's layout (fp32 states shaped like the parameters): torch's AdamW loads it and goes on
    as the 8-bit optimizer would; a torch checkpoint loads into the 8-bit optimizer quantized."""
    model = small_model()
    opt = fusedopt.AdamW(model.parameters(), lr=1e-2, state_dtype="8bit")
    train(model, opt, 5)
    saved = opt.state_dict()
    for p, entry in zip(model.parameters(), saved["state"].values()):
        assert set(entry) == {"step", "exp_avg", "exp_avg_sq"}
        assert entry["exp_avg"].dtype == torch.float32 and entry["exp_avg"].shape == p.shape
        buf = opt.flat_buffers[0][0]
        i = next(k for k, q in enumerate(buf.params) if q is p)
        assert torch.equal(entry["exp_avg_sq"], buf.read_state("exp_avg_sq", i))
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    twin = small_model()
    twin.load_state_dict(model.state_dict())
    torch_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    torch_opt.load_state_dict(loaded)
    for name in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(torch_opt.state[twin[0].weight][name], saved["state"][0][name])

    back = small_model()
    back.load_state_dict(twin.state_dict())
    train(twin, torch_opt, 3)
    opt8 = fusedopt.AdamW(back.parameters(), lr=1e-2, state_dtype="8bit")
    opt8.load_state_dict(torch_opt.state_dict())
    theirs = torch_opt.state[twin[0].weight]
    ours = opt8.state_dict()["state"][0]
    for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        codes, absmax = reference.quantize8(theirs[name].reshape(-1), signed)
        assert torch.equal(ours[name].reshape(-1), reference.dequantize8(codes, absmax, signed))
    assert ours["step"] == theirs["step"]


@needs_cpu
@pytest.mark.parametrize("cls", [fusedopt.AdamW, fusedopt.RMSprop, fusedopt.Adagrad], ids=repr)
def test_state_dict_holds_what_torch_holds(cls: type) -> None:
    """After three steps from the same gradients, every state in state_dict() is torch.optim's within the code's
    precision: the optimizer decodes each state with the code the kernel wrote it in (signed or not, whose scales
    differ by 2^16)."""
    gen = torch.Generator().manual_seed(5)
    ours = [torch.nn.Parameter(torch.randn(700, generator=gen)) for _ in range(2)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = cls(ours, lr=1e-3, state_dtype="8bit")
    ref = getattr(torch.optim, cls.__name__)(theirs, lr=1e-3)
    for _ in range(3):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(700, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    saved, expected = opt.state_dict()["state"], ref.state_dict()["state"]
    for k in saved:
        for name, value in expected[k].items():
            if name == "step":
                continue
            # each step's rounding (1/16 of a value) carried by the moments' averages: within a tenth of the value
            # and a sixteenth of the tensor's largest (a moment near a sign change keeps its history's error)
            bound = value.abs() / 10 + value.abs().max() / 16
            assert torch.all((saved[k][name] - value).abs() <= bound), name


@needs_cpu
def test_compact_checkpoint_round_trips_the_bits() -> None:
    model = small_model()
    opt = fusedopt.AdamW(model.parameters(), state_dtype="8bit", compact_state_dict=True)
    train(model, opt, 3)
    saved = opt.state_dict()
    entry = saved["state"][0]
    assert entry["exp_avg"].dtype == torch.uint8 and "exp_avg_absmax" in entry
    size = sum(t.numel() * t.element_size() for e in saved["state"].values() for t in e.values())
    assert size < 0.3 * sum(p.numel() * 8 for p in model.parameters())
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    other = small_model()
    opt2 = fusedopt.AdamW(other.parameters(), state_dtype="8bit")
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    for p, q in zip(model.parameters(), other.parameters()):
        for key in ("exp_avg", "exp_avg_absmax", "exp_avg_sq", "exp_avg_sq_absmax"):
            assert torch.equal(opt.state[p][key], opt2.state[q][key])
    with pytest.raises(ValueError, match="state_dtype='8bit'"):
        fusedopt.AdamW(small_model().parameters()).load_state_dict(saved)


@needs_cpu
def test_state_written_by_user_code_is_followed() -> None:
    """torch's visible objects are the truth: a float tensor assigned to state[p]["exp_avg"] is quantized in, and a
    cleared state starts afresh."""
    model = small_model()
    opt = fusedopt.AdamW(model.parameters(), lr=1e-2, state_dtype="8bit")
    train(model, opt, 2)
    w = model[0].weight
    values = torch.randn_like(w) * 1e-3
    opt.state[w]["exp_avg"] = values
    opt.step()  # follows the edit first (the gradient is the last one)
    buf = opt.flat_buffers[0][0]
    assert opt.state[w]["exp_avg"].dtype == torch.uint8  # a view of the codes again
    beta1 = 0.9
    expected = beta1 * values + (1 - beta1) * w.grad
    got = buf.read_state("exp_avg", next(k for k, q in enumerate(buf.params) if q is w))
    # two roundings of half a grid gap each: the assigned values' and the new state's
    bound = (beta1 * values.abs() + expected.abs()) / 16 + float(expected.abs().max()) * 1e-4
    assert torch.all((got - expected).abs() <= bound)
    opt.state[w].clear()
    opt.step()
    assert opt.state[w]["step"] == 1


@needs_cpu
def test_copies_and_edited_absmaxes_are_followed() -> None:
    """A deep copy of the optimizer carries the codes and absmaxes into its own buffers; an absmax assigned alone
    rescales its block."""
    import copy

    model = small_model()
    opt = fusedopt.AdamW(model.parameters(), state_dtype="8bit")
    train(model, opt, 2)
    twin = copy.deepcopy(opt)
    twin._follow_visible_objects()
    for p, q in zip(opt.param_groups[0]["params"], twin.param_groups[0]["params"]):
        for key in ("exp_avg", "exp_avg_absmax", "exp_avg_sq", "exp_avg_sq_absmax"):
            assert torch.equal(opt.state[p][key], twin.state[q][key])
    w = model[0].weight
    buf = opt.flat_buffers[0][0]
    before = buf.read_state("exp_avg", 0).clone()
    opt.state[w]["exp_avg_absmax"] = opt.state[w]["exp_avg_absmax"] * 2
    opt._follow_visible_objects()
    assert torch.allclose(buf.read_state("exp_avg", 0), 2 * before)
    assert opt.state[w]["exp_avg_absmax"].data_ptr() == buf.state_region("exp_avg_absmax", 0).data_ptr()


@pytest.mark.parametrize("cls", [fusedopt.Adafactor, fusedopt.ASGD, fusedopt.Muon], ids=repr)
def test_algorithms_without_8bit_states_refuse(cls: type) -> None:
    params = [torch.nn.Parameter(torch.randn(4, 4))]
    with pytest.raises(ValueError, match="Invalid state_dtype: '8bit' for"):
        cls(params, state_dtype="8bit")


def test_float64_parameters_refuse_8bit_states() -> None:
    with pytest.raises(ValueError, match="'8bit' for float64"):
        fusedopt.AdamW([torch.nn.Parameter(torch.randn(4, dtype=F64))], state_dtype="8bit")


def test_invalid_options_are_refused() -> None:
    params = [torch.nn.Parameter(torch.randn(4))]
    with pytest.raises(ValueError, match="Invalid state_dtype: '4bit'"):
        fusedopt.AdamW(params, state_dtype="4bit")
    with pytest.raises(ValueError, match="Invalid compact_state_dict"):
        fusedopt.AdamW(params, compact_state_dict="yes")


@needs_cpu
@pytest.mark.parametrize("cls,kwargs,name,value", [
    (fusedopt.Adagrad, dict(initial_accumulator_value=0.1), "sum", 0.1),
    (fusedopt.Rprop, dict(lr=0.03), "step_size", 0.03),
], ids=["Adagrad", "Rprop"])
def test_first_values_are_encoded_exactly(cls: type, kwargs: dict, name: str, value: float) -> None:
    """A state's nonzero first value (Adagrad's initial accumulator, Rprop's step size = lr) is every block's absmax,
    so it is stored at the top code: decoded to within float32 rounding, not to a grid gap."""
    p = torch.nn.Parameter(torch.randn(1000))
    opt = cls([p], state_dtype="8bit", **kwargs)
    buf = opt.flat_buffers[0][0]
    opt._init_state(opt.param_groups[0], buf, 0, fresh=True)
    assert torch.allclose(buf.read_state(name, 0), torch.full((1000,), value), rtol=2e-7, atol=0)


def test_reference_backend_runs_8bit_states() -> None:
    """The pure-Python backend keeps 8-bit states too (machines where nothing is compiled)."""
    model, twin = small_model(), small_model()
    opt = fusedopt.AdamW(model.parameters(), lr=3e-3, state_dtype="8bit", backend="reference")
    ours = train(model, opt, 40)
    theirs = train(twin, torch.optim.AdamW(twin.parameters(), lr=3e-3), 40)
    assert opt.state[model[0].weight]["exp_avg"].dtype == torch.uint8
    assert ours == pytest.approx(theirs, rel=0.1)
