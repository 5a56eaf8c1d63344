"""DTensor (FSDP2) helpers shared by flat storage, the step's norms and clip_grad_norm_: local shards, the process
groups a parameter is sharded over, and all-reduces of per-rank sums on the tensors' own device."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

if torch.distributed.is_available():
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
else:  # a torch build without distributed support has no DTensor parameters
    dist = None  # type: ignore[assignment]
    DTensor = ()  # type: ignore[assignment,misc]


def is_dtensor(t: Tensor) -> bool:
    return isinstance(t, DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """The tensor whose memory holds `t` on this rank: a DTensor's local shard, else `t` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def shard_groups(t: Tensor) -> list[Any]:
    """The process groups a DTensor is sharded across (one per sharded mesh dimension); [] for a plain tensor."""
    if not isinstance(t, DTensor):
        return []
    return [t.device_mesh.get_group(d) for d, placement in enumerate(t.placements) if placement.is_shard()]


def sharding_key(p: Tensor) -> Any:
    """Parameters of one flat buffer set share device, dtype and (for DTensors) mesh and placements."""
    return (p.device_mesh, tuple(p.placements)) if isinstance(p, DTensor) else None


def all_reduce_sum(sums: Tensor, groups: Sequence[Any]) -> None:
    """Sum `sums` in place over each of `groups` in turn: per-rank sums of squares become whole-tensor sums. `sums`
    stays on its device (with NCCL-only process groups a CPU tensor cannot be all-reduced)."""
    for group in groups:
        dist.all_reduce(sums, group=group)


def state_as_dtensor(view: Tensor, p: Tensor, shape: torch.Size | None = None) -> Tensor:
    """A state region as a DTensor placed like `p` (what DCP reshards): shaped like `p`'s local shard, or a state of
    whole shape `shape` (a factor of `p`), sharded where it has `p`'s size along the sharded dimension and replicated
    where it does not (a column factor of a matrix whose rows are sharded)."""
    if shape is None:
        return DTensor.from_local(view, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                  stride=p.stride())
    from torch.distributed.tensor import Replicate  # noqa: PLC0415
    placements = [pl if not pl.is_shard() or shape[pl.dim] == p.shape[pl.dim] else Replicate()
                  for pl in p.placements]
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(view, p.device_mesh, placements, run_check=False, shape=shape, stride=stride)


def shard_offset(p: Tensor) -> tuple[int, ...]:
    """Where this rank's shard of `p` starts in the whole tensor (zeros for a plain tensor)."""
    if not isinstance(p, DTensor):
        return (0,) * p.dim()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset  # noqa: PLC0415
    return tuple(compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)[1])


def local_values(value: Tensor, p: Tensor) -> Tensor:
    """A loaded state tensor as this rank's part of `p` (a parameter, or a state placed its own way, such as a
    replicated column factor): a DTensor is redistributed like `p`."""
    if is_dtensor(value):
        if not is_dtensor(p):
            return value.full_tensor()
        return value.redistribute(p.device_mesh, p.placements).to_local()
    if is_dtensor(p):
        if value.numel() == p.numel():  # a whole (unsharded) tensor: keep this rank's shard of it
            from torch.distributed.tensor import distribute_tensor
            return distribute_tensor(value.reshape(p.shape).to(p.device), p.device_mesh, p.placements,
                                     src_data_rank=None).to_local()
    return value
