"""The gradient-scaling policy (fusedopt._scaling): the global norm's sums stay on the buffers' device, also when
they are all-reduced over shard groups (an NCCL-only process group cannot reduce a CPU tensor), and the norm, its
overflow and the clip coefficient follow torch.nn.utils.clip_grad_norm_."""
from __future__ import annotations

import math

import pytest
import torch
from fusedopt import _distributed, _scaling


def test_sums_handed_to_the_collective_stay_on_the_buffers_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run on the meta device, so that a tensor built on the CPU anywhere on the way would show."""
    seen: list[tuple[torch.device, tuple[object, ...]]] = []
    monkeypatch.setattr(_distributed, "all_reduce_sum",
                        lambda sums, groups: seen.append((sums.device, tuple(groups))))
    monkeypatch.setattr(_scaling, "all_reduce_sum", _distributed.all_reduce_sum)
    device = torch.device("meta")
    sums = torch.zeros(4, dtype=torch.float32, device=device)
    flags = torch.zeros(4, dtype=torch.float32, device=device)
    group_a, group_b = object(), object()
    norm, nonfinite = _scaling.global_norm(sums, flags, [[], [group_a], [group_a], [group_a, group_b]])
    assert norm.device == device and nonfinite.device == device
    assert [d for d, _ in seen] == [device, device]  # one all-reduce per distinct set of groups
    assert sorted(len(groups) for _, groups in seen) == [1, 2]


def test_norm_flag_and_overflow() -> None:
    sums = torch.tensor([4.0, 5.0], dtype=torch.float64)
    flags = torch.tensor([0.0, 1.0])
    norm, nonfinite = _scaling.global_norm(sums, flags, [[], []], unscale=0.5)
    assert math.isclose(float(norm), 1.5) and float(nonfinite) == 1.0
    huge = torch.tensor([2e38, 2e38], dtype=torch.float64)  # exact in float64, beyond float32 as a sum
    norm, _ = _scaling.global_norm(huge, torch.zeros(2), [[], []])
    assert math.isinf(float(norm))
    assert float(_scaling.clip_coefficient(1.0, norm)) == 0.0
    assert _scaling.clip_coefficient(None, norm) == 1.0
    assert math.isnan(float(_scaling.clip_coefficient(1.0, torch.tensor([float("nan")]))))
    assert math.isclose(float(_scaling.clip_coefficient(2.0, torch.tensor([4.0]))), 2.0 / (4.0 + 1e-6), rel_tol=1e-7)


def test_plain_and_sharded_buffers_are_summed_by_their_own_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    """Buffers 0 and 2 are plain, 1 and 3 sharded over one group: only the sharded ones' sums and flags go through the
    all-reduce (here a stand-in for two ranks holding equal shards: it doubles them), each picked by position."""
    def two_equal_ranks(pair: torch.Tensor, groups: object) -> None:
        pair.mul_(2)

    monkeypatch.setattr(_scaling, "all_reduce_sum", two_equal_ranks)
    group = object()
    sums = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
    for flags, expected_flag in ((torch.tensor([0.0, 0.0, 0.0, 1.0]), 1.0), (torch.tensor([1.0, 0.0, 0.0, 0.0]), 1.0),
                                 (torch.zeros(4), 0.0)):
        norm, nonfinite = _scaling.global_norm(sums, flags, [[], [group], [], [group]])
        assert float(norm) == math.sqrt(1.0 + 4.0 + 2 * (2.0 + 8.0))
        assert float(nonfinite) == expected_flag
