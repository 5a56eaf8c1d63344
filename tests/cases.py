"""Case tables: one row per optimizer class of fusedopt.optim.__all__, holding its cases (constructor kwargs with a
readable id) and every per-algorithm property a test needs. Everything else is read from the class: torch's defaults
(`cls.torch_defaults`), the states and when each exists (`cls.spec`), the kernel fields (`cls.spec.hyper`), the
torch.optim counterpart (`torch.optim.<class name>`, if any). Tests iterate over `TABLE` and never name an algorithm.

Hyperparameters are deliberately non-default (large lr, betas far from 1, visible weight decay) so that a mode that is
ignored or mis-wired changes the result by far more than any tolerance.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import fusedopt
import torch
from fusedopt.flat import Segments
from fusedopt.optim import FusedOptimizer
from fusedopt.optim._spec import State
from torch import Tensor

F64 = torch.float64
VECTOR = 8  # the length of a vector parameter where only its number of dimensions matters


@dataclass(frozen=True)
class Case:
    """One row of a case table: `id` is the pytest id, `kwargs` the constructor kwargs (torch.optim names)."""

    id: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:  # pytest shows this when an id is not used
        return self.id


@dataclass(frozen=True)
class Range:
    """A closed float interval that property tests draw a hyperparameter from."""

    low: float
    high: float


# An oracle in float64 straight from the paper, for algorithms torch.optim lacks:
# (param, grad, states by name, step t >= 1, hyperparameters) -> (param, states, mask of elements not to compare).
Oracle = Callable[[Tensor, Tensor, Mapping[str, Tensor], int, Mapping[str, Any]],
                  tuple[Tensor, dict[str, Tensor], "Tensor | None"]]


@dataclass(frozen=True, eq=False)
class Algorithm:
    """One optimizer class, its cases, and the test properties that cannot be read from the class."""

    cls: type[FusedOptimizer]
    cases: tuple[Case, ...]
    # (kwargs, message): torch.optim's ValueError for a bad value of one of this class's own hyperparameters.
    invalid: tuple[tuple[dict[str, Any], str], ...] = ()
    # torch.optim's ValueError for a bad learning rate (formatted with the value).
    invalid_lr: str = "Invalid learning rate: {}"
    # Float64 paper formulas; required when torch.optim has no counterpart (the oracle of the comparison tests).
    oracle64: Oracle | None = None
    # The oracle's whole trajectory, never re-anchored, stays within the fp32 trajectory tolerance (a smooth update;
    # an update through sign() is not: one flipped sign moves an element by 2*lr).
    smooth_trajectory: bool = False
    # Each element moves by +-lr*sign(c): where c is within an ulp of 0, two correct fp32 implementations may flip the
    # sign, so a few elements may differ by 2*lr.
    sign_update: bool = False
    # Weight decay enters the gradient (g + wd*p, torch.optim's coupled form) unless decoupled_weight_decay is set.
    coupled_weight_decay: bool = False
    # Zero gradients leave zero-initialised states at zero (Adamax's exp_inf rises to eps instead; its parameter
    # still stays put).
    zero_fixed_states: bool = True
    # The step size reaches the update only through a float32 per-parameter scalar state (ASGD's eta = lr, as torch
    # keeps it), so a float64 step uses lr rounded to float32 in torch.optim and in fusedopt alike.
    float32_step_size: bool = False
    # Hyperparameter ranges of the property tests (constructor kwargs: a Range, a list of alternatives, a tuple of
    # specs, or a plain value).
    ranges: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return self.name

    @property
    def name(self) -> str:
        return self.cls.__name__

    @property
    def kernel(self) -> str:
        return self.cls.spec.kernel

    @property
    def torch_cls(self) -> type[torch.optim.Optimizer] | None:
        """torch.optim's class of the same name, the oracle where it exists."""
        return getattr(torch.optim, self.name, None)

    @property
    def two_pass(self) -> bool:
        """The kernel is of the compiled core's trust-ratio or factored kind: a first pass writes the moments (factors)
        and per-parameter sums of squares, a later one reads the stored states back to apply the update."""
        from fusedopt import _kernels  # noqa: PLC0415 - needs the compiled extension

        return _kernels.ALGORITHMS[self.kernel]["kind"] in ("trust_ratio", "factored")

    def group(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The param group the class builds from `kwargs`: torch's defaults, the kwargs, the spec's forced keys
        (unknown keys raise, to catch typos in tables)."""
        unknown = set(kwargs) - set(self.cls.torch_defaults)
        if unknown:
            raise KeyError(f"unknown {self.name} kwargs in case table: {sorted(unknown)}")
        return {**self.cls.torch_defaults, **kwargs, **self.cls.spec.forced}

    def kept_states(self, kwargs: Mapping[str, Any], shape: tuple[int, ...] = (VECTOR,)) -> list[State]:
        """The states of a parameter of `shape` under this configuration (the tests' parameters are vectors unless
        they say otherwise; a vector keeps no Adafactor row or column factor)."""
        return self.cls.spec.kept_for(self.group(kwargs), torch.Size(shape))

    def state_names(self, kwargs: Mapping[str, Any], shape: tuple[int, ...] = (VECTOR,)) -> tuple[str, ...]:
        """The state tensors torch.optim (and fusedopt) keep for this configuration besides the step: the
        per-element ones in kernel slot order, then the per-parameter scalars (0-dim float32 tensors)."""
        return tuple(s.name for s in self.kept_states(kwargs, shape)) + self.cls.spec.scalar_names()

    def hyper(self, kwargs: Mapping[str, Any], dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        """The kernel fields (math header's kFields) of this configuration, for parameters of `dtype`."""
        return self.cls.spec.hyper_for(self.group(kwargs), dtype)

    def decay_enters_gradient(self, kwargs: Mapping[str, Any]) -> bool:
        """Whether this configuration adds wd*p to the gradient before normalising it."""
        group = self.group(kwargs)
        return self.coupled_weight_decay and not group.get("decoupled_weight_decay", False) \
            and group["weight_decay"] != 0

    def fill_scalars(self, segments: Segments, lr: float) -> None:
        """Give a segment table the first values of the row's per-parameter scalar states (the spec's, at learning
        rate `lr`), as the optimizer does when a parameter's state is created. Nothing for a row without them or a
        table that has them."""
        if segments.scalars is None:
            self.cls.spec.fill_scalars(segments, {**self.group({}), "lr": lr})

    def torch_optimizer(self, params: Any, kwargs: Mapping[str, Any]) -> torch.optim.Optimizer:
        """torch.optim's single-tensor implementation (foreach=False) with the case's kwargs."""
        assert self.torch_cls is not None, f"torch.optim has no {self.name}"
        return self.torch_cls(params, **kwargs, foreach=False)

    def descent_cases(self) -> list[Case]:
        """The first case and the last case that minimises (no maximize=True): for trajectories through a real model,
        where gradient ascent on the loss diverges and amplifies every rounding difference without bound."""
        last = [c for c in self.cases if not c.kwargs.get("maximize", False)][-1]
        return [self.cases[0], last]

    def richest_case(self) -> Case:
        """The case that keeps the most states (the latest such case: tables end with their most combined modes)."""
        return max(reversed(self.cases), key=lambda c: len(self.state_names(c.kwargs)))


# ------------------------------------------------------------------------------------- float64 paper oracles
def lion64(p: Tensor, g: Tensor, states: Mapping[str, Tensor], step: int, hp: Mapping[str, Any]
           ) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """Lion, Chen et al. 2023 Alg. 2, in float64 straight from the paper:
    c = b1*m + (1-b1)*g;  p = p - lr*(sign(c) + wd*p);  m = b2*m + (1-b2)*g.
    The mask marks elements whose sign fp32 rounding may legitimately flip."""
    p, g, m = p.to(F64), g.to(F64), states["exp_avg"].to(F64)
    if hp["maximize"]:
        g = -g
    b1, b2 = hp["betas"]
    c = b1 * m + (1 - b1) * g
    p_new = p - hp["lr"] * (torch.sign(c) + hp["weight_decay"] * p)
    m_new = b2 * m + (1 - b2) * g
    # fp32 lerp is accurate to a few ulp of max(|m|, |g|); inside that band the sign is not determined.
    ambiguous = c.abs() <= 1e-6 * (m.abs() + g.abs())
    return p_new, {"exp_avg": m_new}, ambiguous


def lamb64(p: Tensor, g: Tensor, states: Mapping[str, Tensor], step: int, hp: Mapping[str, Any]
           ) -> tuple[Tensor, dict[str, Tensor], None]:
    """LAMB, You et al. 2019 Alg. 2, in float64 straight from the paper (phi = identity):
    m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2; mh = m/(1-b1^t), vh = v/(1-b2^t) (if bias_correction);
    u = mh/(sqrt(vh)+eps) + wd*p; r = ||p||/||u|| (1 if either is 0; min(r, max_trust_ratio)); p = p - lr*r*u."""
    p, g, m, v = p.to(F64), g.to(F64), states["exp_avg"].to(F64), states["exp_avg_sq"].to(F64)
    if hp["maximize"]:
        g = -g
    b1, b2 = hp["betas"]
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    # u from the moments as stored (fusedopt's choice: the update is a function of the saved state).
    ms, vs = (x.to(states[k].dtype).to(F64) for x, k in ((m, "exp_avg"), (v, "exp_avg_sq")))
    mh, vh = (ms / (1 - b1**step), vs / (1 - b2**step)) if hp["bias_correction"] else (ms, vs)
    u = mh / (torch.sqrt(vh) + hp["eps"]) + hp["weight_decay"] * p
    w_norm, u_norm = torch.linalg.vector_norm(p).item(), torch.linalg.vector_norm(u).item()
    ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
    if hp["max_trust_ratio"] is not None:
        ratio = min(ratio, hp["max_trust_ratio"])
    return p - hp["lr"] * ratio * u, {"exp_avg": m, "exp_avg_sq": v}, None


# ------------------------------------------------------------------------------------- the table
UNIT = Range(0.5, 0.999)  # betas, alpha
SMALL = Range(0.0, 0.2)  # weight decay, lr_decay
BOTH = [False, True]

_ADAM_RANGES = dict(lr=Range(1e-4, 5e-2), betas=(UNIT, UNIT), eps=Range(1e-8, 1e-3), weight_decay=SMALL,
                    amsgrad=BOTH, maximize=BOTH)

_ROWS = [
    Algorithm(
        fusedopt.Adam,
        cases=(
            Case("default", {"lr": 1e-2}),
            Case("betas-eps", {"lr": 2e-2, "betas": (0.8, 0.95), "eps": 1e-6}),
            Case("weight_decay", {"lr": 1e-2, "betas": (0.85, 0.98), "weight_decay": 0.1}),
            Case("amsgrad", {"lr": 1e-2, "betas": (0.8, 0.9), "amsgrad": True}),
            Case("amsgrad-weight_decay", {"lr": 1e-2, "betas": (0.8, 0.9), "weight_decay": 0.05, "amsgrad": True}),
            Case("maximize", {"lr": 1e-2, "maximize": True, "weight_decay": 0.05}),
            Case("amsgrad-maximize", {"lr": 1e-2, "betas": (0.7, 0.95), "amsgrad": True, "maximize": True}),
        ),
        invalid=(({"eps": -1e-8}, "Invalid epsilon value: -1e-08"),
                 ({"betas": (1.0, 0.999)}, "Invalid beta parameter at index 0: 1.0")),
        coupled_weight_decay=True,
        ranges=dict(_ADAM_RANGES, decoupled_weight_decay=BOTH),
    ),
    Algorithm(
        fusedopt.AdamW,
        cases=(
            Case("default", {"lr": 1e-2}),  # torch default weight_decay=1e-2
            Case("weight_decay", {"lr": 1e-2, "betas": (0.85, 0.98), "weight_decay": 0.3}),
            Case("no-weight_decay", {"lr": 1e-2, "weight_decay": 0.0}),
            Case("amsgrad", {"lr": 1e-2, "betas": (0.8, 0.9), "weight_decay": 0.1, "amsgrad": True}),
            Case("maximize", {"lr": 1e-2, "weight_decay": 0.1, "maximize": True}),
            Case("amsgrad-maximize-eps", {"lr": 2e-2, "betas": (0.7, 0.95), "eps": 1e-5, "weight_decay": 0.2,
                                          "amsgrad": True, "maximize": True}),
        ),
        invalid=(({"betas": (0.9, 1.5)}, "Invalid beta parameter at index 1: 1.5"),
                 ({"weight_decay": -0.1}, "Invalid weight_decay value: -0.1")),
        coupled_weight_decay=True,  # AdamW's spec forces decoupled_weight_decay
        ranges=_ADAM_RANGES,
    ),
    Algorithm(
        fusedopt.SGD,
        cases=(
            Case("plain", {"lr": 5e-2}),
            Case("weight_decay", {"lr": 5e-2, "weight_decay": 0.1}),
            Case("momentum", {"lr": 5e-2, "momentum": 0.9}),
            Case("momentum-dampening", {"lr": 5e-2, "momentum": 0.8, "dampening": 0.3}),
            Case("nesterov", {"lr": 5e-2, "momentum": 0.9, "nesterov": True}),
            Case("nesterov-weight_decay", {"lr": 5e-2, "momentum": 0.7, "nesterov": True, "weight_decay": 0.05}),
            Case("maximize", {"lr": 5e-2, "maximize": True}),
            Case("momentum-dampening-weight_decay", {"lr": 5e-2, "momentum": 0.8, "dampening": 0.2,
                                                     "weight_decay": 0.1}),
            Case("momentum-dampening-weight_decay-maximize", {"lr": 5e-2, "momentum": 0.8, "dampening": 0.2,
                                                              "weight_decay": 0.1, "maximize": True}),
        ),
        invalid=(({"lr": 0.1, "momentum": -0.5}, "Invalid momentum value: -0.5"),
                 ({"lr": 0.1, "nesterov": True}, "Nesterov momentum requires a momentum")),
        coupled_weight_decay=True,
        ranges=dict(lr=Range(1e-4, 5e-2), momentum=[0.0, 0.5, 0.9], dampening=Range(0.0, 0.5), weight_decay=SMALL,
                    nesterov=False, maximize=BOTH),
    ),
    Algorithm(
        fusedopt.RMSprop,
        cases=(
            Case("default", {"lr": 1e-2}),
            Case("alpha-eps", {"lr": 1e-2, "alpha": 0.9, "eps": 1e-6}),
            Case("weight_decay", {"lr": 1e-2, "alpha": 0.95, "weight_decay": 0.1}),
            Case("momentum", {"lr": 1e-2, "alpha": 0.9, "momentum": 0.8}),
            Case("centered", {"lr": 1e-2, "alpha": 0.9, "centered": True}),
            Case("centered-momentum", {"lr": 5e-3, "alpha": 0.9, "centered": True, "momentum": 0.7}),
            Case("maximize", {"lr": 1e-2, "alpha": 0.9, "maximize": True, "weight_decay": 0.05}),
            # eps 1e-3 keeps lr*wd/eps < 1: with eps 1e-5, elements whose gradient is ~0 oscillate under weight decay
            # with growing amplitude (a 3e-11 difference doubled every step on the Transformer), so no two fp32 runs
            # agree.
            Case("centered-momentum-weight_decay", {"lr": 5e-3, "alpha": 0.8, "eps": 1e-3, "centered": True,
                                                    "momentum": 0.6, "weight_decay": 0.1}),
            # eps 1e-2: where g + wd*p cancels, one rounding (torch's fused multiply-add) or two (fusedopt, on every ISA)
            # leave g an ulp apart, and 1/avg <= 1/eps amplifies it; with eps 1e-3 a few of 1M elements differ by 1e-5
            # at the first step, as torch's own default and AVX2 builds do.
            Case("centered-momentum-weight_decay-maximize", {"lr": 5e-3, "alpha": 0.8, "eps": 1e-2, "centered": True,
                                                             "momentum": 0.6, "weight_decay": 0.1, "maximize": True}),
        ),
        invalid=(({"alpha": -0.1}, "Invalid alpha value: -0.1"),),
        coupled_weight_decay=True,
        ranges=dict(lr=Range(1e-4, 1e-2), alpha=UNIT, eps=Range(1e-3, 1e-1), weight_decay=SMALL,
                    momentum=[0.0, 0.5], centered=BOTH, maximize=BOTH),
    ),
    Algorithm(
        fusedopt.Adagrad,
        cases=(
            Case("default", {"lr": 5e-2}),
            Case("lr_decay", {"lr": 5e-2, "lr_decay": 0.05}),
            Case("weight_decay", {"lr": 5e-2, "weight_decay": 0.1}),
            Case("initial_accumulator_value", {"lr": 5e-2, "initial_accumulator_value": 0.3}),
            Case("eps", {"lr": 5e-2, "eps": 1e-3}),
            Case("maximize", {"lr": 5e-2, "maximize": True}),
            Case("lr_decay-weight_decay-initial_accumulator_value", {"lr": 5e-2, "lr_decay": 0.02,
                                                                     "weight_decay": 0.05,
                                                                     "initial_accumulator_value": 0.1}),
            Case("lr_decay-weight_decay-initial_accumulator_value-maximize", {"lr": 5e-2, "lr_decay": 0.02,
                                                                              "weight_decay": 0.05,
                                                                              "initial_accumulator_value": 0.1,
                                                                              "maximize": True}),
        ),
        invalid=(({"lr_decay": -1.0}, "Invalid lr_decay value: -1.0"),
                 ({"initial_accumulator_value": -1.0}, "Invalid initial_accumulator_value value: -1.0")),
        coupled_weight_decay=True,
        ranges=dict(lr=Range(1e-4, 5e-2), lr_decay=SMALL, eps=Range(1e-10, 1e-3), weight_decay=SMALL,
                    initial_accumulator_value=SMALL, maximize=BOTH),
    ),
    Algorithm(
        fusedopt.Lion,
        cases=(
            Case("default", {"lr": 1e-3}),
            Case("betas", {"lr": 1e-3, "betas": (0.8, 0.95)}),
            Case("weight_decay", {"lr": 1e-3, "weight_decay": 0.5}),
            Case("maximize", {"lr": 1e-3, "betas": (0.85, 0.98), "maximize": True}),
            Case("weight_decay-maximize", {"lr": 2e-3, "betas": (0.7, 0.9), "weight_decay": 0.3, "maximize": True}),
        ),
        invalid=(({"betas": (0.9, -0.1)}, "Invalid beta parameter at index 1: -0.1"),),
        oracle64=lion64,
        sign_update=True,
        ranges=dict(lr=Range(1e-4, 1e-2), betas=(UNIT, UNIT), weight_decay=SMALL, maximize=BOTH),
    ),
    Algorithm(
        fusedopt.LAMB,
        cases=(
            Case("default", {"lr": 1e-2}),
            Case("weight_decay", {"lr": 1e-2, "betas": (0.85, 0.98), "weight_decay": 0.1}),
            Case("no-bias_correction", {"lr": 1e-2, "betas": (0.8, 0.95), "bias_correction": False}),
            Case("max_trust_ratio", {"lr": 1e-2, "weight_decay": 0.05, "max_trust_ratio": 0.5}),
            Case("eps", {"lr": 1e-2, "eps": 1e-3, "weight_decay": 0.01}),
            Case("maximize", {"lr": 1e-2, "betas": (0.8, 0.9), "maximize": True}),
            Case("no-bias_correction-max_trust_ratio-weight_decay", {"lr": 1e-2, "betas": (0.8, 0.95),
                                                                     "weight_decay": 0.2, "bias_correction": False,
                                                                     "max_trust_ratio": 2.0}),
            Case("no-bias_correction-max_trust_ratio-weight_decay-maximize", {"lr": 1e-2, "betas": (0.8, 0.95),
                                                                              "weight_decay": 0.2,
                                                                              "bias_correction": False,
                                                                              "max_trust_ratio": 2.0,
                                                                              "maximize": True}),
        ),
        invalid=(({"max_trust_ratio": 0.0}, "Invalid max_trust_ratio value: 0.0"),),
        oracle64=lamb64,
        smooth_trajectory=True,
        ranges=dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=SMALL, bias_correction=BOTH,
                    max_trust_ratio=[None, Range(0.1, 10.0)], maximize=BOTH),
    ),

    Algorithm(
        fusedopt.Adamax,
        cases=(
            Case("default", {"lr": 1e-2}),
            Case("betas-eps", {"lr": 2e-2, "betas": (0.8, 0.95), "eps": 1e-6}),
            Case("weight_decay", {"lr": 1e-2, "betas": (0.85, 0.98), "weight_decay": 0.1}),
            Case("weight_decay-maximize", {"lr": 1e-2, "betas": (0.7, 0.9), "weight_decay": 0.05, "maximize": True}),
        ),
        invalid=(({"eps": -1.0}, "Invalid epsilon value: -1.0"),),
        coupled_weight_decay=True,
        zero_fixed_states=False,
        ranges=dict(lr=Range(1e-4, 5e-2), betas=(UNIT, UNIT), eps=Range(1e-8, 1e-3), weight_decay=SMALL,
                    maximize=BOTH),
    ),
    Algorithm(
        fusedopt.RAdam,
        cases=(
            Case("default", {"lr": 1e-2}),
            # beta2 0.9: rho_t passes 5 at step 6, so the un-rectified and the rectified steps are both taken.
            Case("betas-eps", {"lr": 1e-2, "betas": (0.8, 0.9), "eps": 1e-6}),
            Case("weight_decay", {"lr": 1e-2, "betas": (0.85, 0.9), "weight_decay": 0.1}),
            Case("decoupled_weight_decay", {"lr": 1e-2, "betas": (0.8, 0.9), "weight_decay": 0.1,
                                            "decoupled_weight_decay": True}),
            Case("decoupled_weight_decay-maximize", {"lr": 1e-2, "betas": (0.8, 0.9), "weight_decay": 0.05,
                                                     "decoupled_weight_decay": True, "maximize": True}),
        ),
        invalid=(({"betas": (0.9, 1.0)}, "Invalid beta parameter at index 1: 1.0"),),
        coupled_weight_decay=True,
        ranges=dict(lr=Range(1e-4, 5e-2), betas=(UNIT, UNIT), eps=Range(1e-8, 1e-3), weight_decay=SMALL,
                    decoupled_weight_decay=BOTH, maximize=BOTH),
    ),
    Algorithm(
        fusedopt.Adadelta,
        cases=(
            Case("default", {"lr": 1.0}),
            # lr 0.7 and 0.3 are no float32 numbers: a learning rate rounded to float32 shows in the float64 cases.
            # eps 1e-4 and 1e-3 are a visible part of sqrt(acc_delta + eps) and sqrt(square_avg + eps).
            Case("rho-eps", {"lr": 0.7, "rho": 0.8, "eps": 1e-4}),
            Case("weight_decay", {"lr": 1.0, "rho": 0.85, "weight_decay": 0.1}),
            Case("maximize", {"lr": 1.0, "maximize": True}),
            Case("rho-eps-weight_decay-maximize", {"lr": 0.3, "rho": 0.7, "eps": 1e-3, "weight_decay": 0.05,
                                                   "maximize": True}),
        ),
        invalid=(({"rho": 1.5}, "Invalid rho value: 1.5"),
                 ({"eps": -1.0}, "Invalid epsilon value: -1.0"),
                 ({"weight_decay": -0.1}, "Invalid weight_decay value: -0.1")),
        coupled_weight_decay=True,
        ranges=dict(lr=Range(0.1, 2.0), rho=UNIT, eps=Range(1e-8, 1e-3), weight_decay=SMALL, maximize=BOTH),
    ),
    Algorithm(
        fusedopt.Rprop,
        cases=(
            Case("default", {"lr": 1e-2}),
            Case("etas", {"lr": 1e-2, "etas": (0.3, 1.5)}),
            # Bounds that both bind within a few steps: 1e-2 * 1.3**3 > 2e-2 and 1e-2 * 0.6**5 < 1e-3.
            Case("step_sizes", {"lr": 1e-2, "etas": (0.6, 1.3), "step_sizes": (1e-3, 2e-2)}),
            Case("maximize", {"lr": 1e-2, "maximize": True}),
            Case("etas-step_sizes-maximize", {"lr": 2e-2, "etas": (0.4, 1.4), "step_sizes": (1e-3, 0.5),
                                              "maximize": True}),
        ),
        invalid=(({"etas": (1.0, 0.5)}, "Invalid eta values: 1.0, 0.5"),
                 ({"etas": (0.5, 1.0)}, "Invalid eta values: 0.5, 1.0"),
                 ({"etas": (0.0, 1.2)}, "Invalid eta values: 0.0, 1.2")),
        ranges=dict(lr=Range(1e-4, 5e-2), etas=(Range(0.1, 0.9), Range(1.1, 2.0)),
                    step_sizes=[(1e-6, 50.0), (Range(1e-6, 1e-3), Range(1e-2, 1.0))], maximize=BOTH),
    ),
    Algorithm(
        fusedopt.NAdam,
        cases=(
            Case("default", {"lr": 1e-2}),
            Case("betas-eps", {"lr": 1e-2, "betas": (0.8, 0.9), "eps": 1e-6}),
            # momentum_decay 0.3: mu_t moves from 0.46 towards 0.9 within a few steps, so mu_product and mu_{t+1}
            # weigh visibly different terms at every step.
            Case("momentum_decay", {"lr": 1e-2, "betas": (0.85, 0.95), "momentum_decay": 0.3}),
            Case("weight_decay", {"lr": 1e-2, "betas": (0.85, 0.9), "weight_decay": 0.1}),
            Case("decoupled_weight_decay", {"lr": 1e-2, "betas": (0.8, 0.9), "weight_decay": 0.1,
                                            "decoupled_weight_decay": True}),
            Case("decoupled_weight_decay-momentum_decay-maximize", {"lr": 1e-2, "betas": (0.8, 0.9),
                                                                    "weight_decay": 0.05, "momentum_decay": 0.1,
                                                                    "decoupled_weight_decay": True,
                                                                    "maximize": True}),
        ),
        invalid=(({"momentum_decay": -0.1}, "Invalid momentum_decay value: -0.1"),
                 ({"eps": -1.0}, "Invalid epsilon value: -1.0")),
        coupled_weight_decay=True,
        ranges=dict(lr=Range(1e-4, 5e-2), betas=(UNIT, UNIT), eps=Range(1e-8, 1e-3), weight_decay=SMALL,
                    momentum_decay=Range(0.0, 0.5), decoupled_weight_decay=BOTH, maximize=BOTH),
    ),
    Algorithm(
        fusedopt.ASGD,
        cases=(
            # t0 = 1e6: ax copies p at every step.
            Case("default", {"lr": 1e-2}),
            # Averaging from step 3 on, and a step size that decays visibly from the second step.
            Case("t0-lambd", {"lr": 5e-2, "lambd": 0.5, "t0": 2.0}),
            Case("alpha", {"lr": 5e-2, "lambd": 0.3, "alpha": 0.5, "t0": 1.0}),
            Case("weight_decay", {"lr": 2e-2, "lambd": 0.2, "t0": 2.0, "weight_decay": 0.1}),
            Case("t0-lambd-alpha-weight_decay-maximize", {"lr": 3e-2, "lambd": 0.4, "alpha": 0.9, "t0": 0.0,
                                                          "weight_decay": 0.05, "maximize": True}),
        ),
        invalid=(({"weight_decay": -0.1}, "Invalid weight_decay value: -0.1"),),
        coupled_weight_decay=True,
        float32_step_size=True,
        ranges=dict(lr=Range(1e-4, 5e-2), lambd=Range(0.0, 1.0), alpha=Range(0.0, 1.0), t0=[0.0, 3.0, 1e6],
                    weight_decay=SMALL, maximize=BOTH),
    ),
    Algorithm(
        fusedopt.Adafactor,
        cases=(
            Case("default", {"lr": 1e-2}),
            # eps1 1e-3: the row mean and the estimate floors (1e-3, 1e-6) bind for small gradients; eps2 1e-2 floors
            # RMS(p) for small parameters.
            Case("beta2_decay-eps", {"lr": 2e-2, "beta2_decay": -0.5, "eps": (1e-3, 1e-2)}),
            # d 1.2: RMS(u) is near 1, so the clipping binds at some steps and not at others.
            Case("d", {"lr": 1e-2, "d": 1.2}),
            Case("weight_decay", {"lr": 2e-2, "weight_decay": 0.5}),
            Case("maximize", {"lr": 1e-2, "maximize": True}),
            Case("beta2_decay-eps-d-weight_decay-maximize", {"lr": 2e-2, "beta2_decay": -0.6, "eps": (1e-4, 1e-2),
                                                             "d": 1.3, "weight_decay": 0.2, "maximize": True}),
        ),
        invalid=(({"beta2_decay": 0.5}, "beta2_decay should be <= 0 but is: 0.5"),
                 ({"eps": (-1.0, 1e-3)}, "epsilon1 should be >= 0 but is: -1.0"),
                 ({"d": 0.5}, "Clipping threshold d should be >= 1 but is: 0.5")),
        invalid_lr="Learning rate should be >= 0 but is: {}",
        ranges=dict(lr=Range(1e-4, 5e-2), beta2_decay=Range(-1.0, -0.3), eps=([None, Range(1e-6, 1e-3)],
                    Range(1e-4, 1e-2)), d=Range(1.0, 2.0), weight_decay=SMALL, maximize=BOTH),
    ),
]

TABLE: dict[type[FusedOptimizer], Algorithm] = {row.cls: row for row in _ROWS}
ROWS: list[Algorithm] = list(TABLE.values())
TORCH_ROWS = [row for row in ROWS if row.torch_cls is not None]  # compared with torch.optim directly
ORACLE_ROWS = [row for row in ROWS if row.torch_cls is None]  # compared with their float64 oracle

# Classes whose step is not one kernel call per buffer set, so the generic tables do not fit them; each has its own
# test module, which checks the same properties (kernel against reference, trajectory against torch.optim,
# checkpoints both ways, validation messages) its own way.
OWN_TESTS: dict[type[FusedOptimizer], str] = {
    fusedopt.Muon: "tests/test_muon.py",  # two kernel calls around a Newton-Schulz iteration in torch
}

_classes = [getattr(fusedopt.optim, name) for name in fusedopt.optim.__all__]
_missing = [c.__name__ for c in _classes if c is not FusedOptimizer and c not in TABLE and c not in OWN_TESTS]
assert not _missing, f"optimizer classes without a row in tests/cases.py: {_missing}"
assert all(row.oracle64 is not None for row in ORACLE_ROWS), "a class torch.optim lacks needs an oracle64"
for _row in ROWS:
    for _case in _row.cases:
        _row.group(_case.kwargs)  # unknown kwargs raise at import

# The row tests use where any algorithm would do (the README's example). Those tests rely on it having a torch.optim
# counterpart, a step count, `lr`, `betas` and `weight_decay` kwargs, at least two states and one state kept only in
# some configurations.
EXAMPLE = TABLE[fusedopt.AdamW]
assert EXAMPLE.torch_cls is not None and EXAMPLE.cls.spec.tracks_step
assert {"lr", "betas", "weight_decay"} <= set(EXAMPLE.cls.torch_defaults)
assert len(EXAMPLE.state_names({})) >= 2 and len(EXAMPLE.state_names({})) < len(EXAMPLE.cls.spec.states)

# Random values of states, for tests that start a kernel from a warm state (never zeros), by torch.optim's state name:
# second moments, sums of squares and step sizes are positive, a centered first moment stays well below the root of
# its second moment; any other state is symmetric around 0. Drawn in float64 and rounded to fp32 unless float64 is
# asked for (the same draws either way).
def _symmetric(n: int, gen: torch.Generator, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(n, generator=gen, dtype=F64).to(dtype)


def _positive(n: int, gen: torch.Generator, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.rand(n, generator=gen, dtype=F64).to(dtype) + 0.1


WARM_STATES: dict[str, Callable[[int, torch.Generator, torch.dtype], Tensor]] = {
    "exp_avg_sq": _positive,
    "max_exp_avg_sq": _positive,
    "exp_inf": _positive,
    "sum": _positive,
    "square_avg": lambda n, gen, dtype: _positive(n, gen, dtype) + 1.0,
    "grad_avg": lambda n, gen, dtype: 0.1 * _symmetric(n, gen, dtype),
    "acc_delta": _positive,
    "step_size": lambda n, gen, dtype: 1e-2 * _positive(n, gen, dtype),  # Rprop's per-element steps, ~lr
    "variance": _positive,  # Adafactor's second moments and their factors
    "row_var": _positive,
    "col_var": _positive,
}


def warm_state(name: str, n: int, gen: torch.Generator, dtype: torch.dtype = torch.float32) -> Tensor:
    """A random value of the state called `name`, n elements, from `gen`: fp32, or float64 (full float64 values, not
    rounded to fp32) when `dtype` is float64."""
    return WARM_STATES.get(name, _symmetric)(n, gen, dtype if dtype == F64 else torch.float32)


# 1 (scalar-like), 7 (shorter than any SIMD vector), 4097 (one past a power of two: vector body + tail),
# 1_000_003 (prime, larger than a cache and several work chunks).
SIZES = [1, 7, 4097, 1_000_003]
SMALL_SIZES = [s for s in SIZES if s < 1_000_000]
BIG_SIZE = SIZES[-1]


def params(rows: Iterable[Algorithm] = ROWS, cases: Callable[[Algorithm], Iterable[Case]] = lambda r: r.cases
           ) -> list:
    """pytest.param(row, case, id="Class-case") for every row and each of `cases(row)`."""
    import pytest  # noqa: PLC0415

    return [pytest.param(row, case, id=f"{row.name}-{case.id}") for row in rows for case in cases(row)]


def row_params(rows: Iterable[Algorithm] = ROWS) -> list:
    """pytest.param(row, id="Class") for every row."""
    import pytest  # noqa: PLC0415

    return [pytest.param(row, id=row.name) for row in rows]


# The interface tests/test_cuda_*.py import (keys: lower-case class names), derived from the table.
ALGORITHMS: dict[str, list[Case]] = {row.name.lower(): list(row.cases) for row in ROWS}


def _row_named(name: str) -> Algorithm:
    return next(row for row in ROWS if row.name.lower() == name)


def hyperparameters(algorithm: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The case's kwargs completed with the class's defaults."""
    return _row_named(algorithm).group(kwargs)


def state_names(algorithm: str, kwargs: dict[str, Any]) -> tuple[str, ...]:
    return _row_named(algorithm).state_names(kwargs)
