// Argument checks shared by the checked CPU entry points (csrc/cpu/dispatch.cpp) and the CUDA ones (csrc/cuda/api.cu):
// hyperparameter count, dtype codes, null state pointers for the states a configuration uses, trust-ratio passes,
// SAM's buffers.
// Each throws std::invalid_argument naming the argument and its value; none touches the memory behind a pointer.
#pragma once

#include <string.h>

#include <stdexcept>
#include <string>

#include "fusedopt/api.h"
#include "fusedopt/dtype.h"

namespace fusedopt {
namespace checks {

[[noreturn]] inline void fail(const std::string& msg) { throw std::invalid_argument(msg); }

inline void check_dtype(const std::string& fn, const char* what, int code) {
  if (!is_valid_dtype(code))
    fail(fn + ": Invalid dtype code for " + what + ": " + std::to_string(code) +
         " (expected 0 float32, 1 bfloat16, 2 float16, 3 float64)");
}

// The algorithm's Hyper from the kFields doubles Python passes.
template <typename A>
typename A::Hyper hyper_from(const std::string& fn, const StepArgs& args) {
  constexpr int64_t kFields = static_cast<int64_t>(sizeof(A::kFields) / sizeof(A::kFields[0]));
  static_assert(sizeof(typename A::Hyper) == kFields * sizeof(double), "Hyper must be kFields doubles");
  if (args.hyper_count != kFields || args.hyper == nullptr)
    fail(fn + ": Invalid hyperparameter count: " + std::to_string(args.hyper_count) + " (expected " +
         std::to_string(kFields) + ")");
  typename A::Hyper h;
  memcpy(&h, args.hyper, sizeof(h));
  return h;
}

// The parameter mode against the buffers: master weights exactly in mode kParamMaster, a compensation buffer exactly
// in mode kParamKahan, every mode but nearest for 16-bit parameters only, stochastic rounding for bfloat16 only.
inline void check_param_mode(const std::string& fn, const FlatBuffers& b) {
  const int mode = b.param_mode;
  if (mode < kParamNearest || mode > kParamStochastic)
    fail(fn + ": Invalid param mode " + std::to_string(mode) + " (0 nearest, 1 master, 2 kahan, 3 stochastic)");
  if ((b.master != nullptr) != (mode == kParamMaster))
    fail(fn + ": master pointer " + (b.master != nullptr ? "given" : "null") + " with param mode " +
         std::to_string(mode) + " (master weights are param mode 1)");
  if ((b.comp != nullptr) != (mode == kParamKahan))
    fail(fn + ": compensation pointer " + (b.comp != nullptr ? "given" : "null") + " with param mode " +
         std::to_string(mode) + " (a Kahan compensation buffer is param mode 2)");
  if (mode != kParamNearest && b.param_dtype != kBFloat16 && b.param_dtype != kFloat16)
    fail(fn + ": param mode " + std::to_string(mode) + " is for 16-bit parameters (param dtype code " +
         std::to_string(b.param_dtype) + ")");
  if (mode == kParamStochastic && b.param_dtype != kBFloat16)
    fail(fn + ": stochastic rounding (param mode 3) is for bfloat16 parameters (param dtype code " +
         std::to_string(b.param_dtype) + ")");
}

// One buffer set for algorithm A under hyperparameters h: counts, dtype codes and their combinations, and a non-null
// pointer for every buffer the configuration reads or writes (A::uses_state). float64 parameters go with float64
// gradients and states only (computed in double, as torch.optim does), never with master weights; float64 gradients
// and states with float64 parameters only.
template <typename A>
void check_buffers(const std::string& fn, const FlatBuffers& b, const typename A::Hyper& h) {
  if (b.n < 0) fail(fn + ": Invalid element count n: " + std::to_string(b.n));
  check_dtype(fn, "param", b.param_dtype);
  check_dtype(fn, "grad", b.grad_dtype);
  if (b.state_dtype != kState8bit) check_dtype(fn, "states", b.state_dtype);
  if (b.param_dtype == kFloat64) {
    if (b.grad_dtype != kFloat64)
      fail(fn + ": grad dtype code " + std::to_string(b.grad_dtype) +
           " must be 3 (float64) with float64 parameters (param dtype code 3)");
    if (b.state_dtype != kFloat64)
      fail(fn + ": state dtype code " + std::to_string(b.state_dtype) +
           " must be 3 (float64) with float64 parameters (param dtype code 3)");
    if (b.master != nullptr)
      fail(fn + ": master weights are for 16-bit parameters (param dtype code 3 is float64)");
  }
  if (b.grad_dtype != b.param_dtype && b.grad_dtype != kFloat32)
    fail(fn + ": grad dtype code " + std::to_string(b.grad_dtype) + " must equal the param dtype code " +
         std::to_string(b.param_dtype) + " or be 0 (float32)");
  if (b.state_dtype == kFloat16) fail(fn + ": Invalid state dtype code 2 (float16); states are float32 or bfloat16");
  if (b.state_dtype == kFloat64 && b.param_dtype != kFloat64)
    fail(fn + ": Invalid state dtype code 3 (float64) with param dtype code " + std::to_string(b.param_dtype) +
         "; float64 states are for float64 parameters");
  if (b.master != nullptr && b.param_dtype == kFloat32)
    fail(fn + ": master weights are for 16-bit parameters (param dtype code 0 is float32)");
  check_param_mode(fn, b);
  if (b.n == 0) return;
  if (b.param == nullptr) fail(fn + ": param pointer is null");
  if (b.grad == nullptr) fail(fn + ": grad pointer is null");
  constexpr int kSlots = static_cast<int>(sizeof(A::kStates) / sizeof(A::kStates[0]));
  for (int k = 0; k < algo::kMaxStates; ++k) {
    if (A::uses_state(h, k) && b.states[k] == nullptr)
      fail(fn + ": " + (k < kSlots ? A::kStates[k] : "state") + " pointer is null");
    if (b.state_dtype == kState8bit && A::uses_state(h, k) && b.absmax[k] == nullptr)
      fail(fn + ": the block absmax of 8-bit state " + (k < kSlots ? A::kStates[k] : "state") + " is null");
  }
}

// 8-bit states (quant8.h): for element-wise and trust-ratio algorithms, over parameters computed in float32, with
// every segment starting on a block boundary (blocks never cross a parameter).
template <typename A>
void check_quantized(const std::string& fn, const FlatBuffers& b, const Segments& s) {
  if (b.state_dtype != kState8bit) return;
  if (A::kKind == algo::Kind::kFactored)
    fail(fn + ": 8-bit states (state dtype code 4) are implemented for element-wise and trust-ratio algorithms");
  if (b.param_dtype == kFloat64) fail(fn + ": 8-bit states are for float32, bfloat16 and float16 parameters");
  for (int64_t k = 0; k < s.count; ++k)
    if (s.offsets != nullptr && s.offsets[k] % kQuantBlock != 0)
      fail(fn + ": with 8-bit states every segment starts on a multiple of " + std::to_string(kQuantBlock) +
           " elements (segment " + std::to_string(k) + " starts at " + std::to_string(s.offsets[k]) + ")");
}

// Whether this call counts the step of its active segments: every element-wise call, and a trust-ratio call that runs
// pass 1 (a kPassApply-only call completes a step counted by its kPassMoments call).
template <typename A>
bool counts_step(const StepArgs& args) {
  return A::kKind == algo::Kind::kElementwise || (args.passes & kPassMoments) != 0;
}

// Trust-ratio algorithms: passes is 1, 2 or 3; the per-segment sum arrays come as a pair, and separate passes keep
// their sums there.
template <typename A>
void check_passes(const std::string& fn, int64_t segment_count, const StepArgs& args) {
  if (A::kKind == algo::Kind::kFactored) {  // 7, or one pass at a time with the caller's sums
    const int all = kPassMoments | kPassNorms | kPassApply;
    if (args.passes != all && args.passes != kPassMoments && args.passes != kPassNorms && args.passes != kPassApply)
      fail(fn + ": Invalid passes: " + std::to_string(args.passes) + " (expected 7, or one of 1, 4 and 2)");
    if (args.passes != all && segment_count > 0 &&
        (args.segment_w2 == nullptr || args.segment_u2 == nullptr || args.factor_sums == nullptr))
      fail(fn + ": separate passes need the per-segment sums and the factor sums");
    if (args.factor_sums_count < 0) fail(fn + ": Invalid factor sums count: " + std::to_string(args.factor_sums_count));
    return;
  }
  if (A::kKind != algo::Kind::kTrustRatio) return;
  if (args.passes < kPassMoments || args.passes > (kPassMoments | kPassApply))
    fail(fn + ": Invalid passes: " + std::to_string(args.passes) + " (expected 1, 2 or 3)");
  if ((args.segment_w2 == nullptr) != (args.segment_u2 == nullptr))
    fail(fn + ": segment_w2 and segment_u2 must both be given or both be null");
  if (args.passes != (kPassMoments | kPassApply) && segment_count > 0 && args.segment_w2 == nullptr)
    fail(fn + ": separate passes need the per-segment sum arrays");
}

// SAM's buffers: counts and dtype codes as a step checks them (check_buffers), the grad where the call reads it, and
// the backup where it needs one (perturbation and undo without master weights).
inline void check_sam_buffers(const std::string& fn, const SamBuffers& b, bool reads_grad, bool needs_backup) {
  if (b.n < 0) fail(fn + ": Invalid element count n: " + std::to_string(b.n));
  check_dtype(fn, "param", b.param_dtype);
  if (reads_grad) {
    check_dtype(fn, "grad", b.grad_dtype);
    if (b.param_dtype == kFloat64 && b.grad_dtype != kFloat64)
      fail(fn + ": grad dtype code " + std::to_string(b.grad_dtype) +
           " must be 3 (float64) with float64 parameters (param dtype code 3)");
    if (b.grad_dtype != b.param_dtype && b.grad_dtype != kFloat32)
      fail(fn + ": grad dtype code " + std::to_string(b.grad_dtype) + " must equal the param dtype code " +
           std::to_string(b.param_dtype) + " or be 0 (float32)");
  }
  if (b.master != nullptr && (b.param_dtype == kFloat32 || b.param_dtype == kFloat64))
    fail(fn + ": master weights are for 16-bit parameters (param dtype code " + std::to_string(b.param_dtype) + ")");
  if (b.n == 0) return;
  if (b.param == nullptr) fail(fn + ": param pointer is null");
  if (reads_grad && b.grad == nullptr) fail(fn + ": grad pointer is null");
  if (needs_backup && b.master == nullptr && b.backup == nullptr)
    fail(fn + ": backup pointer is null (no master weights)");
}

}  // namespace checks
}  // namespace fusedopt
