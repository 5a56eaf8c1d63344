// What every algorithm's math header (csrc/include/fusedopt/math/<algo>.h) builds on: the kinds of driver and the
// shared per-element helpers. An algorithm is a struct in fusedopt::algo with kKind, kStates (state slot names),
// Hyper (doubles, in the order of kFields, as Python passes them), uses_state(hyper, slot), Coeffs and
// make_coeffs(hyper, lr, step, grad_scale), plus Op/with_op (element-wise kind) or the pass functions (trust-ratio and
// factored kinds).
//
// Per-segment scalar states (torch.optim's 0-dim per-parameter tensors: NAdam's mu_product, ASGD's eta and mu) are
// optional. An algorithm that keeps them declares kScalars (their names, a float32 each per segment, as torch keeps
// them), takes them as a last argument of make_coeffs (their values before this step) and defines
// advance(hyper, lr, step, scalars), which writes their values after this step. The drivers call advance once per
// active segment, after every element of the segment has been updated from the coefficients.
#pragma once

#include <type_traits>

#include "fusedopt/common.h"

namespace fusedopt {
namespace algo {

// Which driver runs an algorithm: one pass of Op over every element; two passes with per-segment norms between them
// (trust ratios); or reductions over the rows and columns of each parameter into compact state buffers, then
// per-segment norms, then the update (factored second moments, laid out by Segments::layout).
enum class Kind : int { kElementwise = 0, kTrustRatio = 1, kFactored = 2 };

// At most this many per-element state slots (FlatBuffers::states).
constexpr int kMaxStates = 3;

// The number of per-segment scalar states of A: the length of A::kScalars, 0 when it declares none.
template <typename A, typename = void>
struct ScalarCount {
  static constexpr int value = 0;
};
template <typename A>
struct ScalarCount<A, std::void_t<decltype(A::kScalars)>> {
  static constexpr int value = static_cast<int>(sizeof(A::kScalars) / sizeof(A::kScalars[0]));
};

// Segment coefficients in compute type T; `scalars` (the segment's row of the scalar table, read before the step) is
// passed on only to an algorithm that keeps scalar states.
template <typename T, typename A>
FUSEDOPT_HD typename A::template Coeffs<T> make_segment_coeffs(const typename A::Hyper& h, double lr, double step,
                                                               double grad_scale, const float* scalars) {
  if constexpr (ScalarCount<A>::value > 0)
    return A::template make_coeffs<T>(h, lr, step, grad_scale, scalars);
  else
    return A::template make_coeffs<T>(h, lr, step, grad_scale);
}

// A step's gradient multiplier in compute type T (AMP's unscale times the clip coefficient), negated when the
// algorithm maximizes: every algorithm's Hyper has a `maximize` field, and this is what it means.
template <typename T, typename Hyper>
FUSEDOPT_HD T signed_grad_scale(const Hyper& h, double grad_scale) {
  return static_cast<T>(h.maximize != 0.0 ? -grad_scale : grad_scale);
}

// The segment's scalar states after this step (nothing for an algorithm without them).
template <typename A>
FUSEDOPT_HD void advance_segment(const typename A::Hyper& h, double lr, double step, float* scalars) {
  if constexpr (ScalarCount<A>::value > 0) A::advance(h, lr, step, scalars);
}

}  // namespace algo
}  // namespace fusedopt
