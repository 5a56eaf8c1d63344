"""The ``fusedopt`` console script: ``fusedopt bench`` (fusedopt vs torch.optim on this machine), ``fusedopt info``
and ``fusedopt --version``.

Exit status: 0 success, 2 bad arguments, 3 the requested size does not fit in memory (checked before allocating).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

kExitUsage = 2
kExitMemory = 3
kSweepStart = 1_000_000
# CPU: 32M parameters keep the default run under a minute and ~2.5 GB of memory with three implementations side by
# side; a GPU has the memory and speed for GPT-2 small's 124M.
kDefaultParams = {"cpu": "32M", "cuda": "124M"}
kQuickParams = "1M"


def default_results_path(prefix: str = "bench") -> str:
    """Where results go unless --json names a file: the user's cache folder, never the current directory."""
    import datetime as dt

    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join(cache, "fusedopt", "bench", f"{prefix}-{stamp}.json")


# The harness (fusedopt.bench) is imported inside the bench command's argument parsers and body only, so that
# `fusedopt info` and `import fusedopt.cli` never load it.

def _size_arg(text: str) -> int:
    from .bench.workloads import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"Invalid {name}: {text!r} (expected an integer)") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"Invalid {name}: {value} (must be positive)")
        return value

    return parse


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"Invalid warmup: {text!r} (expected an integer)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"Invalid warmup: {value} (must be >= 0)")
    return value


def _clip_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"Invalid clip: {text!r} (expected a number)") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"Invalid clip: {value} (must be a positive finite max norm)")
    return value


def _optimizer_arg(text: str) -> list[str]:
    from .bench.registry import OPTIMIZERS

    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return list(OPTIMIZERS)
    bad = [n for n in names if n not in OPTIMIZERS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"Invalid optimizer: {','.join(bad) or text!r} (expected a comma list of {', '.join(OPTIMIZERS)} or all)"
        )
    return list(dict.fromkeys(names))


def _impls_arg(text: str) -> list:
    from .bench.registry import ImplSpec

    try:
        return [ImplSpec.parse(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _modes_arg(text: str) -> list:
    from .bench.memory import parse_modes

    try:
        return parse_modes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = argparse.ArgumentParser(
        prog="fusedopt", description="fusedopt: fused optimizer kernels for PyTorch (benchmarks and build info)."
    )
    parser.add_argument("--version", action="version", version=f"fusedopt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{bench,info}")
    sub.required = True

    b = sub.add_parser(
        "bench",
        help="time fusedopt against torch.optim on this machine",
        description="Time one optimizer step of fusedopt against every torch.optim implementation "
        "(for-loop, foreach, fused) and DeepSpeed/Apex when importable, interleaved, on fresh random gradients. "
        "Prints a table and writes JSON + CSV.",
    )
    b.add_argument("--optimizer", type=_optimizer_arg, default=["adamw"],
                   help="comma list of optimizer names, or all (default: adamw). muon steps matrices only: it "
                   "runs on the 2-D tensors of the sets that --params/--tensors/--quick/--sweep choose (1-D tensors "
                   "are dropped, embeddings kept), and without those options on 24 GPT-2-like block matrices of width "
                   "256 (6 blocks of qkv 768x256, projection 256x256, MLP 1024x256 and 256x1024: 4.7M parameters); "
                   "torch.optim.Muon has one implementation, run as torch-forloop")
    b.add_argument("--params", type=_size_arg, default=None,
                   help=f"parameter count, e.g. 1M, 10M, 124M, 350M, 1B (default: {kDefaultParams['cpu']} on "
                        f"CPU, {kDefaultParams['cuda']} on a GPU, {kQuickParams} with --quick)")
    b.add_argument("--tensors", type=_positive_int("tensors"), default=None,
                   help="split the parameters into N equal-ish tensors instead of the GPT-2-shaped set")
    b.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="parameter and gradient dtype (default: fp32)")
    b.add_argument("--state-dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="fusedopt optimizer-state dtype (default auto: fusedopt's default, fp32)")
    b.add_argument("--clip", type=_clip_arg, default=None,
                   help="clip gradients to this global L2 norm inside the timed step "
                   "(fusedopt: max_grad_norm; others: clip_grad_norm_ then step)")
    b.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available, else cpu")
    b.add_argument("--threads", type=_positive_int("threads"), default=None, help="CPU threads for torch and fusedopt")
    b.add_argument("--steps", type=_positive_int("steps"), default=None,
                   help="measured steps (default 20, 5 with --quick)")
    b.add_argument("--warmup", type=_nonneg_int, default=None, help="warm-up steps (default 3, 2 with --quick)")
    b.add_argument("--impls", type=_impls_arg, default=None,
                   help="comma list of implementations instead of the defaults, e.g. "
                   "fusedopt-cpu,fusedopt-cpu[bf16-states],fusedopt-reference,torch-fused")
    b.add_argument("--forloop", action="store_true",
                   help="also time torch.optim's slow for-loop implementation (always for muon: torch's only one)")
    b.add_argument("--sweep", action="store_true", help="run sizes 1M, 4M, 16M, 64M, ... up to --params")
    b.add_argument("--plot", metavar="PNG", default=None,
                   help="write a plot: step time with spread per implementation, or GB/s against size with --sweep "
                   '(needs matplotlib: pip install "fusedopt[bench]")')
    b.add_argument("--json", metavar="PATH", default=None,
                   help="JSON output, CSV next to it (default: $XDG_CACHE_HOME or ~/.cache, then "
                   "fusedopt/bench/bench-<time>.json)")
    b.add_argument("--quick", action="store_true", help="~1M parameters and few steps: a smoke test under 30 s")
    b.add_argument("--seed", type=int, default=0, help="seed of the parameters and gradients")
    b.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="stderr progress bar (default: only when stderr is a terminal)")
    b.add_argument("--memory", action="store_true",
                   help="measure memory instead of time: AdamW's bytes per parameter beyond the parameters and "
                   "gradients (steady after the steps, peak during a step, and what the state layout says) for "
                   "fusedopt's fp32 and bf16 states, bf16 parameters with master weights or bf16 states, "
                   "torch.optim.AdamW fused and foreach, and bitsandbytes' / torchao's AdamW8bit when installed; each "
                   "in a fresh process (process RSS on CPU, torch.cuda.memory_allocated on a GPU). Takes --params, "
                   "--tensors, --quick, --device, --threads, --steps (default 3), --seed, --json")
    b.add_argument("--modes", type=_modes_arg, default=None,
                   help="with --memory: comma list of modes to measure (default all): "
                   "fusedopt-fp32, fusedopt-bf16-states, fusedopt-bf16-master, fusedopt-bf16-bf16-states, "
                   "torch-fused, torch-foreach, bnb-adamw8bit, torchao-adamw8bit")
    b.add_argument("--jobs", type=_positive_int("jobs"), default=1,
                   help="with --memory: modes measured at once, each in its own process (default 1)")

    i = sub.add_parser("info", help="version, backends built, CPU ISA, CUDA build and devices, torch version")
    i.add_argument("--json", action="store_true", help="print build_info() as JSON")
    return parser


# ------------------------------------------------------------------------------------------------- info

def cmd_info(args: argparse.Namespace) -> int:
    import torch

    import fusedopt

    info: dict[str, Any] = dict(fusedopt.build_info())
    info["backend_override"] = os.environ.get("FUSEDOPT_BACKEND") or None
    info.setdefault("version", getattr(fusedopt, "__version__", None))
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    info["torch_threads"] = torch.get_num_threads()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    compiled = info.get("compiled") or {}
    lines = [
        ("fusedopt", info.get("version")),
        ("backends", ", ".join(info.get("backends") or [])),
        ("CPU ISA", info.get("cpu_isa") or "n/a (compiled CPU backend not loaded)"),
        ("CPU ISAs supported", ", ".join(info.get("cpu_isas_supported") or []) or "n/a"),
        ("CUDA kernels built", "yes" if info.get("cuda_built") else "no"),
        ("CUDA available", "yes" if info.get("cuda_available") else "no"),
        ("CUDA devices", ", ".join(info.get("cuda_devices") or []) or "none"),
        ("torch", f"{info['torch']} (CUDA {info['torch_cuda'] or 'none'}, {info['torch_threads']} threads)"),
        ("backend override", f"FUSEDOPT_BACKEND={info['backend_override']}" if info["backend_override"]
         else "none (FUSEDOPT_BACKEND unset)"),
    ]
    for key in sorted(compiled):
        if key not in ("cuda_built",):
            lines.append((f"build: {key}", compiled[key]))
    if info.get("load_error"):
        lines.append(("load error", info["load_error"]))
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k.ljust(width)}  {v}")
    return 0


# ------------------------------------------------------------------------------------------------ bench

def _sweep_sizes(limit: int) -> list[int]:
    sizes, n = [], kSweepStart
    while n < limit:
        sizes.append(n)
        n *= 4
    if not sizes or sizes[-1] != limit:
        sizes.append(limit)
    return sizes


def _csv_path(json_path: str) -> str:
    root, ext = os.path.splitext(json_path)
    return (root if ext.lower() == ".json" else json_path) + ".csv"


def _workloads_of(opt_name: str, workloads: list, size_chosen: bool) -> list:
    """The parameter sets ``opt_name`` runs on: ``workloads``, or for an optimizer of matrices only (muon) their
    2-D tensors, or its own 24-matrix set when no option chose a size or tensor count."""
    from . import bench as hb

    if not hb.OPTIMIZERS[opt_name].matrices_only:
        return workloads
    if not size_chosen:
        return [hb.muon_matrices_workload()]
    return [hb.matrices_only(wl) for wl in workloads]


def cmd_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from . import bench as hb

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda requested but torch.cuda.is_available() is False")
    if args.memory:
        return cmd_bench_memory(args, parser)
    for flag, given in (("--modes", args.modes is not None), ("--jobs", args.jobs != 1)):
        if given:
            parser.error(f"argument {flag}: only with --memory")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print('fusedopt bench: error: --plot needs matplotlib: pip install "fusedopt[bench]"', file=sys.stderr)
            return kExitUsage
    # Muon's own default set applies when nothing chose a size or a tensor count.
    size_chosen = args.params is not None or bool(args.tensors) or args.quick or args.sweep
    if args.params is None:
        args.params = _size_arg(kQuickParams if args.quick else kDefaultParams[args.device])
    if args.json is None:
        args.json = default_results_path()
    steps = args.steps or (5 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    dtype = hb.kDtypes[args.dtype]
    state_dtype = None if args.state_dtype == "auto" else hb.kDtypes[args.state_dtype]
    if args.tensors and args.tensors > args.params:
        parser.error(f"argument --tensors: Invalid tensors: {args.tensors} (more than --params {args.params})")
    if args.threads:
        hb.set_threads(args.threads)
    sizes = _sweep_sizes(args.params) if args.sweep else [args.params]
    workloads = [hb.workload_for(n, args.tensors) for n in sizes]

    # Settle implementations and check memory for every case before allocating anything large.
    plan: list[tuple[str, list, dict[str, str], list]] = []
    for opt_name in args.optimizer:
        specs = list(args.impls) if args.impls else hb.default_impls(opt_name, args.device, forloop=args.forloop)
        if state_dtype is not None:
            specs = [hb.ImplSpec(s.name, s.state_dtype or state_dtype) if s.family == "fusedopt" else s for s in specs]
        ok, skipped = hb.resolve_impls(specs, opt_name, args.device, dtype, args.clip)
        opt_workloads = _workloads_of(opt_name, workloads, size_chosen)
        plan.append((opt_name, ok, skipped, opt_workloads))
        for wl in opt_workloads:
            try:
                hb.check_memory(ok, opt_name, wl, dtype, args.device)
            except hb.MemoryError_ as e:
                print(f"fusedopt bench: error: {e}", file=sys.stderr)
                return kExitMemory
    if not any(ok for _, ok, _, _ in plan):
        print("fusedopt bench: error: no implementation can run here:", file=sys.stderr)
        for opt_name, _, skipped, _ in plan:
            for label, reason in skipped.items():
                print(f"  {opt_name} {label}: {reason}", file=sys.stderr)
        return 1

    progress = hb.Progress("measuring bandwidth", enabled=args.progress)
    meta = hb.machine_info(args.device)
    bw = hb.measure_bandwidth(args.device, repeats=3 if args.quick else 10, progress=progress)
    progress.close()
    threads = torch.get_num_threads()
    where = meta.get("gpu") if args.device == "cuda" else f"{meta['cpu_model']}, {threads} thread(s)"
    print(
        f"fusedopt {meta.get('fusedopt_version')} | torch {meta['torch']} | {args.device}: {where} | "
        f"ISA {meta.get('cpu_isa') or 'n/a'} | memory bandwidth {bw['gbs']:.1f} GB/s "
        f"(best of {bw['repeats']} copies and in-place updates of {bw['buffer_bytes'] >> 20} MiB; the \"% bw\" "
        "reference)"
    )
    rows: list[dict[str, Any]] = []
    for opt_name, ok, skipped, opt_workloads in plan:
        for label, reason in skipped.items():
            print(f"[{opt_name}] skipped {label}: {reason}")
        if not ok:
            continue
        for wl in opt_workloads:
            if not wl.shapes:
                print(f"[{opt_name}] skipped {wl.name}: it has no 2-D tensors ({opt_name} steps matrices only)")
                continue
            progress = hb.Progress(f"{opt_name} {wl.name}", enabled=args.progress)
            result = hb.run_benchmark(
                opt_name, wl, ok, device=args.device, dtype=dtype, clip=args.clip, steps=steps, warmup=warmup,
                seed=args.seed, bandwidth_gbs=bw["gbs"], progress=progress,
            )
            progress.close()
            clip = f", clip {args.clip:g}" if args.clip else ""
            print(
                f"\n{opt_name} | {wl.name}: {wl.numel:,} params in {wl.num_tensors} tensors | {args.dtype}{clip} | "
                f"median of {steps} steps after {warmup} warm-up"
            )
            print(hb.format_table(result))
            notes = [hb.untrusted_note(result)]
            if any(r.get("compute_bound") for r in result):
                notes.append("matmul: matrix multiplications (Newton-Schulz) take most of the step, so memory "
                             "bandwidth does not bound it; B/param and GB/s count the element-wise part only")
            elif any(r.get("fits_in_cache") for r in result):
                notes.append("cache: the step's data fits in the CPU cache, so memory bandwidth does not bound it")
            if any(notes):
                print("\n" + "\n".join(n for n in notes if n))
            for r in result:
                if not r["finite"]:
                    print(f"warning: {r['impl']} produced non-finite parameters", file=sys.stderr)
            rows.extend(result)

    payload = {
        "meta": meta,
        "bandwidth": bw,
        "config": {
            "optimizers": args.optimizer, "sizes": sizes, "tensors": args.tensors, "dtype": args.dtype,
            "state_dtype": args.state_dtype, "clip": args.clip, "device": args.device, "threads": threads,
            "steps": steps, "warmup": warmup, "seed": args.seed, "quick": args.quick,
            "command": "fusedopt " + " ".join(sys.argv[1:]),
        },
        "skipped": {opt_name: skipped for opt_name, _, skipped, _ in plan},
        "results": rows,
    }
    hb.write_json(args.json, payload)
    hb.write_csv(_csv_path(args.json), rows, meta)
    print(f"\nwrote {args.json} and {_csv_path(args.json)}")
    if args.plot:
        hb.plot_results(rows, bw, meta, args.plot, device=args.device)
        print(f"wrote {args.plot}")
    return 0


def cmd_bench_memory(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`fusedopt bench --memory`: AdamW's optimizer bytes per parameter, measured mode by mode in fresh processes."""
    from . import bench as hb
    from .bench import memory as hm

    if args.optimizer != ["adamw"]:
        parser.error("argument --memory: measures AdamW only (leave out --optimizer)")
    for flag, given in (("--sweep", args.sweep), ("--plot", args.plot), ("--clip", args.clip), ("--impls", args.impls),
                        ("--forloop", args.forloop), ("--warmup", args.warmup is not None),
                        ("--dtype", args.dtype != "fp32"), ("--state-dtype", args.state_dtype != "auto")):
        if given:
            parser.error(f"argument {flag}: does not apply with --memory (each mode fixes its dtypes and options; "
                         "--modes picks the modes)")
    steps = args.steps or hm.kDefaultSteps
    if steps < 2:
        parser.error(f"argument --steps: Invalid steps: {steps} (--memory needs at least 2: the peak is taken over "
                     "the steps after the first)")
    if args.params is None:
        args.params = _size_arg(kQuickParams if args.quick else kDefaultParams[args.device])
    if args.tensors and args.tensors > args.params:
        parser.error(f"argument --tensors: Invalid tensors: {args.tensors} (more than --params {args.params})")
    if args.json is None:
        args.json = default_results_path("memory")
    workload = hb.workload_for(args.params, args.tensors)
    modes = args.modes or list(hm.MODES)
    need, have = hm.check_memory_budget(workload, args.device)
    need *= min(args.jobs, len(modes))
    budget = int(have * (0.9 if args.device == "cuda" else 0.8))
    if need > budget:
        print(f"fusedopt bench: error: {workload.name} ({hb.format_size(workload.numel)} parameters) needs about "
              f"{need / 1e9:.1f} GB for --memory but only {have / 1e9:.1f} GB is available on {args.device} (budget "
              f"{budget / 1e9:.1f} GB); use a smaller --params or fewer --jobs", file=sys.stderr)
        return kExitMemory
    meta = hb.machine_info(args.device)
    import torch

    threads = args.threads or torch.get_num_threads()
    where = meta.get("gpu") if args.device == "cuda" else f"{meta['cpu_model']}, {threads} thread(s)"
    print(f"fusedopt {meta.get('fusedopt_version')} | torch {meta['torch']} | {args.device}: {where}")
    print(hm.describe(workload, args.device, steps), flush=True)
    progress = hb.Progress("memory", len(modes), enabled=args.progress)

    def tick(key: str) -> None:
        progress.set_label(f"memory: {key}")
        progress.update(0)

    rows = hm.measure_modes(modes, workload, device=args.device, steps=steps, seed=args.seed, threads=args.threads,
                            jobs=args.jobs, progress=tick)
    progress.close()
    print()
    print(hm.format_memory_table(rows))
    print("\n" + hm.summary_text(rows, workload))
    payload = {
        "meta": meta,
        "config": {"optimizer": "adamw", "workload": workload.name, "params": workload.numel,
                   "tensors": workload.num_tensors, "description": workload.description, "device": args.device,
                   "threads": threads, "steps": steps, "seed": args.seed, "modes": [m.key for m in modes],
                   "command": "fusedopt " + " ".join(sys.argv[1:])},
        "results": rows,
    }
    hb.write_json(args.json, payload)
    print(f"\nwrote {args.json}")
    return 0 if any(r.get("status") == "ok" for r in rows) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        return cmd_info(args)
    bench_parser = parser._subparsers._group_actions[0].choices["bench"]  # type: ignore[union-attr]
    return cmd_bench(args, bench_parser)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
