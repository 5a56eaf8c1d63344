"""fusedopt inside torch.distributed's engines: DDP, FSDP2 (DTensor shards), ZeroRedundancyOptimizer and
torch.distributed.checkpoint, each run on 2 CPU ranks (gloo) and compared with a single-process run of
torch.optim on the same model and data (fusedopt's reference backend for the algorithms torch lacks)."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cases import EXAMPLE
from distributed_workers import (
    CLIP,
    EIGHT_BIT,
    OPTIMIZERS,
    factored_single_process_run,
    make_factored_data,
    make_factored_model,
    make_model,
    muon_single_process_run,
    single_process_run,
    worker,
)
from tolerances import assert_close

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def spawn(scenarios: list[str], world: int, out_dir: str) -> list[dict[str, Any]]:
    """Run `scenarios` on `world` ranks and return what each rank saved."""
    store = tempfile.mktemp(dir=out_dir, prefix="store")
    mp.start_processes(worker, args=(world, store, out_dir, scenarios), nprocs=world, start_method="spawn")
    name = "-".join(scenarios)
    return [torch.load(os.path.join(out_dir, f"{name}.rank{r}.pt"), weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def distributed_results() -> dict[str, Any]:
    """One 2-rank launch runs every DDP, ZeRO and FSDP2 scenario (process start-up dominates a short run)."""
    with tempfile.TemporaryDirectory() as out_dir:
        ranks = spawn(["ddp", "zero", "fsdp"], 2, out_dir)
    # Every rank must end with the same full parameters.
    for key, value in ranks[0].items():
        if isinstance(value, dict):
            for name, tensor in value.items():
                torch.testing.assert_close(ranks[1][key][name], tensor, rtol=0, atol=0)
    return ranks[0]


@pytest.fixture(scope="module")
def oracles() -> dict[str, dict[str, torch.Tensor]]:
    return {name: single_process_run(name) for name in OPTIMIZERS}


def assert_same_model(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], key: str) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert_close(actual[name], expected[name], key)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_ddp_matches_single_process(distributed_results: dict[str, Any], oracles: dict[str, Any], name: str) -> None:
    assert_same_model(distributed_results[f"ddp/{name}"], oracles[name], "fp32_trajectory")


def test_ddp_gradient_as_bucket_view(distributed_results: dict[str, Any], oracles: dict[str, Any]) -> None:
    assert_same_model(distributed_results["ddp_bucket_view/example"], oracles[EXAMPLE.name], "fp32_trajectory")


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fsdp2_matches_single_process(distributed_results: dict[str, Any], oracles: dict[str, Any], name: str) -> None:
    # Trust ratios: each parameter's comes from the norms of the whole parameter (all-reduced between the kernel's two
    # passes); norms of the uneven shards (17 and 16 rows) would give a different trajectory.
    assert_same_model(distributed_results[f"fsdp/{name}"], oracles[name], "fp32_trajectory")


def test_fsdp2_adafactor_factors_combine_across_shards(distributed_results: dict[str, Any]) -> None:
    """Adafactor over FSDP2 shards of a conv weight's leading dimension and of a one-row Linear weight (one rank holds
    no row): the row and column sums, RMS(p) and RMS(u) are all-reduced, so training follows the single-process
    torch.optim.Adafactor run, and the replicated column factors equal torch's."""
    assert_same_model(distributed_results["fsdp_factored/model"], factored_single_process_run(), "fp32_trajectory")
    model = make_factored_model()
    opt = torch.optim.Adafactor(model.parameters(), **OPTIMIZERS["Adafactor"][1])
    for x, y in make_factored_data():
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert_close(distributed_results["fsdp_factored/head_col_var"], opt.state[model.head.weight]["col_var"],
                 "fp32_trajectory")
    assert "sharded along their first dimension" in distributed_results["fsdp_factored/refused"]


def test_fsdp2_muon_matches_single_process(distributed_results: dict[str, Any]) -> None:
    """Muon over FSDP2 row shards (17 + 16 rows of the 33-row weights, 5 rows of the head split 3 + 2): each weight's
    update is gathered whole on one rank by an all-to-all, orthogonalized and sent back, so training follows
    fusedopt.Muon in one process. The gradients' reduction order differs (two halves), so the comparison is that of
    Muon's trajectories: displacement within 1%."""
    expected = muon_single_process_run()
    start = make_model().state_dict()
    for name, value in distributed_results["fsdp_muon/model"].items():
        moved = expected[name] - start[name]
        assert float((value - expected[name]).norm() / moved.norm()) < 1e-2, name
    # Rank 0 owns matrices 0 and 2 (33x16 and 5x33), rank 1 matrix 1 (33x33). Each all-to-all, rank 0 sends its
    # padded rows of matrix 1 (17 of 33 rows) and receives rank 1's rows of matrices 0 and 2 (17 and 3 rows, padded),
    # in bf16; the second all-to-all returns them.
    shapes = [p.shape for p in make_model().parameters() if p.dim() == 2]
    padded = [-(-rows // 2) * cols for rows, cols in shapes]
    assert distributed_results["fsdp_muon/bytes"] == 2 * 2 * (padded[1] + padded[0] + padded[2])
    assert distributed_results["fsdp_muon/state_types"] == ["DTensor"]  # momentum_buffer, placed like its weight


def test_fsdp2_states_are_dtensors(distributed_results: dict[str, Any]) -> None:
    assert distributed_results["fsdp/state_types"] == ["DTensor", "Tensor"]  # states sharded, step plain
    assert torch.isfinite(distributed_results["fsdp/first_state"]).all()
    assert distributed_results["fsdp/first_state"].abs().sum() > 0


def test_fsdp2_max_grad_norm_is_global(distributed_results: dict[str, Any]) -> None:
    # The clipping case only matches the single-process clip_grad_norm_ + torch.optim run if the norm is global;
    # check that clipping was active at the end of training (norm above max_grad_norm=0.5).
    assert distributed_results["fsdp/clip/last_grad_norm"] > OPTIMIZERS[CLIP][1]["max_grad_norm"]


def test_fsdp2_mixed_precision(distributed_results: dict[str, Any]) -> None:
    """bf16 parameters for compute, fp32 reduction: the example optimizer with max_grad_norm follows torch.optim's +
    clip_grad_norm_ under the same FSDP2 policy (fp32 shards, fp32 gradients)."""
    assert_same_model(distributed_results["fsdp_bf16/fusedopt"], distributed_results["fsdp_bf16/torch"],
                      "fp32_trajectory")


def test_clip_grad_norm_on_dtensors(distributed_results: dict[str, Any]) -> None:
    ours, theirs = distributed_results["clip/norms"]
    assert ours == pytest.approx(theirs, rel=1e-6)
    assert ours > 0.1  # the gradients were clipped
    for mine, torchs in distributed_results["clip/grads"]:
        assert_close(mine, torchs, "fp32")


def test_zero_redundancy_optimizer(distributed_results: dict[str, Any], oracles: dict[str, Any]) -> None:
    assert_same_model(distributed_results["zero/example"], oracles[EXAMPLE.name], "fp32_trajectory")
    assert distributed_results["zero/state_steps"] == [20.0]


@pytest.mark.parametrize("name", [CLIP, "Adafactor"])
def test_checkpoint_reshards_between_rank_counts(oracles: dict[str, Any], name: str) -> None:
    """torch.distributed.checkpoint: 2 ranks save at step 10 and 1 rank continues; 1 rank saves at step 15 and
    2 ranks continue. Every path ends where uninterrupted training (and single-process torch.optim) ends."""
    with tempfile.TemporaryDirectory() as out_dir:
        saved2 = spawn([f"checkpoint:save2:{name}"], 2, out_dir)[0]
        loaded1 = spawn([f"checkpoint:load1:{name}"], 1, out_dir)[0]
        loaded2 = spawn([f"checkpoint:load2:{name}"], 2, out_dir)[0]
    assert loaded1["load1/step"] == 10.0
    expected = oracles[name]
    assert_same_model(saved2["checkpoint/save2"], expected, "fp32_trajectory")
    assert_same_model(loaded1["checkpoint/load1"], saved2["checkpoint/save2"], "fp32_trajectory")
    assert_same_model(loaded2["checkpoint/load2"], saved2["checkpoint/save2"], "fp32_trajectory")


def test_8bit_checkpoint_reshards_between_rank_counts() -> None:
    """8-bit states through torch.distributed.checkpoint: state_dict() gives torch's float32 layout, so DCP reshards
    it like any state, and loading quantizes it again in the new shards' blocks: each loaded state is within half a
    grid gap (1/16 of its value plus a step of its block's scale) of what 2 ranks saved. Training goes on from there
    as a close neighbour of the uninterrupted run (8-bit states round differently in other blocks)."""
    with tempfile.TemporaryDirectory() as out_dir:
        saved2 = spawn([f"checkpoint:save2:{EIGHT_BIT}"], 2, out_dir)[0]
        loaded1 = spawn([f"checkpoint:load1:{EIGHT_BIT}"], 1, out_dir)[0]
    assert loaded1["load1/step"] == 10.0
    saved, loaded = saved2["save2/states"], loaded1["load1/states"]
    assert sorted(saved) == sorted(loaded) and any(k.endswith("exp_avg_sq") for k in saved)
    for key, value in saved.items():
        assert value.dtype == torch.float32
        bound = value.abs() / 16 + value.abs().max() / 1e4
        assert torch.all((loaded[key] - value).abs() <= bound), key
    for name, value in loaded1["checkpoint/load1"].items():
        uninterrupted = saved2["checkpoint/save2"][name]
        assert (value - uninterrupted).norm() <= 0.05 * uninterrupted.norm(), name


def test_fsdp_example_runs_with_torchrun() -> None:
    """examples/train_fsdp.py as README documents it (torchrun, 2 CPU ranks), shortened to a few steps."""
    example = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "train_fsdp.py")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", example, "--steps", "12",
         "--dim", "64"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    losses = [float(line.split()[3]) for line in result.stdout.splitlines() if line.startswith("step")]
    assert len(losses) == 3 and losses[-1] < losses[0]  # steps 0, 10 and 11 are printed; the loss goes down
