"""Where a fusedopt step's time goes on a GPU: AdamW on 1,000 tensors of 1,000 fp32 elements and on the GPT-2-shaped
124M set, fusedopt's CUDA backend beside torch's fused AdamW. For each: the median wall time of a step (synchronised),
the Python functions of fusedopt's step by cumulative time (cProfile), and torch.profiler's host and device tables.

    python bench/profile_cuda.py                  # both sets, about a minute on an H200
    python bench/profile_cuda.py --sets small     # 1,000 small tensors only
Prints to stdout (.ci/gpu's profile stage keeps it as profile.txt). Exits with status 1 without a CUDA device.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from collections.abc import Callable

import fusedopt
import torch
from fusedopt.bench.workloads import Workload, equal_tensors_workload, gpt2_workload, parse_size


def make_params(workload: Workload, device: str) -> list[torch.nn.Parameter]:
    generator = torch.Generator(device=device).manual_seed(0)
    params = []
    for _, shape in workload.shapes:
        p = torch.nn.Parameter(torch.randn(shape, device=device, generator=generator) * 0.02)
        p.grad = torch.randn(shape, device=device, generator=generator) * 1e-3
        params.append(p)
    return params


def median_ms(step: Callable[[], None], steps: int) -> float:
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def profile_set(workload: Workload, steps: int) -> None:
    print(f"\n===== {workload.name}: {workload.numel:,} parameters in {len(workload.shapes)} tensors =====")
    ours_params, torch_params = make_params(workload, "cuda"), make_params(workload, "cuda")
    ours = fusedopt.AdamW(ours_params, lr=1e-3, backend="cuda")
    theirs = torch.optim.AdamW(torch_params, lr=1e-3, fused=True)
    for opt in (ours, theirs):  # first steps: states, flat buffers, device tables
        for _ in range(3):
            opt.step()
    print(f"median ms/step over {steps}: fusedopt {median_ms(ours.step, steps):.3f}, "
          f"torch fused {median_ms(theirs.step, steps):.3f}")

    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        ours.step()
    torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(30)
    print(f"\n--- fusedopt step, Python functions by cumulative time ({steps} steps) ---")
    print(text.getvalue())

    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    for name, opt in (("fusedopt", ours), ("torch fused", theirs)):
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(steps):
                opt.step()
            torch.cuda.synchronize()
        averages = prof.key_averages()
        print(f"\n--- {name}: torch.profiler, host time ({steps} steps) ---")
        print(averages.table(sort_by="self_cpu_time_total", row_limit=20))
        print(f"\n--- {name}: torch.profiler, device time ({steps} steps) ---")
        print(averages.table(sort_by="self_device_time_total", row_limit=12))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="small,gpt2", help="comma list of small (1,000 x 1,000), gpt2 (124M)")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("profile_cuda.py: no CUDA device. Run it on a machine with a GPU.", file=sys.stderr)
        sys.exit(1)
    print(f"fusedopt {fusedopt.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}")
    sets = {"small": lambda: equal_tensors_workload("1M", 1000), "gpt2": lambda: gpt2_workload(parse_size("124M"))}
    for key in [s.strip() for s in args.sets.split(",") if s.strip()]:
        if key not in sets:
            ap.error(f"Invalid set: {key!r} (expected small or gpt2)")
        profile_set(sets[key](), args.steps)


if __name__ == "__main__":
    main()
