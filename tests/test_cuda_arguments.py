"""The CUDA entry points check their arguments on the host and raise before any launch, so these run wherever the
CUDA kernels were compiled, GPU or not (CI compiles them with nvcc and has no GPU)."""
from __future__ import annotations

from typing import Any

import fusedopt
import pytest

pytestmark = pytest.mark.skipif("cuda" not in fusedopt.build_info()["backends"],
                                reason="built without CUDA kernels")

# Plausible 64-byte-aligned addresses: nothing is dereferenced, since every check runs before the launch.
LAMB = dict(param=1 << 20, grad=2 << 20, exp_avg=3 << 20, exp_avg_sq=4 << 20, master=0, n=4096, param_dtype=0,
            grad_dtype=0, state_dtype=0, item_begin=5 << 20, item_end=6 << 20, item_segment=7 << 20,
            seg_first=8 << 20, items=1, segments=1, partial_w=9 << 20, partial_u=10 << 20, scaled_lr=11 << 20,
            grad_scale=1.0, lr=1e-3, beta1_weight=0.1, beta2=0.999, one_minus_beta2=0.001, bc1=1.0, bc2=1.0,
            eps=1e-6, weight_decay=0.0, max_trust_ratio=-1.0, beta1=0.9, bias_correction=True,
            segment_w2=12 << 20, segment_u2=13 << 20)


def cuda_lamb(**changes: Any) -> None:
    from fusedopt import _C

    _C.cuda_lamb(**{**LAMB, **changes})


@pytest.mark.parametrize("phases", [0, 4, -1])
def test_lamb_rejects_unknown_phases(phases: int) -> None:
    with pytest.raises(ValueError, match="Invalid phases"):
        cuda_lamb(phases=phases)


@pytest.mark.parametrize("name", ["segment_w2", "segment_u2", "scaled_lr", "seg_first"])
def test_lamb_rejects_a_missing_segment_array(name: str) -> None:
    with pytest.raises(ValueError, match="null segment pointer"):
        cuda_lamb(**{name: 0})


def test_lamb_rejects_negative_counts() -> None:
    with pytest.raises(ValueError, match="Invalid items"):
        cuda_lamb(items=-1)
    with pytest.raises(ValueError, match="Invalid segments"):
        cuda_lamb(segments=-1)
