"""The CUDA entry points (fusedopt._C.cuda_*) check every argument on the host and raise before asking the CUDA runtime
anything, so these run wherever the CUDA kernels were compiled, GPU or not (CI compiles them with nvcc and has no GPU).
Nothing is dereferenced: the pointers are plausible addresses, and every call here is rejected."""
from __future__ import annotations

from typing import Any

import fusedopt
import pytest

if not fusedopt.build_info()["cuda_built"]:
    pytest.skip("fusedopt was built without its CUDA kernels", allow_module_level=True)

from fusedopt import _C  # noqa: E402  (only once the skip above has not fired)

ALGORITHMS: dict[str, dict[str, Any]] = _C.algorithms()
MIB = 1 << 20


def valid(algorithm: str) -> dict[str, Any]:
    """A call that passes every host-side check: 64-byte aligned addresses, every state slot given, one segment of
    one work item, hyperparameters all 1.0 (every mode on, so every state slot is in use; Muon's phase 0, which uses
    both of its slots)."""
    return dict(param=1 * MIB, grad=2 * MIB, s0=3 * MIB, s1=4 * MIB, s2=5 * MIB, master=0, comp=0, param_mode=0,
                seed=0, n=4096, param_dtype=0,
                grad_dtype=0, state_dtype=0, seg_offsets=6 * MIB, seg_numels=7 * MIB, seg_steps=8 * MIB,
                seg_active=9 * MIB, seg_count=1, seg_scalars=13 * MIB if ALGORITHMS[algorithm]["scalars"] else 0,
                work=10 * MIB, items=1,
                hyper=[0.0 if f == "phase" else 1.0 for f in ALGORITHMS[algorithm]["fields"]], lr=1e-3,
                grad_scale=1.0, lr_ptr=0,
                grad_scale_ptr=0, found_inf_ptr=0, passes=7 if factored(algorithm) else 3, segment_w2=0, segment_u2=0,
                factored=11 * MIB if factored(algorithm) else 0, row_items=0, col_items=0, factor_sums=0,
                factor_sums_count=0, device=0, stream=0, absmax0=0, absmax1=0, absmax2=0, signed_states=0)


def factored(algorithm: str) -> bool:
    return ALGORITHMS[algorithm]["kind"] == "factored"


def call(algorithm: str, **changes: Any) -> None:
    getattr(_C, "cuda_" + algorithm)(**{**valid(algorithm), **changes})


def test_every_algorithm_of_the_list_has_a_cuda_step() -> None:
    assert {name for name in dir(_C) if name.startswith("cuda_")} == {
        *("cuda_" + name for name in ALGORITHMS), "cuda_sum_of_squares", "cuda_sum_of_squares_scratch",
        "cuda_sam_perturb", "cuda_sam_restore", "cuda_sam_sum_of_squares"}


REJECTED = [
    pytest.param(dict(param_dtype=5), "Invalid dtype code for param: 5", id="param-dtype"),
    pytest.param(dict(grad_dtype=-1), "Invalid dtype code for grad: -1", id="grad-dtype"),
    pytest.param(dict(param_dtype=1, grad_dtype=2), "grad dtype code 2 must equal the param dtype code 1",
                 id="grad-dtype-mismatch"),
    pytest.param(dict(state_dtype=2), "Invalid state dtype code 2", id="fp16-states"),
    pytest.param(dict(master=11 * MIB), "master weights are for 16-bit parameters", id="fp32-master"),
    # float64 parameters: float64 gradients and states, no master weights; float64 states for them only.
    pytest.param(dict(param_dtype=3), r"grad dtype code 0 must be 3 \(float64\) with float64 parameters",
                 id="fp64-fp32-grad"),
    pytest.param(dict(param_dtype=3, grad_dtype=3), r"state dtype code 0 must be 3 \(float64\)",
                 id="fp64-fp32-states"),
    pytest.param(dict(param_dtype=3, grad_dtype=3, state_dtype=3, master=11 * MIB),
                 r"master weights are for 16-bit parameters \(param dtype code 3 is float64\)", id="fp64-master"),
    pytest.param(dict(state_dtype=3), "float64 states are for float64 parameters", id="fp32-fp64-states"),
    pytest.param(dict(grad_dtype=3), "grad dtype code 3 must equal the param dtype code 0", id="fp32-fp64-grad"),
    pytest.param(dict(n=-1), "Invalid element count n: -1", id="negative-n"),
    pytest.param(dict(param=0), "param pointer is null", id="null-param"),
    pytest.param(dict(grad=0), "grad pointer is null", id="null-grad"),
    pytest.param(dict(hyper=[1.0]), "Invalid hyperparameter count: 1", id="hyper-count"),
    pytest.param(dict(param=MIB + 2), "param pointer 1048578 is not 4-byte aligned", id="param-alignment"),
    pytest.param(dict(param_dtype=1, grad_dtype=1, grad=2 * MIB + 1), "grad pointer 2097153 is not 2-byte aligned",
                 id="grad-alignment"),
    pytest.param(dict(param_dtype=1, master=11 * MIB + 2, param_mode=1),
                 "master pointer 11534338 is not 4-byte aligned", id="master-alignment"),
    # Param modes (param_io.h): master weights exactly with mode 1, a Kahan compensation exactly with mode 2, modes
    # other than nearest for 16-bit parameters, stochastic rounding for bfloat16 ones.
    pytest.param(dict(param_dtype=1, master=11 * MIB), "master pointer given with param mode 0", id="master-mode-0"),
    pytest.param(dict(param_dtype=1, param_mode=1), "master pointer null with param mode 1", id="mode-1-no-master"),
    pytest.param(dict(param_dtype=1, param_mode=2), "compensation pointer null with param mode 2", id="kahan-no-comp"),
    pytest.param(dict(param_dtype=1, comp=11 * MIB), "compensation pointer given with param mode 0",
                 id="comp-mode-0"),
    pytest.param(dict(param_mode=3), "param mode 3 is for 16-bit parameters", id="fp32-stochastic"),
    pytest.param(dict(param_dtype=2, param_mode=3), "stochastic rounding \\(param mode 3\\) is for bfloat16",
                 id="fp16-stochastic"),
    pytest.param(dict(param_mode=4), "Invalid param mode 4", id="param-mode-4"),
    pytest.param(dict(param_dtype=1, param_mode=2, comp=11 * MIB + 1),
                 "compensation pointer 11534337 is not 2-byte aligned", id="comp-alignment"),
    pytest.param(dict(param_dtype=3, grad_dtype=3, state_dtype=3, param=MIB + 4),
                 "param pointer 1048580 is not 8-byte aligned", id="fp64-param-alignment"),
    pytest.param(dict(param_dtype=3, grad_dtype=3, state_dtype=3, s0=3 * MIB + 4),
                 "pointer 3145732 is not 8-byte aligned", id="fp64-state-alignment"),
    pytest.param(dict(seg_count=-1), "Invalid segment count: -1", id="segment-count"),
    pytest.param(dict(items=-1), "Invalid items: -1", id="negative-items"),
    pytest.param(dict(items=4097), "Invalid items: 4097 for a buffer of 4096 elements", id="too-many-items"),
    pytest.param(dict(seg_count=0), "Invalid items: 1 without segments", id="items-without-segments"),
    pytest.param(dict(seg_steps=0), "steps and active flags must not be null", id="null-steps"),
    pytest.param(dict(seg_active=0), "steps and active flags must not be null", id="null-active"),
    pytest.param(dict(work=0), "work pointer is null", id="null-work"),
    pytest.param(dict(work=10 * MIB + 4), "work pointer 10485764 is not 8-byte aligned", id="work-alignment"),
    pytest.param(dict(seg_steps=8 * MIB + 2), "seg_steps pointer 8388610 is not 4-byte aligned",
                 id="steps-alignment"),
    pytest.param(dict(lr_ptr=3), "lr_ptr pointer 3 is not 4-byte aligned", id="lr-alignment"),
    # With float64 parameters the device lr and grad_scale are float64 scalars.
    pytest.param(dict(param_dtype=3, grad_dtype=3, state_dtype=3, lr_ptr=12 * MIB + 4),
                 "lr_ptr pointer 12582916 is not 8-byte aligned", id="fp64-lr-alignment"),
    pytest.param(dict(param_dtype=3, grad_dtype=3, state_dtype=3, grad_scale_ptr=12 * MIB + 4),
                 "grad_scale_ptr pointer 12582916 is not 8-byte aligned", id="fp64-grad-scale-alignment"),
    pytest.param(dict(found_inf_ptr=12 * MIB + 1), "found_inf_ptr pointer 12582913 is not 4-byte aligned",
                 id="found-inf-alignment"),
    pytest.param(dict(device=-1), "Invalid device: -1", id="negative-device"),
]


@pytest.mark.parametrize("changes,message", REJECTED)
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_rejects_before_any_launch(algorithm: str, changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=f"^cuda_{algorithm}: .*{message}"):
        call(algorithm, **changes)


# A factored algorithm's slots in use depend on its layout, in device memory: python/fusedopt/_kernels.py checks them.
@pytest.mark.parametrize("algorithm", [a for a in ALGORITHMS if not factored(a)])
def test_rejects_a_null_pointer_for_every_state_in_use(algorithm: str) -> None:
    for slot, name in enumerate(ALGORITHMS[algorithm]["states"]):
        with pytest.raises(ValueError, match=f"{name} pointer is null"):
            call(algorithm, **{f"s{slot}": 0})


@pytest.mark.parametrize("algorithm", [a for a in ALGORITHMS if factored(a)])
def test_factored_steps_need_their_layout_and_valid_passes(algorithm: str) -> None:
    with pytest.raises(ValueError, match=f"^cuda_{algorithm}: factored pointer is null"):
        call(algorithm, factored=0)
    with pytest.raises(ValueError, match="factored pointer 11534340 is not 8-byte aligned"):
        call(algorithm, factored=11 * MIB + 4)
    with pytest.raises(ValueError, match=r"Invalid passes: 3 \(expected 7, or one of 1, 4 and 2\)"):
        call(algorithm, passes=3)
    with pytest.raises(ValueError, match="separate passes need the per-segment sums and the factor sums"):
        call(algorithm, passes=1)


@pytest.mark.parametrize("algorithm", [a for a in ALGORITHMS if ALGORITHMS[a]["scalars"]])
def test_rejects_null_or_misaligned_scalar_states(algorithm: str) -> None:
    with pytest.raises(ValueError, match=f"^cuda_{algorithm}: segment scalars must not be null"):
        call(algorithm, seg_scalars=0)
    with pytest.raises(ValueError, match="seg_scalars pointer 13631490 is not 4-byte aligned"):
        call(algorithm, seg_scalars=13 * MIB + 2)


def test_accepts_null_pointers_for_states_the_configuration_does_not_use() -> None:
    """SGD without momentum keeps no momentum_buffer: its null pointer passes the checks, and the call is only
    rejected later, for its device index."""
    hyper = [0.0] * len(ALGORITHMS["sgd"]["fields"])  # momentum 0
    with pytest.raises(ValueError, match="Invalid device: -1"):
        call("sgd", s0=0, hyper=hyper, device=-1)


ELEMENTWISE = [a for a in ALGORITHMS if ALGORITHMS[a]["kind"] == "elementwise"]
TRUST_RATIO = [a for a in ALGORITHMS if ALGORITHMS[a]["kind"] == "trust_ratio"]
# 8-bit states (state dtype code 4, quant8.h): byte slots, each with its float32 block absmaxes.
EIGHT_BIT = dict(state_dtype=4, absmax0=14 * MIB, absmax1=15 * MIB, absmax2=16 * MIB, signed_states=1)


@pytest.mark.parametrize("algorithm", ELEMENTWISE + TRUST_RATIO)
def test_8bit_states_need_the_block_absmax_of_every_state_in_use(algorithm: str) -> None:
    for slot, name in enumerate(ALGORITHMS[algorithm]["states"]):
        with pytest.raises(ValueError, match=f"^cuda_{algorithm}: the block absmax of 8-bit state {name} is null"):
            call(algorithm, **{**EIGHT_BIT, f"absmax{slot}": 0})


def test_8bit_states_are_bytes_with_float32_absmaxes() -> None:
    """A byte slot needs no alignment (this call passes every check and is rejected for its device index only); its
    absmaxes are float32. The segment offsets are in device memory and never read here: the offsets' block alignment
    is checked by python/fusedopt/_kernels.py on its host copy (test_cuda_optim.py)."""
    with pytest.raises(ValueError, match="Invalid device: -1"):
        call("adam", **EIGHT_BIT, s0=3 * MIB + 1, s1=4 * MIB + 3, device=-1)
    with pytest.raises(ValueError, match="absmax pointer 15728642 is not 4-byte aligned"):
        call("adam", **{**EIGHT_BIT, "absmax1": 15 * MIB + 2})


@pytest.mark.parametrize("algorithm", TRUST_RATIO)
def test_8bit_states_are_for_trust_ratio_algorithms(algorithm: str) -> None:
    """A trust-ratio call with 8-bit moments passes every host check (rejected for its device index only)."""
    with pytest.raises(ValueError, match="Invalid device: -1"):
        call(algorithm, **EIGHT_BIT, device=-1)


@pytest.mark.parametrize("algorithm", [a for a in ALGORITHMS if factored(a)])
def test_8bit_states_are_not_for_factored_algorithms(algorithm: str) -> None:
    with pytest.raises(ValueError, match=f"^cuda_{algorithm}: 8-bit states .* element-wise and trust-ratio "
                                         "algorithms"):
        call(algorithm, **EIGHT_BIT)


@pytest.mark.parametrize("algorithm", ["adam", "lamb"])
def test_8bit_states_are_not_for_float64_parameters(algorithm: str) -> None:
    with pytest.raises(ValueError, match=r"state dtype code 4 must be 3 \(float64\) with float64 parameters"):
        call(algorithm, **EIGHT_BIT, param_dtype=3, grad_dtype=3)


@pytest.mark.parametrize("passes", [0, 4, -1])
def test_trust_ratio_rejects_unknown_passes(passes: int) -> None:
    with pytest.raises(ValueError, match=f"Invalid passes: {passes}"):
        call("lamb", passes=passes)


@pytest.mark.parametrize("passes", [1, 2])
def test_separate_trust_ratio_passes_need_the_sum_arrays(passes: int) -> None:
    with pytest.raises(ValueError, match="separate passes need the per-segment sum arrays"):
        call("lamb", passes=passes)


def test_sum_arrays_come_as_a_pair() -> None:
    with pytest.raises(ValueError, match="must both be given or both be null"):
        call("lamb", segment_w2=13 * MIB)
    with pytest.raises(ValueError, match="segment_u2 pointer .* is not 8-byte aligned"):
        call("lamb", segment_w2=13 * MIB, segment_u2=14 * MIB + 4)


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_an_unknown_device_is_rejected_before_any_launch(algorithm: str) -> None:
    """The device index is the one check that asks the CUDA runtime: with a GPU it names the index, without a driver
    the runtime's error; either way nothing is launched."""
    with pytest.raises((ValueError, RuntimeError), match="Invalid device: 1000000|cudaGetDeviceCount"):
        call(algorithm, device=1_000_000)


# cuda_sum_of_squares(data, n, dtype, work, items, active, seg_count, scratch, out_sum, out_sum_dtype, out_nonfinite,
#                     device, stream)
SUM = dict(data=1 * MIB, n=100_000, dtype=0, work=2 * MIB, items=7, active=3 * MIB, seg_count=3, scratch=4 * MIB,
           out_sum=5 * MIB, out_sum_dtype=0, out_nonfinite=5 * MIB + 8, device=0, stream=0)


@pytest.mark.parametrize("changes,message", [
    pytest.param(dict(n=-1), "Invalid element count n: -1", id="negative-n"),
    pytest.param(dict(dtype=4), "Invalid dtype code for data: 4", id="dtype"),
    pytest.param(dict(out_sum_dtype=1), "Invalid dtype code for out_sum: 1", id="out-sum-dtype"),
    pytest.param(dict(dtype=3, data=MIB + 4), "data pointer is not element-aligned", id="fp64-data-alignment"),
    pytest.param(dict(out_sum_dtype=3, out_sum=5 * MIB + 4), "out_sum must be a 8-byte aligned float64 scalar",
                 id="fp64-out-alignment"),
    pytest.param(dict(items=-2), "Invalid items: -2", id="negative-items"),
    pytest.param(dict(seg_count=-1), "Invalid segment count: -1", id="segment-count"),
    pytest.param(dict(items=100_001), "Invalid items: 100001 for a buffer of 100000", id="too-many-items"),
    pytest.param(dict(active=0), "need segments and their active flags", id="null-active"),
    pytest.param(dict(work=0), "work pointer is null with 3 segments", id="whole-buffer-with-segments"),
    pytest.param(dict(work=0, active=0, seg_count=0, items=6), r"the whole buffer of 100000 elements is 7 chunks",
                 id="whole-buffer-items"),
    pytest.param(dict(data=0), "data pointer is null", id="null-data"),
    pytest.param(dict(data=MIB + 2), "data pointer is not element-aligned", id="data-alignment"),
    pytest.param(dict(scratch=0), "scratch pointer is null", id="null-scratch"),
    pytest.param(dict(out_sum=0), "out_sum and out_nonfinite must not be null", id="null-out"),
    pytest.param(dict(out_nonfinite=5 * MIB + 2), "out_nonfinite must be a 4-byte aligned float32 scalar",
                 id="out-alignment"),
    pytest.param(dict(device=-1), "Invalid device: -1", id="negative-device"),
])
def test_sum_of_squares_rejects_before_any_launch(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=f"^cuda_sum_of_squares: .*{message}"):
        _C.cuda_sum_of_squares(**{**SUM, **changes})


def test_sum_of_squares_scratch() -> None:
    assert _C.cuda_sum_of_squares_scratch(0) == 0
    assert _C.cuda_sum_of_squares_scratch(7) == 14
    with pytest.raises(ValueError, match="Invalid items: -1"):
        _C.cuda_sum_of_squares_scratch(-1)
