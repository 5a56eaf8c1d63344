"""AdamW with 8-bit states on the CPU, side by side in one run: fusedopt.AdamW(state_dtype="8bit") against torch's
AdamW(fused=True) with fp32 states, fusedopt with fp32 states, and bitsandbytes' and torchao's 8-bit AdamW where
they install and run on the CPU.

    python bench/bench_8bit.py                           # 128M GPT-2-shaped parameters, 6 interleaved steps
    python bench/bench_8bit.py --params 8M --steps 3     # smoke test
    python bench/bench_8bit.py --peers none --out-dir /tmp

Every implementation holds its own copy of the same fp32 parameters. Steps are interleaved through
fusedopt.bench.time_interleaved: each round draws fresh random gradients, copies them into every implementation's
.grad, and times one step of each, in rotating order, so that machine noise falls on all alike. Reported: the median
and p10-p90 step time of each, and each one's median over fusedopt 8-bit's (its speedup), with the bytes each step
moves per parameter (reads and writes of parameters, gradients, states and block scales).

Writes bench/results/<name>-<machine>.{json,md} (name: 8bit-cpu unless --name).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
from collections.abc import Callable
from typing import Any

import torch
from _harness import hb, kRepo, kResults
from fusedopt import AdamW
from fusedopt.bench.measure import Runner, percentile, time_interleaved

kHyper = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

# Bytes one AdamW step reads and writes per fp32 parameter: parameter (read + write), gradient (read), two states
# (read + write) at 4 bytes, or 1 byte plus a 4-byte scale per 256 elements.
kBytesFp32 = 4 + 4 + 4 + 2 * (4 + 4)
kBytes8bit = 4 + 4 + 4 + 2 * (1 + 1 + 2 * 4 / 256)


def implementations(peers: list[str]) -> list[tuple[str, Callable[[list[torch.nn.Parameter]], Any], float]]:
    """(label, builder, bytes moved per parameter) of each implementation, fusedopt 8-bit first."""
    impls: list[tuple[str, Callable[[list[torch.nn.Parameter]], Any], float]] = [
        ("fusedopt AdamW state_dtype='8bit'",
         lambda ps: AdamW(ps, **kHyper, state_dtype="8bit", backend="cpu"), kBytes8bit),
        ("torch AdamW(fused=True) fp32", lambda ps: torch.optim.AdamW(ps, **kHyper, fused=True), kBytesFp32),
        ("fusedopt AdamW fp32", lambda ps: AdamW(ps, **kHyper, backend="cpu"), kBytesFp32),
    ]
    if "bnb" in peers and importlib.util.find_spec("bitsandbytes") is not None:
        import bitsandbytes as bnb

        impls.append((f"bitsandbytes {bnb.__version__} AdamW8bit",
                      lambda ps: bnb.optim.AdamW8bit(ps, **kHyper), kBytes8bit))
    if "torchao" in peers and importlib.util.find_spec("torchao") is not None:
        import torchao
        from torchao.optim import AdamW8bit

        impls.append((f"torchao {torchao.__version__} AdamW8bit", lambda ps: AdamW8bit(ps, **kHyper), kBytes8bit))
    return impls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="128M", help="parameter count of the GPT-2-shaped set (default 128M)")
    ap.add_argument("--steps", type=int, default=6, help="measured steps per implementation (default 6)")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured steps first (default 2)")
    ap.add_argument("--threads", type=int, default=None, help="torch and fusedopt threads (default torch's)")
    ap.add_argument("--peers", default="bnb,torchao", help="comma list of bnb, torchao, or none (default both)")
    ap.add_argument("--name", default="8bit-cpu", help="results file prefix (default 8bit-cpu)")
    ap.add_argument("--out-dir", default=kResults, help="default bench/results")
    args = ap.parse_args()
    if args.threads:
        hb.set_threads(args.threads)
    workload = hb.workload_for(hb.parse_size(args.params), None)
    peers = [p.strip() for p in args.peers.split(",") if p.strip() and p.strip() != "none"]
    runners = []
    for label, build, moved in implementations(peers):
        params = hb.make_params(workload)
        runners.append(Runner(spec=label, params=params, optimizer=build(params), step=None, bytes_per_param=moved))
        runners[-1].step = runners[-1].optimizer.step
    print(f"{workload.name}: {workload.numel / 1e6:.1f}M parameters in {len(workload.shapes)} tensors, "
          f"{torch.get_num_threads()} threads; {', '.join(r.spec for r in runners)}")
    time_interleaved(runners, workload, steps=args.steps, warmup=args.warmup)
    base = statistics.median(runners[0].samples_s)
    rows = []
    for r in runners:
        samples = sorted(r.samples_s)
        median = statistics.median(samples)
        rows.append({"implementation": r.spec, "median_ms": 1e3 * median, "p10_ms": 1e3 * percentile(samples, 0.1),
                     "p90_ms": 1e3 * percentile(samples, 0.9), "time_over_fusedopt_8bit": median / base,
                     "bytes_moved_per_param": r.bytes_per_param,
                     "effective_GBps": r.bytes_per_param * workload.numel / median / 1e9,
                     "samples_ms": [1e3 * s for s in r.samples_s]})
    meta = hb.machine_info("cpu", repo_dir=kRepo)
    meta.update(workload=workload.name, params=workload.numel, steps=args.steps, warmup=args.warmup,
                threads=torch.get_num_threads())
    lines = [f"# AdamW with 8-bit states, CPU ({workload.numel / 1e6:.0f}M parameters)", "",
             f"Machine: {meta.get('cpu_model')} ({meta.get('cpu_cores')} cores, ISA {meta.get('cpu_isa')}), "
             f"{torch.get_num_threads()} threads; torch {torch.__version__}; commit {meta.get('git_commit')}. "
             f"Command: `python bench/bench_8bit.py --params {args.params} --steps {args.steps}`.", "",
             "| implementation | median ms | p10-p90 ms | time / fusedopt 8-bit | bytes moved / param | GB/s |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['implementation']} | {row['median_ms']:.1f} | {row['p10_ms']:.1f}-{row['p90_ms']:.1f} "
                     f"| {row['time_over_fusedopt_8bit']:.2f}x | {row['bytes_moved_per_param']:.2f} | "
                     f"{row['effective_GBps']:.1f} |")
    lines += ["", "Steps interleaved in rotating order, fresh random gradients each round (fusedopt.bench."
              "time_interleaved); every implementation holds its own fp32 parameters. Bytes moved: reads and writes "
              "of the parameters, gradients and states per step."]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"{args.name}-{hb.machine_tag(meta)}")
    hb.write_json(path + ".json", {"meta": meta, "rows": rows})
    with open(path + ".md", "w") as f:
        f.write(text)
    print(f"wrote {path}.json and .md")


if __name__ == "__main__":
    main()
