// The one CUDA launcher: a grid-stride kernel over the flat buffers that calls the per-element functors of
// csrc/include/fusedopt/math (the same ones the CPU driver calls), plus the pack loads, block reductions, device
// queries and launch helpers shared by every CUDA source. Included only by the .cu files of csrc/cuda.
//
// Aligned path: packs of kPack elements read and written with 16-byte vector accesses (an fp32 pack is two, a 16-bit
// pack one), kIlp packs per thread in flight before any math; then a masked scalar tail. When any pointer is not
// 16-byte aligned the whole buffer takes the scalar path (same math, same results). All indices are 64-bit.
#pragma once

#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include <atomic>
#include <stdexcept>
#include <string>

#include "fusedopt/api.h"
#include "fusedopt/common.h"
#include "fusedopt/cuda_api.h"
#include "fusedopt/dtype.h"
#include "fusedopt/math/norm.h"

namespace fusedopt {
namespace cuda {

constexpr int kThreads = 256;  // threads per block of every update and partial-sum kernel (part of the partition)
constexpr int kPack = 8;       // elements per pack: 16 bytes of a 16-bit array, 32 of an fp32 array
#ifndef FUSEDOPT_CUDA_ILP
#define FUSEDOPT_CUDA_ILP 1
#endif
// Packs per thread per iteration. One pack already puts (arrays x 1..2) 16-byte loads in flight per thread (Adam fp32:
// 8); FUSEDOPT_CUDA_ILP=2 doubles registers (2 instead of 4 resident blocks per SM, same bytes in flight per SM) and
// ptxas time, so 1 is the default; benchmark before changing it.
constexpr int kIlp = FUSEDOPT_CUDA_ILP;
constexpr int kMaxDevices = 64;

// ---------------------------------------------------------------------------------------------------------------
// Host side: errors, device guard, grid sizing.

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string("fusedopt cuda: ") + what + ": " + cudaGetErrorName(status) + ": " +
                             cudaGetErrorString(status));
}

// Makes `device` current for the scope of a call and restores the caller's device (torch tracks the current device).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device)
      check_cuda(cudaSetDevice(device), "cudaSetDevice");
    else
      previous_ = -1;
  }
  ~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

inline int current_device() {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  return device;
}

// Multiprocessor count of the current device, queried once per device (attribute queries never synchronise).
inline int sm_count() {
  static std::atomic<int> cache[kMaxDevices];
  const int device = current_device();
  if (device < 0 || device >= kMaxDevices) {
    int v = 0;
    check_cuda(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
    return v;
  }
  int v = cache[device].load(std::memory_order_relaxed);
  if (v == 0) {
    check_cuda(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
    cache[device].store(v, std::memory_order_relaxed);
  }
  return v;
}

// Resident blocks per multiprocessor of one kernel (its register use decides), cached per kernel and device.
template <auto Kernel>
inline int blocks_per_sm() {
  static std::atomic<int> cache[kMaxDevices];
  const int device = current_device();
  const int slot = device >= 0 && device < kMaxDevices ? device : 0;
  int v = cache[slot].load(std::memory_order_relaxed);
  if (v == 0) {
    check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&v, Kernel, kThreads, 0),
               "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    if (v < 1) v = 1;
    cache[slot].store(v, std::memory_order_relaxed);
  }
  return v;
}

// Grid of a grid-stride kernel: enough blocks for `work_blocks` of work, at most one full wave of the device.
template <auto Kernel>
inline unsigned grid_size(int64_t work_blocks) {
  const int64_t wave = static_cast<int64_t>(sm_count()) * blocks_per_sm<Kernel>();
  int64_t g = work_blocks < wave ? work_blocks : wave;
  return static_cast<unsigned>(g < 1 ? 1 : g);
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

// ---------------------------------------------------------------------------------------------------------------
// Device side: packs. A pack of 8 fp32 is two 16-byte words, a pack of 8 bf16/fp16 one; element e of a 16-bit pack is
// the low (e even) or high (e odd) half of 32-bit word e/2 (little endian).

template <typename T>
struct Storage;
template <>
struct Storage<float> {
  static constexpr int kWords = 2;
};
template <>
struct Storage<bf16_t> {
  static constexpr int kWords = 1;
};
template <>
struct Storage<fp16_t> {
  static constexpr int kWords = 1;
};

__device__ __forceinline__ void unpack(const uint4* w, float (&out)[kPack], float) {
  out[0] = __uint_as_float(w[0].x);
  out[1] = __uint_as_float(w[0].y);
  out[2] = __uint_as_float(w[0].z);
  out[3] = __uint_as_float(w[0].w);
  out[4] = __uint_as_float(w[1].x);
  out[5] = __uint_as_float(w[1].y);
  out[6] = __uint_as_float(w[1].z);
  out[7] = __uint_as_float(w[1].w);
}

template <typename T>
__device__ __forceinline__ void unpack(const uint4* w, float (&out)[kPack], T) {
  const uint32_t words[4] = {w[0].x, w[0].y, w[0].z, w[0].w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    out[2 * j] = load(T{static_cast<uint16_t>(words[j] & 0xFFFFu)});
    out[2 * j + 1] = load(T{static_cast<uint16_t>(words[j] >> 16)});
  }
}

__device__ __forceinline__ void pack(const float (&in)[kPack], uint4* w, float) {
  w[0] = make_uint4(__float_as_uint(in[0]), __float_as_uint(in[1]), __float_as_uint(in[2]), __float_as_uint(in[3]));
  w[1] = make_uint4(__float_as_uint(in[4]), __float_as_uint(in[5]), __float_as_uint(in[6]), __float_as_uint(in[7]));
}

template <typename T>
__device__ __forceinline__ void pack(const float (&in)[kPack], uint4* w, T) {
  uint32_t words[4];
#pragma unroll
  for (int j = 0; j < 4; ++j)
    words[j] = static_cast<uint32_t>(store<T>(in[2 * j]).bits) | (static_cast<uint32_t>(store<T>(in[2 * j + 1]).bits) << 16);
  w[0] = make_uint4(words[0], words[1], words[2], words[3]);
}

// Loads pack q (elements q*kPack ..) of a 16-byte aligned array.
template <typename T>
__device__ __forceinline__ void load_pack(const T* base, int64_t q, float (&out)[kPack]) {
  const uint4* src = reinterpret_cast<const uint4*>(base + q * kPack);
  uint4 w[Storage<T>::kWords];
#pragma unroll
  for (int k = 0; k < Storage<T>::kWords; ++k) w[k] = src[k];
  unpack(w, out, T{});
}

// Read-only data (gradients): through the non-coherent path.
template <typename T>
__device__ __forceinline__ void load_pack_ro(const T* base, int64_t q, float (&out)[kPack]) {
  const uint4* src = reinterpret_cast<const uint4*>(base + q * kPack);
  uint4 w[Storage<T>::kWords];
#pragma unroll
  for (int k = 0; k < Storage<T>::kWords; ++k) w[k] = __ldg(src + k);
  unpack(w, out, T{});
}

template <typename T>
__device__ __forceinline__ void store_pack(T* base, int64_t q, const float (&in)[kPack]) {
  uint4 w[Storage<T>::kWords];
  pack(in, w, T{});
  uint4* dst = reinterpret_cast<uint4*>(base + q * kPack);
#pragma unroll
  for (int k = 0; k < Storage<T>::kWords; ++k) dst[k] = w[k];
}

// Arrays whose storage is fp32 or a 16-bit type chosen at run time (one uniform branch per pack): gradients (param
// dtype or fp32) and optimizer states (fp32 or bf16). Keeps the kernel count at one per functor and param dtype.
template <typename T16>
__device__ __forceinline__ void load_pack_either(const void* base, bool fp32, int64_t q, float (&out)[kPack]) {
  if (fp32)
    load_pack(static_cast<const float*>(base), q, out);
  else
    load_pack(static_cast<const T16*>(base), q, out);
}
template <typename T16>
__device__ __forceinline__ void load_pack_either_ro(const void* base, bool fp32, int64_t q, float (&out)[kPack]) {
  if (fp32)
    load_pack_ro(static_cast<const float*>(base), q, out);
  else
    load_pack_ro(static_cast<const T16*>(base), q, out);
}
template <typename T16>
__device__ __forceinline__ void store_pack_either(void* base, bool fp32, int64_t q, const float (&in)[kPack]) {
  if (fp32)
    store_pack(static_cast<float*>(base), q, in);
  else
    store_pack(static_cast<T16*>(base), q, in);
}
template <typename T16>
__device__ __forceinline__ float load_either(const void* base, bool fp32, int64_t i) {
  return fp32 ? static_cast<const float*>(base)[i] : load(static_cast<const T16*>(base)[i]);
}
template <typename T16>
__device__ __forceinline__ void store_either(void* base, bool fp32, int64_t i, float x) {
  if (fp32)
    static_cast<float*>(base)[i] = x;
  else
    static_cast<T16*>(base)[i] = store<T16>(x);
}

// ---------------------------------------------------------------------------------------------------------------
// Device side: coefficients that depend on device memory (capturable lr/step, device grad scale).
// The formulas are those the host uses (python/fusedopt/_compiled_cuda.py), in double, rounded once to float.

__device__ inline void refresh_coeffs(AdamCoeffs& c, const Hyper& h, double lr, double step) {
  c.step_size = static_cast<float>(lr / (1.0 - pow(h.beta1, step)));
  c.bc2_sqrt = static_cast<float>(sqrt(1.0 - pow(h.beta2, step)));
  if (h.decoupled) c.decay = static_cast<float>(1.0 - lr * h.weight_decay);
}
__device__ inline void refresh_coeffs(SgdCoeffs& c, const Hyper&, double lr, double) { c.lr = static_cast<float>(lr); }
__device__ inline void refresh_coeffs(RmspropCoeffs& c, const Hyper&, double lr, double) {
  c.lr = static_cast<float>(lr);
}
__device__ inline void refresh_coeffs(AdagradCoeffs& c, const Hyper& h, double lr, double step) {
  c.clr = static_cast<float>(lr / (1.0 + (step - 1.0) * h.lr_decay));
}
__device__ inline void refresh_coeffs(LionCoeffs& c, const Hyper& h, double lr, double) {
  c.lr = static_cast<float>(lr);
  c.decay = static_cast<float>(1.0 - lr * h.weight_decay);
}
__device__ inline void refresh_coeffs(LambCoeffs& c, const Hyper& h, double, double step) {
  if (h.bias_correction) {
    c.bc1 = static_cast<float>(1.0 - pow(h.beta1, step));
    c.bc2 = static_cast<float>(1.0 - pow(h.beta2, step));
  }
}

// Block prologue of every update kernel: thread 0 applies the device scalars to the coefficients once, the block
// shares them through shared memory. Returns false when the step must be skipped (found_inf set).
template <typename Coeffs>
__device__ __forceinline__ bool block_coeffs(const Coeffs& host, const DeviceScalars& d, const Hyper& h,
                                             Coeffs& out) {
  __shared__ Coeffs shared_coeffs;
  __shared__ int shared_skip;
  if (threadIdx.x == 0) {
    Coeffs c = host;
    const bool skip = d.found_inf != nullptr && *d.found_inf != 0.0f;
    if (d.grad_scale != nullptr) c.grad_scale *= *d.grad_scale;
    if (d.lr != nullptr) refresh_coeffs(c, h, static_cast<double>(*d.lr), d.step != nullptr ? *d.step : 1.0);
    shared_coeffs = c;
    shared_skip = skip ? 1 : 0;
  }
  __syncthreads();
  out = shared_coeffs;
  return shared_skip == 0;
}

// ---------------------------------------------------------------------------------------------------------------
// Device side: deterministic block reduction (fixed shuffle tree, then warp sums in warp order). kThreads threads.

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, offset);
  return v;
}

// Sum over the block of blockDim.x (a multiple of 32, at most 1024) threads; the result is valid in thread 0.
// `scratch` holds 32 doubles. The order depends on blockDim.x only, never on timing.
__device__ __forceinline__ double block_sum(double v, double* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int warps = blockDim.x >> 5;
  double total = 0.0;
  if (warp == 0) {
    total = lane < warps ? scratch[lane] : 0.0;
    total = warp_sum(total);
  }
  __syncthreads();  // scratch may be reused by the caller's next reduction
  return total;
}

// ---------------------------------------------------------------------------------------------------------------
// The element-wise update kernel: Op is one of the functors of math/*.h (AdamOp, SgdOp, RmspropOp, AdagradOp, LionOp),
// TP (param storage) a template parameter. The gradient dtype (TP or fp32), the state dtype (fp32 or bf16) and master
// weights are run-time uniform switches on the loads and stores only (the math is instantiated once per kernel), which
// keeps the count at 3 kernels per functor and the build for every architecture within a few minutes on 2 cores.

struct ElementwiseArgs {
  void* param;
  const void* grad;
  void* states[3];
  float* master;
  int64_t n;
  bool grad_fp32;
  bool state_fp32;
  bool aligned;
  DeviceScalars d;
  Hyper h;
};

template <typename Op, typename TP>
__device__ __forceinline__ void update_element(const Op& op, const ElementwiseArgs& a, int64_t i) {
  TP* p = static_cast<TP*>(a.param);
  float pv = a.master != nullptr ? a.master[i] : load(p[i]);
  const float gv = load_either<TP>(a.grad, a.grad_fp32, i);
  float v0 = Op::uses(0) ? load_either<bf16_t>(a.states[0], a.state_fp32, i) : 0.0f;
  float v1 = Op::uses(1) ? load_either<bf16_t>(a.states[1], a.state_fp32, i) : 0.0f;
  float v2 = Op::uses(2) ? load_either<bf16_t>(a.states[2], a.state_fp32, i) : 0.0f;
  op(pv, gv, v0, v1, v2);
  if (a.master != nullptr) a.master[i] = pv;
  p[i] = store<TP>(pv);
  if (Op::uses(0)) store_either<bf16_t>(a.states[0], a.state_fp32, i, v0);
  if (Op::uses(1)) store_either<bf16_t>(a.states[1], a.state_fp32, i, v1);
  if (Op::uses(2)) store_either<bf16_t>(a.states[2], a.state_fp32, i, v2);
}

template <typename Op, typename TP>
__global__ void __launch_bounds__(kThreads) elementwise_kernel(const Op host_op, const ElementwiseArgs a) {
  Op op;
  if (!block_coeffs(host_op.c, a.d, a.h, op.c)) return;

  TP* p = static_cast<TP*>(a.param);
  const int64_t packs = a.aligned ? a.n / kPack : 0;
  const int64_t tile = static_cast<int64_t>(kThreads) * kIlp;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * tile;

  for (int64_t first = static_cast<int64_t>(blockIdx.x) * tile + threadIdx.x; first < packs; first += stride) {
    float pv[kIlp][kPack], gv[kIlp][kPack], v0[kIlp][kPack], v1[kIlp][kPack], v2[kIlp][kPack];
    // All loads of the iteration first, so that every 16-byte request of every array is in flight together.
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t q = first + static_cast<int64_t>(k) * kThreads;
      if (q < packs) {
        if (a.master != nullptr)
          load_pack(a.master, q, pv[k]);
        else
          load_pack(p, q, pv[k]);
        load_pack_either_ro<TP>(a.grad, a.grad_fp32, q, gv[k]);
        if (Op::uses(0)) load_pack_either<bf16_t>(a.states[0], a.state_fp32, q, v0[k]);
        if (Op::uses(1)) load_pack_either<bf16_t>(a.states[1], a.state_fp32, q, v1[k]);
        if (Op::uses(2)) load_pack_either<bf16_t>(a.states[2], a.state_fp32, q, v2[k]);
      }
    }
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t q = first + static_cast<int64_t>(k) * kThreads;
      if (q < packs) {
#pragma unroll
        for (int e = 0; e < kPack; ++e) {
          float x0 = Op::uses(0) ? v0[k][e] : 0.0f;
          float x1 = Op::uses(1) ? v1[k][e] : 0.0f;
          float x2 = Op::uses(2) ? v2[k][e] : 0.0f;
          op(pv[k][e], gv[k][e], x0, x1, x2);
          v0[k][e] = x0;
          v1[k][e] = x1;
          v2[k][e] = x2;
        }
        if (a.master != nullptr) store_pack(a.master, q, pv[k]);
        store_pack(p, q, pv[k]);
        if (Op::uses(0)) store_pack_either<bf16_t>(a.states[0], a.state_fp32, q, v0[k]);
        if (Op::uses(1)) store_pack_either<bf16_t>(a.states[1], a.state_fp32, q, v1[k]);
        if (Op::uses(2)) store_pack_either<bf16_t>(a.states[2], a.state_fp32, q, v2[k]);
      }
    }
  }

  // Masked tail of the aligned path (< kPack elements), or the whole buffer on the scalar path.
  const int64_t threads = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = packs * kPack + static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < a.n; i += threads)
    update_element<Op, TP>(op, a, i);
}

template <typename Op, typename TP>
void launch_typed(const Op& op, const ElementwiseArgs& a, cudaStream_t stream) {
  constexpr auto kernel = &elementwise_kernel<Op, TP>;
  const int64_t tile = static_cast<int64_t>(kThreads) * kIlp;
  const int64_t work = a.aligned ? (a.n / kPack + tile - 1) / tile : (a.n + kThreads - 1) / kThreads;
  kernel<<<grid_size<kernel>(work > 0 ? work : 1), kThreads, 0, stream>>>(op, a);
}

// Unchecked launch of one element-wise update (api.cu validated everything). Instantiated once per functor in the
// kernels_*.cu files: three kernels per functor (param fp32 / bf16 / fp16).
template <typename Op>
void launch_elementwise(const Op& op, const FlatBuffers& b, const DeviceScalars& d, const Hyper& h,
                        cudaStream_t stream) {
  ElementwiseArgs a;
  a.param = b.param;
  a.grad = b.grad;
  a.states[0] = Op::uses(0) ? b.states[0] : nullptr;
  a.states[1] = Op::uses(1) ? b.states[1] : nullptr;
  a.states[2] = Op::uses(2) ? b.states[2] : nullptr;
  a.master = b.master;
  a.n = b.n;
  a.grad_fp32 = b.grad_dtype == kFloat32;
  a.state_fp32 = b.state_dtype != kBFloat16;
  a.aligned = aligned16(a.param) && aligned16(a.grad) && aligned16(a.master) && aligned16(a.states[0]) &&
              aligned16(a.states[1]) && aligned16(a.states[2]);
  a.d = d;
  a.h = h;
  if (b.param_dtype == kBFloat16)
    launch_typed<Op, bf16_t>(op, a, stream);
  else if (b.param_dtype == kFloat16)
    launch_typed<Op, fp16_t>(op, a, stream);
  else
    launch_typed<Op, float>(op, a, stream);
}

}  // namespace cuda
}  // namespace fusedopt
