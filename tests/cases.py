"""Case tables: per algorithm, a list of torch.optim-style constructor kwargs with a readable id, shared by every test.

Hyperparameters are deliberately non-default (large lr, betas far from 1, visible weight decay) so that a mode that is
ignored or mis-wired changes the result by far more than any tolerance.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Case:
    """One row of a case table: `id` is the pytest id, `kwargs` the constructor kwargs (torch.optim names)."""

    id: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:  # pytest shows this when an id is not used
        return self.id


ADAM = [
    Case("default", {"lr": 1e-2}),
    Case("betas-eps", {"lr": 2e-2, "betas": (0.8, 0.95), "eps": 1e-6}),
    Case("weight_decay", {"lr": 1e-2, "betas": (0.85, 0.98), "weight_decay": 0.1}),
    Case("amsgrad", {"lr": 1e-2, "betas": (0.8, 0.9), "amsgrad": True}),
    Case("amsgrad-weight_decay", {"lr": 1e-2, "betas": (0.8, 0.9), "weight_decay": 0.05, "amsgrad": True}),
    Case("maximize", {"lr": 1e-2, "maximize": True, "weight_decay": 0.05}),
    Case("amsgrad-maximize", {"lr": 1e-2, "betas": (0.7, 0.95), "amsgrad": True, "maximize": True}),
]

ADAMW = [
    Case("default", {"lr": 1e-2}),  # torch default weight_decay=1e-2
    Case("weight_decay", {"lr": 1e-2, "betas": (0.85, 0.98), "weight_decay": 0.3}),
    Case("no-weight_decay", {"lr": 1e-2, "weight_decay": 0.0}),
    Case("amsgrad", {"lr": 1e-2, "betas": (0.8, 0.9), "weight_decay": 0.1, "amsgrad": True}),
    Case("maximize", {"lr": 1e-2, "weight_decay": 0.1, "maximize": True}),
    Case("amsgrad-maximize-eps", {"lr": 2e-2, "betas": (0.7, 0.95), "eps": 1e-5, "weight_decay": 0.2, "amsgrad": True,
                                      "maximize": True}),
]

SGD = [
    Case("plain", {"lr": 5e-2}),
    Case("weight_decay", {"lr": 5e-2, "weight_decay": 0.1}),
    Case("momentum", {"lr": 5e-2, "momentum": 0.9}),
    Case("momentum-dampening", {"lr": 5e-2, "momentum": 0.8, "dampening": 0.3}),
    Case("nesterov", {"lr": 5e-2, "momentum": 0.9, "nesterov": True}),
    Case("nesterov-weight_decay", {"lr": 5e-2, "momentum": 0.7, "nesterov": True, "weight_decay": 0.05}),
    Case("maximize", {"lr": 5e-2, "maximize": True}),
    Case("momentum-dampening-weight_decay", {"lr": 5e-2, "momentum": 0.8, "dampening": 0.2, "weight_decay": 0.1}),
    Case("momentum-dampening-weight_decay-maximize", {"lr": 5e-2, "momentum": 0.8, "dampening": 0.2, "weight_decay": 0.1,
                                                           "maximize": True}),
]

RMSPROP = [
    Case("default", {"lr": 1e-2}),
    Case("alpha-eps", {"lr": 1e-2, "alpha": 0.9, "eps": 1e-6}),
    Case("weight_decay", {"lr": 1e-2, "alpha": 0.95, "weight_decay": 0.1}),
    Case("momentum", {"lr": 1e-2, "alpha": 0.9, "momentum": 0.8}),
    Case("centered", {"lr": 1e-2, "alpha": 0.9, "centered": True}),
    Case("centered-momentum", {"lr": 5e-3, "alpha": 0.9, "centered": True, "momentum": 0.7}),
    Case("maximize", {"lr": 1e-2, "alpha": 0.9, "maximize": True, "weight_decay": 0.05}),
    # eps 1e-3 keeps lr*wd/eps < 1: with eps 1e-5, elements whose gradient is ~0 oscillate under weight decay with
    # growing amplitude (a 3e-11 difference doubled every step on the Transformer), so no two fp32 runs agree.
    Case("centered-momentum-weight_decay", {"lr": 5e-3, "alpha": 0.8, "eps": 1e-3, "centered": True, "momentum": 0.6,
                                            "weight_decay": 0.1}),
    Case("centered-momentum-weight_decay-maximize", {"lr": 5e-3, "alpha": 0.8, "eps": 1e-5, "centered": True, "momentum": 0.6,
                                                         "weight_decay": 0.1, "maximize": True}),
]

ADAGRAD = [
    Case("default", {"lr": 5e-2}),
    Case("lr_decay", {"lr": 5e-2, "lr_decay": 0.05}),
    Case("weight_decay", {"lr": 5e-2, "weight_decay": 0.1}),
    Case("initial_accumulator_value", {"lr": 5e-2, "initial_accumulator_value": 0.3}),
    Case("eps", {"lr": 5e-2, "eps": 1e-3}),
    Case("maximize", {"lr": 5e-2, "maximize": True}),
    Case("lr_decay-weight_decay-initial_accumulator_value", {"lr": 5e-2, "lr_decay": 0.02, "weight_decay": 0.05,
                                                             "initial_accumulator_value": 0.1}),
    Case("lr_decay-weight_decay-initial_accumulator_value-maximize", {"lr": 5e-2, "lr_decay": 0.02, "weight_decay": 0.05,
                                                                          "initial_accumulator_value": 0.1,
                                                                          "maximize": True}),
]

# Lion: fusedopt.Lion(params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False)
LION = [
    Case("default", {"lr": 1e-3}),
    Case("betas", {"lr": 1e-3, "betas": (0.8, 0.95)}),
    Case("weight_decay", {"lr": 1e-3, "weight_decay": 0.5}),
    Case("maximize", {"lr": 1e-3, "betas": (0.85, 0.98), "maximize": True}),
    Case("weight_decay-maximize", {"lr": 2e-3, "betas": (0.7, 0.9), "weight_decay": 0.3, "maximize": True}),
]

# LAMB: fusedopt.LAMB(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, bias_correction=True,
#                     max_trust_ratio=None, maximize=False)
LAMB = [
    Case("default", {"lr": 1e-2}),
    Case("weight_decay", {"lr": 1e-2, "betas": (0.85, 0.98), "weight_decay": 0.1}),
    Case("no-bias_correction", {"lr": 1e-2, "betas": (0.8, 0.95), "bias_correction": False}),
    Case("max_trust_ratio", {"lr": 1e-2, "weight_decay": 0.05, "max_trust_ratio": 0.5}),
    Case("eps", {"lr": 1e-2, "eps": 1e-3, "weight_decay": 0.01}),
    Case("maximize", {"lr": 1e-2, "betas": (0.8, 0.9), "maximize": True}),
    Case("no-bias_correction-max_trust_ratio-weight_decay", {"lr": 1e-2, "betas": (0.8, 0.95), "weight_decay": 0.2,
                                                             "bias_correction": False, "max_trust_ratio": 2.0}),
    Case("no-bias_correction-max_trust_ratio-weight_decay-maximize", {"lr": 1e-2, "betas": (0.8, 0.95),
                                                                          "weight_decay": 0.2, "bias_correction": False,
                                                                          "max_trust_ratio": 2.0, "maximize": True}),
]

ALGORITHMS: dict[str, list[Case]] = {
    "adam": ADAM,
    "adamw": ADAMW,
    "sgd": SGD,
    "rmsprop": RMSPROP,
    "adagrad": ADAGRAD,
    "lion": LION,
    "lamb": LAMB,
}

# 1 (scalar-like), 7 (shorter than any SIMD vector), 4097 (one past a power of two: vector body + tail),
# 1_000_003 (prime, larger than a cache and several OpenMP chunks).
SIZES = [1, 7, 4097, 1_000_003]
SMALL_SIZES = [s for s in SIZES if s < 1_000_000]
BIG_SIZE = SIZES[-1]


def descent_cases(algorithm: str) -> list[Case]:
    """The first case and the last case that minimises (no maximize=True): for trajectories through a real model,
    where gradient ascent on the loss diverges and amplifies every rounding difference without bound."""
    table = ALGORITHMS[algorithm]
    last = [c for c in table if not c.kwargs.get("maximize", False)][-1]
    return [table[0], last]


def params(algorithm: str) -> list:
    """pytest.param(case, id=case.id) for every case of `algorithm`, for use in @pytest.mark.parametrize."""
    import pytest

    return [pytest.param(c, id=c.id) for c in ALGORITHMS[algorithm]]


def all_params() -> list:
    """pytest.param((algorithm, case), id="algorithm-case.id") over every algorithm and case."""
    import pytest

    return [pytest.param(name, c, id=f"{name}-{c.id}") for name, cases in ALGORITHMS.items() for c in cases]


# Constructor defaults (torch.optim's for the five torch algorithms; CONTRACT.md's for Lion and LAMB), used to turn a
# case's kwargs into the full hyperparameter set the reference functions take.
DEFAULTS: dict[str, dict[str, Any]] = {
    "adam": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False, "maximize": False},
    "adamw": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2, "amsgrad": False, "maximize": False},
    "sgd": {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False, "maximize": False},
    "rmsprop": {"lr": 1e-2, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.0, "centered": False, "maximize": False},
    "adagrad": {"lr": 1e-2, "lr_decay": 0.0, "weight_decay": 0.0, "initial_accumulator_value": 0.0, "eps": 1e-10,
                    "maximize": False},
    "lion": {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0, "maximize": False},
    "lamb": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.0, "bias_correction": True, "max_trust_ratio": None,
                 "maximize": False},
}

# Algorithms that torch.optim implements (compared against it directly); the others use a float64 oracle.
TORCH_ALGORITHMS = ("adam", "adamw", "sgd", "rmsprop", "adagrad")
ORACLE_ALGORITHMS = ("lion", "lamb")


def hyperparameters(algorithm: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The case's kwargs completed with the constructor defaults (unknown keys raise, to catch typos in tables)."""
    defaults = DEFAULTS[algorithm]
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise KeyError(f"unknown {algorithm} kwargs in case table: {sorted(unknown)}")
    return {**defaults, **kwargs}


def state_names(algorithm: str, kwargs: dict[str, Any]) -> tuple[str, ...]:
    """The state tensors torch.optim (and fusedopt) keep for this configuration, in torch.optim's names."""
    hp = hyperparameters(algorithm, kwargs)
    if algorithm in ("adam", "adamw"):
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if hp["amsgrad"] else ())
    if algorithm == "sgd":
        return ("momentum_buffer",) if hp["momentum"] != 0 else ()
    if algorithm == "rmsprop":
        return (("square_avg",) + (("momentum_buffer",) if hp["momentum"] > 0 else ())
                + (("grad_avg",) if hp["centered"] else ()))
    if algorithm == "adagrad":
        return ("sum",)
    if algorithm == "lion":
        return ("exp_avg",)
    if algorithm == "lamb":
        return ("exp_avg", "exp_avg_sq")
    raise KeyError(algorithm)
