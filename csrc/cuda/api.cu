// Checked CUDA entry points (fusedopt/cuda_api.h): validate every argument and throw std::invalid_argument naming it
// before any launch, make the requested device current, launch on the given stream, and turn a launch error into
// std::runtime_error. No entry point synchronises with the host.
#include <cuda_runtime.h>
#include <math.h>

#include <stdexcept>
#include <string>

#include "fusedopt/cuda_api.h"
#include "kernels.cuh"
#include "launcher.cuh"

namespace fusedopt {
namespace cuda {
namespace {

[[noreturn]] void invalid(const std::string& message) { throw std::invalid_argument(message); }

void check_launch_args(const Launch& l) {
  int count = 0;
  check_cuda(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  if (l.device < 0 || l.device >= count)
    invalid("Invalid device: " + std::to_string(l.device) + " (" + std::to_string(count) + " CUDA devices)");
}

// Validates a flat buffer set; `uses(k)` says which state slots the algorithm reads and writes.
template <typename Uses>
void check_buffers(const FlatBuffers& b, Uses uses) {
  if (b.n < 0) invalid("Invalid n: " + std::to_string(b.n) + " (expected >= 0)");
  if (!is_valid_dtype(b.param_dtype)) invalid("Invalid param_dtype: " + std::to_string(b.param_dtype));
  if (!is_valid_dtype(b.grad_dtype)) invalid("Invalid grad_dtype: " + std::to_string(b.grad_dtype));
  if (b.grad_dtype != b.param_dtype && b.grad_dtype != kFloat32)
    invalid("Invalid grad_dtype: " + std::to_string(b.grad_dtype) + " (expected param_dtype " +
            std::to_string(b.param_dtype) + " or 0 = float32)");
  if (b.state_dtype != kFloat32 && b.state_dtype != kBFloat16)
    invalid("Invalid state_dtype: " + std::to_string(b.state_dtype) + " (expected 0 = float32 or 1 = bfloat16)");
  if (b.n == 0) return;
  if (b.param == nullptr) invalid("Invalid param: null pointer");
  if (b.grad == nullptr) invalid("Invalid grad: null pointer");
  for (int k = 0; k < 3; ++k)
    if (uses(k) && b.states[k] == nullptr) invalid("Invalid state " + std::to_string(k) + ": null pointer");
  // Element alignment is required (a misaligned element is a hardware fault); 16-byte alignment is optional (the
  // launcher takes the scalar path without it).
  auto element_aligned = [](const void* p, int size) { return (reinterpret_cast<uintptr_t>(p) % size) == 0; };
  if (!element_aligned(b.param, dtype_size(b.param_dtype))) invalid("Invalid param: pointer not element-aligned");
  if (!element_aligned(b.grad, dtype_size(b.grad_dtype))) invalid("Invalid grad: pointer not element-aligned");
  for (int k = 0; k < 3; ++k)
    if (uses(k) && !element_aligned(b.states[k], dtype_size(b.state_dtype)))
      invalid("Invalid state " + std::to_string(k) + ": pointer not element-aligned");
  if (b.master != nullptr && !element_aligned(b.master, 4)) invalid("Invalid master: pointer not element-aligned");
}

void check_device_scalars(const DeviceScalars& d, bool needs_step) {
  auto aligned4 = [](const float* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 3u) == 0; };
  if (!aligned4(d.grad_scale) || !aligned4(d.found_inf) || !aligned4(d.lr) || !aligned4(d.step))
    invalid("Invalid device scalar: pointer not 4-byte aligned");
  if (d.step != nullptr && d.lr == nullptr) invalid("Invalid lr: capturable mode (step on the device) needs lr too");
  if (needs_step && d.lr != nullptr && d.step == nullptr)
    invalid("Invalid step: capturable mode (lr on the device) needs the step on the device too");
}

// fp32 parameters with fp32 master weights: the update runs on the master buffer, then param receives a copy
// (as the CPU dispatcher does); 16-bit parameters read and write master inside the kernel.
template <typename Launcher>
void run_with_master(const FlatBuffers& b, const Launch& l, Launcher&& launch) {
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(l.stream);
  if (b.master != nullptr && b.param_dtype == kFloat32) {
    FlatBuffers on_master = b;
    on_master.param = b.master;
    on_master.master = nullptr;
    launch(on_master, stream);
    check_launch("update kernel");
    check_cuda(cudaMemcpyAsync(b.param, b.master, static_cast<size_t>(b.n) * 4, cudaMemcpyDeviceToDevice, stream),
               "cudaMemcpyAsync(master -> param)");
  } else {
    launch(b, stream);
    check_launch("update kernel");
  }
}

}  // namespace

void adam(const FlatBuffers& b, const AdamCoeffs& c, bool amsgrad, const DeviceScalars& d, const Hyper& h,
          const Launch& l) {
  check_buffers(b, [&](int k) { return k < (amsgrad ? 3 : 2); });
  check_device_scalars(d, true);
  check_launch_args(l);
  if (b.n == 0) return;
  DeviceGuard guard(l.device);
  run_with_master(b, l, [&](const FlatBuffers& x, cudaStream_t s) { launch_adam(x, c, amsgrad, d, h, s); });
}

void sgd(const FlatBuffers& b, const SgdCoeffs& c, bool momentum, const DeviceScalars& d, const Hyper& h,
         const Launch& l) {
  check_buffers(b, [&](int k) { return momentum && k == 0; });
  check_device_scalars(d, false);
  check_launch_args(l);
  if (b.n == 0) return;
  DeviceGuard guard(l.device);
  run_with_master(b, l, [&](const FlatBuffers& x, cudaStream_t s) { launch_sgd(x, c, momentum, d, h, s); });
}

void rmsprop(const FlatBuffers& b, const RmspropCoeffs& c, bool centered, bool momentum, const DeviceScalars& d,
             const Hyper& h, const Launch& l) {
  check_buffers(b, [&](int k) { return k == 0 || (k == 1 && momentum) || (k == 2 && centered); });
  check_device_scalars(d, false);
  check_launch_args(l);
  if (b.n == 0) return;
  DeviceGuard guard(l.device);
  run_with_master(b, l,
                  [&](const FlatBuffers& x, cudaStream_t s) { launch_rmsprop(x, c, centered, momentum, d, h, s); });
}

void adagrad(const FlatBuffers& b, const AdagradCoeffs& c, const DeviceScalars& d, const Hyper& h, const Launch& l) {
  check_buffers(b, [&](int k) { return k == 0; });
  check_device_scalars(d, true);
  check_launch_args(l);
  if (b.n == 0) return;
  DeviceGuard guard(l.device);
  run_with_master(b, l, [&](const FlatBuffers& x, cudaStream_t s) { launch_adagrad(x, c, d, h, s); });
}

void lion(const FlatBuffers& b, const LionCoeffs& c, const DeviceScalars& d, const Hyper& h, const Launch& l) {
  check_buffers(b, [&](int k) { return k == 0; });
  check_device_scalars(d, false);
  check_launch_args(l);
  if (b.n == 0) return;
  DeviceGuard guard(l.device);
  run_with_master(b, l, [&](const FlatBuffers& x, cudaStream_t s) { launch_lion(x, c, d, h, s); });
}

void lamb(const FlatBuffers& b, const LambCoeffs& c, const LambDeviceWork& w, double lr, double max_trust_ratio,
          const DeviceScalars& d, const Hyper& h, const Launch& l) {
  check_buffers(b, [&](int k) { return k < 2; });
  check_device_scalars(d, true);
  if (w.items < 0) invalid("Invalid items: " + std::to_string(w.items));
  if (w.segments < 0) invalid("Invalid segments: " + std::to_string(w.segments));
  if (w.items > 0 && (w.item_begin == nullptr || w.item_end == nullptr || w.item_segment == nullptr ||
                      w.partial_w == nullptr || w.partial_u == nullptr))
    invalid("Invalid LAMB work list: null item pointer");
  if (w.segments > 0 && (w.seg_first == nullptr || w.scaled_lr == nullptr || w.segment_w2 == nullptr ||
                         w.segment_u2 == nullptr))
    invalid("Invalid LAMB work list: null segment pointer");
  if (w.phases < kLambMoments || w.phases > (kLambMoments | kLambApply))
    invalid("Invalid phases: " + std::to_string(w.phases) + " (expected 1, 2 or 3)");
  if (w.items > 0 && b.n == 0) invalid("Invalid n: 0 with " + std::to_string(w.items) + " LAMB work items");
  check_launch_args(l);
  if (b.n == 0 || w.items == 0) return;
  DeviceGuard guard(l.device);
  run_with_master(b, l, [&](const FlatBuffers& x, cudaStream_t s) {
    launch_lamb(x, c, w, lr, max_trust_ratio, d, h, s);
  });
}

int64_t sum_of_squares_scratch(int64_t n) {
  if (n < 0) invalid("Invalid n: " + std::to_string(n) + " (expected >= 0)");
  return 2 * sum_of_squares_blocks(n);
}

void sum_of_squares(const void* data, int64_t n, int dtype, double* scratch, float* out_sum, double* out_sum64,
                    float* out_nonfinite, const Launch& l) {
  if (n < 0) invalid("Invalid n: " + std::to_string(n) + " (expected >= 0)");
  if (!is_valid_dtype(dtype)) invalid("Invalid dtype: " + std::to_string(dtype));
  if (n > 0 && data == nullptr) invalid("Invalid data: null pointer");
  if (n > 0 && (reinterpret_cast<uintptr_t>(data) % dtype_size(dtype)) != 0)
    invalid("Invalid data: pointer not element-aligned");
  if (scratch == nullptr) invalid("Invalid scratch: null pointer");
  if ((reinterpret_cast<uintptr_t>(scratch) & 7u) != 0) invalid("Invalid scratch: pointer not 8-byte aligned");
  check_launch_args(l);
  DeviceGuard guard(l.device);
  launch_sum_of_squares(data, n, dtype, scratch, out_sum, out_sum64, out_nonfinite,
                        reinterpret_cast<cudaStream_t>(l.stream));
}

void clip_coefficient(const float* sums, const float* flags, int64_t count, double max_norm,
                      const float* inv_scale_dev, float inv_scale, float* out_coef, float* out_norm,
                      float* out_found_inf, const Launch& l) {
  if (count < 0) invalid("Invalid count: " + std::to_string(count));
  if (count > 0 && sums == nullptr) invalid("Invalid sums: null pointer");
  if (out_coef == nullptr) invalid("Invalid out_coef: null pointer");
  if (isnan(max_norm)) invalid("Invalid max_norm: nan");
  check_launch_args(l);
  DeviceGuard guard(l.device);
  launch_clip_coefficient(sums, flags, count, max_norm, inv_scale_dev, inv_scale, out_coef, out_norm, out_found_inf,
                          reinterpret_cast<cudaStream_t>(l.stream));
}

int device_count() {
  int count = 0;
  // No driver or no device: report 0 instead of raising, so build_info() works everywhere.
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

int runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

int driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) return 0;
  return v;
}

}  // namespace cuda
}  // namespace fusedopt
