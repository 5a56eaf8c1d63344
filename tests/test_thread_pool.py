"""Where the CPU kernels' parallel regions run (csrc/cpu/thread_pool.cpp): the compiled core links no OpenMP runtime;
regions run on the one torch loaded (backend "openmp", found at run time) or on fusedopt's own pool (backend "pool":
no runtime, a forked child, or FUSEDOPT_THREADS_BACKEND=pool / _C.set_thread_backend). Either way they use as many
threads as torch.get_num_threads() (or fusedopt.set_num_threads) says, the results do not depend on the backend or the
team size, and a child forked after the parent stepped steps on its full thread count (on the pool), with
torch.optim's result. The pool's workers are named "fusedopt-pool", which is how these tests find them in /proc
(Linux only)."""
from __future__ import annotations

import ast
import inspect
import multiprocessing as mp
import os
import re
import struct
import subprocess
import sys
import textwrap

import fusedopt
import pytest
import torch

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and ELF files: Linux only"),
    pytest.mark.skipif("cpu" not in fusedopt.build_info()["backends"], reason="compiled CPU backend not built"),
]

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fusedopt.__file__)))
# libgomp (GNU; torch's wheel bundles a copy), libiomp5 (Intel), libomp (LLVM)
OPENMP_RUNTIME = re.compile(r"^lib(g|i|)omp")
CHUNK = int(fusedopt._C.build_info()["chunk_elements"])
# The OpenMP runtime the extension found when it was loaded ("" when torch loaded none).
RUNTIME = fusedopt._C.build_info()["openmp_runtime"]
needs_runtime = pytest.mark.skipif(not RUNTIME, reason="torch loaded no OpenMP runtime: regions always run on the pool")


@pytest.fixture
def thread_backend():
    """Sets _C's thread backend for the test and the default ("openmp") back afterwards."""
    yield fusedopt._C.set_thread_backend
    fusedopt._C.set_thread_backend("openmp")


def _run_python(code: str, timeout: float = 180, extra_env: dict[str, str] | None = None) -> str:
    """Runs code in a fresh interpreter that imports the same fusedopt as this one, with `extra_env` added to the
    environment (and the default backends otherwise); returns its stdout."""
    env = dict(os.environ)
    env.pop("FUSEDOPT_BACKEND", None)
    env.pop("FUSEDOPT_THREADS_BACKEND", None)
    env.update(extra_env or {})
    env["PYTHONPATH"] = PACKAGE_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    code = "import os\n" + inspect.getsource(_pool_workers) + textwrap.dedent(code)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _needed_libraries(path: str) -> list[str]:
    """DT_NEEDED entries of a 64-bit little-endian ELF shared object (what `readelf -d` lists as NEEDED)."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b"\x7fELF", path
    if data[4] != 2 or data[5] != 1:
        pytest.skip("not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + k * shentsize) for k in range(shnum)]
    needed = []
    for _name, kind, _flags, _addr, offset, size, link, _info, _align, entsize in sections:
        if kind != 6:  # SHT_DYNAMIC
            continue
        strtab = sections[link][4]
        for pos in range(offset, offset + size, entsize):
            tag, value = struct.unpack_from("<qQ", data, pos)
            if tag == 0:  # DT_NULL
                break
            if tag == 1:  # DT_NEEDED
                end = data.index(b"\0", strtab + value)
                needed.append(data[strtab + value:end].decode())
    return needed


def _pool_workers() -> dict[int, int]:
    """This process's pool workers: thread id -> times it was scheduled onto a CPU (/proc/<tid>/schedstat)."""
    workers = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() != "fusedopt-pool":
                    continue
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                workers[int(tid)] = int(f.read().split()[2])
        except FileNotFoundError:
            continue
    return workers


def test_the_extension_needs_and_loads_no_openmp_runtime() -> None:
    needed = _needed_libraries(fusedopt._C.__file__)
    assert "libc.so.6" in needed, needed  # the reader works
    assert not [lib for lib in needed if OPENMP_RUNTIME.match(lib)], needed
    out = _run_python("""
        import os, re
        import torch

        def openmp_runtimes():  # paths, not names: a second copy may have the same name (libgomp.so.1)
            with open("/proc/self/maps") as f:
                paths = {line.split(maxsplit=5)[-1].strip() for line in f if len(line.split(maxsplit=5)) == 6}
            return sorted(p for p in paths if re.match(r"^lib(g|i|)omp", os.path.basename(p)))

        torch.set_num_threads(2)
        before = openmp_runtimes()
        import fusedopt
        model = torch.nn.Linear(512, 256)
        opt = fusedopt.AdamW(model.parameters(), lr=1e-3)
        model(torch.randn(8, 512)).square().sum().backward()
        opt.step()
        assert fusedopt._C.get_num_threads() == 2
        assert opt.state[model.weight]["exp_avg"].abs().sum() > 0
        info = fusedopt._C.build_info()
        print("backend", [info["thread_backend"], os.path.realpath(info["openmp_runtime"]) if info["openmp_runtime"]
                          else ""])
        print("before", before)
        print("after", openmp_runtimes())
    """)
    backend, before, after = (ast.literal_eval(line.split(" ", 1)[1]) for line in out.splitlines()[-3:])
    assert after == before, f"importing fusedopt and stepping mapped another OpenMP runtime: {before} -> {after}"
    # The regions run on the runtime torch loaded, when it loaded one.
    assert backend == (["openmp", before[0]] if before else ["pool", ""]), (backend, before)


@needs_runtime
def test_regions_run_on_torchs_runtime_with_torchs_thread_count() -> None:
    # A fresh process: the default backend, and no pool thread was ever asked for. Each step's one region has 12 work
    # items; last_region_threads() is the size of the team the runtime gave.
    out = _run_python(f"""
        import torch, fusedopt

        param = torch.nn.Parameter(torch.randn(12 * {CHUNK}))
        opt = fusedopt.AdamW([param], lr=1e-3)
        param.grad = torch.randn_like(param)
        steps = []
        for k in (1, 3, 2, 5):
            torch.set_num_threads(k)
            opt.step()
            steps.append(fusedopt._C.last_region_threads())
        fusedopt.set_num_threads(4)  # a fixed count wins over torch's
        opt.step()
        steps.append(fusedopt._C.last_region_threads())
        fusedopt.set_num_threads(None)
        torch.set_num_threads(2)
        opt.step()
        steps.append(fusedopt._C.last_region_threads())
        print(fusedopt._C.thread_backend(), len(_pool_workers()), steps)
    """)
    backend, workers, steps = out.splitlines()[-1].split(" ", 2)
    assert (backend, workers) == ("openmp", "0"), out
    assert ast.literal_eval(steps) == [1, 3, 2, 5, 4, 2], steps


@needs_runtime
def test_a_smaller_team_than_asked_gives_the_same_bits() -> None:
    # OMP_THREAD_LIMIT=1 makes the runtime give a team of one to the two threads asked for: the team splits the work
    # items by its actual size, and every result is the same as on the pool's two threads (per-item partial sums,
    # combined in item order).
    out = _run_python(f"""
        import torch, fusedopt

        def run(backend):
            fusedopt._C.set_thread_backend(backend)
            gen = torch.Generator().manual_seed(3)
            params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (5 * {CHUNK} + 3, 1000, 2 * {CHUNK})]
            opt = fusedopt.AdamW(params, lr=1e-2, weight_decay=0.1, max_grad_norm=0.5)
            for _ in range(3):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen)
                opt.step()
            return params, fusedopt._C.last_region_threads()

        fusedopt.set_num_threads(2)
        on_team, team = run("openmp")
        on_pool, pool = run("pool")
        same = all(torch.equal(a, b) for a, b in zip(on_team, on_pool))
        print(team, pool, same)
    """, extra_env={"OMP_THREAD_LIMIT": "1"})
    assert out.splitlines()[-1] == "1 2 True", out


@needs_runtime
def test_a_region_called_inside_an_openmp_region_runs_inline() -> None:
    # The step runs on member 0 of a team of two that the runtime's own GOMP_parallel started (through ctypes); member 1
    # returns at once. fusedopt sees omp_in_parallel() and runs the step's regions on the calling thread alone.
    out = _run_python(f"""
        import ctypes
        import torch, fusedopt

        omp = ctypes.CDLL({RUNTIME!r}, mode=os.RTLD_NOLOAD)
        param = torch.nn.Parameter(torch.randn(12 * {CHUNK}))
        param.grad = torch.randn_like(param)
        opt = fusedopt.AdamW([param], lr=1e-3, max_grad_norm=1.0)
        fusedopt.set_num_threads(2)
        opt.step()
        outside = fusedopt._C.last_region_threads()
        seen = {{}}

        @ctypes.CFUNCTYPE(None, ctypes.c_void_p)
        def member(_):
            if omp.omp_get_thread_num() == 0:
                seen["team"] = omp.omp_get_num_threads()
                opt.step()
                seen["inside"] = fusedopt._C.last_region_threads()

        omp.GOMP_parallel(member, None, 2, 0)
        print(outside, seen["team"], seen["inside"])
    """)
    assert out.splitlines()[-1] == "2 2 1", out


@pytest.mark.skipif(not os.path.exists("/proc/self/schedstat"), reason="kernel without per-task schedstat")
def test_the_pool_runs_as_many_ranges_as_torch_threads() -> None:
    # A fresh process on the pool (FUSEDOPT_THREADS_BACKEND=pool), so the pool holds only the workers these steps asked
    # for. Each step's one region has 12 work items; a worker is woken only for its own range, so the workers
    # scheduled during a step are the ranges minus the caller's. Settings are changed on the main thread before each
    # step, as a user would.
    out = _run_python(f"""
        import time
        import torch, fusedopt

        param = torch.nn.Parameter(torch.randn(12 * {CHUNK}))
        opt = fusedopt.AdamW([param], lr=1e-3)
        param.grad = torch.randn_like(param)

        def ranges_of_one_step():
            time.sleep(0.2)  # idle workers stop spinning (after 50 us) and sleep
            before = _pool_workers()
            opt.step()
            after = _pool_workers()
            ranges = 1 + sum(after[t] != before.get(t, 0) for t in after)
            return len(after), ranges, fusedopt._C.last_region_threads()

        torch.set_num_threads(1)
        steps = [ranges_of_one_step()]
        for k in (3, 2, 5):
            torch.set_num_threads(k)
            steps.append(ranges_of_one_step())
        fusedopt.set_num_threads(4)  # a fixed count wins over torch's
        steps.append(ranges_of_one_step())
        fusedopt.set_num_threads(None)
        torch.set_num_threads(1)
        steps.append(ranges_of_one_step())
        assert fusedopt._C.thread_backend() == "pool"
        print(steps)
    """, extra_env={"FUSEDOPT_THREADS_BACKEND": "pool"})
    steps = ast.literal_eval(out.splitlines()[-1])
    # (workers that exist, ranges run, threads reported): the pool grows to the largest count asked and never shrinks.
    assert steps == [(0, 1, 1), (2, 3, 3), (2, 2, 2), (4, 5, 5), (4, 4, 4), (4, 1, 1)], steps


def _step_in_forked_child(conn, expected: list[torch.Tensor], seed: int) -> None:
    torch.set_num_threads(1)  # torch's own OpenMP pool does not survive fork(); fusedopt's count is fixed at 3
    params, grads = _inputs(seed)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = fusedopt.AdamW(params, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)
    ref = torch.optim.AdamW(copies, lr=1e-2, weight_decay=0.1)
    for p, c, g in zip(params, copies, grads):
        p.grad, c.grad = g.clone(), g.clone()
    opt.step()
    torch.nn.utils.clip_grad_norm_(copies, 1.0)
    ref.step()
    try:
        for p, c in zip(params, copies):
            torch.testing.assert_close(p.detach(), c.detach(), rtol=1e-6, atol=1e-7)
        vs_torch = "same"
    except AssertionError as e:
        vs_torch = str(e)
    conn.send({
        "threads": fusedopt._C.get_num_threads(),
        "backend": fusedopt._C.thread_backend(),
        "team": fusedopt._C.last_region_threads(),
        "workers": len(_pool_workers()),
        "same_bits_as_parent": all(torch.equal(p.detach(), e) for p, e in zip(params, expected)),
        "vs_torch": vs_torch,
    })
    conn.close()


def _inputs(seed: int) -> tuple[list[torch.nn.Parameter], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3 * CHUNK + 5,), (257, 129), (7,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    return params, [torch.randn(s, generator=gen) for s in shapes]


@pytest.mark.parametrize("parent_backend", [pytest.param("openmp", marks=needs_runtime), "pool"])
def test_a_child_forked_after_the_parent_stepped_steps_on_its_full_thread_count(parent_backend, thread_backend) -> None:
    # "openmp": the parent's team lives in the runtime, which a child cannot use (its first region would wait forever
    # for the parent's team threads); the child runs on the pool. "pool": the parent's pool has workers, which the child
    # does not inherit; it starts a pool of its own.
    previous = torch.get_num_threads()
    thread_backend(parent_backend)
    fusedopt.set_num_threads(3)
    try:
        params, grads = _inputs(seed=5)
        opt = fusedopt.AdamW(params, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        assert fusedopt._C.thread_backend() == parent_backend
        assert fusedopt._C.last_region_threads() == 3
        if parent_backend == "pool":
            assert len(_pool_workers()) >= 2
        expected = [p.detach().clone() for p in params]
        receive, send = mp.Pipe(duplex=False)
        child = mp.get_context("fork").Process(target=_step_in_forked_child, args=(send, expected, 5))
        child.start()
        send.close()
        try:
            got = receive.recv() if receive.poll(60) else None
        except EOFError:  # the child died before sending
            got = None
        child.join(10)
        if child.exitcode is None:
            child.kill()
        assert got is not None, "the forked child hung in step() or died"
        assert child.exitcode == 0
    finally:
        fusedopt.set_num_threads(None)
        torch.set_num_threads(previous)
    # A fresh pool in the child: two workers beside the calling thread, none left over from the parent.
    assert got["threads"] == 3 and got["workers"] == 2, got
    assert got["backend"] == "pool" and got["team"] == 3, got
    assert got["same_bits_as_parent"], got
    assert got["vs_torch"] == "same", got["vs_torch"]


def _adamw_steps(dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """Three clipped AdamW steps on random data (the clip is active: the gradient norm is far above 0.5); the
    parameters, the moments (and master weights) after them."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5 * CHUNK + 3,), (300, 129), (7,), (2 * CHUNK,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    opt = fusedopt.AdamW(params, lr=1e-2, weight_decay=0.1, max_grad_norm=0.5)
    for _ in range(3):
        for p in params:
            p.grad = (3 * torch.randn(p.shape, generator=gen)).to(dtype)
        opt.step()
    states = [t for p in params for t in opt.state[p].values() if isinstance(t, torch.Tensor) and t.numel() > 1]
    return [p.detach().clone() for p in params] + [t.clone() for t in states]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_adamw_with_clipping_gives_the_same_bits_on_both_backends_and_any_thread_count(dtype, thread_backend) -> None:
    previous = torch.get_num_threads()
    results = {}
    try:
        for backend in ("openmp", "pool"):
            thread_backend(backend)
            for threads in (1, 2, 3):
                fusedopt.set_num_threads(threads)
                results[backend, threads] = _adamw_steps(dtype, seed=11)
                assert fusedopt._C.thread_backend() == (backend if RUNTIME else "pool")
                assert fusedopt._C.last_region_threads() == threads
    finally:
        fusedopt.set_num_threads(None)
        torch.set_num_threads(previous)
    first = results["openmp", 1]
    assert len(first) > 4  # parameters and states
    for key, tensors in results.items():
        assert all(torch.equal(a, b) for a, b in zip(first, tensors)), f"{key} differs from ('openmp', 1)"
