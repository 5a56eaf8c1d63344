"""`fusedopt bench --memory` (fusedopt.bench.memory): optimizer bytes per parameter measured in fresh processes.

One run of the command on a 2M-parameter GPT-2-shaped set measures four modes at once (one process each) and its
numbers are checked against the state layout; the layout formula itself is checked against the tensors the
optimizers really hold; peers (bitsandbytes, torchao) are never required.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from fusedopt import cli
from fusedopt.bench import memory as hm
from fusedopt.bench.workloads import Workload, gpt2_workload, make_params

kMeasured = ["fusedopt-fp32", "fusedopt-bf16-states", "fusedopt-bf16-master", "torch-fused"]
# What each of them keeps per parameter beyond parameters and gradients: two fp32 states, two bf16 states, two fp32
# states and an fp32 master copy of the bf16 parameters, torch's two fp32 states.
kLayout = {"fusedopt-fp32": 8.0, "fusedopt-bf16-states": 4.0, "fusedopt-bf16-master": 12.0, "torch-fused": 8.0}
# Process memory is counted in pages and the interpreter allocates a little on the side: at 2M parameters that is
# well under 0.5 B/param; a measurement that counts the parameters or gradients again is off by 2-4 B/param.
kTolerance = 1.0


@pytest.fixture(scope="module")
def memory_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory") / "memory.json"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli.main(["bench", "--memory", "--params", "2M", "--modes", ",".join(kMeasured), "--jobs", "4",
                         "--steps", "2", "--device", "cpu", "--threads", "1", "--json", str(out)])
    assert code == 0, buf.getvalue()
    with open(out) as f:
        payload = json.load(f)
    return buf.getvalue(), payload, {r["mode"]: r for r in payload["results"]}


def test_measured_steady_bytes_match_the_state_layout(memory_run):
    _, payload, rows = memory_run
    assert set(rows) == set(kMeasured)
    for key, want in kLayout.items():
        r = rows[key]
        assert r["status"] == "ok", r
        assert r["finite"]
        assert r["params"] == payload["config"]["params"] > 1_900_000
        assert r["expected_bytes_per_param"] == pytest.approx(want, abs=0.05), key
        assert r["steady_bytes_per_param"] == pytest.approx(want, abs=kTolerance), (key, r)


def test_measured_peak_is_the_steady_state_plus_temporaries(memory_run):
    _, _, rows = memory_run
    for key, want in kLayout.items():
        r = rows[key]
        # fusedopt's step and torch's fused CPU step allocate nothing of the parameters' size
        assert r["steady_bytes_per_param"] - 0.1 <= r["peak_bytes_per_param"] <= want + kTolerance, (key, r)


def test_fusedopt_moves_parameters_and_gradients_instead_of_copying_them(memory_run):
    """After the constructor fusedopt holds its flat gradient buffer while the original gradients still exist (+4
    B/param in fp32, +2 in bf16); the first step takes them in and frees the originals. The parameters' originals are
    freed by the constructor already. Measured, not assumed: a leaked copy shows here."""
    _, _, rows = memory_run
    assert rows["fusedopt-fp32"]["after_build_bytes_per_param"] == pytest.approx(4.0, abs=kTolerance)
    assert rows["fusedopt-bf16-master"]["after_build_bytes_per_param"] == pytest.approx(2.0 + 4.0, abs=kTolerance)
    assert rows["torch-fused"]["after_build_bytes_per_param"] == pytest.approx(0.0, abs=kTolerance)


def test_memory_table_printed(memory_run):
    stdout, _, rows = memory_run
    assert "B/param steady" in stdout and "B/param expected" in stdout
    for key in kMeasured:
        r = rows[key]
        line = next(x for x in stdout.splitlines() if x.startswith(r["label"] + " "))
        cells = line[len(r["label"]):].split()
        assert float(cells[0]) == pytest.approx(r["steady_bytes_per_param"], abs=0.006), line
        assert float(cells[1]) == pytest.approx(r["peak_bytes_per_param"], abs=0.006), line


def _tiny() -> Workload:
    # Two tensors over the 8-bit optimizers' 4,096-element threshold (one a multiple of their 256-element blocks, one
    # not: torchao keeps that one in fp32), two under it whose sizes are not multiples of fusedopt's alignment.
    return Workload("tiny", [("w", (256, 64)), ("v", (257, 64)), ("b", (100,)), ("e", (33, 31))])


@pytest.mark.parametrize("key", ["fusedopt-fp32", "fusedopt-bf16-states", "fusedopt-bf16-master",
                                 "fusedopt-bf16-bf16-states", "torch-fused", "torch-foreach"])
def test_expected_bytes_are_the_bytes_the_optimizer_holds(key):
    """The layout formula against the tensors a real optimizer refers to after a step (each storage once); fusedopt's
    formula also counts the padding of its parameter and gradient buffers, which its state does not hold."""
    mode = {m.key: m for m in hm.MODES}[key]
    wl = _tiny()
    params = make_params(wl, dtype=hm.kDtypeOf[mode.param_dtype])
    opt = hm._build(mode, params, torch.device("cpu"))
    opt.step()
    held = hm._held_bytes(opt)
    expected = hm.expected_bytes(mode, wl)["bytes"]
    if mode.kind == "fusedopt":
        from fusedopt.flat import packed_offsets

        total = packed_offsets([math.prod(s) for _, s in wl.shapes])[1]
        padding = 2 * hm.kDtypeOf[mode.param_dtype].itemsize * (total - wl.numel)
        assert padding > 0
        assert held == expected - padding
    else:
        assert held == expected


def test_expected_bytes_of_the_8bit_peers():
    """Two states of 8-bit codes plus an fp32 scale per 256-element block for tensors of 4,096 elements or more
    (torchao: only when a multiple of 256), two fp32 states for the others (100 + 1,023 elements), a float32 step per
    tensor in torchao (bitsandbytes counts steps in a Python int); bitsandbytes shares its two 256-entry code tables,
    torchao keeps one per state and tensor."""
    wl = _tiny()
    by = {m.key: m for m in hm.MODES}
    step, small = 4 * 4, 8 * 1123
    w8 = 2 * (16384 + 4 * 64)  # 64 blocks
    v8 = 2 * (16448 + 4 * 65)  # 64.25 blocks: bitsandbytes rounds up
    assert hm.expected_bytes(by["bnb-adamw8bit"], wl)["bytes"] == w8 + v8 + 2 * 1024 + small
    assert hm.expected_bytes(by["torchao-adamw8bit"], wl)["bytes"] == w8 + 2 * 1024 + 8 * 16448 + small + step


def test_bitsandbytes_expected_bytes_if_installed():
    pytest.importorskip("bitsandbytes")
    mode = {m.key: m for m in hm.MODES}["bnb-adamw8bit"]
    wl = _tiny()
    params = make_params(wl)
    for p in params:
        p.grad.normal_()
    try:
        opt = hm._build(mode, params, torch.device("cpu"))
        opt.step()
    except Exception as e:  # noqa: BLE001 - a bitsandbytes without a CPU path is what the row reports, not a failure
        pytest.skip(f"bitsandbytes AdamW8bit does not run on the CPU here: {e!r}")
    assert hm._held_bytes(opt) == hm.expected_bytes(mode, wl)["bytes"]


def test_missing_peer_is_a_skipped_row(monkeypatch):
    real = hm.importlib.util.find_spec
    monkeypatch.setattr(hm.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("bitsandbytes", "torchao") else real(name, *a))
    modes = [m for m in hm.MODES if m.module]
    rows = hm.measure_modes(modes, gpt2_workload("1M"))  # no process is started for a missing package
    assert [r["status"] for r in rows] == ["skipped", "skipped"]
    assert rows[0]["reason"] == "bitsandbytes is not installed (pip install bitsandbytes)"
    table = hm.format_memory_table(rows)
    assert "Skipped: bitsandbytes is not installed" in table and "Skipped: torchao is not installed" in table
    assert rows[0]["expected_bytes_per_param"] == pytest.approx(2.0, abs=0.2)


def test_failing_mode_is_an_unavailable_row_with_the_error(monkeypatch, tmp_path):
    def boom(*args, **kwargs):
        raise RuntimeError("no CPU kernel for this\nsecond line")

    monkeypatch.setattr(hm, "measure_mode", boom)
    job = {"mode": "bnb-adamw8bit", "shapes": [["w", [64, 64]]], "name": "w", "description": "", "device": "cpu",
           "steps": 2, "seed": 0, "threads": None, "out": str(tmp_path / "row.json")}
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps(job))
    assert hm.main(["--worker", str(spec)]) == 0
    row = json.loads((tmp_path / "row.json").read_text())
    assert row["status"] == "unavailable"
    assert row["reason"] == "RuntimeError: no CPU kernel for this"
    assert "Unavailable: RuntimeError: no CPU kernel for this" in hm.format_memory_table([row])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--memory", "--optimizer", "sgd"], "measures AdamW only"),
        (["bench", "--memory", "--clip", "1"], "--clip: does not apply with --memory"),
        (["bench", "--memory", "--dtype", "bf16"], "--dtype: does not apply with --memory"),
        (["bench", "--memory", "--steps", "1"], "at least 2"),
        (["bench", "--memory", "--modes", "fusedopt-fp32,nope"], "Invalid memory mode: 'nope'"),
        (["bench", "--modes", "fusedopt-fp32"], "--modes: only with --memory"),
        (["bench", "--jobs", "2"], "--jobs: only with --memory"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else v,
)
def test_memory_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--device", "cpu", "--json", os.devnull])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_memory_too_large_is_refused_before_measuring(capsys):
    assert cli.main(["bench", "--memory", "--params", "500B", "--device", "cpu", "--json", os.devnull]) == \
        cli.kExitMemory
    out, err = capsys.readouterr()
    assert "needs about" in err and "--memory" in err
    assert "B/param" not in out
