// Pieces shared by the CUDA step launcher (launcher.cuh) and the reductions (reductions.cu): host-side errors, device
// guard and grid sizing; device-side 16-byte pack loads and stores, the deterministic block sum, and the walk over the
// work items of a segment table. Included only by the sources of csrc/cuda.
#pragma once

#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include <atomic>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "fusedopt/common.h"
#include "fusedopt/cuda_api.h"
#include "fusedopt/dtype.h"
#include "fusedopt/math/norm.h"

namespace fusedopt {
namespace cuda {

constexpr int kThreads = 256;  // threads per block of every step and partial-sum kernel (part of the partition)
constexpr int kPack = 8;       // elements per pack: 16 bytes of a 16-bit array, 32 of an fp32 array, 64 of an fp64 one
constexpr int kMaxDevices = 64;

// ---------------------------------------------------------------------------------------------------------------
// Host side: errors, device guard, grid sizing.

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string("fusedopt cuda: ") + what + ": " + cudaGetErrorName(status) + ": " +
                             cudaGetErrorString(status));
}

inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

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

// Rejects a device index the runtime does not know. The only check that asks the CUDA runtime, so it runs after every
// other check (those work on machines without a GPU or driver).
inline void check_device(const std::string& fn, int device) {
  if (device < 0) throw std::invalid_argument(fn + ": Invalid device: " + std::to_string(device));
  int count = 0;
  check_cuda(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  if (device >= count)
    throw std::invalid_argument(fn + ": Invalid device: " + std::to_string(device) + " (" + std::to_string(count) +
                                " CUDA devices)");
}

inline int current_device() {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  return device;
}

// Multiprocessor count of the current device, queried once per device (attribute queries never synchronise and are
// allowed during stream capture).
inline int sm_count() {
  static std::atomic<int> cache[kMaxDevices];
  const int device = current_device();
  int v = device < kMaxDevices ? cache[device].load(std::memory_order_relaxed) : 0;
  if (v == 0) {
    check_cuda(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
    if (device < kMaxDevices) cache[device].store(v, std::memory_order_relaxed);
  }
  return v;
}

// Resident blocks per multiprocessor of one kernel (its register use decides), cached per kernel and device.
template <auto Kernel>
inline int blocks_per_sm() {
  static std::atomic<int> cache[kMaxDevices];
  const int device = current_device();
  int v = device < kMaxDevices ? cache[device].load(std::memory_order_relaxed) : 0;
  if (v == 0) {
    check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&v, Kernel, kThreads, 0),
               "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    if (v < 1) v = 1;
    if (device < kMaxDevices) cache[device].store(v, std::memory_order_relaxed);
  }
  return v;
}

// Grid of a kernel that strides over `work` work items: one block per item, at most one full wave of the device. The
// grid size never changes a result (each item is one block's, whatever the grid).
template <auto Kernel>
inline unsigned grid_size(int64_t work) {
  const int64_t wave = static_cast<int64_t>(sm_count()) * blocks_per_sm<Kernel>();
  const int64_t g = work < wave ? work : wave;
  return static_cast<unsigned>(g < 1 ? 1 : g);
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Phase 2 of the deterministic sums of squares (reductions.cu): the per-item partials scratch[0, items) and flags
// scratch[items, 2 * items) added in a fixed order into the device scalars; also used by ASAM's norm (sam.cu).
void launch_sum_of_squares_combine(const double* scratch, int64_t items, void* out_sum, bool out_double,
                                   float* out_nonfinite, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------------------
// Device side: packs. A pack of 8 fp32 is two 16-byte words, a pack of 8 fp64 four, a pack of 8 bf16/fp16 one;
// element e of a 16-bit pack is the low (e even) or high (e odd) half of 32-bit word e/2 (little endian). Packs are
// unpacked into and packed from the compute type C of their kernel: float, or double for float64 parameters.

template <typename T>
struct Storage {
  static constexpr int kWords = 1;  // bf16_t, fp16_t
};
template <>
struct Storage<float> {
  static constexpr int kWords = 2;
};
template <>
struct Storage<double> {
  static constexpr int kWords = 4;
};

template <typename C>
__device__ __forceinline__ void unpack(const uint4* w, C (&out)[kPack], float) {
  out[0] = __uint_as_float(w[0].x);
  out[1] = __uint_as_float(w[0].y);
  out[2] = __uint_as_float(w[0].z);
  out[3] = __uint_as_float(w[0].w);
  out[4] = __uint_as_float(w[1].x);
  out[5] = __uint_as_float(w[1].y);
  out[6] = __uint_as_float(w[1].z);
  out[7] = __uint_as_float(w[1].w);
}

template <typename C, typename T>
__device__ __forceinline__ void unpack(const uint4* w, C (&out)[kPack], T) {
  const uint32_t words[4] = {w[0].x, w[0].y, w[0].z, w[0].w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    out[2 * j] = load(T{static_cast<uint16_t>(words[j] & 0xFFFFu)});
    out[2 * j + 1] = load(T{static_cast<uint16_t>(words[j] >> 16)});
  }
}

template <typename C>
__device__ __forceinline__ void unpack(const uint4* w, C (&out)[kPack], double) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    out[2 * k] = __hiloint2double(static_cast<int>(w[k].y), static_cast<int>(w[k].x));
    out[2 * k + 1] = __hiloint2double(static_cast<int>(w[k].w), static_cast<int>(w[k].z));
  }
}

template <typename C>
__device__ __forceinline__ void pack(const C (&in)[kPack], uint4* w, float) {
  w[0] = make_uint4(__float_as_uint(in[0]), __float_as_uint(in[1]), __float_as_uint(in[2]), __float_as_uint(in[3]));
  w[1] = make_uint4(__float_as_uint(in[4]), __float_as_uint(in[5]), __float_as_uint(in[6]), __float_as_uint(in[7]));
}

template <typename C, typename T>
__device__ __forceinline__ void pack(const C (&in)[kPack], uint4* w, T) {
  uint32_t words[4];
#pragma unroll
  for (int j = 0; j < 4; ++j)
    words[j] = static_cast<uint32_t>(store<T>(in[2 * j]).bits) |
               (static_cast<uint32_t>(store<T>(in[2 * j + 1]).bits) << 16);
  w[0] = make_uint4(words[0], words[1], words[2], words[3]);
}

template <typename C>
__device__ __forceinline__ void pack(const C (&in)[kPack], uint4* w, double) {
#pragma unroll
  for (int k = 0; k < 4; ++k)
    w[k] = make_uint4(static_cast<uint32_t>(__double2loint(in[2 * k])), static_cast<uint32_t>(__double2hiint(in[2 * k])),
                      static_cast<uint32_t>(__double2loint(in[2 * k + 1])),
                      static_cast<uint32_t>(__double2hiint(in[2 * k + 1])));
}

// Loads pack q (elements q*kPack ..) of a 16-byte aligned array.
template <typename T, typename C>
__device__ __forceinline__ void load_pack(const T* base, int64_t q, C (&out)[kPack]) {
  const uint4* src = reinterpret_cast<const uint4*>(base + q * kPack);
  uint4 w[Storage<T>::kWords];
#pragma unroll
  for (int k = 0; k < Storage<T>::kWords; ++k) w[k] = src[k];
  unpack(w, out, T{});
}

// Read-only data (gradients): through the non-coherent path.
template <typename T, typename C>
__device__ __forceinline__ void load_pack_ro(const T* base, int64_t q, C (&out)[kPack]) {
  const uint4* src = reinterpret_cast<const uint4*>(base + q * kPack);
  uint4 w[Storage<T>::kWords];
#pragma unroll
  for (int k = 0; k < Storage<T>::kWords; ++k) w[k] = __ldg(src + k);
  unpack(w, out, T{});
}

template <typename T, typename C>
__device__ __forceinline__ void store_pack(T* base, int64_t q, const C (&in)[kPack]) {
  uint4 w[Storage<T>::kWords];
  pack(in, w, T{});
  uint4* dst = reinterpret_cast<uint4*>(base + q * kPack);
#pragma unroll
  for (int k = 0; k < Storage<T>::kWords; ++k) dst[k] = w[k];
}

// Arrays whose storage is fp32 or a 16-bit type chosen at run time (one uniform branch per pack): gradients (param
// dtype or fp32) and optimizer states (fp32 or bf16). Keeps the kernel count at one per op and param dtype.
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
// The value a state holds once stored: what a later read of it (a trust-ratio update pass) sees.
__device__ __forceinline__ float stored_state(bool fp32, float x) { return fp32 ? x : load(store<bf16_t>(x)); }

// Gradients and states of parameters of storage TP, in TP's compute type: float64 parameters have float64 gradients
// and states; the others TP or fp32 gradients and fp32 or bf16 states, chosen at run time (the `either` helpers).
template <typename TP>
constexpr bool kFloat64Params = std::is_same<TP, double>::value;

template <typename TP>
__device__ __forceinline__ void load_grad_pack(const void* base, bool fp32, int64_t q, compute_t<TP> (&out)[kPack]) {
  if constexpr (kFloat64Params<TP>)
    load_pack_ro(static_cast<const double*>(base), q, out);
  else
    load_pack_either_ro<TP>(base, fp32, q, out);
}
template <typename TP>
__device__ __forceinline__ compute_t<TP> load_grad(const void* base, bool fp32, int64_t i) {
  if constexpr (kFloat64Params<TP>)
    return static_cast<const double*>(base)[i];
  else
    return load_either<TP>(base, fp32, i);
}
template <typename TP>
__device__ __forceinline__ void load_state_pack(const void* base, bool fp32, int64_t q, compute_t<TP> (&out)[kPack]) {
  if constexpr (kFloat64Params<TP>)
    load_pack(static_cast<const double*>(base), q, out);
  else
    load_pack_either<bf16_t>(base, fp32, q, out);
}
template <typename TP>
__device__ __forceinline__ void store_state_pack(void* base, bool fp32, int64_t q, const compute_t<TP> (&in)[kPack]) {
  if constexpr (kFloat64Params<TP>)
    store_pack(static_cast<double*>(base), q, in);
  else
    store_pack_either<bf16_t>(base, fp32, q, in);
}
template <typename TP>
__device__ __forceinline__ compute_t<TP> load_state(const void* base, bool fp32, int64_t i) {
  if constexpr (kFloat64Params<TP>)
    return static_cast<const double*>(base)[i];
  else
    return load_either<bf16_t>(base, fp32, i);
}
template <typename TP>
__device__ __forceinline__ void store_state(void* base, bool fp32, int64_t i, compute_t<TP> x) {
  if constexpr (kFloat64Params<TP>)
    static_cast<double*>(base)[i] = x;
  else
    store_either<bf16_t>(base, fp32, i, x);
}
template <typename TP>
__device__ __forceinline__ compute_t<TP> stored_state_of(bool fp32, compute_t<TP> x) {
  if constexpr (kFloat64Params<TP>)
    return x;
  else
    return stored_state(fp32, x);
}

// ---------------------------------------------------------------------------------------------------------------
// Device side: deterministic block reduction (fixed shuffle tree, then warp sums in warp order).

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, offset);
  return v;
}

// Sum over the block of blockDim.x (a multiple of 32, at most 1024) threads; the result is valid in thread 0.
// `scratch` holds 32 doubles. The order depends on blockDim.x only, never on timing. Every thread must call it.
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
// Work items (see DeviceWork): item i is [begin[i], end[i]) of segment segment[i]. With begin null, the whole buffer of
// n elements in chunks of kChunk (no segments: every item is active).

struct Items {
  const int64_t* begin = nullptr;
  const int64_t* end = nullptr;
  const int64_t* segment = nullptr;
  const int64_t* seg_first = nullptr;  // segments + 1 entries
  int64_t count = 0;
  int64_t n = 0;
};

inline Items items_of(const DeviceWork& w, int64_t n) {
  Items items;
  items.count = w.items;
  items.n = n;
  if (w.work != nullptr) {
    items.begin = w.work;
    items.end = w.work + w.items;
    items.segment = w.work + 2 * w.items;
    items.seg_first = w.work + 3 * w.items;
  }
  return items;
}

__device__ __forceinline__ void item_range(const Items& items, int64_t it, int64_t& begin, int64_t& end) {
  if (items.begin != nullptr) {
    begin = items.begin[it];
    end = items.end[it];
  } else {
    begin = it * kChunk;
    end = items.n - begin < kChunk ? items.n : begin + kChunk;
  }
}

// Every element of [begin, end) once, spread over the block for coalesced access: when `vec` (every array 16-byte
// aligned and begin a multiple of kPack), thread t takes packs t, t + kThreads, ... as 16-byte accesses and then at most
// one element of the masked tail; otherwise elements t, t + kThreads, ... one by one. For element-wise updates, where
// the order does not matter. Indices are 64-bit throughout.
template <typename PackFn, typename ElementFn>
__device__ __forceinline__ void for_each_element(int64_t begin, int64_t end, bool vec, PackFn&& on_pack,
                                                 ElementFn&& on_element) {
  int64_t tail = begin;
  if (vec) {
    const int64_t first = begin / kPack, last = first + (end - begin) / kPack;
    for (int64_t q = first + threadIdx.x; q < last; q += kThreads) on_pack(q);
    tail = last * kPack;
  }
  for (int64_t i = tail + threadIdx.x; i < end; i += kThreads) on_element(i);
}

// Thread t of the block visits the runs of kPack elements starting at begin + (t + k * kThreads) * kPack, k = 0, 1, ...
// in order: a whole run as one pack access when `vec` (every array 16-byte aligned and begin a multiple of kPack), else
// element by element (the masked tail of an item, or a misaligned buffer). Each thread sees the same elements in the
// same order on both paths, so a reduction (sum of squares, per-segment norms) does not depend on alignment.
template <typename PackFn, typename ElementFn>
__device__ __forceinline__ void for_each_run(int64_t begin, int64_t end, bool vec, PackFn&& on_pack,
                                             ElementFn&& on_element) {
  for (int64_t r = begin + static_cast<int64_t>(threadIdx.x) * kPack; r < end;
       r += static_cast<int64_t>(kThreads) * kPack) {
    if (vec && r + kPack <= end) {
      on_pack(r / kPack);
    } else {
      const int64_t stop = r + kPack < end ? r + kPack : end;
      for (int64_t i = r; i < stop; ++i) on_element(i);
    }
  }
}

}  // namespace cuda
}  // namespace fusedopt
