"""Benchmark parameter sets built from shapes alone (no download): GPT-2-shaped models scaled to a size,
and sets of N equal-ish tensors. Used by the ``fusedopt bench`` CLI and the scripts in ``bench/``."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

__all__ = [
    "Workload",
    "equal_tensors_workload",
    "format_size",
    "gpt2_linear_shapes",
    "gpt2_model_workload",
    "gpt2_shapes",
    "gpt2_workload",
    "is_block_matrix",
    "make_params",
    "matrices_only",
    "muon_matrices_workload",
    "parse_size",
    "transformer_128m_workload",
    "workload_for",
]

_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([KkMmBbGg]?)\s*$")

#: GPT-2 small: vocabulary, context length, width, depth.
kGpt2Vocab = 50257
kGpt2Context = 1024
kGpt2Width = 768
kGpt2Depth = 12


@dataclass(frozen=True)
class Workload:
    """A named list of (tensor name, shape) pairs; ``numel`` is the total parameter count."""

    name: str
    shapes: list[tuple[str, tuple[int, ...]]] = field(repr=False)
    description: str = ""

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for _, s in self.shapes)

    @property
    def num_tensors(self) -> int:
        return len(self.shapes)


def parse_size(text: str | int) -> int:
    """Parse a parameter count such as ``"1M"``, ``"124M"``, ``"1.5B"``, ``"350m"`` or ``"1000000"``.

    Raises ``ValueError`` naming the value when it is not a positive count.
    """
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE_RE.match(str(text))
        if not m:
            raise ValueError(f"Invalid size: {text!r} (expected a count such as 1M, 124M, 1B or 1000000)")
        value = round(float(m.group(1)) * _SUFFIX[m.group(2).upper()])
    if value <= 0:
        raise ValueError(f"Invalid size: {text!r} (must be positive)")
    return value


def format_size(n: int) -> str:
    """Short human form of a parameter count: 1M, 124.4M, 1.3B."""
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            v = n / scale
            return f"{v:.0f}{unit}" if abs(v - round(v)) < 0.05 else f"{v:.1f}{unit}"
    return str(n)


def gpt2_shapes(
    n_layer: int = kGpt2Depth, d_model: int = kGpt2Width, vocab: int = kGpt2Vocab, n_ctx: int = kGpt2Context
) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter shapes of a GPT-2 model (HF naming, tied LM head): 12 tensors per block + 4."""
    d = d_model
    shapes: list[tuple[str, tuple[int, ...]]] = [("wte", (vocab, d)), ("wpe", (n_ctx, d))]
    for i in range(n_layer):
        h = f"h.{i}"
        shapes += [
            (f"{h}.ln_1.weight", (d,)),
            (f"{h}.ln_1.bias", (d,)),
            (f"{h}.attn.c_attn.weight", (d, 3 * d)),
            (f"{h}.attn.c_attn.bias", (3 * d,)),
            (f"{h}.attn.c_proj.weight", (d, d)),
            (f"{h}.attn.c_proj.bias", (d,)),
            (f"{h}.ln_2.weight", (d,)),
            (f"{h}.ln_2.bias", (d,)),
            (f"{h}.mlp.c_fc.weight", (d, 4 * d)),
            (f"{h}.mlp.c_fc.bias", (4 * d,)),
            (f"{h}.mlp.c_proj.weight", (4 * d, d)),
            (f"{h}.mlp.c_proj.bias", (d,)),
        ]
    shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    return shapes


#: The weight matrices of a GPT-2 block (attention qkv and projection, MLP in and out): what Muon steps in a real model.
kBlockMatrices = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def is_block_matrix(name: str) -> bool:
    """Whether ``name`` (of ``gpt2_shapes``) is one of a block's weight matrices (``kBlockMatrices``)."""
    return name.endswith(kBlockMatrices)


def gpt2_linear_shapes(
    n_layer: int = kGpt2Depth, d_model: int = kGpt2Width, vocab: int = kGpt2Vocab, n_ctx: int = kGpt2Context
) -> list[tuple[str, tuple[int, ...]]]:
    """``gpt2_shapes`` with each block's weight matrices as ``torch.nn.Linear`` stores them, (out, in): qkv
    (3d, d), attention projection (d, d), MLP in (4d, d), MLP out (d, 4d). Muon's learning-rate adjustment and its
    transpose of tall matrices depend on this orientation."""
    shapes = gpt2_shapes(n_layer, d_model, vocab, n_ctx)
    return [(n, tuple(reversed(s)) if is_block_matrix(n) else s) for n, s in shapes]


def muon_matrices_workload(d_model: int = 256, n_layer: int = 6) -> Workload:
    """The block weight matrices of a GPT-2-like model, as ``torch.nn.Linear`` weights: 4 per block (qkv
    (3d, d), projection (d, d), MLP (4d, d) and (d, 4d)). The default, 24 matrices at width 256 (4.7M parameters), is
    ``fusedopt bench --optimizer muon``'s set."""
    shapes = [(n, s) for n, s in gpt2_linear_shapes(n_layer, d_model, 0, 0) if is_block_matrix(n)]
    return Workload(
        name=f"gpt2-matrices-{n_layer}x{d_model}",
        shapes=shapes,
        description=f"the 4 weight matrices of each of {n_layer} GPT-2-like blocks of width {d_model}, (out, in)",
    )


def gpt2_model_workload(n_layer: int = 6, d_model: int = 256, vocab: int = 8192, n_ctx: int = 1024) -> Workload:
    """A whole small GPT-2-shaped model with ``torch.nn.Linear``-oriented block matrices (``gpt2_linear_shapes``):
    Muon steps the block matrices (``is_block_matrix``), AdamW the rest (embeddings, which are the tied head,
    norms, biases)."""
    shapes = gpt2_linear_shapes(n_layer, d_model, vocab, n_ctx)
    total = sum(math.prod(s) for _, s in shapes)
    return Workload(
        name=f"gpt2-{format_size(total)}-{n_layer}x{d_model}",
        shapes=shapes,
        description=f"GPT-2-shaped: {n_layer} layers, width {d_model}, vocab {vocab}, context {n_ctx}",
    )


def matrices_only(workload: Workload) -> Workload:
    """The 2-D tensors of ``workload`` (for optimizers that step matrices only, such as Muon); the others dropped.
    The result may be empty."""
    shapes = [(n, s) for n, s in workload.shapes if len(s) == 2]
    if len(shapes) == len(workload.shapes):
        return workload
    return Workload(
        name=f"{workload.name}-2d",
        shapes=shapes,
        description=f"the {len(shapes)} 2-D tensors of {len(workload.shapes)} in: {workload.description}",
    )


def _gpt2_count(n_layer: int, d: int, vocab: int, n_ctx: int) -> int:
    return vocab * d + n_ctx * d + n_layer * (12 * d * d + 13 * d) + 2 * d


def _gpt2_config_for(target: int) -> tuple[int, int, int, int]:
    """(n_layer, d_model, vocab, n_ctx) of a GPT-2-like model with about ``target`` parameters.

    124M gives GPT-2 small exactly. Otherwise width is a multiple of 64 with depth near width/64 (the GPT-2
    aspect ratio); below 50M parameters the vocabulary and context shrink so embeddings stay about a third of
    the model instead of all of it.
    """
    if abs(target - _gpt2_count(kGpt2Depth, kGpt2Width, kGpt2Vocab, kGpt2Context)) / target < 0.02:
        return kGpt2Depth, kGpt2Width, kGpt2Vocab, kGpt2Context
    best: tuple[float, tuple[int, int, int, int]] | None = None
    for d in range(64, 16384 + 1, 64):
        if target >= 50_000_000:
            vocab, n_ctx = kGpt2Vocab, kGpt2Context
        else:
            n_ctx = min(kGpt2Context, max(64, d))
            vocab = max(64, min(kGpt2Vocab, int(target / 3 / d) - n_ctx))
        per_layer = 12 * d * d + 13 * d
        rest = target - _gpt2_count(0, d, vocab, n_ctx)
        if rest < per_layer * 0.5:
            continue
        n_layer = max(1, round(rest / per_layer))
        err = abs(_gpt2_count(n_layer, d, vocab, n_ctx) - target) / target
        aspect = abs(math.log(n_layer / max(1.0, d / 64)))
        score = err + 0.02 * aspect
        if best is None or score < best[0]:
            best = (score, (n_layer, d, vocab, n_ctx))
    if best is None:  # tiny targets: one narrow block plus small embeddings
        d = 64
        vocab = max(1, (target - _gpt2_count(1, d, 0, 0)) // d)
        return 1, d, vocab, 0
    return best[1]


def gpt2_workload(params: int | str = "124M") -> Workload:
    """GPT-2-small-shaped set (124M parameters in 148 tensors), scaled in width/depth to ``params``."""
    target = parse_size(params)
    n_layer, d, vocab, n_ctx = _gpt2_config_for(target)
    shapes = [(n, s) for n, s in gpt2_shapes(n_layer, d, vocab, n_ctx) if math.prod(s) > 0]
    return Workload(
        name=f"gpt2-{format_size(target)}",
        shapes=shapes,
        description=f"GPT-2-shaped: {n_layer} layers, width {d}, vocab {vocab}, context {n_ctx}",
    )


def equal_tensors_workload(params: int | str, tensors: int) -> Workload:
    """``tensors`` equal-ish tensors (sizes within +-25%, fixed pattern) summing to exactly ``params``."""
    total = parse_size(params)
    if tensors <= 0:
        raise ValueError(f"Invalid tensors: {tensors} (must be positive)")
    if tensors > total:
        raise ValueError(f"Invalid tensors: {tensors} (more tensors than parameters: {total})")
    base = total / tensors
    # A deterministic +-25% zig-zag keeps sizes unequal (as in real models) while the total stays exact.
    weights = [1.0 + 0.25 * math.sin(1.7 * i) for i in range(tensors)]
    scale = total / sum(weights)
    sizes = [max(1, int(w * scale)) for w in weights]
    diff = total - sum(sizes)
    i = 0
    while diff != 0:
        step = 1 if diff > 0 else -1
        if sizes[i % tensors] + step >= 1:
            sizes[i % tensors] += step
            diff -= step
        i += 1
    shapes = [(f"t{i}", _shape_2d(n)) for i, n in enumerate(sizes)]
    return Workload(
        name=f"{format_size(total)}x{tensors}",
        shapes=shapes,
        description=f"{tensors} equal-ish tensors of about {format_size(int(base))} parameters",
    )


def _shape_2d(n: int) -> tuple[int, ...]:
    """A matrix-like shape of exactly ``n`` elements when a factor near 768 or 64 divides it, else 1-D."""
    for cols in (768, 512, 256, 128, 64):
        if n % cols == 0 and n // cols > 1:
            return (n // cols, cols)
    return (n,)


def transformer_128m_workload(params: int | str | None = None) -> Workload:
    """128M-parameter transformer-shaped set in 196 tensors (16 blocks of width 768, 18176-token vocabulary).

    ``params`` scales the vocabulary and width down (or up) while keeping 16 blocks, so the tensor count stays
    ~200 for quick smoke runs.
    """
    n_layer, n_ctx = 16, 1024
    if params is None:
        d, vocab = 768, 18176
    else:
        target = parse_size(params)
        full = _gpt2_count(n_layer, 768, 18176, n_ctx)
        d = max(8, round(768 * math.sqrt(target / full) / 8) * 8)
        ctx = min(n_ctx, 4 * d)
        vocab = max(8, (target - _gpt2_count(n_layer, d, 0, ctx)) // d)
        n_ctx = ctx
    shapes = gpt2_shapes(n_layer, d, vocab, n_ctx)
    total = sum(math.prod(s) for _, s in shapes)
    return Workload(
        name=f"transformer-{format_size(total)}",
        shapes=shapes,
        description=f"transformer-shaped: {n_layer} layers, width {d}, vocab {vocab}, context {n_ctx}",
    )


def workload_for(params: int | str, tensors: int | None = None) -> Workload:
    """``tensors`` equal-ish tensors when given, otherwise the GPT-2-shaped set scaled to ``params``."""
    if tensors:
        return equal_tensors_workload(params, tensors)
    return gpt2_workload(params)


def make_params(
    workload: Workload,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> list[torch.nn.Parameter]:
    """Allocate the workload's parameters (small random values) with zero ``.grad`` tensors of the same dtype."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for _, shape in workload.shapes:
        data = torch.empty(shape, dtype=torch.float32).uniform_(-0.05, 0.05, generator=gen)
        p = torch.nn.Parameter(data.to(device=device, dtype=dtype))
        p.grad = torch.zeros_like(p)
        params.append(p)
    return params
