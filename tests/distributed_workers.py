"""Training loops run inside the ranks of tests/test_distributed.py (2 ranks, gloo, CPU), and their single-process
counterparts. Each distributed scenario saves the full parameters after every run; the test compares them with a
single-process run of torch.optim (or of fusedopt's reference backend where torch.optim lacks the algorithm) on the
same data."""
from __future__ import annotations

import gc
import os
from collections.abc import Callable
from typing import Any

import fusedopt
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from cases import EXAMPLE, TABLE
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

STEPS = 20
GLOBAL_BATCH = 8
IN, HIDDEN, OUT = 16, 33, 5  # 33 rows: FSDP2 shards them unevenly (17 + 16) across 2 ranks


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(IN, HIDDEN), nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, OUT)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = torch.tanh(layer(x))
        return self.layers[-1](x)


def make_model() -> MLP:
    torch.manual_seed(0)
    return MLP()


class FactoredNet(nn.Module):
    """Shards that factored second moments must combine: a Conv1d weight (5, 4, 3) split 3 + 2 along its leading
    dimension, and a Linear weight (1, 30) whose single row lives on rank 0 (rank 1 holds none, but keeps the column
    factors in step)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 5, 3)
        self.head = nn.Linear(30, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def make_factored_model() -> FactoredNet:
    torch.manual_seed(0)
    return FactoredNet()


def make_factored_data(steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(2)
    return [(torch.randn(GLOBAL_BATCH, 4, 8, generator=generator), torch.randn(GLOBAL_BATCH, 1, generator=generator))
            for _ in range(steps)]


def factored_single_process_run(steps: int = STEPS) -> dict[str, torch.Tensor]:
    """torch.optim.Adafactor on the whole batch: the oracle of the sharded FactoredNet run."""
    model = make_factored_model()
    opt = torch.optim.Adafactor(model.parameters(), **ADAFACTOR_KWARGS)
    for x, y in make_factored_data(steps):
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def muon_groups(model: nn.Module) -> list[dict[str, Any]]:
    """The whole-model recipe on the MLP: its weights (33x16, 33x33, 5x33) to Muon, its biases to AdamW."""
    params = list(model.parameters())
    return [{"params": [p for p in params if p.dim() == 2]},
            {"params": [p for p in params if p.dim() != 2], "use_muon": False, "lr": 3e-3}]


MUON_KWARGS = {"lr": 0.02, "weight_decay": 0.1}


def muon_single_process_run(steps: int = STEPS) -> dict[str, torch.Tensor]:
    """fusedopt.Muon on the whole batch in one process: the oracle of the sharded run."""
    model = make_model()
    opt = fusedopt.Muon(muon_groups(model), **MUON_KWARGS)
    for x, y in make_data(steps):
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def make_data(steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, IN, generator=generator), torch.randn(GLOBAL_BATCH, OUT, generator=generator))
            for _ in range(steps)]


# name -> (fusedopt class, kwargs): every class in the minimising case of its table that combines most modes, and the
# example optimizer with clipping (CLIP) and without (EXAMPLE.name: what the scenarios that need one optimizer use).
# `oracle_optimizer` picks the single-process counterpart.
EXAMPLE_KWARGS = {"lr": 1e-2, "weight_decay": 0.1}
ADAFACTOR_KWARGS = dict(TABLE[fusedopt.Adafactor].descent_cases()[-1].kwargs)
CLIP = f"{EXAMPLE.name}-clip"
EIGHT_BIT = f"{EXAMPLE.name}-8bit"
OPTIMIZERS: dict[str, tuple[type, dict[str, Any]]] = {
    **{row.name: (row.cls, dict(row.descent_cases()[-1].kwargs)) for row in TABLE.values() if row is not EXAMPLE},
    EXAMPLE.name: (EXAMPLE.cls, EXAMPLE_KWARGS),
    CLIP: (EXAMPLE.cls, {**EXAMPLE_KWARGS, "max_grad_norm": 0.5}),
}
# The checkpoint scenarios also run the example with 8-bit states (no single-process oracle: it rounds its states).
CHECKPOINT_OPTIMIZERS = {**OPTIMIZERS, EIGHT_BIT: (EXAMPLE.cls, {**EXAMPLE_KWARGS, "state_dtype": "8bit"})}


def oracle_optimizer(name: str, params: Any) -> torch.optim.Optimizer:
    """torch.optim where it has the algorithm; fusedopt's reference backend (torch formulas) otherwise."""
    cls, kwargs = OPTIMIZERS[name]
    kwargs = {k: v for k, v in kwargs.items() if k != "max_grad_norm"}
    row = TABLE[cls]
    if row.torch_cls is not None:
        return row.torch_cls(params, **kwargs)
    return cls(params, backend="reference", **kwargs)


def single_process_run(name: str, steps: int = STEPS) -> dict[str, torch.Tensor]:
    """The whole global batch on one process; the oracle optimizer; clip_grad_norm_ when the case clips."""
    model = make_model()
    opt = oracle_optimizer(name, model.parameters())
    max_norm = OPTIMIZERS[name][1].get("max_grad_norm")
    for x, y in make_data(steps):
        nn.functional.mse_loss(model(x), y).backward()
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# Inside a rank ---------------------------------------------------------------------------------------------------

def local_batch(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    per_rank = x.shape[0] // world
    return x[rank * per_rank:(rank + 1) * per_rank]


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as a whole tensor on every rank (gathers DTensor shards)."""
    result = {}
    for name, value in model.state_dict().items():
        name = name.replace("module.", "")
        result[name] = (value.full_tensor() if isinstance(value, DTensor) else value).detach().clone()
    return result


def full_states(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's state_dict tensors (torch.optim's layout) as whole tensors, by "parameter index/state name"."""
    result = {}
    for index, entry in opt.state_dict()["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                result[f"{index}/{key}"] = (value.full_tensor() if isinstance(value, DTensor) else value).clone()
    return result


def train(model: nn.Module, opt: torch.optim.Optimizer, data: list[tuple[torch.Tensor, torch.Tensor]], rank: int,
          world: int, after_backward: Callable[[], None] | None = None) -> None:
    for x, y in data:
        loss = nn.functional.mse_loss(model(local_batch(x, rank, world)), local_batch(y, rank, world))
        loss.backward()
        if after_backward is not None:
            after_backward()
        opt.step()
        opt.zero_grad()


def fsdp_model(mp_policy: MixedPrecisionPolicy | None = None, world: int = 2) -> nn.Module:
    model = make_model()
    mesh = init_device_mesh("cpu", (world,))
    kwargs = {"mesh": mesh} if mp_policy is None else {"mesh": mesh, "mp_policy": mp_policy}
    for layer in model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def run_ddp(rank: int, world: int, results: dict[str, Any]) -> None:
    data = make_data()
    for name, (cls, kwargs) in OPTIMIZERS.items():
        model = DistributedDataParallel(make_model())
        train(model, cls(model.parameters(), **kwargs), data, rank, world)
        results[f"ddp/{name}"] = full_state(model)
    model = DistributedDataParallel(make_model(), gradient_as_bucket_view=True)
    train(model, EXAMPLE.cls(model.parameters(), **EXAMPLE_KWARGS), data, rank, world)
    results["ddp_bucket_view/example"] = full_state(model)


def run_zero(rank: int, world: int, results: dict[str, Any]) -> None:
    data = make_data()
    model = DistributedDataParallel(make_model())
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=EXAMPLE.cls, **EXAMPLE_KWARGS)
    train(model, opt, data, rank, world)
    results["zero/example"] = full_state(model)
    opt.consolidate_state_dict(to=0)
    if rank == 0:
        state = opt.state_dict()
        results["zero/state_steps"] = sorted({float(s["step"]) for s in state["state"].values()})


def run_fsdp(rank: int, world: int, results: dict[str, Any]) -> None:
    data = make_data()
    for name, (cls, kwargs) in OPTIMIZERS.items():
        model = fsdp_model()
        opt = cls(model.parameters(), **kwargs)
        train(model, opt, data, rank, world)
        results[f"fsdp/{name}"] = full_state(model)
        if name == CLIP:
            results["fsdp/clip/last_grad_norm"] = opt.last_grad_norm
        if name == EXAMPLE.name:  # states are DTensors placed like their parameters
            state = opt.state[next(model.parameters())]
            results["fsdp/state_types"] = sorted({type(v).__name__ for v in state.values()})
            results["fsdp/first_state"] = state[EXAMPLE.state_names(EXAMPLE_KWARGS)[0]].full_tensor().clone()

    # Adafactor's factors across shards of a leading dimension and of rows, including a shard without rows.
    model = make_factored_model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in (model.conv, model.head):
        fully_shard(layer, mesh=mesh)
    opt = fusedopt.Adafactor(model.parameters(), **ADAFACTOR_KWARGS)
    train(model, opt, make_factored_data(), rank, world)
    results["fsdp_factored/model"] = full_state(model)
    results["fsdp_factored/head_col_var"] = opt.state[model.head.weight]["col_var"].full_tensor().clone()
    # Columns split across ranks: the factors could not be combined, so the optimizer is refused.
    split_columns = nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)]))
    try:
        fusedopt.Adafactor([split_columns])
    except NotImplementedError as error:
        results["fsdp_factored/refused"] = str(error)

    # Muon: each row-sharded weight is assembled on one rank, orthogonalized there and scattered back.
    model = fsdp_model()
    opt = fusedopt.Muon(muon_groups(model), **MUON_KWARGS)
    train(model, opt, data, rank, world)
    results["fsdp_muon/model"] = full_state(model)
    results["fsdp_muon/bytes"] = opt.last_orthogonalize_bytes
    results["fsdp_muon/state_types"] = sorted({type(v).__name__ for v in opt.state[model.layers[1].weight].values()})

    # Mixed precision (bf16 compute, fp32 reduce): fusedopt and torch.optim under the same FSDP2 engine.
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for label, make_opt in (("fusedopt", lambda ps: EXAMPLE.cls(ps, **OPTIMIZERS[CLIP][1])),
                            ("torch", lambda ps: oracle_optimizer(EXAMPLE.name, ps))):
        model = fsdp_model(policy)
        opt = make_opt(model.parameters())
        clip = None if label == "fusedopt" else (lambda m=model: torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5))
        train(model, opt, data, rank, world, after_backward=clip)
        results[f"fsdp_bf16/{label}"] = full_state(model)

    # fusedopt.clip_grad_norm_ on DTensor gradients against torch's on clones of the same gradients.
    model = fsdp_model()
    x, y = data[0]
    nn.functional.mse_loss(model(local_batch(x, rank, world)), local_batch(y, rank, world)).backward()
    params = list(model.parameters())
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, twin in zip(params, twins):
        twin.grad = p.grad.detach().clone()
    ours = fusedopt.clip_grad_norm_(params, 0.1)
    theirs = torch.nn.utils.clip_grad_norm_(twins, 0.1)
    results["clip/norms"] = (float(ours), float(theirs.full_tensor() if isinstance(theirs, DTensor) else theirs))
    results["clip/grads"] = [(p.grad.full_tensor().clone(), t.grad.full_tensor().clone())
                             for p, t in zip(params, twins)]


def run_checkpoint(rank: int, world: int, results: dict[str, Any], directory: str, phase: str,
                   name: str = CLIP) -> None:
    """Train on `world` ranks with FSDP2 + optimizer `name` of CHECKPOINT_OPTIMIZERS (default: the example with
    clipping), saving and loading with torch.distributed.checkpoint.

    phase "save2": steps 0-9, save, steps 10-19. phase "load1": load the 2-rank checkpoint, steps 10-14, save,
    steps 15-19. phase "load2": load the 1-rank checkpoint, steps 15-19.
    """
    data = make_data()
    model = fsdp_model(world=world)
    cls, kwargs = CHECKPOINT_OPTIMIZERS[name]
    opt = cls(model.parameters(), **kwargs)

    def save(name: str) -> None:
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(directory, name))

    def load(name: str) -> None:
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=os.path.join(directory, name))
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])

    if phase == "save2":
        train(model, opt, data[:10], rank, world)
        save("ckpt2")
        results["save2/states"] = full_states(opt)
        train(model, opt, data[10:], rank, world)
    elif phase == "load1":
        load("ckpt2")
        results["load1/step"] = float(opt.state[next(model.parameters())]["step"])
        results["load1/states"] = full_states(opt)
        train(model, opt, data[10:15], rank, world)
        save("ckpt1")
        train(model, opt, data[15:], rank, world)
    else:
        load("ckpt1")
        train(model, opt, data[15:], rank, world)
    results[f"checkpoint/{phase}"] = full_state(model)


def worker(rank: int, world: int, store_path: str, out_dir: str, scenarios: list[str]) -> None:
    """Entry point of one rank: run `scenarios`, save what rank 0 (or every rank) observed."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        results: dict[str, Any] = {}
        for scenario in scenarios:
            kind, _, arg = scenario.partition(":")
            if kind == "ddp":
                run_ddp(rank, world, results)
            elif kind == "zero":
                run_zero(rank, world, results)
            elif kind == "fsdp":
                run_fsdp(rank, world, results)
            elif kind == "checkpoint":  # checkpoint:PHASE or checkpoint:PHASE:OPTIMIZER
                phase, _, name = arg.partition(":")
                run_checkpoint(rank, world, results, out_dir, phase, name or CLIP)
            else:
                raise ValueError(f"unknown scenario {scenario!r}")
        torch.save(results, os.path.join(out_dir, f"{'-'.join(scenarios)}.rank{rank}.pt"))
    finally:
        shut_down()


def shut_down() -> None:
    """End a rank's process group. The models and optimizers are freed first (FSDP2's modules sit in reference cycles
    that hold the group) and every rank finishes its collectives: otherwise the group outlives
    destroy_process_group, and a gloo thread finishing a collective while Python shuts down aborts the process
    ("terminate called without an active exception"; torch.optim's AdamW in 2 of 24 runs here)."""
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
