"""torch's own optimizer test matrix (torch.testing._internal.common_optimizers.optim_db, from the installed torch)
run on fusedopt: every input config of each algorithm fusedopt implements against torch.optim's for-loop
implementation (parameters and every state tensor at every step), in float32 and in float64 (the dtypes torch's
matrix runs on the CPU), and every error input with the same exception type and message. Where fusedopt differs on
purpose, the reason is given once, in DIFFERENT_ON_PURPOSE."""
from __future__ import annotations

import warnings

import fusedopt
import pytest
import torch
from tolerances import assert_close

common_optimizers = pytest.importorskip("torch.testing._internal.common_optimizers",
                                        reason="torch's optimizer test matrix needs expecttest")

pytestmark = pytest.mark.skipif("cpu" not in fusedopt.build_info()["backends"], reason="compiled CPU backend not built")

OPTIM_DB = {info.optim_cls.__name__: info for info in common_optimizers.optim_db}
# fusedopt classes with a torch.optim counterpart in torch's matrix.
OURS = [name for name in fusedopt.optim.__all__ if name in OPTIM_DB]

# Error inputs fusedopt answers differently, by design (also in README "Differences from torch.optim").
DIFFERENT_ON_PURPOSE = {
    "duplicate parameters": "flat storage cannot hold one parameter twice: fusedopt raises ValueError where torch "
                            "warns and steps the parameter twice",
    "Muon only supports 2D parameters": "fusedopt.Muon orthogonalizes a 3-D parameter per matrix of its first "
                                        "dimension (stacked expert weights), where torch refuses it",
    "does not support complex parameters": "fusedopt refuses complex parameters of every algorithm when the optimizer "
                                           "is built (ValueError, pointing to torch.view_as_real), where torch's "
                                           "Adafactor raises RuntimeError at the first step",
}


# Parameters of the input-config runs where an algorithm takes only some shapes (torch's Muon: matrices; a wide, a
# tall, a square one, and one of a shape seen before).
SHAPES = {"Muon": [(5, 7), (7, 5), (6, 6), (5, 7)]}

# Input configs whose torch run takes a float lr instead of the tensor one: torch.optim.Muon computes 1 - lr*wd and
# lr*ratio as float32 tensors when lr is a tensor, even for float64 parameters; fusedopt computes every coefficient of
# a float64 step in float64, so it matches torch's float64 step with lr given as a number.
FLOAT_LR_IN_TORCH = {("Muon", "Tensor lr", torch.float64)}

# Per-step tolerance of each parameter dtype.
DTYPES = {torch.float32: "fp32", torch.float64: torch.float64}


def _inputs(name: str) -> list:
    return [pytest.param(name, oi, dtype, id=f"{name}-{oi.desc}-{str(dtype)[6:]}") for dtype in DTYPES
            for oi in OPTIM_DB[name].optim_inputs_func(device="cpu", dtype=dtype)]


def _errors(name: str) -> list:
    info = OPTIM_DB[name]
    cases = info.optim_error_inputs_func(device="cpu", dtype=torch.float32)
    return [pytest.param(name, e, id=f"{name}-{k}-{e.error_type.__name__}") for k, e in enumerate(cases)]


@pytest.mark.parametrize("name,optim_input,dtype", [p for name in OURS for p in _inputs(name)])
def test_input_configs_match_torch_for_loop(name: str, optim_input, dtype: torch.dtype) -> None:
    kwargs = dict(optim_input.kwargs)
    if kwargs.get("differentiable"):
        pytest.skip("differentiable=True is refused: fusedopt's fused kernels are not differentiable")
    torch.manual_seed(0)
    shapes = SHAPES.get(name, [(5, 7), (1,), (33,), (4, 3, 2)])
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = getattr(fusedopt, name)(params, **kwargs)
    # The for-loop implementation; torch's Muon has no other (and no foreach argument).
    for_loop = {} if name == "Muon" else {"foreach": False}
    if (name, optim_input.desc, dtype) in FLOAT_LR_IN_TORCH:
        for_loop["lr"] = float(kwargs["lr"])
    theirs = getattr(torch.optim, name)(copies, **{**kwargs, **for_loop})
    for step in range(10):
        for k, (p, t) in enumerate(zip(params, copies)):
            if (k + step) % 4 == 3:  # a parameter without a gradient this step
                p.grad, t.grad = None, None
                continue
            g = torch.randn(p.shape, dtype=dtype)
            p.grad, t.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
        for p, t in zip(params, copies):
            # Per step, fp32: torch's CPU add with alpha fuses a multiply-add that fusedopt's kernels round twice;
            # float64 to float64 rounding.
            assert p.dtype == t.dtype == dtype
            assert_close(p, t, DTYPES[dtype], msg=f"param, step {step}")
            expected = theirs.state.get(t, {})
            state = ours.state.get(p, {})
            assert set(state) == set(expected), (set(state), set(expected))
            for key, value in expected.items():
                assert_close(torch.as_tensor(state[key]), torch.as_tensor(value), DTYPES[dtype],
                             msg=f"{key}, step {step}")


@pytest.mark.parametrize("name,error_input", [p for name in OURS for p in _errors(name)])
def test_error_inputs_match_torch(name: str, error_input) -> None:
    inputs = error_input.optimizer_error_input
    for reason_key, reason in DIFFERENT_ON_PURPOSE.items():
        if reason_key in error_input.error_regex:
            pytest.skip(reason)
    params = inputs.params if inputs.params is not None else [torch.nn.Parameter(torch.randn(3))]
    cls = getattr(fusedopt, name)
    enum = common_optimizers.OptimizerErrorEnum
    if issubclass(error_input.error_type, Warning):
        with pytest.warns(error_input.error_type, match=error_input.error_regex):
            opt = cls(params, **inputs.kwargs)
            if error_input.error_on == enum.STEP_ERROR:
                opt.step()
        return
    with pytest.raises(error_input.error_type, match=error_input.error_regex), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = cls(params, **inputs.kwargs)
        if error_input.error_on == enum.STEP_ERROR:
            opt.step()
