"""Thread backends of the CPU kernels side by side, in one process: fusedopt-cpu on the OpenMP runtime torch loaded
(backend "openmp"), on fusedopt's own pool (backend "pool"), optionally other builds of fusedopt._C, and torch's fused
AdamW, interleaved step by step (fusedopt.bench.time_interleaved), over several repetitions.

    python bench/bench_threads.py                          # 1M in 200 tensors and one 32M tensor, 2 threads, 5 reps
    python bench/bench_threads.py --build pool-6915a08=/tmp/build-6915a08/_C.cpython-311-x86_64-linux-gnu.so

--build LABEL=PATH loads another build of fusedopt._C (same Python interface, e.g. an older commit) and runs the
same fusedopt.AdamW with fusedopt._kernels._C swapped to it for that implementation's steps. Printed per workload:
each implementation's median step time per repetition, then the median, min and max over the repetitions of its
ratio to torch fused (time / torch fused time; below 1 is faster) and the speed-up (the inverse of the median
ratio). Nothing is written to bench/results.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import random
import re
import statistics

import torch
from _harness import hb
from fusedopt import _C, _kernels
from fusedopt.bench.workloads import Workload, equal_tensors_workload, make_params, parse_size


def load_build(label: str, path: str):
    """Another build of fusedopt._C as a module of its own (the init function is PyInit__C whatever the package)."""
    name = "_fusedopt_build_" + re.sub(r"\W", "_", label) + "._C"
    loader = importlib.machinery.ExtensionFileLoader(name, path)
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def fusedopt_step(opt, module, backend: str | None):
    def step() -> None:
        previous = _kernels._C
        _kernels._C = module
        if backend is not None:
            module.set_thread_backend(backend)
        try:
            opt.step()
        finally:
            _kernels._C = previous

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5, help="repetitions (each a fresh interleaved run)")
    ap.add_argument("--steps", type=int, default=15, help="measured steps per implementation and repetition")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--clip", type=float, default=None, help="max_grad_norm (torch: clip_grad_norm_ then step)")
    ap.add_argument("--workloads", default="1Mx200,32Mx1", help="comma list of SIZExTENSORS")
    ap.add_argument("--build", action="append", default=[], metavar="LABEL=PATH", help="another _C build to compare")
    args = ap.parse_args()

    builds = []
    for item in args.build:
        label, _, path = item.partition("=")
        if not path:
            ap.error(f"Invalid --build: {item!r} (expected LABEL=PATH)")
        builds.append((label, load_build(label, path)))
    hb.set_threads(args.threads)
    for _, module in builds:
        module.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fusedopt backend now {_C.thread_backend()} "
          f"({_C.build_info()['openmp_runtime'] or 'no OpenMP runtime'}), ISA {_C.cpu_isa()}, clip {args.clip}")

    for text in args.workloads.split(","):
        size, _, tensors = text.strip().partition("x")
        workload: Workload = equal_tensors_workload(parse_size(size), int(tensors or 1))
        labels = ["torch-fused", "fusedopt openmp", "fusedopt pool"] + [f"build {label}" for label, _ in builds]
        ratios: dict[str, list[float]] = {label: [] for label in labels[1:]}
        for rep in range(args.reps):
            # A different order each repetition, for building (where each one's buffers land) and for timing:
            # time_interleaved rotates the order it is given, which keeps each implementation behind the same one in
            # every round, and the one before leaves its threads spinning (the pool's for 50 us, OpenMP's longer) and
            # its data in the caches. At 1M that shifts a step time by several percent, the same way every round.
            order = list(labels)
            random.Random(rep).shuffle(order)
            runners = {}
            for label in order:
                params = make_params(workload, seed=rep)
                impl = "torch-fused" if label == "torch-fused" else "fusedopt-cpu"
                opt, step, _ = hb.build_optimizer(hb.ImplSpec(impl), "adamw", params, clip=args.clip)
                if label == "fusedopt openmp":
                    step = fusedopt_step(opt, _C, "openmp")
                elif label == "fusedopt pool":
                    step = fusedopt_step(opt, _C, "pool")
                elif label.startswith("build "):
                    step = fusedopt_step(opt, dict(builds)[label[6:]], None)
                runners[label] = hb.Runner(hb.ImplSpec(impl), params, opt, step, 0)
            hb.time_interleaved([runners[label] for label in order], workload, steps=args.steps, warmup=args.warmup,
                                seed=rep)
            medians = {label: statistics.median(r.samples_s) for label, r in runners.items()}
            _C.set_thread_backend("openmp")
            line = " | ".join(f"{label} {medians[label] * 1e3:.2f} ms" for label in labels)
            print(f"{workload.name} rep {rep}: {line}", flush=True)
            for label in labels[1:]:
                ratios[label].append(medians[label] / medians["torch-fused"])
            del runners
        print(f"{workload.name}: time / torch fused time, median (min-max) of {args.reps} reps x {args.steps} steps; "
              "speed-up = its inverse")
        for label, values in ratios.items():
            med = statistics.median(values)
            print(f"  {label:24s} {med:.3f} ({min(values):.3f}-{max(values):.3f})  speed-up {1 / med:.2f}x")


if __name__ == "__main__":
    main()
