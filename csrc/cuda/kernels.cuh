// Unchecked CUDA launches, one per algorithm, defined in kernels_*.cu and called by api.cu after validation.
// Each launch runs on `stream` of the current device and never synchronises.
#pragma once

#include <cuda_runtime.h>

#include "fusedopt/api.h"
#include "fusedopt/cuda_api.h"

namespace fusedopt {
namespace cuda {

void launch_adam(const FlatBuffers& b, const AdamCoeffs& c, bool amsgrad, const DeviceScalars& d, const Hyper& h,
                 cudaStream_t stream);
void launch_sgd(const FlatBuffers& b, const SgdCoeffs& c, bool momentum, const DeviceScalars& d, const Hyper& h,
                cudaStream_t stream);
void launch_rmsprop(const FlatBuffers& b, const RmspropCoeffs& c, bool centered, bool momentum,
                    const DeviceScalars& d, const Hyper& h, cudaStream_t stream);
void launch_adagrad(const FlatBuffers& b, const AdagradCoeffs& c, const DeviceScalars& d, const Hyper& h,
                    cudaStream_t stream);
void launch_lion(const FlatBuffers& b, const LionCoeffs& c, const DeviceScalars& d, const Hyper& h,
                 cudaStream_t stream);
void launch_lamb(const FlatBuffers& b, const LambCoeffs& c, const LambDeviceWork& w, double lr,
                 double max_trust_ratio, const DeviceScalars& d, const Hyper& h, cudaStream_t stream);
void launch_sum_of_squares(const void* data, int64_t n, int dtype, double* scratch, float* out_sum,
                           double* out_sum64, float* out_nonfinite, cudaStream_t stream);
int64_t sum_of_squares_blocks(int64_t n);
void launch_clip_coefficient(const float* sums, const float* flags, int64_t count, double max_norm,
                             const float* inv_scale_dev, float inv_scale, float* out_coef, float* out_norm,
                             float* out_found_inf, cudaStream_t stream);

}  // namespace cuda
}  // namespace fusedopt
