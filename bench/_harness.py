"""Shared driver of the bench/*.py scripts: runs a list of cases through fusedopt.bench (the harness core,
which the ``fusedopt bench`` CLI also uses) and writes bench/results/<name>-<machine>.{json,csv,md}."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

kRepo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
kResults = os.path.join(kRepo, "bench", "results")

try:  # an installed fusedopt wins; a source checkout works with nothing installed
    import fusedopt
except ImportError:
    sys.path.insert(0, os.path.join(kRepo, "python"))
    import fusedopt  # noqa: F401

import torch  # noqa: E402
from fusedopt import bench as hb  # noqa: E402
from fusedopt.bench.workloads import Workload, format_size  # noqa: E402

__all__ = ["Case", "best_fusedopt", "hb", "kRepo", "kResults", "run_suite"]


@dataclass
class Case:
    """One table of the report: an optimizer on a workload with a list of implementations."""

    title: str
    optimizer: str
    workload: Workload
    impls: Sequence[hb.ImplSpec]
    clip: float | None = None
    dtype: torch.dtype = torch.float32
    notes: list[str] = field(default_factory=list)


# torch.optim's algorithms without fused=True: compared with torch's foreach (and on a GPU its for-loop)
# implementations. `--cases family` selects them all.
kFamily = ["radam", "adamax", "nadam", "adadelta", "rprop", "asgd", "adafactor"]


def cases_help(cases: Sequence[str]) -> str:
    return f"comma list of {', '.join([*cases, *kFamily])}, or family (= {','.join(kFamily)})"


def parse_cases(text: str, cases: Sequence[str]) -> list[str]:
    """The comma list `text` ("family" standing for kFamily); ValueError naming what is not in `cases` or kFamily."""
    which = [c.strip() for c in text.replace("family", ",".join(kFamily)).split(",") if c.strip()]
    known = [*cases, *kFamily]
    bad = [c for c in which if c not in known]
    if bad:
        raise ValueError(f"Invalid case: {','.join(bad)} (expected a comma list of {', '.join(known)})")
    return which


def best_fusedopt(device: str) -> str:
    """The compiled fusedopt backend for ``device`` when built, else the reference backend."""
    dev = torch.device(device).type
    return f"fusedopt-{dev}" if dev in hb.fusedopt_backends() else "fusedopt-reference"


def run_suite(
    name: str,
    cases: Sequence[Case],
    *,
    device: str,
    steps: int,
    warmup: int,
    out_dir: str = kResults,
    progress: bool | None = None,
    extra_meta: dict[str, Any] | None = None,
) -> str:
    """Run every case (implementations interleaved within a case), print tables, write JSON/CSV/markdown.

    Memory is checked for every case before the first allocation. Returns the JSON path.
    """
    for case in cases:
        ok, skipped = hb.resolve_impls(case.impls, case.optimizer, device, case.dtype, case.clip)
        case.impls = ok
        case.notes += [f"skipped {label}: {reason}" for label, reason in skipped.items()]
        try:
            hb.check_memory(ok, case.optimizer, case.workload, case.dtype, device)
        except hb.MemoryError_ as e:
            sys.exit(f"{name}: error: {case.title}: {e}")
    meta = hb.machine_info(device, repo_dir=kRepo)
    meta.update(extra_meta or {})
    bar = hb.Progress("measuring bandwidth", enabled=progress)
    bw = hb.measure_bandwidth(device, progress=bar)
    bar.close()
    print(
        f"{name}: fusedopt {meta.get('fusedopt_version')} | torch {meta['torch']} | "
        f"{meta.get('gpu') or meta['cpu_model']} | {torch.get_num_threads()} thread(s) | ISA {meta.get('cpu_isa')} | "
        f"bandwidth {bw['gbs']:.1f} GB/s (copy {bw['copy_gbs']:.1f}, in-place {bw['update_gbs']:.1f})",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    md = [
        f"# {name} on {meta.get('gpu') or meta['cpu_model']}",
        "",
        (
            f"fusedopt {meta.get('fusedopt_version')} (commit {meta.get('git_commit')}), torch {meta['torch']}, "
            f"{torch.get_num_threads()} thread(s), ISA {meta.get('cpu_isa')}, {meta['timestamp']}."
        ),
        (
            f"Measured memory bandwidth: {bw['gbs']:.1f} GB/s (copy {bw['copy_gbs']:.1f} GB/s, in-place update "
            f"{bw['update_gbs']:.1f} GB/s, read + write bytes). Median of {steps} steps after {warmup} warm-up, "
            "implementations interleaved, fresh random gradients every step. GB/s counts the bytes the algorithm "
            "must move (see bench/README.md)."
        ),
    ]
    for case in cases:
        if not case.impls:
            print(f"\n{case.title}: nothing to run ({'; '.join(case.notes)})")
            md += ["", f"## {case.title}", "", "nothing to run: " + "; ".join(case.notes)]
            continue
        bar = hb.Progress(case.title, enabled=progress)
        result = hb.run_benchmark(
            case.optimizer, case.workload, case.impls, device=device, dtype=case.dtype, clip=case.clip,
            steps=steps, warmup=warmup, bandwidth_gbs=bw["gbs"], progress=bar,
        )
        bar.close()
        for r in result:
            r["case"] = case.title
        rows += result
        head = (f"{case.title}: {case.workload.numel:,} params in {case.workload.num_tensors} tensors "
                f"({case.workload.description})")
        print("\n" + head)
        print(hb.format_table(result), flush=True)
        for note in case.notes:
            print(f"  note: {note}")
        sizes = f"{case.workload.numel:,} parameters in {case.workload.num_tensors} tensors"
        md += ["", f"## {case.title}", "", f"{sizes} ({case.workload.description}).", ""]
        md.append(hb.format_table(result, markdown=True))
        if case.notes:
            md += [""] + [f"- {note}" for note in case.notes]
    tag = hb.machine_tag(meta, device)
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"{name}-{tag}")
    payload = {
        "meta": meta,
        "bandwidth": bw,
        "config": {"steps": steps, "warmup": warmup, "device": device, "threads": torch.get_num_threads(),
                   "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])},
        "cases": [{"title": c.title, "optimizer": c.optimizer, "workload": c.workload.name,
                   "params": c.workload.numel, "tensors": c.workload.num_tensors, "clip": c.clip,
                   "impls": [s.label for s in c.impls], "notes": c.notes} for c in cases],
        "results": rows,
    }
    hb.write_json(base + ".json", payload)
    hb.write_csv(base + ".csv", rows, meta)
    with open(base + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print(f"\nwrote {base}.json, .csv and .md")
    return base + ".json"


def size_label(n: int) -> str:
    return format_size(n)
