"""Optimizer memory, measured: AdamW's bytes per parameter beyond the parameters and gradients, for fusedopt's memory
modes against torch.optim and the 8-bit AdamWs of bitsandbytes and torchao (when installed).

    python bench/bench_memory.py                        # 32M GPT-2-shaped set on the CPU, every mode: a few minutes
    python bench/bench_memory.py --params 4M            # smoke test
    python bench/bench_memory.py --modes fusedopt-fp32,torch-fused --out-dir /tmp

Modes (fusedopt.bench.memory.MODES): fusedopt AdamW with fp32 states (default), with state_dtype=torch.bfloat16, with
bf16 parameters and master_weights=True, with bf16 parameters and bf16 states; torch.optim.AdamW(fused=True) and
(foreach=True); bitsandbytes.optim.AdamW8bit and torchao.optim.AdamW8bit, each a row saying why when it is not
installed or its CPU path fails. Each mode runs in a fresh Python process: a warm-up on a throwaway copy of the
shapes, then parameters and gradients are made and the process's memory read (the baseline), the optimizer built and
stepped (--steps, default 3) and its memory read again; steady = after the steps - baseline, peak = the largest
during a step after the first (VmHWM, reset before each step through /proc/self/clear_refs) - baseline, both per
parameter. On a GPU, torch.cuda.memory_allocated and max_memory_allocated. The module docstring of
fusedopt/bench/memory.py says exactly what is subtracted and why fusedopt's flat buffers do not count twice.

Writes bench/results/<name>-<machine>.{json,md} (name: memory-cpu or memory-cuda unless --name).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from _harness import hb, kRepo, kResults
from fusedopt.bench import memory as hm

kPeerNames = {"bnb": "bitsandbytes", "torchao": "torchao"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="32M", help="parameter count of the GPT-2-shaped set (default 32M)")
    ap.add_argument("--tensors", type=int, default=None, help="N equal-ish tensors instead of the GPT-2 shapes")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="default cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch and fusedopt threads (default torch's)")
    ap.add_argument("--steps", type=int, default=hm.kDefaultSteps, help="steps per mode (default 3, at least 2)")
    ap.add_argument("--jobs", type=int, default=1, help="modes measured at once, each in its own process")
    ap.add_argument("--modes", default="all", help="comma list of " + ", ".join(hm.mode_keys()) + " (default all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default=None, help="results file prefix (default memory-<device>)")
    ap.add_argument("--out-dir", default=kResults, help="default bench/results")
    args = ap.parse_args()
    try:
        modes = hm.parse_modes(args.modes)
        workload = hb.workload_for(hb.parse_size(args.params), args.tensors)
    except ValueError as e:
        ap.error(str(e))
    if args.steps < 2:
        ap.error(f"Invalid steps: {args.steps} (at least 2)")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_memory.py: error: --device cuda but torch.cuda.is_available() is False")
    need, have = hm.check_memory_budget(workload, args.device)
    if need * min(args.jobs, len(modes)) > 0.8 * have:
        sys.exit(f"bench_memory.py: error: needs about {need * min(args.jobs, len(modes)) / 1e9:.1f} GB, "
                 f"{have / 1e9:.1f} GB available")
    meta = hb.machine_info(args.device, repo_dir=kRepo)
    threads = args.threads or torch.get_num_threads()
    meta["torch_threads"] = threads
    where = meta.get("gpu") or f"{meta['cpu_model']} ({meta['cpu_cores']} cores)"
    print(f"bench_memory: fusedopt {meta.get('fusedopt_version')} | torch {meta['torch']} | {where} | "
          f"{threads} thread(s)")
    print(hm.describe(workload, args.device, args.steps), flush=True)
    rows = hm.measure_modes(modes, workload, device=args.device, steps=args.steps, seed=args.seed,
                            threads=args.threads, jobs=args.jobs,
                            progress=lambda key: print(f"  measuring {key} ...", flush=True))
    table = hm.format_memory_table(rows)
    print("\n" + table + "\n\n" + hm.format_detail_table(rows) + "\n\n" + hm.summary_text(rows, workload))

    name = args.name or f"memory-{args.device}"
    base = os.path.join(args.out_dir, f"{name}-{hb.machine_tag(meta, args.device)}")
    payload = {
        "meta": meta,
        "config": {"optimizer": "adamw", "workload": workload.name, "params": workload.numel,
                   "tensors": workload.num_tensors, "description": workload.description, "device": args.device,
                   "threads": threads, "steps": args.steps, "seed": args.seed, "modes": [m.key for m in modes],
                   "hyper": hm.kHyper, "malloc_env": hm.kMallocEnv,
                   "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])},
        "results": rows,
    }
    os.makedirs(args.out_dir, exist_ok=True)
    hb.write_json(base + ".json", payload)
    versions = [f"fusedopt {meta.get('fusedopt_version')} (commit {meta.get('git_commit')})", f"torch {meta['torch']}"]
    versions += [f"{kPeerNames[r['kind']]} {r['version']}" for r in rows
                 if r.get("version") and r["kind"] in kPeerNames]
    md = [
        f"# Optimizer memory on {where}",
        "",
        f"{', '.join(versions)}; {threads} thread(s), ISA {meta.get('cpu_isa')}, {meta['timestamp']}.",
        "",
        (f"AdamW (lr {hm.kHyper['lr']:g}, weight decay {hm.kHyper['weight_decay']:g}) on {workload.numel:,} parameters "
         f"in {workload.num_tensors} tensors ({workload.description}), {args.steps} steps, {args.device}. Bytes per "
         "parameter beyond the parameters and gradients themselves."),
        "",
        hm.format_memory_table(rows, markdown=True),
        "",
        hm.summary_text(rows, workload),
        "",
        "Other moments, in bytes per parameter over the same baseline: after the constructor, the constructor's "
        "peak (fusedopt copies the parameters into its flat buffer while the originals still exist, and allocates its "
        "flat gradient buffer, whose originals are freed at the first step), the first step's peak (where the states "
        "are allocated), and the bytes of the tensors the optimizer's state refers to (each storage once):",
        "",
        hm.format_detail_table(rows, markdown=True),
    ]
    with open(base + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print(f"\nwrote {base}.json and .md")


if __name__ == "__main__":
    main()
