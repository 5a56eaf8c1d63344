"""Muon's orthogonalization: the Newton-Schulz iteration of torch.optim.Muon (Jordan et al. 2024), batched over every
matrix of one shape with `torch.bmm`, in bfloat16 as torch runs it, and its FSDP2 form, where each whole matrix is
assembled on one rank, orthogonalized there, and its rows sent back. The element-wise parts of the step are kernels
(math/muon.h); this module is the only torch arithmetic of a Muon step."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._distributed import dist, is_dtensor

# Matrices of one shape are orthogonalized in batches of at most this many elements, which bounds the bf16 copies and
# the iteration's temporaries (about four times the batch) whatever the model's size.
BATCH_ELEMENTS = 1 << 26


def newton_schulz(x: Tensor, coefficients: Sequence[float], steps: int, eps: float) -> Tensor:
    """The quintic Newton-Schulz iteration on a batch of bfloat16 matrices (n, rows, cols) with rows <= cols,
    normalized to Frobenius norm 1 first: X <- a X + (b A + c A^2) X, A = X X^T. Returns the result (bfloat16)."""
    a, b, c = coefficients
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        gram_update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, gram_update, x, beta=a)
    return x


def orthogonalize_(matrices: Sequence[Tensor], coefficients: Sequence[float], steps: int, eps: float) -> None:
    """Replace each stack of matrices (a tensor of shape (n, rows, cols)) by its orthogonalization, matrix by matrix,
    as torch.optim.Muon computes it: in bfloat16, on the transpose of a tall matrix. Matrices of one shape run as one
    batch (in chunks of BATCH_ELEMENTS)."""
    by_shape: dict[tuple[int, int], list[Tensor]] = defaultdict(list)
    for m in matrices:
        if m.numel():
            by_shape[(m.shape[-2], m.shape[-1])].append(m)
    for (rows, cols), group in by_shape.items():
        per_batch = max(1, BATCH_ELEMENTS // (rows * cols))
        slices = [m[k:k + per_batch] for m in group for k in range(0, m.shape[0], per_batch)]
        batch: list[Tensor] = []
        count = 0
        for s in slices:
            if count + s.shape[0] > per_batch:
                _orthogonalize_batch(batch, count, coefficients, steps, eps)
                batch, count = [], 0
            batch.append(s)
            count += s.shape[0]
        _orthogonalize_batch(batch, count, coefficients, steps, eps)


def _orthogonalize_batch(batch: list[Tensor], count: int, coefficients: Sequence[float], steps: int, eps: float
                         ) -> None:
    """One bmm chain over `count` matrices of one shape, copied from and back into the stacks of `batch`."""
    rows, cols = batch[0].shape[-2:]
    tall = rows > cols
    x = torch.empty(count, min(rows, cols), max(rows, cols), dtype=torch.bfloat16, device=batch[0].device)
    at = 0
    for part in batch:
        x[at:at + part.shape[0]].copy_(part.mT if tall else part)
        at += part.shape[0]
    x = newton_schulz(x, coefficients, steps, eps)
    at = 0
    for part in batch:
        part.copy_(x[at:at + part.shape[0]].mT if tall else x[at:at + part.shape[0]])
        at += part.shape[0]


def orthogonalize_sharded_(pieces: Sequence[tuple[Tensor, Tensor]], coefficients: Sequence[float], steps: int,
                           eps: float) -> int:
    """Orthogonalize matrices whose rows are sharded (FSDP2's Shard(0) on one mesh dimension). `pieces` holds, for
    each matrix in the same order on every rank, its parameter (a DTensor) and this rank's rows of its update, shaped
    like the local shard. Matrix j is assembled on rank j % world of the shard group (rows gathered in bfloat16,
    padded to the chunk size), orthogonalized there with the other matrices that rank assembled (batched by shape),
    and its rows scattered back. A 3-D stack sharded by its first dimension holds whole matrices on each rank and is
    orthogonalized where it lies. Returns the bytes this rank sent and received."""
    local_stacks: list[Tensor] = []
    gathered: list[tuple[Tensor, Tensor, Any, int, int, int]] = []  # (update, padded, group, owner, rows, chunk)
    for p, update in pieces:
        placements = [pl for pl in p.placements if pl.is_shard()] if is_dtensor(p) else []
        if p.dim() == 3 or not placements:
            local_stacks.append(update.reshape(-1, update.shape[-2], update.shape[-1]))
            continue
        mesh_dim = next(d for d, pl in enumerate(p.placements) if pl.is_shard())
        group = p.device_mesh.get_group(mesh_dim)
        world = dist.get_world_size(group)
        rows = p.shape[0]
        chunk = -(-rows // world)
        gathered.append((update, update.new_zeros(chunk, p.shape[1], dtype=torch.bfloat16), group,
                         len(gathered) % world, rows, chunk))
    orthogonalize_(local_stacks, coefficients, steps, eps)
    if not gathered:
        return 0
    traffic = 0
    mine: list[tuple[int, Tensor]] = []
    for j, (update, padded, group, owner, rows, _) in enumerate(gathered):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        padded[:update.shape[0]].copy_(update)
        parts = [torch.empty_like(padded) for _ in range(world)] if rank == owner else None
        dist.gather(padded, parts, dst=dist.get_global_rank(group, owner), group=group)
        if rank == owner:
            mine.append((j, torch.cat(parts)[:rows]))  # type: ignore[arg-type]
            traffic += (world - 1) * padded.numel() * padded.element_size()
        else:
            traffic += padded.numel() * padded.element_size()
    orthogonalize_([whole.unsqueeze(0) for _, whole in mine], coefficients, steps, eps)
    results = dict(mine)
    for j, (update, padded, group, owner, rows, chunk) in enumerate(gathered):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        parts = None
        if rank == owner:
            whole = results[j]
            whole = torch.cat([whole, whole.new_zeros(chunk * world - rows, whole.shape[1])])
            parts = list(whole.split(chunk))
            traffic += (world - 1) * padded.numel() * padded.element_size()
        else:
            traffic += padded.numel() * padded.element_size()
        dist.scatter(padded, parts, src=dist.get_global_rank(group, owner), group=group)
        update.copy_(padded[:update.shape[0]])
    return traffic
