// C++ API of the compiled core: plain pointers, 64-bit counts, dtype codes, a segment table and the algorithm's
// hyperparameters as doubles. Implemented for the CPU in csrc/cpu/dispatch.cpp (checked entry points) and consumed by
// csrc/bindings/module.cpp; csrc/include/fusedopt/cuda_api.h is the CUDA counterpart.
#pragma once

#include <stdint.h>

#include <string>
#include <vector>

#include "fusedopt/algorithms.h"
#include "fusedopt/param_io.h"
#include "fusedopt/quant8.h"

namespace fusedopt {

// One flat buffer set: n elements each. states[k] follows the algorithm's kStates; unused slots are null.
// param_mode (param_io.h ParamMode) says how the parameter values are kept, for 16-bit parameters: master (fp32, mode
// kParamMaster) holds the values, param receiving round(master); comp (param dtype, mode kParamKahan) is the Kahan
// compensation, the value being param + comp; mode kParamStochastic rounds bf16 parameters stochastically, keyed on
// seed. Null pointers for the other modes.
// With state_dtype kState8bit (quant8.h) each used state slot is one byte per element with absmax[k] its float32 block
// absmaxes (one per kQuantBlock elements), and bit k of signed_states says whether slot k holds signed values.
struct FlatBuffers {
  void* param = nullptr;
  const void* grad = nullptr;
  void* states[algo::kMaxStates] = {nullptr, nullptr, nullptr};
  float* master = nullptr;
  void* comp = nullptr;
  int param_mode = 0;
  uint64_t seed = 0;
  int64_t n = 0;
  int param_dtype = 0;
  int grad_dtype = 0;
  int state_dtype = 0;
  float* absmax[algo::kMaxStates] = {nullptr, nullptr, nullptr};
  int signed_states = 0;
};

// The parameters of a flat buffer set: segment s is [offsets[s], offsets[s] + numels[s]), sorted and disjoint.
// steps[s] is the segment's step count (float32, as torch.optim's `step`), incremented by the call for every active
// segment before its coefficients are made; active[s] != 0 when the parameter has a gradient this step. Inactive
// segments are neither read nor written. Segments with different step counts are updated in the same call.
// scalars holds the per-segment scalar states of an algorithm that keeps them (algorithm.h): row s, kScalars float32
// values, read before and written after the segment's update; null for the others.
// layout holds, for a factored algorithm (algorithm.h), kLayoutColumns int64 per segment (the Layout columns below);
// null for the others. A segment of total_rows > 0 is a stack of `lead` matrices of `rows` x `cols` (its last two
// dimensions; numel = lead*rows*cols, rows may be 0 on a shard that holds none), with row factors (lead*rows) and
// column factors (lead*cols) at its offsets in slots 0 and 1, and its entries in StepArgs::factor_sums: lead row sums
// at row_sum_at, lead*cols column sums at col_sum_at (where the shards of one parameter put the same leading index).
// A segment of total_rows 0 is a vector or scalar whose whole second moment (numel) lies at variance_at in slot 2.
// total_rows is the row count of the whole parameter (its shards' rows together), which the means divide by.
enum Layout : int {
  kLead = 0,
  kRows,
  kCols,
  kTotalRows,
  kRowVarAt,
  kColVarAt,
  kVarianceAt,
  kRowSumAt,
  kColSumAt,
  kNumel,  // the whole parameter's numel (its shards' together), which RMS(p) and RMS(u) divide by
  kLayoutColumns
};
struct Segments {
  const int64_t* offsets = nullptr;
  const int64_t* numels = nullptr;
  float* steps = nullptr;
  const uint8_t* active = nullptr;
  float* scalars = nullptr;
  const int64_t* layout = nullptr;
  int64_t count = 0;
};

// Trust-ratio and factored passes, for running them separately (sharded parameters all-reduce the sums in between).
constexpr int kPassMoments = 1;  // pass 1: moments and per-segment sums of squares of p and u (counts the step);
                                 // factored: the factors' row and column sums of squares, the row factors, the
                                 // variance, the row factors' sums and the sums of squares of p
constexpr int kPassApply = 2;    // last pass: trust ratios (step sizes) from the sums, then the update
constexpr int kPassNorms = 4;    // factored only, between the two: the column factors and row means from the
                                 // (reduced) sums, then the sums of squares of u

// What a step needs besides the buffers and segments. hyper holds the algorithm's Hyper fields in kFields order.
struct StepArgs {
  const double* hyper = nullptr;
  int64_t hyper_count = 0;
  double lr = 0.0;
  double grad_scale = 1.0;  // AMP 1/scale times the clip coefficient
  // Trust-ratio and factored algorithms only: which passes run, and segments.count doubles each that receive the
  // per-segment sums of squares of p and u and are read by the later passes (null: scratch space of the call).
  int passes = kPassMoments | kPassApply;
  double* segment_w2 = nullptr;
  double* segment_u2 = nullptr;
  // Factored algorithms: the row and column sums of the moments pass (Layout::kRowSumAt, kColSumAt), which the norms
  // pass turns into row means and column factors; factor_sums_count doubles, zeroed by the caller (null: scratch).
  double* factor_sums = nullptr;
  int64_t factor_sums_count = 0;
};

struct SumOfSquares {
  double sum = 0.0;
  bool nonfinite = false;
};

// The buffers of SAM's perturbation and its undo (fusedopt/math/sam.h), n elements each, laid out as the flat buffer
// set of a step. grad is read by the perturbation and ASAM's sum of squares only. With master (fp32, 16-bit
// parameters) the weights w are the master's and backup is unused (null); without, backup (the param dtype) receives
// p's bits from the perturbation and gives them back to the undo.
struct SamBuffers {
  void* param = nullptr;
  const void* grad = nullptr;
  const float* master = nullptr;
  void* backup = nullptr;
  int64_t n = 0;
  int param_dtype = 0;
  int grad_dtype = 0;
};

namespace cpu {

// Checked entry points, one per algorithm: they validate their arguments and throw std::invalid_argument before
// touching memory.
#define FUSEDOPT_DECLARE_STEP(A) void A(const FlatBuffers& b, const Segments& s, const StepArgs& args);
FUSEDOPT_FOR_EACH_ALGORITHM(FUSEDOPT_DECLARE_STEP)
#undef FUSEDOPT_DECLARE_STEP

SumOfSquares sum_of_squares(const void* data, int64_t n, int dtype);
// Over the active segments only (a parameter without a gradient this step holds stale values).
SumOfSquares sum_of_squares_segments(const void* data, int64_t n, int dtype, const Segments& s);

// SAM over the active segments: p := round(w + e), e = scale * g (ASAM: scale * w * w * g), backing p up first
// without master weights; the undo restores p bit for bit (from the backup, or round(master)); ASAM's norm is the
// sum of squares of |w| * g, with the reduction's fixed partition and combine order.
void sam_perturb(const SamBuffers& b, const Segments& s, double scale, bool adaptive);
void sam_restore(const SamBuffers& b, const Segments& s);
SumOfSquares sam_sum_of_squares(const SamBuffers& b, const Segments& s);

// Run-time ISA selection: "baseline", "avx2", "avx512".
std::vector<std::string> compiled_isas();
std::vector<std::string> supported_isas();  // compiled and runnable on this CPU, best last
std::string cpu_isa();
void set_cpu_isa(const std::string& name);  // throws std::invalid_argument naming the value and the supported ISAs
std::string isa_override_error();           // non-empty when FUSEDOPT_CPU_ISA or FUSEDOPT_THREADS_BACKEND held an
                                            // unusable value at load
void set_num_threads(int n);     // fixes the kernels' thread count
void reset_num_threads();        // back to following the count given by follow_threads
void follow_threads(int n);      // the caller's (torch's) thread count, used unless one is fixed
int get_num_threads();           // what the next kernel will use
// Where the kernels' parallel regions run (csrc/cpu/thread_pool.h): "openmp" (the OpenMP runtime torch loaded, found
// when the extension was loaded) or "pool" (fusedopt's own threads: no runtime, a forked child, or asked for).
std::string thread_backend();
void set_thread_backend(const std::string& name);  // "openmp" (default: when one is loaded) or "pool"; else throws
std::string openmp_runtime();    // path of the runtime found at load ("" when none)
int last_region_threads();       // threads that ran the last parallel region (1: inline), for tests

}  // namespace cpu
}  // namespace fusedopt
