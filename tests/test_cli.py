"""Command-line tests: argument handling of ``fusedopt bench``/``info`` and one ``bench --quick`` run end to end.

No timing assertions: only that every expected implementation ran and the reported numbers are consistent.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import fusedopt
import pytest
from fusedopt import cli

kPackageRoot = os.path.dirname(os.path.dirname(os.path.abspath(fusedopt.__file__)))
DEFAULT_OPTIMIZER = cli.build_parser().parse_args(["bench"]).optimizer[0]  # what `bench` runs unless told


def _env() -> dict[str, str]:
    # The subprocess must import the same fusedopt as this test process (installed or source tree).
    env = dict(os.environ)
    env["PYTHONPATH"] = kPackageRoot + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("FUSEDOPT_BACKEND", None)
    return env


def _run(*args: str, timeout: float = 300, env: dict[str, str] | None = None, cwd: object = None
         ) -> subprocess.CompletedProcess:
    """`fusedopt <args>` in a subprocess; `env` adds variables to `_env()`."""
    return subprocess.run(
        [sys.executable, "-m", "fusedopt", *args], capture_output=True, text=True, env={**_env(), **(env or {})},
        cwd=cwd, timeout=timeout,
        check=False,
    )


def _expected_cpu_impls() -> list[str]:
    fo = "fusedopt-cpu" if "cpu" in fusedopt.build_info()["backends"] else "fusedopt-reference"
    return [fo, "torch-foreach", "torch-fused"]  # the slow for-loop only with --forloop


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--optimizer", "lbfgs"], "Invalid optimizer"),
        (["bench", "--optimizer", f"{DEFAULT_OPTIMIZER},nope"], "Invalid optimizer"),
        (["bench", "--params", "12Q"], "Invalid size"),
        (["bench", "--params", "0"], "Invalid size"),
        (["bench", "--params=-5M"], "Invalid size"),
        (["bench", "--tensors", "0"], "Invalid tensors"),
        (["bench", "--steps", "x"], "Invalid steps"),
        (["bench", "--clip", "-1"], "Invalid clip"),
        (["bench", "--dtype", "int8"], "invalid choice"),
        (["bench", "--impls", "torch-magic"], "Invalid implementation"),
        (["bench", "--quick", "--params", "1K", "--tensors", "5000"], "Invalid tensors"),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else v,
)
def test_bad_arguments_exit_2_with_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"], ["info", "--help"]], ids=" ".join)
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: fusedopt" in out
    if argv[0] == "bench":
        for option in ("--optimizer", "--params", "--tensors", "--clip", "--sweep", "--plot", "--quick", "--json",
                       "--forloop"):
            assert option in out
    assert "(default: None)" not in out and "default: False" not in out  # each default said once, in words


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"fusedopt {fusedopt.__version__}"


def test_info_shows_the_backend_override():
    proc = _run("info", env={"FUSEDOPT_BACKEND": "reference"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "FUSEDOPT_BACKEND=reference" in proc.stdout
    assert "none (FUSEDOPT_BACKEND unset)" in _run("info").stdout


def test_plot_without_matplotlib_stops_before_benchmarking(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert cli.main(["bench", "--quick", "--plot", os.devnull, "--json", os.devnull]) == cli.kExitUsage
    out, err = capsys.readouterr()
    assert err.strip() == 'fusedopt bench: error: --plot needs matplotlib: pip install "fusedopt[bench]"'
    assert out == ""  # nothing was measured


def _row(impl: str, p10: float, med: float, p90: float) -> dict:
    return {"impl": impl, "impl_name": impl.split("[")[0], "ms_p10": p10, "ms_median": med, "ms_p90": p90}


def test_speedup_is_marked_untrusted_when_the_spreads_are_wide():
    from fusedopt.bench.measure import _add_speedups
    from fusedopt.bench.report import untrusted_note

    steady = [_row("fusedopt-cpu", 9.5, 10.0, 10.5), _row("torch-fused", 19.0, 20.0, 21.0)]
    _add_speedups(steady)
    assert steady[0]["speedup_vs_best_torch"] == pytest.approx(2.0)
    assert steady[0]["speedup_p10_p90"] == pytest.approx([19 / 10.5, 21 / 9.5])
    assert all(r["speedup_trusted"] for r in steady) and untrusted_note(steady) is None
    noisy = [_row("fusedopt-cpu", 5.0, 10.0, 30.0), _row("torch-fused", 19.0, 20.0, 21.0)]
    _add_speedups(noisy)
    assert not noisy[0]["speedup_trusted"] and noisy[1]["speedup_trusted"]
    assert "fusedopt-cpu 0.63-4.20x" in untrusted_note(noisy)


def test_parse_size_and_sweep_sizes():
    from fusedopt.bench.workloads import parse_size

    assert parse_size("1M") == 1_000_000
    assert parse_size("124m") == 124_000_000
    assert parse_size("1.5B") == 1_500_000_000
    assert parse_size("4096") == 4096
    assert cli._sweep_sizes(parse_size("124M")) == [1_000_000, 4_000_000, 16_000_000, 64_000_000, 124_000_000]


def test_workload_shapes():
    from fusedopt.bench.workloads import equal_tensors_workload, gpt2_workload, transformer_128m_workload

    gpt2 = gpt2_workload("124M")
    assert gpt2.numel == 124_439_808 and gpt2.num_tensors == 148
    assert dict(gpt2.shapes)["wte"] == (50257, 768)
    big = transformer_128m_workload()
    assert 127e6 < big.numel < 129e6 and 190 <= big.num_tensors <= 210
    small = equal_tensors_workload("1M", 200)
    assert small.numel == 1_000_000 and small.num_tensors == 200


def test_too_large_is_refused_before_allocating(capsys):
    assert cli.main(["bench", "--params", "500B", "--impls", "torch-fused", "--json", os.devnull]) == cli.kExitMemory
    err = capsys.readouterr().err
    assert "needs about" in err and "available" in err


def test_info_subprocess():
    proc = _run("info")
    assert proc.returncode == 0, proc.stderr
    for key in ("fusedopt", "backends", "CPU ISA", "CUDA", "torch"):
        assert key in proc.stdout
    proc = _run("info", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["version"] == fusedopt.build_info()["version"]
    assert "reference" in info["backends"]


@pytest.mark.parametrize(
    "code",
    [
        "import fusedopt",
        "import fusedopt.cli",
        "from fusedopt import cli; assert cli.main(['info', '--json']) == 0",
    ],
    ids=["import fusedopt", "import fusedopt.cli", "fusedopt info"],
)
def test_library_and_info_do_not_import_the_bench_harness(code):
    # The harness lives in fusedopt.bench and is loaded by the bench command only.
    check = "import sys; bad = sorted(m for m in sys.modules if m.startswith('fusedopt.bench')); assert not bad, bad"
    proc = subprocess.run(
        [sys.executable, "-c", f"{code}\n{check}"], capture_output=True, text=True, env=_env(), timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`bench --quick` without --json, run in an empty folder: the results go to the cache folder, not there."""
    work, cache = tmp_path_factory.mktemp("cwd"), tmp_path_factory.mktemp("cache")
    # One thread keeps this smoke test's run time steady on small shared CI machines.
    proc = _run("bench", "--quick", "--device", "cpu", "--threads", "1", env={"XDG_CACHE_HOME": str(cache)}, cwd=work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list(work.iterdir()) == []
    (out,) = (cache / "fusedopt" / "bench").glob("bench-*.json")
    assert f"wrote {out} and {out.with_suffix('.csv')}" in proc.stdout
    return proc.stdout, json.loads(out.read_text()), out


def test_quick_bench_marks_cache_resident_steps(quick_run):
    """1M AdamW parameters (28 MB moved) fit in a server CPU's cache: no share of memory bandwidth is claimed."""
    from fusedopt.bench.measure import llc_bytes

    stdout, payload, _ = quick_run
    rows = _table_rows(stdout)
    for r in payload["results"]:
        expected = bool(llc_bytes()) and r["bytes_per_param"] * r["params"] < 2 * llc_bytes()
        assert r["fits_in_cache"] == expected
        assert (r["pct_bandwidth"] is None) == expected
        assert (rows[r["impl"]][6] == "cache") == expected


@pytest.mark.parametrize("sweep", [False, True], ids=["bars", "sweep"])
def test_plot(sweep, tmp_path):
    pytest.importorskip("matplotlib")
    from fusedopt.bench.report import plot_results

    rows = []
    for params in ([1_000_000, 4_000_000] if sweep else [1_000_000]):
        for impl, ms in (("fusedopt-cpu", 1.0), ("torch-fused", 2.0)):
            rows.append({"optimizer": "adamw", "impl": impl, "params": params, "gbs": 28 * params / ms / 1e6,
                         "ms_median": ms, "ms_p10": 0.9 * ms, "ms_p90": 1.2 * ms, "dtype": "fp32", "clip": None,
                         "fits_in_cache": params < 2_000_000})
    path = tmp_path / "plot.png"
    plot_results(rows, {"gbs": 20.0}, {"fusedopt_version": "x", "cpu_model": "cpu", "torch_threads": 1}, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _table_rows(stdout: str) -> dict[str, list[str]]:
    rows = {}
    lines = stdout.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("implementation") and "ms/step" in line:
            for row in lines[i + 2 :]:
                if not row.strip():
                    break
                cells = row.split()
                rows[cells[0]] = cells
    return rows


def test_quick_bench_table_names_every_implementation(quick_run):
    stdout, _, _ = quick_run
    rows = _table_rows(stdout)
    for name in _expected_cpu_impls():
        assert name in rows, f"{name} missing from the table:\n{stdout}"


def test_quick_bench_json(quick_run):
    _, payload, path = quick_run
    assert path.with_suffix(".csv").exists()
    for key in ("cpu_model", "cpu_cores", "torch", "fusedopt_version", "timestamp"):
        assert key in payload["meta"]
    assert payload["bandwidth"]["gbs"] > 0
    results = {r["impl"]: r for r in payload["results"]}
    for name in _expected_cpu_impls():
        r = results[name]
        assert r["optimizer"] == DEFAULT_OPTIMIZER and r["device"] == "cpu"
        for key in ("ms_median", "ms_p10", "ms_p90", "gbs", "params_per_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (name, key, r[key])
        assert r["ms_p10"] <= r["ms_median"] <= r["ms_p90"]
        assert r["bytes_per_param"] == 28  # default optimizer, fp32: param, 2 states read+written; grad read
        assert r["finite"]
    best = min(r["ms_median"] for r in results.values() if r["impl"].startswith("torch-"))
    for r in results.values():
        assert r["speedup_vs_best_torch"] == pytest.approx(best / r["ms_median"], rel=1e-9)
        assert r["gbs"] == pytest.approx(28 * r["params"] / (r["ms_median"] / 1e3) / 1e9, rel=1e-9)


def test_quick_bench_speedup_column_matches_ms_column(quick_run):
    stdout, payload, _ = quick_run
    rows = _table_rows(stdout)
    ms = {name: float(cells[1]) for name, cells in rows.items()}
    best = min(v for name, v in ms.items() if name.startswith("torch-"))
    trusted = {r["impl"]: r["speedup_trusted"] for r in payload["results"]}
    for name, cells in rows.items():
        assert cells[-1].endswith("x" if trusted[name] else "x?"), (name, cells)
        shown = float(cells[-1].rstrip("x?"))
        assert shown == pytest.approx(best / ms[name], rel=0.01, abs=0.006), (name, cells)


def test_cuda_requested_without_gpu_is_an_argument_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--device", "cuda", "--json", os.devnull])
    assert exc.value.code == 2
    assert "cuda" in capsys.readouterr().err


def test_muon_bench_runs_fusedopt_and_torch(tmp_path):
    """`bench --optimizer muon` on the 2-D tensors of a tiny GPT-2-shaped set: fusedopt and torch.optim.Muon (its
    one implementation, as torch-forloop) both run; torch's foreach/fused flavours are skipped with the reason."""
    out = tmp_path / "muon.json"
    proc = _run("bench", "--optimizer", "muon", "--quick", "--params", "200K", "--steps", "2", "--warmup", "1",
                "--device", "cpu", "--threads", "1", "--json", str(out), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fo = _expected_cpu_impls()[0]
    rows = _table_rows(proc.stdout)
    assert set(rows) == {fo, "torch-forloop"}, proc.stdout
    assert all(cells[6] == "matmul" for cells in rows.values())  # no share of memory bandwidth claimed
    for flavour in ("torch-foreach", "torch-fused"):
        assert f"[muon] skipped {flavour}: torch.optim.Muon has a single implementation" in proc.stdout
    payload = json.loads(out.read_text())
    results = {r["impl"]: r for r in payload["results"]}
    assert set(results) == {fo, "torch-forloop"}
    for r in results.values():
        assert r["optimizer"] == "muon" and r["workload"] == "gpt2-200K-2d" and r["finite"]
        assert r["bytes_per_param"] == 20 and r["pct_bandwidth"] is None and r["compute_bound"]
        assert math.isfinite(r["ms_median"]) and r["ms_median"] > 0
    assert results["torch-forloop"]["speedup_vs_best_torch"] == 1.0


def test_muon_workloads_are_matrices():
    from fusedopt import bench as hb

    default = hb.muon_matrices_workload()
    assert default.num_tensors == 24 and default.numel == 4_718_592
    assert [s for _, s in default.shapes[:4]] == [(768, 256), (256, 256), (1024, 256), (256, 1024)]
    gpt2 = hb.gpt2_workload("1M")
    assert cli._workloads_of("muon", [gpt2], size_chosen=False) == [default]
    (kept,) = cli._workloads_of("muon", [gpt2], size_chosen=True)
    assert kept.shapes == [(n, s) for n, s in gpt2.shapes if len(s) == 2] and kept.num_tensors < gpt2.num_tensors
    assert cli._workloads_of("adamw", [gpt2], size_chosen=False) == [gpt2]
    model = hb.gpt2_model_workload()
    assert [s for n, s in model.shapes if hb.is_block_matrix(n)] == [s for _, s in default.shapes]
    # Built on a parameter that is not a matrix, every Muon implementation says why it cannot run.
    params = hb.make_params(hb.Workload("mixed", [("w", (4, 4)), ("b", (4,))]))
    for name in ("fusedopt-reference", "torch-forloop"):
        with pytest.raises(hb.Unavailable, match="2-D parameters only"):
            hb.build_optimizer(hb.ImplSpec(name), "muon", params, clip=None)
