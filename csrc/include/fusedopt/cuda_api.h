// C++ API of the CUDA backend: the FlatBuffers / Segments / StepArgs of the CPU entry points (api.h), all in device
// memory, plus the device work list, optional device scalars and where to launch. Host-compiler safe: no CUDA or
// torch headers, so the pybind11 bindings include it as is. Implemented in csrc/cuda/api.cu.
#pragma once

#include <stdint.h>

#include "fusedopt/api.h"

namespace fusedopt {
namespace cuda {

// Where and on which stream a call runs. `stream` is a cudaStream_t passed as an integer (0: legacy default stream).
struct Launch {
  int device = 0;
  intptr_t stream = 0;
};

// The work list of a segment table in device memory: one int64 array laid out
//   [item_begin (items) | item_end (items) | item_segment (items) | seg_first (segment count + 1)]
// over every segment, active or not (python/fusedopt/flat.py Segments.on_device builds it once per table). Item i is
// [item_begin[i], item_end[i]) of segment item_segment[i]: at most kChunk elements starting on a kChunk boundary of
// its segment; segment s owns items seg_first[s] .. seg_first[s+1]-1. The kernels skip the items of inactive segments,
// so the list never changes with the active flags. The partition depends on the layout alone, which keeps the
// reductions bitwise reproducible.
struct DeviceWork {
  const int64_t* work = nullptr;
  int64_t items = 0;
  // Factored algorithms only: one int64 array [layout (segment count x kLayoutColumns, api.h Layout) | row_first
  // (segment count + 1) | row items {segment, row} (row_items) | column items {segment, leading index, first column,
  // end column} (col_items)] over every segment, active or not; segment s owns row items row_first[s] ..
  // row_first[s+1]-1, rows 0 .. lead*rows-1 of its stack of matrices (Segments.on_device builds it once per table).
  const int64_t* factored = nullptr;
  int64_t row_items = 0;
  int64_t col_items = 0;
};

// Optional device-memory scalars read by the kernels (null: absent). lr and grad_scale are of the compute type of the
// buffer set: float32, or float64 with float64 parameters (a float32 copy would round what torch computes in double).
//   lr:         replaces StepArgs::lr (a scheduler writes it in place; a CUDA graph replays with the new value);
//   grad_scale: multiplies StepArgs::grad_scale (AMP 1/scale times the clip coefficient, computed on the device);
//   found_inf:  float32; when *found_inf != 0 the call writes nothing and counts no step (AMP or skip_nonfinite).
struct DeviceScalars {
  const void* lr = nullptr;
  const void* grad_scale = nullptr;
  const float* found_inf = nullptr;
};

// Checked entry points, one per algorithm of the list: the CPU semantics (api.h) on the device. Every active segment's
// step count is incremented on the device (unless *found_inf), then each segment's coefficients are made on the device
// by the math header's make_coeffs from its own step. Every argument is validated before any launch
// (std::invalid_argument naming it); launch errors become std::runtime_error. Nothing synchronises with the host.
// Trust-ratio algorithms take their scratch space (per-item partial sums, and the per-segment sums when
// StepArgs::segment_w2 is null) from cudaMallocAsync on the stream and free it there, so a call is capture-safe.
#define FUSEDOPT_DECLARE_CUDA_STEP(A)                                                                     \
  void A(const FlatBuffers& b, const Segments& s, const DeviceWork& w, const StepArgs& args, const DeviceScalars& d, \
         const Launch& l);
FUSEDOPT_FOR_EACH_ALGORITHM(FUSEDOPT_DECLARE_CUDA_STEP)
#undef FUSEDOPT_DECLARE_CUDA_STEP

// Doubles of scratch space sum_of_squares needs for `items` work items (a partial sum and a flag per item).
int64_t sum_of_squares_scratch(int64_t items);
// Deterministic sum of squares (fp32 squares of fp32/bf16/fp16 data, float64 squares of float64 data; double
// accumulation) of the active segments' items, written to *out_sum as float32 (out_sum_dtype 0) or float64
// (out_sum_dtype 3), and 1.0f (else 0.0f) to the float32 *out_nonfinite when one of those elements is inf/NaN; both
// stay in device memory. w.work == 0 (with segment_count 0 and active null) means the whole buffer, in
// w.items = ceil(n / kChunk) chunks.
void sum_of_squares(const void* data, int64_t n, int dtype, const DeviceWork& w, const uint8_t* active,
                    int64_t segment_count, double* scratch, void* out_sum, int out_sum_dtype, float* out_nonfinite,
                    const Launch& l);

// SAM (fusedopt/math/sam.h) over the active segments' items, the CPU semantics (api.h) on the device, asynchronous on
// the stream. scale_ptr (optional) is a device scalar of the compute type that replaces `scale`; found_inf (optional,
// float32) non-zero: the call writes nothing. The sum of squares of |w| * g goes to device scalars as
// sum_of_squares does, with its scratch (sum_of_squares_scratch(w.items) doubles).
void sam_perturb(const SamBuffers& b, const DeviceWork& w, const uint8_t* active, int64_t segment_count, double scale,
                 const void* scale_ptr, const float* found_inf, bool adaptive, const Launch& l);
void sam_restore(const SamBuffers& b, const DeviceWork& w, const uint8_t* active, int64_t segment_count,
                 const float* found_inf, const Launch& l);
void sam_sum_of_squares(const SamBuffers& b, const DeviceWork& w, const uint8_t* active, int64_t segment_count,
                        double* scratch, void* out_sum, int out_sum_dtype, float* out_nonfinite, const Launch& l);

}  // namespace cuda
}  // namespace fusedopt
