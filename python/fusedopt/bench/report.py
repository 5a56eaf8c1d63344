"""Output of the benchmark harness: result tables (text and markdown), JSON and CSV files tagged with machine,
ISA and commit, the throughput-vs-size plot, and a stderr progress bar."""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from typing import IO, Any

import torch

from .registry import OPTIMIZERS, bytes_per_param
from .workloads import format_size

__all__ = [
    "Progress",
    "bytes_table",
    "format_table",
    "untrusted_note",
    "machine_info",
    "machine_tag",
    "plot_results",
    "write_csv",
    "write_json",
]


def bytes_table() -> str:
    """Markdown table of bytes per parameter per algorithm and dtype (no clipping)."""
    cases = [
        ("fp32 params, fp32 states", torch.float32, torch.float32),
        ("bf16 params, fp32 states", torch.bfloat16, torch.float32),
        ("fp32 params, bf16 states", torch.float32, torch.bfloat16),
        ("bf16 params, bf16 states", torch.bfloat16, torch.bfloat16),
    ]
    lines = ["| optimizer | states | " + " | ".join(c[0] for c in cases) + " |", "|---" * (len(cases) + 2) + "|"]
    for name, spec in OPTIMIZERS.items():
        row = [str(bytes_per_param(name, p, s)) for _, p, s in cases]
        lines.append(f"| {name} | {spec.states} | " + " | ".join(row) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- environment

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit(here: str | None = None) -> str | None:
    """HEAD of the git checkout holding ``here`` (default: this package), "-dirty" with uncommitted changes."""
    here = here or os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
        )
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here, capture_output=True, text=True, timeout=5,
            check=False,
        )
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: str = "cpu", *, repo_dir: str | None = None) -> dict[str, Any]:
    """Tags for a result file: machine, ISA, versions, commit (of ``repo_dir`` or else this package's checkout),
    timestamp."""
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": (repo_dir and _git_commit(repo_dir)) or _git_commit(),
    }
    try:
        import fusedopt

        build = fusedopt.build_info()
        info["fusedopt_version"] = getattr(fusedopt, "__version__", build.get("version"))
        info["cpu_isa"] = build.get("cpu_isa")
        info["fusedopt_backends"] = build.get("backends")
        info["build_info"] = build
    except Exception as e:  # noqa: BLE001 - a tag must never stop a benchmark
        info["fusedopt_version"] = None
        info["build_info_error"] = repr(e)
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        idx = torch.device(device).index or 0
        prop = torch.cuda.get_device_properties(idx)
        info["gpu"] = prop.name
        info["gpu_memory_bytes"] = prop.total_memory
    return info


def machine_tag(info: dict[str, Any] | None = None, device: str = "cpu") -> str:
    """Short file-name tag: ``amd-epyc-2c`` on CPU, ``nvidia-h100-80gb-hbm3`` on GPU."""
    info = info or machine_info(device)
    if info.get("gpu") and torch.device(device).type == "cuda":
        base = info["gpu"]
    else:
        base = f"{info['cpu_model']}-{info['cpu_cores']}c"
    for junk in ("(R)", "(TM)", "(tm)", "CPU", "Processor", "@"):
        base = base.replace(junk, " ")
    tag = "".join(c.lower() if c.isalnum() else "-" for c in base)
    while "--" in tag:
        tag = tag.replace("--", "-")
    return tag.strip("-") or "unknown"


# ------------------------------------------------------------------------------------------------ output

kColumns = [
    ("implementation", "impl", "{}"),
    ("ms/step", "ms_median", "{:.3f}"),
    ("p10-p90 ms", None, None),
    ("Mparams/s", "params_per_s", None),
    ("B/param", "bytes_per_param", "{}"),
    ("GB/s", "gbs", "{:.1f}"),
    ("% bw", "pct_bandwidth", "{:.0f}%"),
    ("speed-up vs best torch", "speedup_vs_best_torch", "{:.2f}x"),
]


def format_table(rows: Iterable[dict[str, Any]], *, markdown: bool = False) -> str:
    """Aligned text (or markdown) table: implementation, ms/step, p10-p90, Mparams/s, bytes/param, GB/s,
    % of measured bandwidth, speed-up over the best torch.optim flavour."""
    body: list[list[str]] = []
    for r in rows:
        line = []
        for title, key, fmt in kColumns:
            if title == "p10-p90 ms":
                line.append(f"{r['ms_p10']:.3f}-{r['ms_p90']:.3f}")
            elif title == "Mparams/s":
                line.append(f"{r['params_per_s'] / 1e6:.1f}")
            elif key == "pct_bandwidth" and r.get("compute_bound"):
                line.append("matmul")
            elif key == "pct_bandwidth" and r.get("fits_in_cache"):
                line.append("cache")
            elif key == "speedup_vs_best_torch" and r.get(key) is not None and not r.get("speedup_trusted", True):
                line.append(f"{r[key]:.2f}x?")
            else:
                v = r.get(key)
                line.append("n/a" if v is None else fmt.format(v))
        body.append(line)
    header = [c[0] for c in kColumns]
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(line) + " |" for line in body]
        return "\n".join(out)
    widths = [max(len(header[i]), *(len(b[i]) for b in body)) if body else len(header[i]) for i in range(len(header))]
    def fmt_line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [fmt_line(header), "  ".join("-" * w for w in widths)]
    out += [fmt_line(b) for b in body]
    return "\n".join(out)


def untrusted_note(rows: Iterable[dict[str, Any]]) -> str | None:
    """A line saying which speed-ups (marked "?") the timing spread leaves undetermined, or None."""
    shaky = [r for r in rows if not r.get("speedup_trusted", True)]
    if not shaky:
        return None
    ranges = ", ".join(f"{r['impl']} {r['speedup_p10_p90'][0]:.2f}-{r['speedup_p10_p90'][1]:.2f}x" for r in shaky)
    return (f"?: the p10-p90 spreads are too wide to trust this ratio ({ranges}); the machine is noisy: rerun "
            "with more --steps or on an idle machine")


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON (values JSON cannot hold as their ``str``), creating the folder."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
        f.write("\n")


kCsvFields = [
    "optimizer", "impl", "workload", "params", "tensors", "device", "dtype", "state_dtype", "clip", "steps",
    "ms_median", "ms_p10", "ms_p90", "params_per_s", "bytes_per_param", "gbs", "pct_bandwidth",
    "speedup_vs_best_torch", "best_torch", "finite",
]


def write_csv(path: str, rows: Iterable[dict[str, Any]], meta: dict[str, Any] | None = None) -> None:
    """One row per (optimizer, workload, implementation); machine tags repeated on each row."""
    extra = ["cpu_model", "cpu_isa", "torch", "fusedopt_version", "git_commit", "timestamp"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=kCsvFields + extra, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({**r, **{k: (meta or {}).get(k) for k in extra}})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        f.write(buf.getvalue())


class Progress:
    """A plain stderr progress bar that appears only after one second and only on a terminal (or when forced)."""

    def __init__(
        self, label: str = "", total: int = 0, *, enabled: bool | None = None, stream: IO[str] | None = None
    ) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label = label
        self.total = total
        self.done = 0
        self.start = time.perf_counter()
        self._last = 0.0
        self._drawn = False

    def reset(self, total: int, label: str | None = None) -> None:
        """Start over with ``total`` units of work (and a new label when given)."""
        self.total, self.done = total, 0
        if label is not None:
            self.label = label
        self._draw()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units done."""
        self.done += n
        self._draw()

    def set_label(self, label: str) -> None:
        """Show ``label`` in front of the bar."""
        self.label = label
        self._draw()

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and (now - self.start < 1.0 or now - self._last < 0.1):
            return
        self._last = now
        frac = self.done / self.total if self.total else 0.0
        width = 30
        filled = int(frac * width)
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(f"\r{self.label[:40]:<40} [{bar}] {100 * frac:3.0f}% {now - self.start:6.1f}s")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        """Draw the final state and end the line, when anything was drawn."""
        if self.enabled and self._drawn:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()


def plot_results(rows: Sequence[dict[str, Any]], bandwidth: dict[str, Any], meta: dict[str, Any], path: str,
                 *, device: str = "cpu") -> None:
    """One panel per optimizer. One size: a bar per implementation of its median step time, with the p10-p90
    spread as an error bar. Several sizes (--sweep): effective GB/s against parameter count (log x), one line per
    implementation, the measured memory bandwidth as a horizontal line, and the sizes whose data fit in the CPU
    cache (where a step may exceed that bandwidth) shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    optimizers = list(dict.fromkeys(r["optimizer"] for r in rows))
    n = len(optimizers)
    cols = min(n, 3)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.4 * cols, 4.4 * nrows), squeeze=False)
    machine = meta.get("gpu") if device == "cuda" and meta.get("gpu") else (
        f"{meta.get('cpu_model')}, {meta.get('torch_threads')} thread(s)")
    for ax, opt_name in zip(axes.flat, optimizers):
        sub = [r for r in rows if r["optimizer"] == opt_name]
        sizes = sorted({r["params"] for r in sub})
        dt = sub[0]["dtype"]
        clip = f", clip {sub[0]['clip']:g}" if sub[0]["clip"] else ""
        if len(sizes) == 1:
            _bar_panel(ax, sub)
            ax.set_title(f"{opt_name}, {format_size(sizes[0])} parameters ({dt}{clip})")
            continue
        for impl in dict.fromkeys(r["impl"] for r in sub):
            pts = sorted((r["params"], r["gbs"]) for r in sub if r["impl"] == impl)
            style = "-o" if impl.startswith("fusedopt") else "--s"
            width = 2 if impl.startswith("fusedopt") else 1.2
            ax.plot([p for p, _ in pts], [g for _, g in pts], style, label=impl, linewidth=width)
        ax.axhline(bandwidth["gbs"], color="black", linestyle=":",
                   label=f"measured memory bandwidth {bandwidth['gbs']:.0f} GB/s")
        cached = [s for s in sizes if all(r.get("fits_in_cache") for r in sub if r["params"] == s)]
        if cached:
            ax.axvspan(sizes[0] / 1.3, max(cached) * 1.3, color="0.9", zorder=0, label="fits in CPU cache")
        ax.set_xscale("log")
        ax.set_xticks(sizes)
        ax.set_xticklabels([format_size(s) for s in sizes])
        ax.minorticks_off()
        ax.set_xlabel("parameters")
        ax.set_ylabel("effective bandwidth (GB/s, algorithmic bytes)")
        ax.set_title(f"{opt_name} ({dt}{clip})")
        ax.set_ylim(bottom=0)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(f"fusedopt {meta.get('fusedopt_version')} optimizer step on {machine}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _bar_panel(ax: Any, rows: Sequence[dict[str, Any]]) -> None:
    """Median step time per implementation, p10-p90 as asymmetric error bars."""
    names = [r["impl"] for r in rows]
    med = [r["ms_median"] for r in rows]
    err = [[m - r["ms_p10"] for m, r in zip(med, rows)], [r["ms_p90"] - m for m, r in zip(med, rows)]]
    colors = ["tab:blue" if name.startswith("fusedopt") else "tab:gray" for name in names]
    ax.bar(range(len(rows)), med, yerr=err, capsize=4, color=colors)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize="small")
    ax.set_ylabel("ms per step (median; bars: p10-p90)")
    ax.set_ylim(bottom=0)
    ax.grid(True, axis="y", alpha=0.3)
