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
    """The quintic Newton-Schulz iteration of torch.optim.Muon on a batch of bfloat16 matrices (n, rows, cols),
    normalized to Frobenius norm 1 first: X <- a X + (b A + c A^2) X with A = X X^T. torch runs it on the transpose of
    a tall matrix; here a tall one runs the same iteration from the right, X <- a X + X (b A + c A^2) with
    A = X^T X, which is that transposed iteration (A is symmetric) without copying any transpose: the same products,
    and on this CPU the same bits, in about half the time. Returns the result (bfloat16)."""
    a, b, c = coefficients
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    if x.shape[-2] <= x.shape[-1]:
        for _ in range(steps):
            gram = torch.bmm(x, x.mT)
            gram_update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.baddbmm(x, gram_update, x, beta=a)
    else:
        for _ in range(steps):
            gram = torch.bmm(x.mT, x)
            gram_update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.baddbmm(x, x, gram_update, beta=a)
    return x


def orthogonalize_(matrices: Sequence[Tensor], coefficients: Sequence[float], steps: int, eps: float) -> None:
    """Replace each stack of matrices (a tensor of shape (n, rows, cols)) by its orthogonalization, matrix by matrix,
    as torch.optim.Muon computes it: in bfloat16 (`newton_schulz`). Matrices of one shape run as one batch (in chunks
    of BATCH_ELEMENTS)."""
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
    x = torch.empty(count, *batch[0].shape[-2:], dtype=torch.bfloat16, device=batch[0].device)
    at = 0
    for part in batch:
        x[at:at + part.shape[0]].copy_(part)
        at += part.shape[0]
    x = newton_schulz(x, coefficients, steps, eps)
    at = 0
    for part in batch:
        part.copy_(x[at:at + part.shape[0]])
        at += part.shape[0]


def orthogonalize_sharded_(pieces: Sequence[tuple[Tensor, Tensor]], coefficients: Sequence[float], steps: int,
                           eps: float) -> int:
    """Orthogonalize matrices whose rows are sharded (FSDP2's Shard(0) on one mesh dimension). `pieces` holds, for
    each matrix in the same order on every rank, its parameter (a DTensor) and this rank's rows of its update, shaped
    like the local shard. Matrix j is assembled on rank j % world of its shard group, orthogonalized there with the
    other matrices that rank assembled (batched by shape), and its rows sent back: two all-to-alls of bfloat16 rows
    (padded to the shard size) per group and step, whatever the number of matrices. A 3-D stack sharded by its first
    dimension holds whole matrices on each rank and is orthogonalized where it lies. Returns the bytes this rank sent
    to and received from other ranks."""
    local_stacks: list[Tensor] = []
    # id(group) -> (group, [(update, rows, cols, chunk)])
    by_group: dict[int, tuple[Any, list[tuple[Tensor, int, int, int]]]] = {}
    for p, update in pieces:
        placements = [pl for pl in p.placements if pl.is_shard()] if is_dtensor(p) else []
        if p.dim() == 3 or not placements:
            local_stacks.append(update.reshape(-1, update.shape[-2], update.shape[-1]))
            continue
        group = p.device_mesh.get_group(next(d for d, pl in enumerate(p.placements) if pl.is_shard()))
        rows, cols = p.shape
        chunk = -(-rows // dist.get_world_size(group))  # torch.chunk's shard size; the last shards may be shorter
        by_group.setdefault(id(group), (group, []))[1].append((update, rows, cols, chunk))
    orthogonalize_(local_stacks, coefficients, steps, eps)
    return sum(_orthogonalize_across(group, matrices, coefficients, steps, eps)
               for group, matrices in by_group.values())


def _orthogonalize_across(group: Any, matrices: list[tuple[Tensor, int, int, int]], coefficients: Sequence[float],
                          steps: int, eps: float) -> int:
    """`orthogonalize_sharded_` over one process group: matrix j is owned by rank j % world."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    owned = [[j for j in range(len(matrices)) if j % world == r] for r in range(world)]
    block = [chunk * cols for _, _, cols, chunk in matrices]  # one rank's padded rows of matrix j
    device = matrices[0][0].device
    # Out: to each owner, this rank's rows of the matrices it owns, in order.
    send = torch.zeros(sum(block), dtype=torch.bfloat16, device=device)
    at = 0
    for r in range(world):
        for j in owned[r]:
            update, _, cols, chunk = matrices[j]
            send[at:at + update.numel()].copy_(update.reshape(-1))
            at += block[j]
    send_splits = [sum(block[j] for j in owned[r]) for r in range(world)]
    recv_splits = [send_splits[rank]] * world
    received = torch.empty(sum(recv_splits), dtype=torch.bfloat16, device=device)
    dist.all_to_all_single(received, send, recv_splits, send_splits, group=group)
    # Assemble the owned matrices: source rank r's block of matrix j holds rows [r * chunk, (r + 1) * chunk).
    mine = received.view(world, send_splits[rank])
    wholes = []
    at = 0
    for j in owned[rank]:
        _, rows, cols, chunk = matrices[j]
        wholes.append(mine[:, at:at + block[j]].reshape(world * chunk, cols)[:rows])
        at += block[j]
    results = [w.contiguous().unsqueeze(0) for w in wholes]
    orthogonalize_(results, coefficients, steps, eps)
    # Back: each rank's rows of every owned matrix, in the layout it sent them.
    at = 0
    for j, result in zip(owned[rank], results):
        _, rows, cols, chunk = matrices[j]
        padded = torch.zeros(world * chunk, cols, dtype=torch.bfloat16, device=device)
        padded[:rows].copy_(result[0])
        mine[:, at:at + block[j]].copy_(padded.view(world, chunk * cols))
        at += block[j]
    returned = torch.empty_like(send)
    dist.all_to_all_single(returned, received, send_splits, recv_splits, group=group)
    at = 0
    for r in range(world):
        for j in owned[r]:
            update = matrices[j][0]
            update.copy_(returned[at:at + update.numel()].view(update.shape))
            at += block[j]
    element = send.element_size()
    return element * (sum(send_splits) - send_splits[rank] + sum(recv_splits) - recv_splits[rank]) * 2
