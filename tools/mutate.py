#!/usr/bin/env python3
"""Mutation check: applies one hand-written bug at a time to a math header or to reference.py, rebuilds, and runs the
tests that should catch it; a mutant that survives points at a weak test. Run: `python tools/mutate.py` (--help)."""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUILD_DIR = ROOT / "build" / "mutate"
DEFAULT_OUT = ROOT / "bench" / "results" / "mutation-score.json"

MATH = "csrc/include/fusedopt/math/"
ADAM, SGD, RMSPROP, ADAGRAD, LION, LAMB = (f"{MATH}{a}.h" for a in "adam sgd rmsprop adagrad lion lamb".split())
ADADELTA, RPROP, NADAM, ASGD = (f"{MATH}{a}.h" for a in "adadelta rprop nadam asgd".split())
ADAFACTOR = f"{MATH}adafactor.h"
MUON = f"{MATH}muon.h"
NEWTON_SCHULZ = "python/fusedopt/_newton_schulz.py"
PARAM_IO = "csrc/include/fusedopt/param_io.h"
DRIVER = "csrc/cpu/driver.h"
REF = "python/fusedopt/reference.py"
QUANT8 = "csrc/include/fusedopt/quant8.h"
BASE = "python/fusedopt/optim/_base.py"


@dataclass(frozen=True)
class Mutant:
    """One bug: `original` must occur exactly once in `file` and is replaced by `replacement`. `algorithm` picks the
    tests that should catch it (see pytest_command)."""

    name: str
    algorithm: str
    file: str
    original: str
    replacement: str


def _swap(a: str, b: str, text: str) -> str:
    """text with every a and b exchanged (for swapped-hyperparameter mutants)."""
    return text.replace(a, "\0").replace(b, a).replace("\0", b)


_MOMENT_BETAS = """\
    c.beta1_weight = static_cast<T>(1.0 - h.beta1);
    c.beta2 = static_cast<T>(h.beta2);
    c.one_minus_beta2 = static_cast<T>(1.0 - h.beta2);"""
_LION_BETAS = """\
    c.beta1_weight = static_cast<T>(1.0 - h.beta1);
    c.beta2_weight = static_cast<T>(1.0 - h.beta2);"""
_LION_ORDER = """\
      p -= c.lr * sign(lerp(exp_avg, g, c.beta1_weight));
      exp_avg = lerp(exp_avg, g, c.beta2_weight);"""
_ADAGRAD_ORDER = """\
      sum += g * g;
      p -= c.clr * (g / (square_root(sum) + c.eps));"""
_GRAD_SCALE = "c.grad_scale = signed_grad_scale<T>(h, grad_scale);"
_ADADELTA_ORDER = """\
      square_avg = square_avg * c.rho + c.one_minus_rho * g * g;
      const T delta = square_root(acc_delta + c.eps) / square_root(square_avg + c.eps) * g;"""
_RPROP_ETAS = """\
    c.etaminus = static_cast<T>(h.etaminus);
    c.etaplus = static_cast<T>(h.etaplus);"""
_RPROP_CLAMP = """\
      s = s < c.step_size_min ? c.step_size_min : s;  // torch.clamp_: NaN propagates, max wins when min > max
      s = s > c.step_size_max ? c.step_size_max : s;"""
_REF_RPROP_FACTORS = """\
    sign[sign.gt(0)] = etaplus
    sign[sign.lt(0)] = etaminus"""
_REF_ADAM_MOMENTS = """\
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)

    bias_correction1"""

# The mutants, grouped by file. Each is a bug a plausible edit could introduce: a dropped term (weight decay, eps, a
# bias correction), a flipped sign, beta1 and beta2 swapped, an off-by-one step, a halved step size, a wrong lerp
# weight, two updates in the wrong order, an ignored option (maximize, grad_scale, dampening, a clamp). Every C++
# mutant costs one rebuild (16-30 s), so a pattern repeated in several headers (the weight-decay term, the maximize
# sign) is mutated in a few of them, not in all, to keep the whole run within 15-25 minutes on 2 cores.
# Left out because nothing observable changes (equivalent mutants):
#   lion's c.decay = h.weight_decay != 0.0 ? 1 - lr * weight_decay : 1 -> always 1 - lr * weight_decay: with
#     weight_decay 0 that is exactly 1 in double and in float;
#   sgd's c.first_step = step <= 1.0 -> step == 1.0: steps are counted before make_coeffs, so step >= 1 always.
MUTANTS: list[Mutant] = [
    # --- adam.h
    Mutant("adam-no-l2-weight-decay", "adam", ADAM,
           "g + c.weight_decay * p, g);", "g, g);"),
    Mutant("adam-decoupled-decay-without-lr", "adam", ADAM,
           "static_cast<T>(1.0 - lr * h.weight_decay)", "static_cast<T>(1.0 - h.weight_decay)"),
    Mutant("adam-no-eps", "adam", ADAM,
           "square_root(second) / c.bc2_sqrt + c.eps;", "square_root(second) / c.bc2_sqrt;"),
    Mutant("adam-no-bias-correction1", "adam", ADAM,
           "lr / (1.0 - pow(h.beta1, step))", "lr"),
    Mutant("adam-bias-correction2-step-minus-1", "adam", ADAM,
           "pow(h.beta2, step)", "pow(h.beta2, step - 1.0)"),
    Mutant("adam-swap-betas", "adam", ADAM,
           _MOMENT_BETAS, _swap("h.beta1", "h.beta2", _MOMENT_BETAS)),
    Mutant("adam-lerp-weight-beta1", "adam", ADAM,
           "lerp(exp_avg, g, c.beta1_weight)", "lerp(g, exp_avg, c.beta1_weight)"),
    Mutant("adam-amsgrad-uses-exp-avg-sq", "adam", ADAM,
           "second = max_exp_avg_sq;", "second = exp_avg_sq;"),
    Mutant("adam-ignore-grad-scale", "adam", ADAM,
           _GRAD_SCALE, "c.grad_scale = h.maximize != 0.0 ? T(-1) : T(1);"),
    # --- sgd.h
    Mutant("sgd-first-step-off-by-one", "sgd", SGD,
           "c.first_step = step <= 1.0;", "c.first_step = step <= 0.0;"),
    Mutant("sgd-ignore-dampening", "sgd", SGD,
           "static_cast<T>(1.0 - h.dampening)", "T(1)"),
    Mutant("sgd-nesterov-swapped", "sgd", SGD,
           "uniform_select(c.nesterov, g + c.momentum * momentum_buffer, momentum_buffer)",
           "uniform_select(c.nesterov, momentum_buffer, g + c.momentum * momentum_buffer)"),
    Mutant("sgd-ignore-maximize", "sgd", SGD,
           _GRAD_SCALE, "c.grad_scale = static_cast<T>(grad_scale);"),
    Mutant("rmsprop-no-eps", "rmsprop", RMSPROP,
           "avg = square_root(square_avg) + c.eps;", "avg = square_root(square_avg);"),
    Mutant("rmsprop-centered-plus", "rmsprop", RMSPROP,
           "square_avg - grad_avg * grad_avg", "square_avg + grad_avg * grad_avg"),
    Mutant("rmsprop-grad-avg-lerp-weight-alpha", "rmsprop", RMSPROP,
           "lerp(grad_avg, g, c.one_minus_alpha)", "lerp(g, grad_avg, c.one_minus_alpha)"),
    Mutant("rmsprop-swap-alpha", "rmsprop", RMSPROP,
           "square_avg * c.alpha + c.one_minus_alpha * g * g", "square_avg * c.one_minus_alpha + c.alpha * g * g"),
    Mutant("rmsprop-ignore-momentum-coefficient", "rmsprop", RMSPROP,
           "momentum_buffer * c.momentum + g / avg", "momentum_buffer + g / avg"),
    Mutant("adagrad-lr-decay-step-off-by-one", "adagrad", ADAGRAD,
           "(step - 1.0) * h.lr_decay", "step * h.lr_decay"),
    Mutant("adagrad-no-eps", "adagrad", ADAGRAD,
           "(square_root(sum) + c.eps)", "square_root(sum)"),
    Mutant("adagrad-update-before-sum", "adagrad", ADAGRAD,
           _ADAGRAD_ORDER, "\n".join(reversed(_ADAGRAD_ORDER.split("\n")))),
    Mutant("adagrad-ignore-maximize", "adagrad", ADAGRAD,
           _GRAD_SCALE, "c.grad_scale = static_cast<T>(grad_scale);"),
    # --- lion.h
    Mutant("lion-swap-betas", "lion", LION,
           _LION_BETAS, _swap("h.beta1", "h.beta2", _LION_BETAS)),
    Mutant("lion-decay-without-lr", "lion", LION,
           "static_cast<T>(1.0 - lr * h.weight_decay)", "static_cast<T>(1.0 - h.weight_decay)"),
    Mutant("lion-flip-update-sign", "lion", LION,
           "p -= c.lr * sign(", "p += c.lr * sign("),
    Mutant("lion-momentum-before-direction", "lion", LION,
           _LION_ORDER, "\n".join(reversed(_LION_ORDER.split("\n")))),
    Mutant("lion-halve-lr", "lion", LION,
           "c.lr = static_cast<T>(lr);", "c.lr = static_cast<T>(0.5 * lr);"),
    Mutant("lamb-no-bias-correction1", "lamb", LAMB,
           "c.bc1 = bias_correction ? static_cast<T>(1.0 - pow(h.beta1, step)) : T(1);", "c.bc1 = T(1);"),
    Mutant("lamb-swap-betas", "lamb", LAMB,
           _MOMENT_BETAS, _swap("h.beta1", "h.beta2", _MOMENT_BETAS)),
    Mutant("lamb-no-weight-decay", "lamb", LAMB,
           "u + c.weight_decay * p, u);", "u, u);"),
    Mutant("lamb-no-eps", "lamb", LAMB,
           "(square_root(exp_avg_sq / c.bc2) + c.eps)", "square_root(exp_avg_sq / c.bc2)"),
    Mutant("lamb-trust-ratio-inverted", "lamb", LAMB,
           "? wn / un : 1.0;", "? un / wn : 1.0;"),
    Mutant("lamb-zero-norm-ratio-0", "lamb", LAMB,
           "? wn / un : 1.0;", "? wn / un : 0.0;"),
    Mutant("lamb-ignore-max-trust-ratio", "lamb", LAMB,
           "if (c.max_trust_ratio >= 0.0 && ratio > c.max_trust_ratio) ratio = c.max_trust_ratio;", ""),
    # --- adadelta.h
    Mutant("adadelta-no-weight-decay", "adadelta", ADADELTA,
           "g + c.weight_decay * p, g);", "g, g);"),
    Mutant("adadelta-no-eps-in-denominator", "adadelta", ADADELTA,
           "square_root(square_avg + c.eps)", "square_root(square_avg)"),
    Mutant("adadelta-no-eps-in-numerator", "adadelta", ADADELTA,
           "square_root(acc_delta + c.eps)", "square_root(acc_delta)"),
    Mutant("adadelta-swap-rho-square-avg", "adadelta", ADADELTA,
           "square_avg * c.rho + c.one_minus_rho * g * g", "square_avg * c.one_minus_rho + c.rho * g * g"),
    Mutant("adadelta-swap-rho-acc-delta", "adadelta", ADADELTA,
           "acc_delta * c.rho + c.one_minus_rho * delta * delta",
           "acc_delta * c.one_minus_rho + c.rho * delta * delta"),
    Mutant("adadelta-delta-before-square-avg", "adadelta", ADADELTA,
           _ADADELTA_ORDER, "\n".join(reversed(_ADADELTA_ORDER.split("\n")))),
    Mutant("adadelta-flip-update-sign", "adadelta", ADADELTA,
           "p -= c.lr * delta;", "p += c.lr * delta;"),
    Mutant("adadelta-ignore-maximize", "adadelta", ADADELTA,
           _GRAD_SCALE, "c.grad_scale = static_cast<T>(grad_scale);"),
    Mutant("adadelta-ignore-grad-scale", "adadelta", ADADELTA,
           _GRAD_SCALE, "c.grad_scale = h.maximize != 0.0 ? T(-1) : T(1);"),
    # --- rprop.h
    Mutant("rprop-swap-etas", "rprop", RPROP,
           _RPROP_ETAS, _swap("h.etaminus", "h.etaplus", _RPROP_ETAS)),
    Mutant("rprop-zero-product-grows", "rprop", RPROP,
           "product < T(0) ? c.etaminus : T(1);", "product < T(0) ? c.etaminus : c.etaplus;"),
    Mutant("rprop-no-min-clamp", "rprop", RPROP,
           "s = s < c.step_size_min ? c.step_size_min : s;", "s = s;"),
    Mutant("rprop-no-max-clamp", "rprop", RPROP,
           "s = s > c.step_size_max ? c.step_size_max : s;", "s = s;"),
    Mutant("rprop-clamp-order-swapped", "rprop", RPROP,
           _RPROP_CLAMP, "\n".join(reversed(_RPROP_CLAMP.split("\n")))),
    Mutant("rprop-keep-grad-on-sign-change", "rprop", RPROP,
           "g = factor == c.etaminus ? T(0) : g;", ""),
    Mutant("rprop-step-with-old-step-size", "rprop", RPROP,
           "p -= sign(g) * s;", "p -= sign(g) * step_size / factor;"),
    Mutant("rprop-flip-update-sign", "rprop", RPROP,
           "p -= sign(g) * s;", "p += sign(g) * s;"),
    Mutant("rprop-prev-not-stored", "rprop", RPROP,
           "      prev = g;\n", ""),
    Mutant("rprop-prev-stored-before-zeroing", "rprop", RPROP,
           "      g = factor == c.etaminus ? T(0) : g;\n      p -= sign(g) * s;\n      prev = g;\n",
           "      prev = g;\n      g = factor == c.etaminus ? T(0) : g;\n      p -= sign(g) * s;\n"),
    Mutant("rprop-ignore-maximize", "rprop", RPROP,
           _GRAD_SCALE, "c.grad_scale = static_cast<T>(grad_scale);"),
    Mutant("rprop-nan-product-propagates", "rprop", RPROP,
           "product < T(0) ? c.etaminus : T(1);",
           "product < T(0) ? c.etaminus : (product == product ? T(1) : product);"),
    # --- nadam.h
    Mutant("nadam-mu-product-not-advanced", "nadam", NADAM,
           "    scalars[0] = mu_product_after(h, step, scalars[0]);\n", ""),
    Mutant("nadam-mu-product-of-previous-step", "nadam", NADAM,
           "const double mu_product = mu_product_after(h, step, scalars[0]);",
           "const double mu_product = scalars[0];"),
    Mutant("nadam-mu-next-is-mu", "nadam", NADAM,
           "const double mu_next = mu_at(h, step + 1.0);", "const double mu_next = mu_at(h, step);"),
    Mutant("nadam-momentum-decay-ignored", "nadam", NADAM,
           "pow(0.96, step * h.momentum_decay)", "pow(0.96, step * 0.004)"),
    Mutant("nadam-no-bias-correction2", "nadam", NADAM,
           "c.bc2 = static_cast<T>(1.0 - pow(h.beta2, step));", "c.bc2 = T(1);"),
    Mutant("nadam-eps-inside-sqrt", "nadam", NADAM,
           "square_root(exp_avg_sq / c.bc2) + c.eps", "square_root(exp_avg_sq / c.bc2 + c.eps)"),
    Mutant("nadam-no-gradient-term", "nadam", NADAM,
           "      p += (c.grad_weight * g) / denom;\n", ""),
    Mutant("nadam-decoupled-decay-without-lr", "nadam", NADAM,
           "static_cast<T>(1.0 - lr * h.weight_decay)", "static_cast<T>(1.0 - h.weight_decay)"),
    Mutant("nadam-ignore-maximize", "nadam", NADAM,
           _GRAD_SCALE, "c.grad_scale = static_cast<T>(grad_scale);"),
    Mutant("nadam-fp64-avg-weight-rounded-to-float", "nadam", NADAM,
           "c.avg_weight = static_cast<T>((-lr * mu_next) / (1.0 - mu_product_next));",
           "c.avg_weight = static_cast<T>(static_cast<float>((-lr * mu_next) / (1.0 - mu_product_next)));"),
    # --- asgd.h
    Mutant("asgd-eta-not-advanced", "asgd", ASGD,
           "    scalars[0] = static_cast<float>(lr / pow(1.0 + h.lambd * lr * step, h.alpha));\n", ""),
    Mutant("asgd-alpha-ignored", "asgd", ASGD,
           "lr / pow(1.0 + h.lambd * lr * step, h.alpha)", "lr / (1.0 + h.lambd * lr * step)"),
    Mutant("asgd-mu-t0-off-by-one", "asgd", ASGD,
           "const double since = step - h.t0;", "const double since = step - h.t0 + 1.0;"),
    Mutant("asgd-no-decay-term", "asgd", ASGD,
           "c.decay = static_cast<T>(1.0 - h.lambd * eta);", "c.decay = T(1);"),
    Mutant("asgd-never-averages", "asgd", ASGD,
           "c.averaging = scalars[1] != 1.0f;", "c.averaging = false;"),
    Mutant("asgd-average-of-old-parameter", "asgd", ASGD,
           "      p *= c.decay;\n      p += c.neg_eta * g;\n"
           "      ax = uniform_select(c.averaging, ax + (p - ax) * c.mu, p);",
           "      ax = uniform_select(c.averaging, ax + (p - ax) * c.mu, p);\n      p *= c.decay;\n"
           "      p += c.neg_eta * g;"),
    Mutant("asgd-no-weight-decay", "asgd", ASGD,
           "g + c.weight_decay * p, g);", "g, g);"),
    Mutant("asgd-ignore-maximize", "asgd", ASGD,
           _GRAD_SCALE, "c.grad_scale = static_cast<T>(grad_scale);"),
    # --- float64 parameters: a coefficient rounded to float32 on its way to the double compute type (only the float64
    # cases can see it: for float32 parameters the mutant changes nothing)
    Mutant("adam-fp64-step-size-rounded-to-float", "adam", ADAM,
           "c.step_size = static_cast<T>(lr / (1.0 - pow(h.beta1, step)));",
           "c.step_size = static_cast<T>(static_cast<float>(lr / (1.0 - pow(h.beta1, step))));"),
    Mutant("sgd-fp64-lr-rounded-to-float", "sgd", SGD,
           "c.lr = static_cast<T>(lr);", "c.lr = static_cast<T>(static_cast<float>(lr));"),
    Mutant("lamb-fp64-scaled-lr-rounded-to-float", "lamb", LAMB,
           "return static_cast<T>(c.lr * ratio);", "return static_cast<T>(static_cast<float>(c.lr * ratio));"),
    Mutant("adadelta-fp64-lr-rounded-to-float", "adadelta", ADADELTA,
           "c.lr = static_cast<T>(lr);", "c.lr = static_cast<T>(static_cast<float>(lr));"),
    Mutant("rprop-fp64-etaplus-rounded-to-float", "rprop", RPROP,
           "c.etaplus = static_cast<T>(h.etaplus);", "c.etaplus = static_cast<T>(static_cast<float>(h.etaplus));"),
    # --- reference.py: the oracle of the kernel tests, itself checked against torch.optim and float64 formulas
    Mutant("ref-adam-decoupled-decay-without-lr", "adam", REF,
           "        if decoupled:\n            p.mul_(1 - lr * weight_decay)",
           "        if decoupled:\n            p.mul_(1 - weight_decay)"),
    Mutant("ref-adam-swap-betas", "adam", REF,
           _REF_ADAM_MOMENTS, _swap("beta1", "beta2", _REF_ADAM_MOMENTS)),
    Mutant("ref-adam-bias-correction1-step-plus-1", "adam", REF,
           "bias_correction1 = 1 - beta1**step", "bias_correction1 = 1 - beta1**(step + 1)"),
    Mutant("ref-adam-no-bias-correction2", "adam", REF,
           "bias_correction2 = 1 - beta2**step", "bias_correction2 = 1"),
    Mutant("ref-adam-amsgrad-uses-exp-avg-sq", "adam", REF,
           "denom = (vmax.sqrt() / bias_correction2_sqrt)", "denom = (v.sqrt() / bias_correction2_sqrt)"),
    Mutant("ref-sgd-first-step-off-by-one", "sgd", REF,
           "if step <= 1:", "if step < 1:"),
    Mutant("ref-sgd-ignore-dampening", "sgd", REF,
           "add_(g, alpha=1 - dampening)", "add_(g, alpha=1)"),
    Mutant("ref-sgd-nesterov-swapped", "sgd", REF,
           "g = g.add(buf, alpha=momentum) if nesterov else buf",
           "g = buf if nesterov else g.add(buf, alpha=momentum)"),
    Mutant("ref-rmsprop-centered-plus", "rmsprop", REF,
           "sq.addcmul(ga, ga, value=-1)", "sq.addcmul(ga, ga, value=1)"),
    Mutant("ref-rmsprop-grad-avg-lerp-weight-alpha", "rmsprop", REF,
           "ga.lerp_(g, 1 - alpha)", "ga.lerp_(g, alpha)"),
    Mutant("ref-rmsprop-no-eps", "rmsprop", REF,
           "avg = avg.add_(eps)", "avg = avg"),
    Mutant("ref-adagrad-lr-decay-step-off-by-one", "adagrad", REF,
           "(step - 1) * lr_decay", "step * lr_decay"),
    Mutant("ref-adagrad-no-eps", "adagrad", REF,
           "std = s.sqrt().add_(eps)", "std = s.sqrt()"),
    Mutant("ref-lion-swap-betas", "lion", REF,
           "c = torch.lerp(m, g, 1 - beta1)", "c = torch.lerp(m, g, 1 - beta2)"),
    Mutant("ref-lion-decay-without-lr", "lion", REF,
           "p.mul_(1 - lr * weight_decay)\n    c = torch.lerp", "p.mul_(1 - weight_decay)\n    c = torch.lerp"),
    Mutant("ref-lion-flip-update-sign", "lion", REF,
           "p.add_(torch.sign(c), alpha=-lr)", "p.add_(torch.sign(c), alpha=lr)"),
    Mutant("ref-adadelta-no-weight-decay", "adadelta", REF,
           "g = g.add(p, alpha=weight_decay)\n    sq.mul_(rho)", "g = g\n    sq.mul_(rho)"),
    Mutant("ref-adadelta-swap-rho", "adadelta", REF,
           "sq.mul_(rho).addcmul_(g, g, value=1 - rho)", "sq.mul_(1 - rho).addcmul_(g, g, value=rho)"),
    Mutant("ref-adadelta-no-eps-in-numerator", "adadelta", REF,
           "delta = acc.add(eps).sqrt_()", "delta = acc.sqrt()"),
    Mutant("ref-adadelta-acc-delta-of-gradient", "adadelta", REF,
           "acc.mul_(rho).addcmul_(delta, delta, value=1 - rho)", "acc.mul_(rho).addcmul_(g, g, value=1 - rho)"),
    Mutant("ref-adadelta-flip-update-sign", "adadelta", REF,
           "p.add_(delta, alpha=-lr)", "p.add_(delta, alpha=lr)"),
    Mutant("ref-rprop-swap-etas", "rprop", REF,
           _REF_RPROP_FACTORS, _swap("etaplus", "etaminus", _REF_RPROP_FACTORS)),
    Mutant("ref-rprop-no-clamp", "rprop", REF,
           "size.mul_(sign).clamp_(step_size_min, step_size_max)", "size.mul_(sign)"),
    Mutant("ref-rprop-keep-grad-on-sign-change", "rprop", REF,
           "g = torch.where(sign.eq(etaminus), 0.0, g)", "g = g"),
    Mutant("ref-rprop-flip-update-sign", "rprop", REF,
           "p.addcmul_(g.sign(), size, value=-1)", "p.addcmul_(g.sign(), size, value=1)"),
    # --- adafactor.h, and the factored driver's reductions
    Mutant("adafactor-beta2-step-off-by-one", "adafactor", ADAFACTOR,
           "pow(step, h.beta2_decay)", "pow(step + 1.0, h.beta2_decay)"),
    Mutant("adafactor-lerp-weight-flipped", "adafactor", ADAFACTOR,
           "return lerp(factor, mean_square, c.new_weight);", "return lerp(factor, mean_square, T(1) - c.new_weight);"),
    Mutant("adafactor-rho-ignores-lr", "adafactor", ADAFACTOR,
           "c.rho = lr < inverse_sqrt_step ? lr : inverse_sqrt_step;", "c.rho = inverse_sqrt_step;"),
    Mutant("adafactor-no-weight-decay", "adafactor", ADAFACTOR,
           "c.decay = static_cast<T>(1.0 - lr * h.weight_decay);", "c.decay = T(1);"),
    Mutant("adafactor-no-eps2-floor", "adafactor", ADAFACTOR,
           "(rms_p > c.eps2 ? rms_p : c.eps2)", "rms_p"),
    Mutant("adafactor-no-update-clipping", "adafactor", ADAFACTOR,
           "(clip > 1.0 ? clip : 1.0)", "1.0"),
    Mutant("adafactor-d-ignored", "adafactor", ADAFACTOR,
           "sqrt(u2) / (root_n * c.d)", "sqrt(u2) / root_n"),
    Mutant("adafactor-half-step", "adafactor", ADAFACTOR,
           "return static_cast<T>(-alpha /", "return static_cast<T>(-0.5 * alpha /"),
    Mutant("adafactor-row-mean-not-floored", "adafactor", ADAFACTOR,
           "return mean < c.eps1 ? c.eps1 : mean;", "return mean;"),
    Mutant("adafactor-estimate-without-row-mean", "adafactor", ADAFACTOR,
           "return (row_factor * col_factor) / row_mean;", "return row_factor * col_factor;"),
    Mutant("adafactor-estimate-not-floored", "adafactor", ADAFACTOR,
           "const T floored = estimate < c.eps1_squared ? c.eps1_squared : estimate;", "const T floored = estimate;"),
    Mutant("adafactor-ignore-maximize", "adafactor", ADAFACTOR,
           _GRAD_SCALE, "c.grad_scale = static_cast<T>(grad_scale);"),
    Mutant("factored-column-mean-over-columns", "adafactor", DRIVER,
           "column_sums[j] / total_rows", "column_sums[j] / static_cast<double>(cols)"),
    Mutant("factored-row-sums-skip-last-row", "adafactor", DRIVER,
           "for (int64_t r = 0; r < rows; ++r) total +=", "for (int64_t r = 0; r + 1 < rows; ++r) total +="),
    Mutant("ref-adafactor-beta2-step-off-by-one", "adafactor", REF,
           "new_weight = step**beta2_decay", "new_weight = (step + 1)**beta2_decay"),
    Mutant("ref-adafactor-column-mean-over-columns", "adafactor", REF,
           "torch.norm(g, dim=-2, keepdim=True).square_().div_(g.size(-2))",
           "torch.norm(g, dim=-2, keepdim=True).square_().div_(g.size(-1))"),
    Mutant("ref-adafactor-no-row-mean", "adafactor", REF,
           "estimate.div_(row.mean(dim=-2, keepdim=True).clamp_(min=eps1))", "estimate.div_(1.0)"),
    Mutant("ref-adafactor-no-update-clipping", "adafactor", REF,
           "denominator = max(1.0, u.norm(2).item()", "denominator = max(0.0, 0.0 * u.norm(2).item()"),
    # --- muon.h, its reference phases and the Newton-Schulz iteration (tests/test_muon.py)
    Mutant("muon-half-step", "muon", MUON,
           "c.step_size = static_cast<T>(-(lr * lr_ratio(h, scalars[0], scalars[1])));",
           "c.step_size = static_cast<T>(-(0.5 * lr * lr_ratio(h, scalars[0], scalars[1])));"),
    Mutant("muon-lr-ratio-ignored", "muon", MUON,
           "c.step_size = static_cast<T>(-(lr * lr_ratio(h, scalars[0], scalars[1])));",
           "c.step_size = static_cast<T>(-lr);"),
    Mutant("muon-match-rms-uses-min", "muon", MUON,
           "return 0.2 * sqrt(rows > cols ? rows : cols);", "return 0.2 * sqrt(rows < cols ? rows : cols);"),
    Mutant("muon-original-ratio-inverted", "muon", MUON,
           "const double aspect = rows / cols;", "const double aspect = cols / rows;"),
    Mutant("muon-no-weight-decay", "muon", MUON, "p *= c.decay;", "p *= T(1);"),
    Mutant("muon-momentum-weight-flipped", "muon", MUON,
           "c.one_minus_momentum = static_cast<T>(1.0 - h.momentum);",
           "c.one_minus_momentum = static_cast<T>(h.momentum);"),
    Mutant("muon-nesterov-ignored", "muon", MUON,
           "update = Nesterov ? lerp(g, momentum_buffer, c.momentum) : momentum_buffer;",
           "update = momentum_buffer;"),
    Mutant("muon-nesterov-weight-flipped", "muon", MUON,
           "lerp(g, momentum_buffer, c.momentum)", "lerp(g, momentum_buffer, c.one_minus_momentum)"),
    Mutant("muon-grad-scale-ignored", "muon", MUON,
           "      g *= c.grad_scale;\n      momentum_buffer", "      momentum_buffer"),
    Mutant("ref-muon-nesterov-ignored", "muon", REF,
           "_write_back(update, g.lerp(b, momentum) if nesterov else b)", "_write_back(update, b)"),
    Mutant("ref-muon-lr-ratio-ignored", "muon", REF,
           "p.add_(_work(update), alpha=-(lr * ratio))", "p.add_(_work(update), alpha=-lr)"),
    Mutant("ref-muon-no-weight-decay", "muon", REF,
           "p.mul_(1 - lr * weight_decay)\n    p.add_(_work(update)", "p.add_(_work(update)"),
    Mutant("ref-muon-momentum-weight-flipped", "muon", REF,
           "b.lerp_(g, 1 - momentum)", "b.lerp_(g, momentum)"),
    Mutant("muon-ns-one-step-less", "muon", NEWTON_SCHULZ,
           "        for _ in range(steps):\n            gram = torch.bmm(x, x.mT)",
           "        for _ in range(steps - 1):\n            gram = torch.bmm(x, x.mT)"),
    Mutant("muon-ns-tall-one-step-less", "muon", NEWTON_SCHULZ,
           "        for _ in range(steps):\n            gram = torch.bmm(x.mT, x)",
           "        for _ in range(steps - 1):\n            gram = torch.bmm(x.mT, x)"),
    Mutant("muon-ns-tall-half-update", "muon", NEWTON_SCHULZ,
           "x = torch.baddbmm(x, x, gram_update, beta=a)", "x = torch.baddbmm(x, x, gram_update, beta=a, alpha=0.5)"),
    Mutant("muon-ns-not-normalized", "muon", NEWTON_SCHULZ,
           "x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)",
           "x = x / x.norm(dim=(-2, -1), keepdim=True).amax().clamp(min=eps)"),
    Mutant("muon-ns-coefficients-b-c-swapped", "muon", NEWTON_SCHULZ,
           "gram = torch.bmm(x, x.mT)\n            gram_update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)",
           "gram = torch.bmm(x, x.mT)\n            gram_update = torch.baddbmm(gram, gram, gram, beta=c, alpha=b)"),
    Mutant("ref-muon-original-ratio-inverted", "muon", REF,
           "return math.sqrt(max(1, rows / cols))", "return math.sqrt(max(1, cols / rows))"),
    # --- param_io.h: Kahan compensation and stochastic rounding of 16-bit parameters (tests/test_low_precision.py)
    Mutant("lowp-kahan-read-ignores-comp", "low_precision", PARAM_IO,
           "return load(p[i]) + load(comp[i]);", "return load(p[i]);"),
    Mutant("lowp-kahan-residual-dropped", "low_precision", PARAM_IO,
           "comp[i] = store<TP>(v - load(rounded));", "comp[i] = store<TP>(C(0));"),
    Mutant("lowp-kahan-residual-sign-flipped", "low_precision", PARAM_IO,
           "comp[i] = store<TP>(v - load(rounded));", "comp[i] = store<TP>(load(rounded) - v);"),
    Mutant("lowp-stochastic-half-the-noise", "low_precision", PARAM_IO,
           "(u + (bits & 0xFFFFu)) >> 16", "(u + (bits & 0x7FFFu)) >> 16"),
    Mutant("lowp-stochastic-key-ignores-step", "low_precision", PARAM_IO,
           "mix32(static_cast<uint32_t>(step) * 0x9E3779B9u + static_cast<uint32_t>(segment))",
           "mix32(static_cast<uint32_t>(segment))"),
    Mutant("lowp-ref-stochastic-half-the-noise", "low_precision", REF,
           "rounded = (((u + (bits & 0xFFFF)) >> 16) << 16) & _MASK32",
           "rounded = (((u + (bits & 0x7FFF)) >> 16) << 16) & _MASK32"),
    Mutant("lowp-ref-kahan-residual-dropped", "low_precision", REF,
           "comp.copy_((values - rounded.float()).to(comp.dtype))", "comp.zero_()"),
    # --- 8-bit states: the code (quant8.h), the driver's blocks, the reference quantizer, the optimizer's signedness
    # (tests/test_8bit_states.py)
    Mutant("q8-encode-truncates", "8bit", QUANT8,
           "return ((float_as_bits(y + 8.0f) + 0x80000u) >> 20) - 1040u;",
           "return (float_as_bits(y + 8.0f) >> 20) - 1040u;"),
    Mutant("q8-decode-without-offset", "8bit", QUANT8,
           "return bits_as_float((m + 1040u) << 20) - 8.0f;", "return bits_as_float((m + 1040u) << 20);"),
    Mutant("q8-encode-drops-sign", "8bit", QUANT8,
           "const uint32_t sign = is_signed ? (float_as_bits(x) >> 24) & 0x80u : 0u;", "const uint32_t sign = 0u;"),
    Mutant("q8-unsigned-top-is-signed-top", "8bit", QUANT8,
           "return is_signed ? kSignedTop : kUnsignedTop;", "return kSignedTop;"),
    Mutant("q8-absmax-not-written", "8bit", DRIVER,
           "  q.absmax[k][begin / kQuantBlock] = absmax;\n", "\n"),
    Mutant("q8-absmax-ignores-nonfinite", "8bit", DRIVER,
           "return largest >= 0x7F800000u ? NAN : bits_as_float(largest);", "return bits_as_float(largest);"),
    Mutant("q8-decode-without-top", "8bit", DRIVER,
           "const float scale = q.absmax[k][begin / kQuantBlock] / q.top[k];",
           "const float scale = q.absmax[k][begin / kQuantBlock];"),
    Mutant("q8-ref-encode-truncates", "8bit", REF,
           "magnitude = ((u + 0x80000) >> 20) - 1040", "magnitude = (u >> 20) - 1040"),
    Mutant("q8-ref-decode-without-offset", "8bit", REF,
           "q = ((m + 1040) << 20).view(torch.float32) - 8.0", "q = ((m + 1040) << 20).view(torch.float32)"),
    Mutant("q8-optimizer-every-state-signed", "8bit", BASE,
           "signed=[s.signed for s in spec.states]", "signed=[True for s in spec.states]"),
    Mutant("ref-rprop-prev-not-stored", "rprop", REF,
           "pv.copy_(g)", "pv.copy_(pv)"),
    Mutant("ref-nadam-mu-next-is-mu", "nadam", REF,
           "mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((step + 1) * momentum_decay))",
           "mu_next = beta1 * (1.0 - 0.5 * 0.96 ** (step * momentum_decay))"),
    Mutant("ref-nadam-mu-product-not-updated", "nadam", REF,
           "mu_product.mul_(mu)", "mu_product.mul_(1.0)"),
    Mutant("ref-nadam-no-bias-correction2", "nadam", REF,
           "denom = v.div(1 - beta2**step)", "denom = v.div(1)"),
    Mutant("ref-asgd-eta-without-alpha", "asgd", REF,
           "eta.fill_(lr / ((1 + lambd * lr * step) ** alpha))", "eta.fill_(lr / (1 + lambd * lr * step))"),
    Mutant("ref-asgd-mu-t0-off-by-one", "asgd", REF,
           "mu.fill_(1 / max(1, step - t0))", "mu.fill_(1 / max(1, step - t0 + 1))"),
    Mutant("ref-asgd-no-decay-term", "asgd", REF,
           "p.mul_(1 - lambd * eta_value)", "p.mul_(1)"),
    Mutant("ref-lamb-no-bias-correction1", "lamb", REF,
           "mh = m / (1 - beta1**step)", "mh = m"),
    Mutant("ref-lamb-no-weight-decay", "lamb", REF,
           "u.add_(p, alpha=weight_decay)", "u.add_(p, alpha=0.0)"),
    Mutant("ref-lamb-trust-ratio-inverted", "lamb", REF,
           "ratio = w_norm / u_norm if", "ratio = u_norm / w_norm if"),
    Mutant("ref-lamb-zero-norm-ratio-0", "lamb", REF,
           "if (w_norm > 0 and u_norm > 0) else 1.0", "if (w_norm > 0 and u_norm > 0) else 0.0"),
    Mutant("ref-lamb-ignore-max-trust-ratio", "lamb", REF,
           "ratio = min(ratio, max_trust_ratio)\n    p = _work(param)", "ratio = ratio\n    p = _work(param)"),
]


def tests_of(mutant: Mutant) -> list[str]:
    """Where a bug of this file shows first, chosen by measurement: a kernel bug in the kernel-vs-reference tests, a
    reference bug in the reference-vs-torch.optim (or float64 paper formulas) tests."""
    # Adafactor's factors (parameters of two or more dimensions) are tested on shaped parameters of their own.
    factored = ["tests/test_adafactor.py"] if mutant.algorithm == "adafactor" else []
    if mutant.algorithm == "muon":  # a step is two kernel calls around Newton-Schulz: its own test module
        return ["tests/test_muon.py"]
    if mutant.algorithm == "low_precision":  # parameter storage, whatever the algorithm
        return ["tests/test_low_precision.py"]
    if mutant.algorithm == "8bit":  # 8-bit states, whatever the algorithm
        return ["tests/test_8bit_states.py"]
    if mutant.file == REF:
        return ["tests/test_reference.py", *factored]
    return ["tests/test_cpu_kernels.py", "tests/test_kernel_sensitivity.py", *factored]


def pytest_command(files: list[str], algorithms: list[str]) -> list[str]:
    """pytest on the tests of `algorithms` in `files`. -x stops at the first failure, so a caught mutant costs a few
    seconds; the 1,000,003-element cases add minutes and no sensitivity."""
    select = f"({' or '.join(algorithms)}) and not n1000003"
    return [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *files, "-k", select]


def mutant_command(mutant: Mutant) -> list[str]:
    return pytest_command(tests_of(mutant), [mutant.algorithm])


# --- applying mutants ------------------------------------------------------------------------------------------------

def check_mutants(mutants: list[Mutant]) -> None:
    """Every mutant applies to exactly one place of its file and changes it; names are unique. Raises SystemExit
    naming each stale row, so the list cannot drift from the code silently."""
    errors = []
    names = [m.name for m in mutants]
    errors += [f"duplicate mutant name {n!r}" for n in sorted({n for n in names if names.count(n) > 1})]
    for m in mutants:
        text = (ROOT / m.file).read_text(encoding="utf-8")
        count = text.count(m.original)
        if count != 1:
            errors.append(f"{m.name}: snippet found {count} times in {m.file} (must be exactly once): {m.original!r}")
        if m.original == m.replacement:
            errors.append(f"{m.name}: replacement equals the original")
    if errors:
        raise SystemExit("mutant list out of sync with the code (or a mutation run is in progress):\n  "
                         + "\n  ".join(errors))


@contextmanager
def applied(mutant: Mutant, backups: Path) -> Iterator[None]:
    """The mutant written into its file for the duration of the block; the original bytes are always written back.
    A copy of the original waits in `backups` meanwhile, for a run killed too hard to restore (see recover)."""
    path = ROOT / mutant.file
    original = path.read_bytes()
    text = original.decode("utf-8")
    if text.count(mutant.original) != 1:
        raise SystemExit(f"{mutant.name}: snippet not found exactly once in {mutant.file}")
    backup = backups / f"{mutant.name}.orig"
    backups.mkdir(parents=True, exist_ok=True)
    backup.write_bytes(original)
    try:
        path.write_bytes(text.replace(mutant.original, mutant.replacement).encode("utf-8"))
        yield
    finally:
        # A second Ctrl-C must not cut the restore short: signals wait until the original is back.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
        try:
            path.write_bytes(original)
            backup.unlink()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def recover(backups: Path) -> None:
    """After a run killed with a mutant in place (SIGKILL, power loss): put the original back when the file still
    holds exactly that mutant, else stop and say where the original is, so that no later edit is overwritten."""
    by_name = {m.name: m for m in MUTANTS}
    for backup in sorted(backups.glob("*.orig")) if backups.is_dir() else []:
        m = by_name.get(backup.stem)
        original = backup.read_bytes()
        mutated = original.decode("utf-8").replace(m.original, m.replacement).encode("utf-8") if m else None
        path = ROOT / m.file if m else None
        if path is not None and path.read_bytes() == mutated:
            path.write_bytes(original)
            backup.unlink()
            print(f"restored {m.file}, left mutated by a killed run ({m.name})", file=sys.stderr)
        elif path is not None and path.read_bytes() == original:
            backup.unlink()
        else:
            raise SystemExit(f"a killed run left {backup}; compare it with the mutated file, then delete it")


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# --- building and testing --------------------------------------------------------------------------------------------

def _run(cmd: list[str], *, env: dict[str, str] | None = None, timeout: float | None = None,
         log: Path | None = None) -> int:
    """Run cmd in the repository root, output to `log` (or discarded); returns its exit status (-9 on timeout).
    It runs in its own process group, stopped on a timeout or an interrupt with SIGTERM first: ninja puts each
    compiler in a group of its own and kills them only when it is allowed to clean up."""
    with open(log or os.devnull, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return -9
        finally:
            if proc.poll() is None:
                _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            pass


class Builder:
    """The baseline-ISA CPU build in its own CMake directory (configured once, then incremental), so the normal
    build/ and python/fusedopt/_C*.so are never touched by a mutant."""

    def __init__(self, build_dir: Path, logs: Path) -> None:
        self.build_dir = build_dir
        self.logs = logs

    def configure(self) -> None:
        if (self.build_dir / "build.ninja").exists():
            return
        cmake_dir = subprocess.run([sys.executable, "-m", "pybind11", "--cmakedir"], capture_output=True, text=True,
                                   check=True).stdout.strip()
        cmd = ["cmake", "-S", str(ROOT), "-B", str(self.build_dir), "-G", "Ninja", "-DFUSEDOPT_CUDA=OFF",
               "-DFUSEDOPT_CPU_ISAS=OFF", f"-Dpybind11_DIR={cmake_dir}",
               f"-DPython_EXECUTABLE={sys.executable}"]
        if _run(cmd, log=self.logs / "configure.log") != 0:
            raise SystemExit(f"cmake configure failed, see {self.logs / 'configure.log'}")

    def build(self, log_name: str) -> Path | None:
        """Build incrementally; the extension's path, or None when the build failed (log under logs/)."""
        if _run(["cmake", "--build", str(self.build_dir)], log=self.logs / log_name) != 0:
            return None
        suffix = sysconfig.get_config_var("EXT_SUFFIX")
        return self.build_dir / f"_C{suffix}"


class Package:
    """A private copy of python/fusedopt, first on PYTHONPATH of the tests, holding the extension under test: the
    worktree's package (and its _C) stay as they are."""

    def __init__(self, parent: Path) -> None:
        self.parent = parent
        self.dir = parent / "fusedopt"

    def sync(self, extension: Path) -> None:
        """Copy the worktree's Python sources (mutated or not) and `extension` into the private package."""
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.copytree(ROOT / "python" / "fusedopt", self.dir,
                        ignore=shutil.ignore_patterns("__pycache__", "_C*.so", "_C*.pyd"))
        shutil.copy2(extension, self.dir / extension.name)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(self.parent)] + [p for p in [env.get("PYTHONPATH")] if p])
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # a mutant of the same size in the same second must not reuse a .pyc
        env.pop("FUSEDOPT_BACKEND", None)
        env.pop("FUSEDOPT_CPU_ISA", None)
        return env

    def check_import(self) -> None:
        """The tests will import this package and its compiled CPU backend, not an installed fusedopt."""
        probe = ("import fusedopt, fusedopt._C as C; print(fusedopt.__file__); print(C.__file__); "
                 "print('cpu' in fusedopt.build_info()['backends'])")
        out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=self.env(), capture_output=True, text=True)
        lines = out.stdout.split()
        if out.returncode != 0 or len(lines) != 3 or not all(line.startswith(str(self.dir)) for line in lines[:2]) \
                or lines[2] != "True":
            raise SystemExit(f"the private package does not import as expected:\n{out.stdout}{out.stderr}")


@dataclass
class Result:
    mutant: Mutant
    status: str  # caught | survived | build-failed | error
    seconds: float
    detail: str = ""


def _status(rc: int) -> str:
    """pytest's exit status as a verdict: 1 = a test failed, negative = crashed or timed out, 0 = all passed."""
    if rc == 0:
        return "survived"
    if rc == 1 or rc < 0:
        return "caught"
    return "error"  # 2-5: collection error, usage error, nothing selected


def run(mutants: list[Mutant], build_dir: Path, out: Path) -> int:
    """Build the original, check that the tests pass on it, then each mutant in turn; the report; the exit status."""
    logs, backups = build_dir / "logs", build_dir / "originals"
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    start = time.monotonic()
    builder = Builder(build_dir, logs)
    results: list[Result] = []
    needs_rebuild = False
    with tempfile.TemporaryDirectory(prefix="fusedopt-mutate-") as tmp:
        package = Package(Path(tmp))
        print(f"building the original (baseline ISA) in {build_dir} ...", flush=True)
        builder.configure()
        built = builder.build("original.log")
        if built is None:
            raise SystemExit(f"the original does not build, see {logs / 'original.log'}")
        original_ext = Path(tmp) / built.name
        shutil.copy2(built, original_ext)
        package.sync(original_ext)
        package.check_import()

        # The subsets must pass on the original code, or a "caught" would mean nothing. One pytest run per set of
        # files (the union of the algorithms) checks them all; its time bounds each mutant's run.
        subsets: dict[tuple[str, ...], list[str]] = {}
        for m in mutants:
            algorithms = subsets.setdefault(tuple(tests_of(m)), [])
            if m.algorithm not in algorithms:
                algorithms.append(m.algorithm)
        timeout = 0.0
        for files, algorithms in subsets.items():
            cmd = pytest_command(list(files), algorithms)
            t0 = time.monotonic()
            rc = _run(cmd, env=package.env(), log=logs / "baseline.log")
            if rc != 0:
                raise SystemExit(f"the tests fail on the original code (exit {rc}): {' '.join(cmd[2:])}\n"
                                 f"see {logs / 'baseline.log'}")
            timeout = max(timeout, 120 + 3 * (time.monotonic() - t0))
            print(f"original passes in {time.monotonic() - t0:5.1f} s: {' '.join(cmd[2:])}", flush=True)

        try:
            for i, m in enumerate(mutants, 1):
                t0 = time.monotonic()
                cmd = mutant_command(m)
                with applied(m, backups):
                    ext = original_ext
                    if not m.file.endswith(".py"):
                        needs_rebuild = True
                        ext = builder.build(f"{m.name}.build.log")
                    if ext is None:
                        result = Result(m, "build-failed", time.monotonic() - t0, f"see {logs / m.name}.build.log")
                    else:
                        package.sync(ext)
                        rc = _run(cmd, env=package.env(), timeout=timeout,
                                  log=logs / f"{m.name}.test.log")
                        detail = "timed out" if rc == -9 else (f"crashed (signal {-rc})" if rc < 0 else "")
                        result = Result(m, _status(rc), time.monotonic() - t0, detail)
                results.append(result)
                print(f"[{i:2d}/{len(mutants)}] {result.status:12s} {result.seconds:6.1f} s  {m.name}"
                      + (f"  ({result.detail})" if result.detail else ""), flush=True)
        except KeyboardInterrupt:
            needs_rebuild = False  # the next run rebuilds the mutate build dir from the restored sources anyway
            raise
        finally:
            if needs_rebuild:
                print("rebuilding the original ...", flush=True)
                if builder.build("original.log") is None:
                    print(f"warning: the original did not rebuild, see {logs / 'original.log'}", file=sys.stderr)

    elapsed = time.monotonic() - start
    report(results, elapsed, out)
    return 0 if all(r.status == "caught" for r in results) else 1


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip()


def report(results: list[Result], elapsed: float, out: Path) -> None:
    """The table on stdout, the same as JSON at `out`."""
    width = max(len(r.mutant.name) for r in results)
    fwidth = max(len(r.mutant.file) for r in results)
    print(f"\n{'mutant':{width}}  {'file':{fwidth}}  {'result':12}  seconds")
    for r in results:
        print(f"{r.mutant.name:{width}}  {r.mutant.file:{fwidth}}  {r.status:12}  {r.seconds:7.1f}")
    caught = sum(r.status == "caught" for r in results)
    score = caught / len(results)
    print(f"\nmutation score: {caught}/{len(results)} = {score:.1%} caught, in {elapsed / 60:.1f} min")
    for r in results:
        if r.status != "caught":
            print(f"  {r.status}: {r.mutant.name} ({r.mutant.file}), tests: {' '.join(mutant_command(r.mutant)[2:])}")
    record = {
        "meta": {
            "git_commit": _git("rev-parse", "HEAD"),
            "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "platform": platform.platform(),
            "cpu_cores": os.cpu_count(),
            "python": platform.python_version(),
        },
        "score": score,
        "caught": caught,
        "total": len(results),
        "seconds": round(elapsed, 1),
        "mutants": [
            {"name": r.mutant.name, "algorithm": r.mutant.algorithm, "file": r.mutant.file, "result": r.status,
             "seconds": round(r.seconds, 1), "detail": r.detail, "tests": " ".join(mutant_command(r.mutant)[2:])}
            for r in results
        ],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", metavar="SUBSTRING", help="run the mutants whose name or file contains SUBSTRING")
    parser.add_argument("--list", action="store_true", help="list the mutants (after checking each applies once)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON result (default: {DEFAULT_OUT})")
    parser.add_argument("--build-dir", type=Path, default=DEFAULT_BUILD_DIR,
                        help=f"CMake build directory of the mutants (default: {DEFAULT_BUILD_DIR})")
    args = parser.parse_args(argv)
    build_dir = args.build_dir.resolve()

    if not args.list:
        # One run per build directory; a file left mutated by a killed run is restored before anything reads it.
        (build_dir / "logs").mkdir(parents=True, exist_ok=True)
        lock = open(build_dir / ".lock", "w")  # held until the process exits
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise SystemExit(f"another mutation run holds {build_dir}") from None
        recover(build_dir / "originals")
    check_mutants(MUTANTS)
    mutants = [m for m in MUTANTS if args.only is None or args.only in m.name or args.only in m.file]
    if not mutants:
        raise SystemExit(f"no mutant matches {args.only!r}")
    if args.list:
        for m in mutants:
            print(f"{m.name:42} {m.file:36} {' '.join(mutant_command(m)[2:])}")
        print(f"{len(mutants)} mutants")
        return 0
    try:
        return run(mutants, build_dir, args.out.resolve())
    except KeyboardInterrupt:
        print("\ninterrupted: every mutated file has been restored", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
