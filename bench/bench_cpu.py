"""CPU benchmark of the compiled kernels: fusedopt-cpu against torch.optim (for-loop, foreach, fused) and DeepSpeed
CPU optimizers on a 128M-parameter transformer-shaped set and a 1M-parameter set of 200 tensors, 2 threads.

    python bench/bench_cpu.py                       # full run (the lead's; several minutes, ~14 GB of RAM)
    python bench/bench_cpu.py --params 4M --steps 10  # smoke test in well under a minute
    python bench/bench_cpu.py --cases family --name cpu-family   # torch's foreach-only algorithms vs foreach
Writes bench/results/<name>-<machine>.{json,csv,md} (name: cpu unless --name).
"""

from __future__ import annotations

import argparse

import torch
from _harness import Case, best_fusedopt, cases_help, hb, kFamily, parse_cases, run_suite
from fusedopt.bench.workloads import equal_tensors_workload, parse_size, transformer_128m_workload

kAll = ["adamw", "adamw-clip", "adamw-bf16-states", "adam", "sgd", "rmsprop", "adagrad", "lion", "lamb"]


def cases_for(workload, which: list[str]) -> list[Case]:
    fo = best_fusedopt("cpu")
    out: list[Case] = []
    for key in which:
        if key == "adamw-clip":
            out.append(Case(f"adamw clip 1.0 / {workload.name}", "adamw", workload,
                            hb.default_impls("adamw", "cpu"), clip=1.0,
                            notes=["fusedopt: max_grad_norm=1.0; others: clip_grad_norm_(params, 1.0) then step"]))
        elif key == "adamw-bf16-states":
            impls = [hb.ImplSpec(fo, torch.bfloat16), hb.ImplSpec(fo), hb.ImplSpec("torch-fused")]
            out.append(Case(f"adamw bf16 states / {workload.name}", "adamw", workload, impls,
                            notes=["fp32 parameters; bf16 states move 20 bytes/param instead of 28"]))
        elif key in kFamily:
            out.append(Case(f"{key} / {workload.name}", key, workload, hb.default_impls(key, "cpu", forloop=False)))
        else:
            out.append(Case(f"{key} / {workload.name}", key, workload, hb.default_impls(key, "cpu")))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=None, help="size of the large transformer-shaped set (default 128M)")
    ap.add_argument("--small-params", default="1M", help="size of the many-small-tensors set")
    ap.add_argument("--small-tensors", type=int, default=200, help="tensor count of the small set")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=15, help="measured steps per implementation (>= 10 for reports)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cases", default=",".join(kAll),
                    help=cases_help(kAll))
    ap.add_argument("--name", default="cpu", help="results file prefix (default cpu)")
    ap.add_argument("--skip-large", action="store_true", help="only the small set")
    ap.add_argument("--out-dir", default=None, help="default bench/results")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    args = ap.parse_args()
    try:
        which = parse_cases(args.cases, kAll)
    except ValueError as e:
        ap.error(str(e))
    try:
        large = transformer_128m_workload(parse_size(args.params) if args.params else None)
        small = equal_tensors_workload(args.small_params, args.small_tensors)
    except ValueError as e:
        ap.error(str(e))
    hb.set_threads(args.threads)
    cases = [] if args.skip_large else cases_for(large, which)
    cases += cases_for(small, which)
    kwargs = {"out_dir": args.out_dir} if args.out_dir else {}
    run_suite(args.name, cases, device="cpu", steps=args.steps, warmup=args.warmup, progress=args.progress,
              extra_meta={"bench": "bench_cpu.py"}, **kwargs)


if __name__ == "__main__":
    main()
