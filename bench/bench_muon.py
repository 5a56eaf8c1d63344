"""Muon on the CPU: fusedopt.Muon(backend="cpu") against torch.optim.Muon, side by side and interleaved, in two cases:

* matrices: the 24 weight matrices of 6 GPT-2-like blocks of width 256 (qkv 768x256, projection 256x256, MLP
  1024x256 and 256x1024; 4.7M parameters), torch.optim.Muon against fusedopt.Muon;
* model: a whole small GPT-2-shaped model (those blocks plus embeddings of an 8192-token vocabulary and 1024
  positions, norms and biases; 7.1M parameters): torch.optim.Muon on the block matrices plus
  torch.optim.AdamW(fused=True) on the rest, against one fusedopt.Muon whose use_muon=False group holds the rest.

    python bench/bench_muon.py                          # 5 rounds of 10 steps per case, 2 threads: a few minutes
    python bench/bench_muon.py --rounds 2 --steps 2     # smoke test
    python bench/bench_muon.py --threads 1 --out-dir /tmp

Every round runs both cases, each through fusedopt.bench.time_interleaved (the implementations alternate step by
step in rotating order; fresh random gradients copied in place into each one's .grad before its timed step), with
the case order alternating between rounds. Reported per implementation: median and p10-p90 step time over all
measured steps and the per-round medians; per case, torch's time / fusedopt's (overall and round by round).

Where the time goes: during the same steps, the pieces of each step are timed by wrapping, in their modules, the
functions the step calls: fusedopt's two element-wise kernel calls (functional.update phase 0: momentum and Nesterov
into the update; phase 1: weight decay and the parameter update), its orthogonalize_ (bf16 copies in and out of the
batches) and, inside it, newton_schulz (the batched bmm chain); torch's _zeropower_via_newtonschulz (the per-matrix
bf16 Newton-Schulz, with its cast, norm and transposes), the rest of its step being its element-wise ops and Python;
in the model case also each optimizer or param group. The wrappers add two perf_counter calls per call (about 50
calls per step). Writes bench/results/<name>-<machine>.{json,md} (name: muon-cpu unless --name).

On a shared machine, more threads than idle cores make the matmuls' thread pools spin: steps then take tens of
times longer, torch's 360 small matmuls per step far more than fusedopt's 60 batched ones, and the ratio says
nothing about the code. How many cores other processes kept busy (from /proc/stat, less this process's CPU time) is
printed per round and recorded (meta.other_processes_cores*); trust a run only where that left `--threads` cores
idle.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.optim._muon as torch_muon
from _harness import hb, kRepo, kResults
from fusedopt import Muon, _newton_schulz
from fusedopt.optim import muon as fusedopt_muon

kOptimizer = "muon"
kTargetSpeedup = 1.3  # the target: fusedopt's Muon step on the matrices at least this much faster than torch's


# ------------------------------------------------------------------------------------------------ pieces

class PieceTimer:
    """Adds the wall time of wrapped calls to the accumulator of the step being timed (none: not recorded)."""

    def __init__(self) -> None:
        self.active: dict[str, float] | None = None

    def wrap(self, key: str | Callable[..., str], fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` timed under ``key`` (or ``key(*args, **kwargs)``, a name chosen per call)."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            acc = self.active
            if acc is None:
                return fn(*args, **kwargs)
            name = key(*args, **kwargs) if callable(key) else key
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                acc[name] = acc.get(name, 0.0) + time.perf_counter() - t0

        return timed

    def step(self, step: Callable[[], Any], record: list[dict[str, float]]) -> Callable[[], None]:
        """``step`` recording its pieces into a new accumulator appended to ``record``."""

        def run() -> None:
            acc: dict[str, float] = {}
            self.active = acc
            try:
                step()
            finally:
                self.active = None
            record.append(acc)

        return run


TIMER = PieceTimer()


class _FunctionalProxy:
    """fusedopt.functional as muon.py sees it, with `update` timed by phase."""

    def __init__(self, module: Any) -> None:
        self._module = module
        self.update = TIMER.wrap(lambda *a, **k: f"kernel phase {k['hyper']['phase']}", module.update)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def install_piece_timers() -> None:
    """Wrap, where the steps look them up, the functions whose time the report splits out."""
    fusedopt_muon.functional = _FunctionalProxy(fusedopt_muon.functional)
    fusedopt_muon.orthogonalize_ = TIMER.wrap("orthogonalize_", fusedopt_muon.orthogonalize_)
    _newton_schulz.newton_schulz = TIMER.wrap("newton_schulz", _newton_schulz.newton_schulz)
    torch_muon._zeropower_via_newtonschulz = TIMER.wrap("torch newton_schulz", torch_muon._zeropower_via_newtonschulz)


# (key, label, parent key or None). A top-level piece's share is of the step; what no piece covers is "rest".
kPieces: dict[str, list[tuple[str, str, str | None]]] = {
    "torch": [
        ("muon step", "torch.optim.Muon.step", None),
        ("torch newton_schulz", "Newton-Schulz, per matrix (bf16 cast, norm, transposes, 15 mm)", "muon step"),
        ("adamw step", "torch.optim.AdamW(fused=True).step", None),
    ],
    "fusedopt": [
        ("group muon", "Muon group (_update)", None),
        ("kernel phase 0", "kernel phase 0: momentum, Nesterov -> update (functional.update)", "group muon"),
        ("orthogonalize_", "orthogonalize_: bf16 batch copies in and out + Newton-Schulz", "group muon"),
        ("newton_schulz", "newton_schulz: normalize + batched bmm chain (15 bmm per shape batch)", "orthogonalize_"),
        ("kernel phase 1", "kernel phase 1: weight decay, lr-adjusted update (functional.update)", "group muon"),
        ("group adamw", "AdamW group (use_muon=False; _update: one AdamW kernel call)", None),
    ],
}


def summarise_pieces(family: str, record: Sequence[dict[str, float]], step_ms: float) -> list[dict[str, Any]]:
    """Median ms per step of each piece seen, its share of the median step, and the rest of the step (Python,
    bookkeeping, element-wise ops outside the pieces). A piece's parent is its nearest ancestor that was seen."""
    seen = {k for r in record for k in r}
    parents = {k: p for k, _, p in kPieces[family]}

    def parent_of(key: str) -> str | None:
        parent = parents[key]
        while parent is not None and parent not in seen:
            parent = parents[parent]
        return parent

    out: list[dict[str, Any]] = []
    depth: dict[str | None, int] = {None: -1}
    for key, label, _ in kPieces[family]:
        if key in seen:
            ms = hb.percentile(sorted(r.get(key, 0.0) * 1e3 for r in record), 0.5)
            parent = parent_of(key)
            depth[key] = depth[parent] + 1
            out.append({"piece": key, "label": label, "parent": parent, "depth": depth[key], "ms_median": ms,
                        "share_of_step": ms / step_ms})
    top = [p["piece"] for p in out if p["parent"] is None]
    covered = hb.percentile(sorted(sum(r.get(k, 0.0) for k in top) * 1e3 for r in record), 0.5)
    out.append({"piece": "rest", "label": "rest of the step (Python, bookkeeping, ops outside the pieces above)",
                "parent": None, "depth": 0, "ms_median": step_ms - covered,
                "share_of_step": (step_ms - covered) / step_ms})
    return out


# ------------------------------------------------------------------------------------------------ machine

def cpu_snapshot() -> tuple[float, float, float]:
    """(wall s, CPU s busy machine-wide from /proc/stat, CPU s of this process): two of them give the cores other
    processes kept busy in between."""
    busy = math.nan
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    except (OSError, ValueError, IndexError):
        pass
    t = os.times()
    return time.perf_counter(), busy, t.user + t.system


def others_cores(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    """Average number of cores that processes other than this one kept busy between two ``cpu_snapshot``s (NaN
    without /proc/stat)."""
    wall = after[0] - before[0]
    return max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / wall) if wall > 0 else math.nan


# ------------------------------------------------------------------------------------------------ runners

@dataclass
class Impl:
    """One implementation of one case: its harness runner (timed step) and its per-step pieces."""

    label: str
    family: str  # "torch" or "fusedopt"
    runner: hb.Runner
    pieces: list[dict[str, float]] = field(default_factory=list)
    round_medians_s: list[float] = field(default_factory=list)
    samples_s: list[float] = field(default_factory=list)


@dataclass
class Case:
    key: str
    title: str
    workload: hb.Workload
    impls: list[Impl]
    notes: list[str] = field(default_factory=list)


def _impl(label: str, family: str, params: list[torch.nn.Parameter], opt: Any, step: Callable[[], Any]) -> Impl:
    impl = Impl(label, family, hb.Runner(hb.ImplSpec("torch-forloop" if family == "torch" else "fusedopt-cpu"),
                                         params, opt, step, hb.bytes_per_param(kOptimizer)))
    impl.runner.step = TIMER.step(step, impl.pieces)
    return impl


def matrices_case(width: int, layers: int, seed: int) -> Case:
    """torch.optim.Muon and fusedopt.Muon as `fusedopt bench --optimizer muon` builds them (fusedopt.bench.registry)."""
    workload = hb.muon_matrices_workload(width, layers)
    impls = []
    for name, family in (("torch-forloop", "torch"), ("fusedopt-cpu", "fusedopt")):
        params = hb.make_params(workload, seed=seed)
        opt, step, _ = hb.build_optimizer(hb.ImplSpec(name), kOptimizer, params, clip=None)
        label = "torch.optim.Muon" if family == "torch" else "fusedopt.Muon (cpu)"
        impls.append(_impl(label, family, params, opt, step))
    return Case("matrices", f"matrices / {workload.name}", workload, impls)


def model_case(width: int, layers: int, vocab: int, n_ctx: int, seed: int) -> Case:
    """Muon on the block matrices and AdamW on the rest: two torch optimizers against one fusedopt.Muon."""
    workload = hb.gpt2_model_workload(layers, width, vocab, n_ctx)
    names = [n for n, _ in workload.shapes]
    muon_hyper = dict(hb.OPTIMIZERS[kOptimizer].hyper)
    adamw_hyper = dict(hb.OPTIMIZERS["adamw"].hyper)  # lr 1e-3, weight_decay 0.01

    def split(params: list[torch.nn.Parameter]) -> tuple[list, list]:
        matrices = [p for n, p in zip(names, params) if hb.is_block_matrix(n)]
        rest = [p for n, p in zip(names, params) if not hb.is_block_matrix(n)]
        return matrices, rest

    params = hb.make_params(workload, seed=seed)
    matrices, rest = split(params)
    t_muon = torch.optim.Muon(matrices, **muon_hyper)
    t_adamw = torch.optim.AdamW(rest, **adamw_hyper, fused=True)
    muon_step = TIMER.wrap("muon step", t_muon.step)
    adamw_step = TIMER.wrap("adamw step", t_adamw.step)

    def torch_step() -> None:
        muon_step()
        adamw_step()

    torch_impl = _impl("torch.optim.Muon + torch.optim.AdamW(fused=True)", "torch", params, (t_muon, t_adamw),
                       torch_step)

    params = hb.make_params(workload, seed=seed)
    matrices, rest = split(params)
    opt = Muon([{"params": matrices}, {"params": rest, "use_muon": False, **adamw_hyper}], **muon_hyper,
                        backend="cpu")
    opt._update = TIMER.wrap(lambda group, *a, **k: "group muon" if group["use_muon"] else "group adamw", opt._update)
    fused_impl = _impl("fusedopt.Muon (cpu) with a use_muon=False AdamW group", "fusedopt", params, opt, opt.step)
    return Case("model", f"model / {workload.name}", workload, [torch_impl, fused_impl], notes=[
        f"{len(matrices)} block matrices ({sum(p.numel() for p in matrices):,} parameters) stepped by Muon "
        f"(lr {muon_hyper['lr']}, weight_decay {muon_hyper['weight_decay']}), the other {len(rest)} tensors "
        f"({sum(p.numel() for p in rest):,} parameters: embeddings, which are the tied head, norms, biases) by AdamW "
        f"(lr {adamw_hyper['lr']}, weight_decay {adamw_hyper['weight_decay']})"])


# ------------------------------------------------------------------------------------------------ report

def newton_schulz_flops(workload: hb.Workload, steps: int = 5) -> int:
    """FLOPs of the quintic Newton-Schulz per optimizer step: per matrix of m <= n, each iteration is X X^T (2 m^2 n),
    b A + c A^2 (2 m^3) and the update times X (2 m^2 n)."""
    total = 0
    for _, (rows, cols) in workload.shapes:
        m, n = min(rows, cols), max(rows, cols)
        total += steps * (4 * m * m * n + 2 * m ** 3)
    return total


def ratio(num: Impl, den: Impl) -> dict[str, Any]:
    """``num``'s step time / ``den``'s, from the overall medians and round by round (same round, same noise)."""
    per_round = sorted(a / b for a, b in zip(num.round_medians_s, den.round_medians_s))
    return {
        "overall": hb.percentile(sorted(num.samples_s), 0.5) / hb.percentile(sorted(den.samples_s), 0.5),
        "round_median": hb.percentile(per_round, 0.5),
        "round_min": per_round[0],
        "round_max": per_round[-1],
    }


def max_abs_diff(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return max(float((x.detach() - y.detach()).abs().max()) for x, y in zip(a, b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=256, help="model width d (default 256)")
    ap.add_argument("--layers", type=int, default=6, help="blocks (default 6: 24 matrices)")
    ap.add_argument("--vocab", type=int, default=8192, help="vocabulary of the model case (default 8192)")
    ap.add_argument("--context", type=int, default=1024, help="positions of the model case (default 1024)")
    ap.add_argument("--threads", type=int, default=2, help="torch and fusedopt threads (default 2)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds; each runs both cases and gives one median each")
    ap.add_argument("--steps", type=int, default=10, help="measured steps per implementation, case and round")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured steps per implementation before the first round")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="muon-cpu", help="results file prefix (default muon-cpu)")
    ap.add_argument("--out-dir", default=kResults, help="default bench/results")
    args = ap.parse_args()
    for name in ("width", "layers", "vocab", "context", "threads", "rounds", "steps"):
        if getattr(args, name) < 1:
            ap.error(f"Invalid {name}: {getattr(args, name)} (must be positive)")
    if args.warmup < 0:
        ap.error(f"Invalid warmup: {args.warmup} (must be >= 0)")
    if "cpu" not in hb.fusedopt_backends():
        sys.exit("bench_muon.py: error: fusedopt's compiled CPU backend is not built (fusedopt.build_info())")
    if not hasattr(torch.optim, "Muon"):
        sys.exit(f"bench_muon.py: error: torch {torch.__version__} has no torch.optim.Muon")

    hb.set_threads(args.threads)
    install_piece_timers()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = [matrices_case(args.width, args.layers, args.seed),
                 model_case(args.width, args.layers, args.vocab, args.context, args.seed)]
    meta = hb.machine_info("cpu", repo_dir=kRepo)
    meta["bench"] = "bench_muon.py"
    meta["load_average_before"] = list(os.getloadavg())
    run_start = cpu_snapshot()
    threads = torch.get_num_threads()
    print(
        f"bench_muon.py: fusedopt {meta.get('fusedopt_version')} | torch {meta['torch']} | {meta['cpu_model']} | "
        f"{threads} thread(s) | ISA {meta.get('cpu_isa')} | {args.rounds} rounds x {args.steps} steps per case",
        flush=True,
    )

    round_others: list[float] = []
    for k in range(args.rounds):
        round_start = cpu_snapshot()
        for j, case in enumerate(cases if k % 2 == 0 else cases[::-1]):
            warmup = args.warmup if k == 0 else 0
            runners = [impl.runner for impl in case.impls]
            for impl in case.impls:
                impl.runner.samples_s.clear()
            start = [len(impl.pieces) for impl in case.impls]
            hb.time_interleaved(runners, case.workload, steps=args.steps, warmup=warmup,
                                seed=args.seed + 1000 * (k + 1) + 100 * j)
            for impl, n0 in zip(case.impls, start):
                del impl.pieces[n0:n0 + warmup]  # the warm-up steps' pieces
                impl.round_medians_s.append(hb.percentile(sorted(impl.runner.samples_s), 0.5))
                impl.samples_s += impl.runner.samples_s
        round_others.append(others_cores(round_start, cpu_snapshot()))
        gc.collect()
        print(f"  round {k + 1}: " + ", ".join(
            f"{case.key} torch/fusedopt {case.impls[0].round_medians_s[-1] / case.impls[1].round_medians_s[-1]:.2f}"
            for case in cases) + f"; other processes busy on {round_others[-1]:.2f} cores", flush=True)

    results: list[dict[str, Any]] = []
    speedups: dict[str, Any] = {}
    md_cases: list[str] = []
    for case in cases:
        torch_impl, fused_impl = case.impls
        speedup = ratio(torch_impl, fused_impl)
        speedups[case.key] = speedup
        diff = max_abs_diff(torch_impl.runner.params, fused_impl.runner.params)
        flops = newton_schulz_flops(hb.Workload("m", [(n, s) for n, s in case.workload.shapes
                                                      if hb.is_block_matrix(n) or case.key == "matrices"]))
        rows = []
        for impl in case.impls:
            s = sorted(impl.samples_s)
            med = hb.percentile(s, 0.5) * 1e3
            row = {
                "case": case.key, "title": case.title, "impl": impl.label, "family": impl.family,
                "workload": case.workload.name, "description": case.workload.description,
                "params": case.workload.numel, "tensors": case.workload.num_tensors,
                "ms_median": med, "ms_p10": hb.percentile(s, 0.1) * 1e3, "ms_p90": hb.percentile(s, 0.9) * 1e3,
                "round_medians_ms": [v * 1e3 for v in impl.round_medians_s], "steps_measured": len(s),
                "speedup_vs_torch": speedup["overall"] if impl.family == "fusedopt" else 1.0,
                "newton_schulz_gflop_per_step": flops / 1e9,
                "finite": bool(all(torch.isfinite(p).all() for p in impl.runner.params)),
                "pieces": summarise_pieces(impl.family, impl.pieces, med),
            }
            if impl.family == "fusedopt":
                row["max_abs_param_diff_vs_torch"] = diff
            rows.append(row)
        results += rows
        md_cases += _case_markdown(case, rows, speedup, diff, flops)
        print(f"\n{case.title}: {case.workload.numel:,} params in {case.workload.num_tensors} tensors "
              f"({case.workload.description})")
        for row in rows:
            print(f"  {row['impl']:<55} {row['ms_median']:8.2f} ms  (p10-p90 {row['ms_p10']:.2f}-{row['ms_p90']:.2f})")
            for piece in row["pieces"]:
                label = "    " + "  " * piece["depth"] + piece["label"]
                print(f"{label:<79} {piece['ms_median']:8.2f} ms {100 * piece['share_of_step']:5.1f}%")
        print(f"  fusedopt speed-up over torch: {speedup['overall']:.2f}x (per round {speedup['round_min']:.2f}x-"
              f"{speedup['round_max']:.2f}x); max |param difference| after the run {diff:.2e}")

    meta["load_average_after"] = list(os.getloadavg())
    meta["other_processes_cores"] = others_cores(run_start, cpu_snapshot())
    meta["other_processes_cores_by_round"] = round_others
    cores = os.cpu_count() or 1
    busy = max(round_others) + threads > cores + 0.25
    load_note = (f"Other processes kept {meta['other_processes_cores']:.2f} of the {cores} cores busy on average "
                 f"during the run (rounds: {', '.join(f'{v:.2f}' for v in round_others)}; /proc/stat), with "
                 f"{threads} thread(s) here"
                 + (": in some rounds the threads had fewer idle cores than they need, so thread pools may have "
                    "spun and those times and ratios say more about the machine than the code." if busy else "."))
    print(f"\n{load_note}")
    target_met = speedups["matrices"]["overall"] >= kTargetSpeedup
    print(f"\ntarget (matrices: fusedopt >= {kTargetSpeedup}x faster than torch.optim.Muon): "
          f"{'met' if target_met else 'NOT met'} ({speedups['matrices']['overall']:.2f}x)")
    payload = {
        "meta": meta,
        "config": {
            "optimizer": kOptimizer, "muon_hyperparameters": hb.OPTIMIZERS[kOptimizer].hyper,
            "adamw_hyperparameters": hb.OPTIMIZERS["adamw"].hyper, "dtype": "fp32", "device": "cpu",
            "width": args.width, "layers": args.layers, "vocab": args.vocab, "context": args.context,
            "rounds": args.rounds, "steps_per_round": args.steps, "warmup": args.warmup, "threads": threads,
            "seed": args.seed, "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
            "method": "per round, each case through fusedopt.bench.time_interleaved (implementations alternate step "
                      "by step in rotating order, fresh random gradients copied in place into the existing .grad "
                      "before each timed step), case order alternating between rounds; pieces timed in the same "
                      "steps by wrapping the functions the steps call",
        },
        "cases": [{"key": c.key, "title": c.title, "workload": c.workload.name, "params": c.workload.numel,
                   "tensors": c.workload.num_tensors, "description": c.workload.description,
                   "impls": [i.label for i in c.impls], "notes": c.notes} for c in cases],
        "results": results,
        "speedup_fusedopt_vs_torch": speedups,
        "target": {"case": "matrices", "speedup_at_least": kTargetSpeedup, "met": target_met},
    }
    base = os.path.join(args.out_dir, f"{args.name}-{hb.machine_tag(meta)}")
    hb.write_json(base + ".json", payload)
    md = [
        f"# {args.name} on {meta['cpu_model']}",
        "",
        f"fusedopt {meta.get('fusedopt_version')} (commit {meta.get('git_commit')}), torch {meta['torch']}, "
        f"{threads} thread(s), ISA {meta.get('cpu_isa')}, {meta['timestamp']}. Command: "
        f"`python bench/{payload['config']['command']}`.",
        "",
        f"fp32 parameters; Muon lr {hb.OPTIMIZERS[kOptimizer].hyper['lr']}, weight_decay "
        f"{hb.OPTIMIZERS[kOptimizer].hyper['weight_decay']}, torch.optim.Muon's other defaults (momentum 0.95, "
        f"Nesterov, 5 Newton-Schulz steps in bf16). {args.rounds} rounds; in each, both cases with the implementations "
        f"interleaved step by step ({args.steps} measured steps each, fresh random gradients every step; "
        f"{args.warmup} warm-up step(s) before the first round). Median and p10-p90 over all measured steps; the "
        "speed-up is torch's median / fusedopt's, with its range over the per-round medians. Pieces: median ms per "
        "step of each wrapped call, timed during the same steps (indented: part of the piece above).",
        "",
        load_note,
        *md_cases,
        "",
        f"Target: fusedopt's Muon step on the matrices at least {kTargetSpeedup}x faster than torch.optim.Muon: "
        f"{'met' if target_met else 'not met'} ({speedups['matrices']['overall']:.2f}x in this run).",
    ]
    with open(base + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print(f"\nwrote {base}.json and .md")


def _case_markdown(case: Case, rows: list[dict[str, Any]], speedup: dict[str, Any], diff: float, flops: int
                   ) -> list[str]:
    wl = case.workload
    out = ["", f"## {case.title}", "", f"{wl.numel:,} parameters in {wl.num_tensors} tensors ({wl.description}).", "",
           "| implementation | ms/step | p10-p90 ms | round medians ms | speed-up vs torch |", "|---|---|---|---|---|"]
    for r in rows:
        rounds = ", ".join(f"{v:.1f}" for v in r["round_medians_ms"])
        sp = (f"{speedup['overall']:.2f}x ({speedup['round_min']:.2f}-{speedup['round_max']:.2f}x by round)"
              if r["family"] == "fusedopt" else "1.00x")
        out.append(f"| {r['impl']} | {r['ms_median']:.2f} | {r['ms_p10']:.2f}-{r['ms_p90']:.2f} | {rounds} | {sp} |")
    out += ["", "| implementation | piece | ms/step (median) | share of the step |", "|---|---|---|---|"]
    for r in rows:
        for p in r["pieces"]:
            label = "&nbsp;&nbsp;&nbsp;" * p["depth"] + p["label"]
            out.append(f"| {r['impl']} | {label} | {p['ms_median']:.2f} | {100 * p['share_of_step']:.0f}% |")
    best = min(r["ms_median"] for r in rows)
    out += ["", f"- Newton-Schulz: {flops / 1e9:.1f} GFLOP per step (5 iterations on "
                f"{sum(1 for n, _ in case.workload.shapes if hb.is_block_matrix(n) or case.key == 'matrices')} "
                f"matrices), {flops / 1e9 / (best / 1e3):.0f} GFLOP/s over the faster whole step.",
            f"- Largest |parameter difference| between the two after the run: {diff:.2e} (both finite: "
            f"{all(r['finite'] for r in rows)})."]
    out += [f"- {note}" for note in case.notes]
    return out


if __name__ == "__main__":
    main()
