"""Per-step Python overhead: AdamW on many small fp32 CPU tensors (default 1M parameters in 200 tensors of 5,000),
fusedopt.AdamW(backend="cpu") against torch.optim.AdamW(fused=True) and (foreach=True), plus fusedopt's step with
every .grad None, the Python floor of a step that finds nothing to update.

    python bench/bench_overhead.py                              # 10 rounds of 100 steps, 1 thread: under a minute
    python bench/bench_overhead.py --rounds 3 --steps 20        # smoke test
    python bench/bench_overhead.py --threads 2 --out /tmp/overhead.json
Writes bench/results/overhead-<machine>.json unless --out says where.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import warnings
from typing import Any

import torch
from _harness import hb, kRepo, kResults
from fusedopt.bench.workloads import Workload, format_size, parse_size

kOptimizer = "adamw"
kImpls = ("fusedopt-cpu", "torch-fused", "torch-foreach")
kEmpty = "fusedopt-cpu-empty"
kBaseline = "torch-fused"


def equal_tensors(params: int, tensors: int) -> Workload:
    """``tensors`` 1-D tensors of ``params // tensors`` elements, the remainder spread one each over the first."""
    if tensors <= 0 or tensors > params:
        raise ValueError(f"Invalid tensors: {tensors} (must be between 1 and --params {params})")
    base, extra = divmod(params, tensors)
    shapes = [(f"t{i}", (base + (i < extra),)) for i in range(tensors)]
    return Workload(f"{format_size(params)}x{tensors}", shapes, f"{tensors} tensors of {base:,} elements")


def build_runners(workload: Workload, seed: int) -> list[tuple[str, hb.Runner]]:
    """(label, runner) for each implementation in ``kImpls``, then ``kEmpty``: fusedopt over parameters whose
    ``.grad`` stay None."""
    runners = []
    for name in (*kImpls, kEmpty):
        spec = hb.ImplSpec("fusedopt-cpu" if name == kEmpty else name)
        params = hb.make_params(workload, seed=seed)
        if name == kEmpty:
            for p in params:
                p.grad = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt, step, _ = hb.build_optimizer(spec, kOptimizer, params, clip=None)
        # The empty step's runner receives no gradients, so its .grad stay None every round.
        fed = [] if name == kEmpty else params
        runners.append((name, hb.Runner(spec, fed, opt, step, hb.bytes_per_param(kOptimizer))))
    return runners


def summarise(samples_s: list[float], round_medians_s: list[float]) -> dict[str, Any]:
    """Median and p10/p90 over every measured step, and the median of each round with their range."""
    s = sorted(samples_s)
    r = sorted(round_medians_s)
    return {
        "ms_median": hb.percentile(s, 0.5) * 1e3,
        "ms_p10": hb.percentile(s, 0.1) * 1e3,
        "ms_p90": hb.percentile(s, 0.9) * 1e3,
        "round_medians_ms": [v * 1e3 for v in round_medians_s],
        "round_median_min_ms": r[0] * 1e3,
        "round_median_max_ms": r[-1] * 1e3,
        "steps_measured": len(s),
    }


def ratio(rows: dict[str, dict[str, Any]], num: str, den: str) -> dict[str, Any]:
    """``num``'s step time / ``den``'s, from the overall medians and round by round (same round, same noise)."""
    per_round = sorted(a / b for a, b in zip(rows[num]["round_medians_ms"], rows[den]["round_medians_ms"]))
    return {
        "overall": rows[num]["ms_median"] / rows[den]["ms_median"],
        "round_median": hb.percentile(per_round, 0.5),
        "round_min": per_round[0],
        "round_max": per_round[-1],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="1M", help="total parameters (default 1M)")
    ap.add_argument("--tensors", type=int, default=200, help="number of equal tensors (default 200)")
    ap.add_argument("--steps", type=int, default=100, help="measured steps per implementation and round")
    ap.add_argument("--rounds", type=int, default=10,
                    help="rounds of interleaved steps; each round gives every implementation one median")
    ap.add_argument("--warmup", type=int, default=3,
                    help="unmeasured steps at the start of every round (fusedopt's first step adopts the "
                    "gradients into its flat buffer; later steps find its views in .grad)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and fusedopt threads (default 1: the overhead is serial Python, and one thread "
                    "keeps thread pools from spinning on a shared machine)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON output (default bench/results/overhead-<machine>.json)")
    args = ap.parse_args()
    for name in ("steps", "rounds", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"Invalid {name}: {getattr(args, name)} (must be positive)")
    if args.warmup < 0:
        ap.error(f"Invalid warmup: {args.warmup} (must be >= 0)")
    try:
        workload = equal_tensors(parse_size(args.params), args.tensors)
    except ValueError as e:
        ap.error(str(e))

    hb.set_threads(args.threads)
    specs = [hb.ImplSpec(n) for n in kImpls]
    ok, skipped = hb.resolve_impls(specs, kOptimizer, "cpu", torch.float32, None)
    if skipped:
        reasons = "; ".join(f"{label}: {reason}" for label, reason in skipped.items())
        sys.exit(f"bench_overhead.py: error: cannot run {reasons} (build the compiled extension first)")
    hb.check_memory(ok + [hb.ImplSpec("fusedopt-cpu")], kOptimizer, workload, torch.float32, "cpu")
    meta = hb.machine_info("cpu", repo_dir=kRepo)
    meta["bench"] = "bench_overhead.py"
    print(
        f"bench_overhead.py: fusedopt {meta.get('fusedopt_version')} | torch {meta['torch']} | {meta['cpu_model']} | "
        f"{torch.get_num_threads()} thread(s) | ISA {meta.get('cpu_isa')} | AdamW fp32, {workload.numel:,} params "
        f"in {workload.num_tensors} tensors | {args.rounds} rounds x {args.steps} steps",
        flush=True,
    )

    labelled = build_runners(workload, args.seed)
    runners = [r for _, r in labelled]
    round_medians: dict[str, list[float]] = {label: [] for label, _ in labelled}
    samples: dict[str, list[float]] = {label: [] for label, _ in labelled}
    for k in range(args.rounds):
        for r in runners:
            r.samples_s.clear()
        # A new seed per round: every round, and every step in it, sees gradients no earlier step saw.
        hb.time_interleaved(runners, workload, steps=args.steps, warmup=args.warmup,
                            seed=args.seed + 1000 * (k + 1))
        for label, r in labelled:
            round_medians[label].append(hb.percentile(sorted(r.samples_s), 0.5))
            samples[label] += r.samples_s
        gc.collect()

    rows: dict[str, dict[str, Any]] = {}
    for label, r in labelled:
        rows[label] = {"impl": label, **summarise(samples[label], round_medians[label])}
        rows[label]["finite"] = bool(all(torch.isfinite(p).all() for p in r.params))
    for label in rows:
        rows[label]["time_vs_torch_fused"] = ratio(rows, label, kBaseline)
    fused_speedup = ratio(rows, kBaseline, "fusedopt-cpu")
    foreach_speedup = ratio(rows, "torch-foreach", "fusedopt-cpu")
    floor_share = rows[kEmpty]["ms_median"] / rows["fusedopt-cpu"]["ms_median"]

    print("\nimplementation      ms/step   p10-p90 ms     round medians ms   time vs torch-fused")
    print("------------------  -------  -------------  -----------------  -------------------")
    for row in rows.values():
        spread = f"{row['ms_p10']:.3f}-{row['ms_p90']:.3f}"
        rounds = f"{row['round_median_min_ms']:.3f}-{row['round_median_max_ms']:.3f}"
        print(f"{row['impl']:<18}  {row['ms_median']:7.3f}  {spread:>13}  {rounds:>17}  "
              f"{row['time_vs_torch_fused']['overall']:18.2f}x")
    print(
        f"\nfusedopt-cpu vs torch-fused: {fused_speedup['overall']:.2f}x faster "
        f"(per round {fused_speedup['round_min']:.2f}x-{fused_speedup['round_max']:.2f}x, "
        f"median {fused_speedup['round_median']:.2f}x)"
    )
    print(f"fusedopt-cpu vs torch-foreach: {foreach_speedup['overall']:.2f}x faster")
    print(f"empty fusedopt step (all grads None): {rows[kEmpty]['ms_median'] * 1e3:.0f} us, "
          f"{100 * floor_share:.0f}% of the fusedopt step")
    for row in rows.values():
        if not row["finite"]:
            print(f"warning: {row['impl']} produced non-finite parameters", file=sys.stderr)

    payload = {
        "meta": meta,
        "config": {
            "optimizer": kOptimizer, "hyperparameters": hb.OPTIMIZERS[kOptimizer].hyper, "dtype": "fp32",
            "device": "cpu", "params": workload.numel, "tensors": workload.num_tensors, "workload": workload.name,
            "steps_per_round": args.steps, "rounds": args.rounds, "warmup_per_round": args.warmup,
            "threads": torch.get_num_threads(), "seed": args.seed,
            "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
            "method": "implementations interleaved step by step in every round (order rotating), fresh random "
                      "gradients copied in place into the existing .grad tensors before each timed step; "
                      f"{kEmpty} is fusedopt.AdamW(backend='cpu') over parameters whose .grad are all None",
        },
        "results": list(rows.values()),
        "speedup_fusedopt_vs_torch_fused": fused_speedup,
        "speedup_fusedopt_vs_torch_foreach": foreach_speedup,
        "empty_step_share_of_fusedopt_step": floor_share,
    }
    out = args.out or os.path.join(kResults, f"overhead-{hb.machine_tag(meta)}.json")
    hb.write_json(out, payload)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
