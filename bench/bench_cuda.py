"""GPU benchmark: fusedopt-cuda against torch.optim (fused, foreach, for-loop) and Apex FusedAdam when importable,
on a GPT-2-small-shaped fp32 set (124M parameters, 148 tensors) and on 1,000 small tensors, with the device-to-device
copy bandwidth measured in the same run.

    python bench/bench_cuda.py                  # full run
    python bench/bench_cuda.py --params 10M     # quick check
    python bench/bench_cuda.py --cases family --name cuda-family   # torch's foreach-only algorithms vs foreach
Writes bench/results/<name>-<gpu>.{json,csv,md} (name: cuda unless --name). Exits with status 1 and a message
when there is no CUDA device.
"""

from __future__ import annotations

import argparse
import sys

import torch
from _harness import Case, best_fusedopt, cases_help, hb, parse_cases, run_suite
from fusedopt.bench.workloads import equal_tensors_workload, gpt2_workload, parse_size

kAll = ["adamw", "adamw-clip", "adam", "sgd", "lion", "lamb", "rmsprop"]


def cases_for(workload, which: list[str], dtype: torch.dtype) -> list[Case]:
    out: list[Case] = []
    fo = best_fusedopt("cuda")
    for key in which:
        opt = "adamw" if key == "adamw-clip" else key
        impls = hb.default_impls(opt, "cuda")
        if fo == "fusedopt-reference" and "cuda" not in hb.fusedopt_backends():
            notes = ["fusedopt has no CUDA kernels in this build: fusedopt-reference shown instead"]
        else:
            notes = []
        clip = 1.0 if key == "adamw-clip" else None
        if clip:
            notes.append("fusedopt: max_grad_norm=1.0; others: clip_grad_norm_(params, 1.0) then step")
        title = f"{opt}{' clip 1.0' if clip else ''} / {workload.name}"
        out.append(Case(title, opt, workload, impls, clip=clip, dtype=dtype, notes=notes))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="124M", help="size of the GPT-2-shaped set (default 124M)")
    ap.add_argument("--small-params", default="1M", help="total size of the many-small-tensors set (default 1M)")
    ap.add_argument("--small-tensors", type=int, default=1000, help="tensor count of the small set")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--cases", default=",".join(kAll),
                    help=cases_help(kAll))
    ap.add_argument("--name", default="cuda", help="results file prefix (default cuda)")
    ap.add_argument("--device", default="cuda", help="CUDA device, e.g. cuda:1")
    ap.add_argument("--out-dir", default=None, help="default bench/results")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(
            "bench_cuda.py: no CUDA device (torch.cuda.is_available() is False; torch "
            f"{torch.__version__}, built with CUDA {torch.version.cuda}). Run it on a machine with a GPU.",
            file=sys.stderr,
        )
        sys.exit(1)
    try:
        which = parse_cases(args.cases, kAll)
    except ValueError as e:
        ap.error(str(e))
    try:
        large = gpt2_workload(parse_size(args.params))
        small = equal_tensors_workload(args.small_params, args.small_tensors)
    except ValueError as e:
        ap.error(str(e))
    device = torch.device(args.device)
    if device.type != "cuda":
        ap.error(f"Invalid device: {args.device!r} (expected cuda or cuda:N)")
    if device.index is not None:
        torch.cuda.set_device(device)
    dtype = hb.kDtypes[args.dtype]
    cases = cases_for(large, which, dtype) + cases_for(small, which, dtype)
    kwargs = {"out_dir": args.out_dir} if args.out_dir else {}
    run_suite(args.name, cases, device=args.device, steps=args.steps, warmup=args.warmup, progress=args.progress,
              extra_meta={"bench": "bench_cuda.py"}, **kwargs)


if __name__ == "__main__":
    main()
