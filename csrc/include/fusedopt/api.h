// C++ API of the compiled core: plain pointers, 64-bit counts, dtype codes and precomputed coefficients.
// Implemented for the CPU in csrc/cpu/dispatch.cpp (checked entry points) and consumed by csrc/bindings/module.cpp.
#pragma once

#include <stdint.h>

#include <string>
#include <vector>

#include "fusedopt/math/adagrad.h"
#include "fusedopt/math/adam.h"
#include "fusedopt/math/lamb.h"
#include "fusedopt/math/lion.h"
#include "fusedopt/math/rmsprop.h"
#include "fusedopt/math/sgd.h"

namespace fusedopt {

// One flat buffer set: n elements each. states[k] follows the algorithm's state order (see math/*.h); unused slots
// are null. master (fp32) is null or holds the parameter value, with param receiving round(master).
struct FlatBuffers {
  void* param = nullptr;
  const void* grad = nullptr;
  void* states[3] = {nullptr, nullptr, nullptr};
  float* master = nullptr;
  int64_t n = 0;
  int param_dtype = 0;
  int grad_dtype = 0;
  int state_dtype = 0;
};

// LAMB segments: count (offset, numel) pairs, sorted by offset, non-overlapping, within [0, n).
struct LambSegments {
  const int64_t* offsets = nullptr;
  const int64_t* numels = nullptr;
  int64_t count = 0;
};

// LAMB passes, for running them separately (sharded parameters all-reduce the per-segment sums in between).
constexpr int kLambMoments = 1;  // pass 1: moments and per-segment sums of squares of p and u
constexpr int kLambApply = 2;    // pass 2: trust ratios from the sums, then the update

struct SumOfSquares {
  double sum = 0.0;
  bool nonfinite = false;
};

namespace cpu {

// Checked entry points: they validate their arguments and throw std::invalid_argument before touching memory.
void adam(const FlatBuffers& b, const AdamCoeffs& c, bool amsgrad);
void sgd(const FlatBuffers& b, const SgdCoeffs& c, bool momentum);
void rmsprop(const FlatBuffers& b, const RmspropCoeffs& c, bool centered, bool momentum);
void adagrad(const FlatBuffers& b, const AdagradCoeffs& c);
void lion(const FlatBuffers& b, const LionCoeffs& c);
// lr and max_trust_ratio in double (max_trust_ratio < 0 or NaN: no clamp, i.e. None); the trust ratio is computed per segment.
void lamb(const FlatBuffers& b, const LambCoeffs& c, const LambSegments& segments, double lr, double max_trust_ratio);
// One or both LAMB passes: `phases` is kLambMoments, kLambApply or both. segment_w2/segment_u2 (segments.count doubles
// each) receive the sums of squares of p and u after pass 1 and are read by pass 2.
void lamb_phases(const FlatBuffers& b, const LambCoeffs& c, const LambSegments& segments, double lr,
                 double max_trust_ratio, int phases, double* segment_w2, double* segment_u2);
SumOfSquares sum_of_squares(const void* data, int64_t n, int dtype);

// Run-time ISA selection: "baseline", "avx2", "avx512".
std::vector<std::string> compiled_isas();
std::vector<std::string> supported_isas();  // compiled and runnable on this CPU, best last
std::string cpu_isa();
void set_cpu_isa(const std::string& name);  // throws std::invalid_argument naming the value and the supported ISAs
std::string isa_override_error();           // non-empty when FUSEDOPT_CPU_ISA held an unusable value at load
void set_num_threads(int n);
int get_num_threads();
bool openmp_enabled();

}  // namespace cpu
}  // namespace fusedopt
