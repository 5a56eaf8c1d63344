// C++ API of the CUDA backend: the same FlatBuffers / *Coeffs as the CPU entry points (api.h) plus device-memory
// scalars and a stream handle. Host-compiler safe: no CUDA or torch headers, so the pybind11 bindings include it as is.
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

// Optional device-memory scalars read by the update kernels (every pointer may be null):
//   grad_scale: multiplies the host grad_scale (clip coefficient x AMP 1/scale computed on the device);
//   found_inf:  when *found_inf != 0 the kernels return without writing anything (AMP skipped step);
//   lr, step:   capturable mode: lr and the step count (already incremented) are read from device memory and the
//               step-dependent coefficients are recomputed per thread block from `Hyper`, so a CUDA graph can replay.
struct DeviceScalars {
  const float* grad_scale = nullptr;
  const float* found_inf = nullptr;
  const float* lr = nullptr;
  const float* step = nullptr;
};

// Hyperparameters the device needs to recompute lr/step-dependent coefficients in capturable mode (ignored otherwise).
struct Hyper {
  double beta1 = 0.0;
  double beta2 = 0.0;
  double weight_decay = 0.0;
  double lr_decay = 0.0;  // Adagrad
  bool decoupled = false;       // Adam: AdamW
  bool bias_correction = true;  // LAMB
};

// LAMB work list in device memory (built once per segment table by the caller; see python/fusedopt/_compiled_cuda.py):
// item i is [item_begin[i], item_end[i]) of segment item_segment[i], at most kChunk elements, starting on a kChunk
// boundary of its segment. partial_w/partial_u (items doubles each) and scaled_lr (segments floats) are scratch.
// segment_w2/segment_u2 (segments doubles each) hold the per-segment sums of squares of p and u between the passes:
// `phases` (kLambMoments, kLambApply or both, as on the CPU) lets the caller reduce them across ranks in between.
struct LambDeviceWork {
  const int64_t* item_begin = nullptr;
  const int64_t* item_end = nullptr;
  const int64_t* item_segment = nullptr;
  const int64_t* seg_first = nullptr;  // segments + 1 entries
  int64_t items = 0;
  int64_t segments = 0;
  double* partial_w = nullptr;
  double* partial_u = nullptr;
  float* scaled_lr = nullptr;
  double* segment_w2 = nullptr;
  double* segment_u2 = nullptr;
  int phases = kLambMoments | kLambApply;
};

// Checked entry points: they validate every argument and throw std::invalid_argument before any launch, and turn a
// launch error into std::runtime_error. Nothing synchronises with the host.
void adam(const FlatBuffers& b, const AdamCoeffs& c, bool amsgrad, const DeviceScalars& d, const Hyper& h,
          const Launch& l);
void sgd(const FlatBuffers& b, const SgdCoeffs& c, bool momentum, const DeviceScalars& d, const Hyper& h,
         const Launch& l);
void rmsprop(const FlatBuffers& b, const RmspropCoeffs& c, bool centered, bool momentum, const DeviceScalars& d,
             const Hyper& h, const Launch& l);
void adagrad(const FlatBuffers& b, const AdagradCoeffs& c, const DeviceScalars& d, const Hyper& h, const Launch& l);
void lion(const FlatBuffers& b, const LionCoeffs& c, const DeviceScalars& d, const Hyper& h, const Launch& l);
// lr and max_trust_ratio in double (max_trust_ratio < 0 or NaN: no clamp, as on the CPU); d.lr replaces lr when set.
void lamb(const FlatBuffers& b, const LambCoeffs& c, const LambDeviceWork& w, double lr, double max_trust_ratio,
          const DeviceScalars& d, const Hyper& h, const Launch& l);

// Doubles of scratch space sum_of_squares needs for n elements (partial sums and flags of the fixed partition).
int64_t sum_of_squares_scratch(int64_t n);
// Deterministic sum of squares (fp32 products, double accumulation) left in device memory: any of out_sum (fp32),
// out_sum64 (double) may be null; out_nonfinite (fp32, 1.0 when an element is inf/NaN, else 0.0) may be null.
void sum_of_squares(const void* data, int64_t n, int dtype, double* scratch, float* out_sum, double* out_sum64,
                    float* out_nonfinite, const Launch& l);
// One thread combines `count` fp32 sums of squares in index order: norm = sqrt(sum) * inv_scale;
// coef = min(max_norm / (norm + 1e-6), 1) * inv_scale (NaN propagates, as torch.clamp). inv_scale is *inv_scale_dev
// when set, else inv_scale. flags (count floats, may be null) and a non-finite norm set *out_found_inf to 1.
void clip_coefficient(const float* sums, const float* flags, int64_t count, double max_norm,
                      const float* inv_scale_dev, float inv_scale, float* out_coef, float* out_norm,
                      float* out_found_inf, const Launch& l);

int device_count();
// CUDA runtime version this module was built against (e.g. 13000) and the driver's.
int runtime_version();
int driver_version();

}  // namespace cuda
}  // namespace fusedopt
