"""The ranks of tests/test_sam.py's FSDP2 test (2 ranks, gloo, CPU) and its single-process counterpart: SAM and ASAM
over fusedopt optimizers on the model and data of tests/distributed_workers.py."""
from __future__ import annotations

import os
from typing import Any

import fusedopt
import torch
import torch.distributed as dist
from distributed_workers import fsdp_model, full_state, local_batch, make_data, make_model, shut_down
from torch import nn

STEPS = 5
# name -> (base class, base kwargs, SAM kwargs)
SCENARIOS: dict[str, tuple[type, dict[str, Any], dict[str, Any]]] = {
    "sam-sgd": (fusedopt.SGD, {"lr": 0.05, "momentum": 0.9}, {"rho": 0.1}),
    "asam-adamw-clip": (fusedopt.AdamW, {"lr": 1e-2, "weight_decay": 0.1, "max_grad_norm": 0.5},
                        {"rho": 0.5, "adaptive": True}),
}


def train(model: nn.Module, name: str, rank: int, world: int) -> None:
    cls, kwargs, sam_kwargs = SCENARIOS[name]
    sam = fusedopt.SAM(cls(model.parameters(), **kwargs), **sam_kwargs)
    for x, y in make_data(STEPS):
        x, y = local_batch(x, rank, world), local_batch(y, rank, world)
        nn.functional.mse_loss(model(x), y).backward()
        sam.first_step(zero_grad=True)
        nn.functional.mse_loss(model(x), y).backward()
        sam.second_step(zero_grad=True)


def single_process(name: str) -> dict[str, torch.Tensor]:
    model = make_model()
    train(model, name, 0, 1)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def worker(rank: int, world: int, store_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        results = {}
        for name in SCENARIOS:
            model = fsdp_model(world=world)
            train(model, name, rank, world)
            results[name] = full_state(model)
        torch.save(results, os.path.join(out_dir, f"sam.rank{rank}.pt"))
    finally:
        shut_down()
