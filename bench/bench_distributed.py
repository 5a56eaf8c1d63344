"""Step time of fusedopt.AdamW and torch.optim.AdamW inside DDP (default and gradient_as_bucket_view=True) and
FSDP2, on CPU ranks with gloo, measured side by side in one run.

    python bench/bench_distributed.py                       # 2 ranks, 16M parameters, 1 thread per rank
    python bench/bench_distributed.py --params 64M --ranks 2

Two times per implementation: `opt.step()` alone, and the whole iteration (forward, backward with the engine's
communication, step, zero_grad), where an optimizer also pays for what it makes the engine do around the step.
What the step shows: with default DDP, DDP copies the averaged gradients into `.grad` in place, which is fusedopt's
flat buffer, so the step stays one pass; with `gradient_as_bucket_view=True`, `.grad` is DDP's bucket and the step
first copies it into the flat buffer; with FSDP2 the step copies the local parameter and gradient shards in and the
parameter shards out (FSDP owns their storage). Results: bench/results/distributed-cpu-<ranks>r.{json,md}.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "python"))

import fusedopt  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from fusedopt.bench.workloads import parse_size  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

WIDTH = 1024
ENGINES = ("ddp", "ddp-bucket-view", "fsdp2")
IMPLS = ("fusedopt", "torch-foreach", "torch-fused")


def make_model(params: int) -> nn.Module:
    layers = max(1, params // (WIDTH * WIDTH))
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(layers)])


def make_optimizer(impl: str, parameters: Any) -> torch.optim.Optimizer:
    kwargs = dict(lr=1e-4, weight_decay=0.1)
    if impl == "fusedopt":
        return fusedopt.AdamW(parameters, **kwargs)
    return torch.optim.AdamW(parameters, foreach=impl == "torch-foreach", fused=impl == "torch-fused" or None,
                             **kwargs)


def wrap(engine: str, model: nn.Module, world: int) -> nn.Module:
    if engine == "ddp":
        return DistributedDataParallel(model)
    if engine == "ddp-bucket-view":
        return DistributedDataParallel(model, gradient_as_bucket_view=True)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def measure(engine: str, impl: str, params: int, steps: int, world: int) -> tuple[float, float]:
    model = wrap(engine, make_model(params), world)
    opt = make_optimizer(impl, model.parameters())
    x = torch.randn(4, WIDTH)
    step_times, iteration_times = [], []
    for step in range(steps + 3):
        dist.barrier()
        iteration_start = time.perf_counter()
        model(x).square().mean().backward()
        dist.barrier()
        start = time.perf_counter()
        opt.step()
        elapsed = time.perf_counter() - start
        opt.zero_grad()
        if step >= 3:
            step_times.append(elapsed)
            iteration_times.append(time.perf_counter() - iteration_start)
    del model, opt
    return statistics.median(step_times), statistics.median(iteration_times)


def worker(rank: int, world: int, store: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    best: dict[tuple[str, ...], float] = {}
    for _ in range(args.rounds):  # rounds alternate the implementations so drift on a shared machine is shared
        for engine in args.engines.split(","):
            for impl in IMPLS:
                if impl == "torch-fused" and engine == "fsdp2":
                    continue  # torch's fused CPU AdamW does not take DTensor parameters in every release
                t = torch.tensor(measure(engine, impl, args.params, args.steps, world))
                dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step is as slow as its slowest rank
                for key, value in (((engine, impl), t[0]), ((engine, impl, "iteration"), t[1])):
                    best[key] = min(best.get(key, float("inf")), float(value))
    if rank == 0:
        torch.save(best, out)
    # FSDP2's modules keep the process group alive in reference cycles: free them and let every rank finish before
    # the group goes, or a gloo thread may still be working while Python shuts down (which aborts the process).
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=parse_size, default=parse_size("16M"))
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (fusedopt follows them)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma list of {', '.join(ENGINES)}")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    unknown = set(args.engines.split(",")) - set(ENGINES)
    if unknown:
        parser.error(f"Invalid engines: {sorted(unknown)} (expected a comma list of {', '.join(ENGINES)})")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "result.pt")
        mp.start_processes(worker, args=(args.ranks, os.path.join(tmp, "store"), args, result_path),
                           nprocs=args.ranks, start_method="spawn")
        best = torch.load(result_path)
    total = make_model(args.params)
    numel = sum(p.numel() for p in total.parameters())
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    rows = []
    for engine in args.engines.split(","):
        base = best[(engine, "fusedopt")]
        for impl in IMPLS:
            if (engine, impl) in best:
                rows.append({"engine": engine, "impl": impl, "step_ms": best[(engine, impl)] * 1e3,
                             "time_vs_fusedopt": best[(engine, impl)] / base,
                             "iteration_ms": best[(engine, impl, "iteration")] * 1e3,
                             "iteration_vs_fusedopt": best[(engine, impl, "iteration")]
                             / best[(engine, "fusedopt", "iteration")]})
    for row in rows:  # fusedopt's step cost under each engine relative to default DDP (the one-pass step)
        row["vs_ddp_fusedopt"] = row["step_ms"] / (best[("ddp", "fusedopt")] * 1e3) if ("ddp", "fusedopt") in best \
            else float("nan")
    report = {"machine": machine, "ranks": args.ranks, "threads_per_rank": args.threads, "params": numel,
              "params_per_rank_fsdp2": numel // args.ranks, "torch": torch.__version__,
              "fusedopt": fusedopt.__version__, "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"distributed-cpu-{args.ranks}r")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=2)
    lines = [f"# optimizer step inside DDP / FSDP2: {numel / 1e6:.1f}M fp32 parameters, {args.ranks} ranks x "
             f"{args.threads} thread(s), gloo, {machine}", "",
             "| engine | implementation | step (ms, median, slowest rank) | time / fusedopt | time / fusedopt in DDP "
             "| iteration (ms) | iteration / fusedopt |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['engine']} | {row['impl']} | {row['step_ms']:.1f} | {row['time_vs_fusedopt']:.2f} | "
                     f"{row['vs_ddp_fusedopt']:.2f} | {row['iteration_ms']:.1f} | {row['iteration_vs_fusedopt']:.2f} |")
    text = "\n".join(lines) + "\n"
    with open(stem + ".md", "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
