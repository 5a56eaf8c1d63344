"""Per-dtype comparison tolerances shared by every test; the one place a tolerance is chosen.

Use `assert_close(actual, expected, dtype)` with the dtype of the tensor under test (its storage dtype), or with a
key such as "fp32_trajectory" when comparing multi-step trajectories.
"""
from __future__ import annotations

import torch

# Per-step, single-kernel comparisons: both sides compute in fp32 with the same operation order, so they agree to a
# few ulps (rtol 1e-5 is ~80 ulp at fp32 epsilon 1.19e-7); atol covers values that cancel towards zero.
FP32 = {"rtol": 1e-5, "atol": 1e-6}

# Multi-step trajectories vs torch.optim (or vs a float64 oracle): a one-ulp difference in step k (e.g. an FMA
# contraction in a compiled kernel, or a different but equally valid order of `sqrt(v)/bc2_sqrt`) feeds back through
# the m/sqrt(v) ratio of normalising optimizers, which amplifies relative differences where v is tiny. Over 50 steps
# with lr ~1e-2 the parameters drift by at most a few 1e-6 absolute, so atol is raised to 1e-5; rtol stays tight.
FP32_TRAJECTORY = {"rtol": 1e-5, "atol": 1e-5}

# 16-bit storage, one step from identical inputs: the fp32 results agree to a few fp32 ulps, so the stored values are
# equal or one 16-bit ulp apart (bf16: 8 significand bits, ulp <= 2**-7 relative; fp16: 11 bits, <= 2**-10). atol only
# covers values that cancel towards zero.
BF16 = {"rtol": 2**-7, "atol": 1e-5}
FP16 = {"rtol": 2**-10, "atol": 1e-6}

TOLERANCES: dict[object, dict[str, float]] = {
    torch.float32: FP32,
    torch.bfloat16: BF16,
    torch.float16: FP16,
    torch.float64: {"rtol": 1e-12, "atol": 1e-14},
    "fp32": FP32,
    "fp32_trajectory": FP32_TRAJECTORY,
    "bf16": BF16,
    "fp16": FP16,
}


def tolerance(dtype: object) -> dict[str, float]:
    """rtol/atol for `dtype` (a torch.dtype or one of the string keys of TOLERANCES)."""
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise KeyError(f"no tolerance for dtype {dtype!r}; known: {list(TOLERANCES)}") from None


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: object = None, msg: str = "") -> None:
    """torch.testing.assert_close with the tolerance of `dtype` (default: actual.dtype).

    Values are compared in float64 so that a 16-bit result may be compared against an fp32 computation; dtype and
    device are not checked here (the caller chooses what to compare).
    """
    if dtype is None:
        dtype = actual.dtype
    tol = tolerance(dtype)
    a = actual.detach().to("cpu", torch.float64)
    e = torch.as_tensor(expected).detach().to("cpu", torch.float64)
    torch.testing.assert_close(
        a, e, rtol=tol["rtol"], atol=tol["atol"], equal_nan=True,
        msg=(lambda m: f"{msg}\n{m}" if msg else m),
    )


def assert_update_close(actual: torch.Tensor, expected: torch.Tensor, before: torch.Tensor, dtype: object,
                        msg: str = "", stored: torch.dtype | None = None) -> None:
    """Compare the updates `actual - before` and `expected - before`: relative tolerance of `dtype` on each element,
    plus that of the largest update, plus one rounding of the result when it is stored in 16 bits (`stored`).

    For an update computed from rounded inputs, e.g. LAMB's direction from bf16-stored moments: where the two sides'
    fp32 moments round to neighbouring bf16 values, the direction differs by one bf16 ulp of its terms, which can be
    far larger than the direction itself where m / (sqrt(v) + eps) and weight_decay * p cancel. A halved or dropped
    update still fails."""
    a, e, b = (t.detach().to("cpu", torch.float64) for t in (actual, expected, before))
    rtol = tolerance(dtype)["rtol"]
    da, de = a - b, e - b
    allowed = rtol * de.abs() + rtol * de.abs().max()
    if stored is not None and stored != torch.float32:
        allowed = allowed + tolerance(stored)["rtol"] * e.abs()
    excess = (da - de).abs() - allowed
    worst = int(excess.argmax())
    assert bool((excess <= 0).all()), (
        f"{msg}: updates differ by {float((da - de).abs()[worst]):.3g} at index {worst} (allowed "
        f"{float(allowed[worst]):.3g}; update {float(de[worst]):.3g}, largest {float(de.abs().max()):.3g})")
