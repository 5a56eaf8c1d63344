// Per-element pieces of the deterministic sum-of-squares reductions (global gradient norm, per-parameter norms of trust-ratio algorithms).
// torch.nn.utils.clip_grad_norm_ / torch.linalg.vector_norm(ord=2) squared; the partition and combine order live in
// the drivers (fixed chunks of kChunk elements, kNormLanes interleaved lanes per chunk, fixed-order combine).
#pragma once

#include "fusedopt/common.h"
#include "fusedopt/dtype.h"

namespace fusedopt {

// Lanes of a per-chunk partial sum: element i of a chunk goes to lane i % kNormLanes, so the summation order is a
// function of the index alone (the same for every thread count), while the lanes map onto SIMD registers.
constexpr int kNormLanes = 16;

// fp32 product, accumulated in double; a float64 element's product is in double.
FUSEDOPT_HD double square_term(float x) { return static_cast<double>(x * x); }
FUSEDOPT_HD double square_term(double x) { return x * x; }

// True for inf and NaN: the exponent field is all ones.
FUSEDOPT_HD bool is_nonfinite(float x) { return (float_as_bits(x) & 0x7F800000u) == 0x7F800000u; }
FUSEDOPT_HD bool is_nonfinite(double x) {
  return (double_as_bits(x) & 0x7FF0000000000000ull) == 0x7FF0000000000000ull;
}

}  // namespace fusedopt
