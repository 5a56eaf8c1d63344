// What every algorithm's math header (csrc/include/fusedopt/math/<algo>.h) builds on: the kinds of driver and the
// shared per-element helpers. An algorithm is a struct in fusedopt::algo with kKind, kStates (state slot names),
// Hyper (doubles, in the order of kFields, as Python passes them), uses_state(hyper, slot), Coeffs and
// make_coeffs(hyper, lr, step, grad_scale), plus Op/with_op (element-wise kind) or the pass functions (trust-ratio kind).
#pragma once

#include "fusedopt/common.h"

namespace fusedopt {
namespace algo {

// Which driver runs an algorithm: one pass of Op over every element, or two passes with per-segment norms between them (trust ratios).
enum class Kind : int { kElementwise = 0, kTrustRatio = 1 };

// At most this many per-element state slots (FlatBuffers::states).
constexpr int kMaxStates = 3;

}  // namespace algo
}  // namespace fusedopt
