// Deterministic sum of squares on the device (global gradient norm), in two phases over the work items of a segment
// table, and its checked entry point. Squares are fp32 for fp32/bf16/fp16 data and float64 for float64 data (the norm
// of float64 gradients is a float64 one, as torch computes it); partial sums are double either way. Phase 1: one block per item at a time (grid-stride over items; thread t takes the
// runs t, t + kThreads, ... of kPack elements, the same on the vector and the scalar path), a fixed block tree, one
// partial sum and one non-finite flag per item (zero for the items of inactive segments). Phase 2: one block adds the
// partials, thread t those of items t, t + 1024, ..., then a fixed tree. The partition depends on the layout alone, so
// the result is bitwise identical run to run and on any GPU. Nothing leaves the device.
#include <string>

#include "device.cuh"
#include "fusedopt/checks.h"

namespace fusedopt {
namespace cuda {
namespace {

constexpr int kCombineThreads = 1024;

template <typename T>
__global__ void __launch_bounds__(kThreads) sum_of_squares_partial_kernel(const T* x, const Items items,
                                                                         const uint8_t* active, bool aligned,
                                                                         double* partial, double* flags) {
  __shared__ double scratch[32];
  for (int64_t it = blockIdx.x; it < items.count; it += gridDim.x) {
    if (active != nullptr && active[items.segment[it]] == 0) {  // uniform over the block
      if (threadIdx.x == 0) {
        partial[it] = 0.0;
        flags[it] = 0.0;
      }
      continue;
    }
    int64_t begin, end;
    item_range(items, it, begin, end);
    double acc = 0.0;
    int bad = 0;
    for_each_run(
        begin, end, aligned && begin % kPack == 0,
        [&](int64_t q) {
          compute_t<T> v[kPack];
          load_pack_ro(x, q, v);
#pragma unroll
          for (int e = 0; e < kPack; ++e) {
            acc += square_term(v[e]);
            bad |= is_nonfinite(v[e]) ? 1 : 0;
          }
        },
        [&](int64_t i) {
          const compute_t<T> v = load(x[i]);
          acc += square_term(v);
          bad |= is_nonfinite(v) ? 1 : 0;
        });
    acc = block_sum(acc, scratch);
    bad = __syncthreads_or(bad);
    if (threadIdx.x == 0) {
      partial[it] = acc;
      flags[it] = bad ? 1.0 : 0.0;
    }
  }
}

__global__ void __launch_bounds__(kCombineThreads) sum_of_squares_combine_kernel(const double* partial,
                                                                                const double* flags, int64_t items,
                                                                                void* out_sum, bool out_double,
                                                                                float* out_nonfinite) {
  __shared__ double scratch[32];
  double v = 0.0;
  int bad = 0;
  for (int64_t it = threadIdx.x; it < items; it += kCombineThreads) {
    v += partial[it];
    bad |= flags[it] != 0.0 ? 1 : 0;
  }
  v = block_sum(v, scratch);
  bad = __syncthreads_or(bad);
  if (threadIdx.x == 0) {
    if (out_double)
      *static_cast<double*>(out_sum) = v;
    else
      *static_cast<float*>(out_sum) = static_cast<float>(v);
    *out_nonfinite = bad ? 1.0f : 0.0f;
  }
}

template <typename T>
void launch_partial(const void* data, const Items& items, const uint8_t* active, double* scratch,
                    cudaStream_t stream) {
  constexpr auto kernel = &sum_of_squares_partial_kernel<T>;
  kernel<<<grid_size<kernel>(items.count), kThreads, 0, stream>>>(static_cast<const T*>(data), items, active,
                                                                  aligned16(data), scratch, scratch + items.count);
  check_launch("sum_of_squares_partial_kernel");
}

[[noreturn]] void fail(const std::string& msg) { checks::fail("cuda_sum_of_squares: " + msg); }

bool aligned_to(const void* p, int bytes) { return (reinterpret_cast<uintptr_t>(p) % bytes) == 0; }

}  // namespace

void launch_sum_of_squares_combine(const double* scratch, int64_t items, void* out_sum, bool out_double,
                                   float* out_nonfinite, cudaStream_t stream) {
  sum_of_squares_combine_kernel<<<1, kCombineThreads, 0, stream>>>(scratch, scratch + items, items, out_sum,
                                                                    out_double, out_nonfinite);
  check_launch("sum_of_squares_combine_kernel");
}

int64_t sum_of_squares_scratch(int64_t items) {
  if (items < 0) checks::fail("cuda_sum_of_squares_scratch: Invalid items: " + std::to_string(items));
  return 2 * items;
}

void sum_of_squares(const void* data, int64_t n, int dtype, const DeviceWork& w, const uint8_t* active,
                    int64_t segment_count, double* scratch, void* out_sum, int out_sum_dtype, float* out_nonfinite,
                    const Launch& l) {
  if (n < 0) fail("Invalid element count n: " + std::to_string(n));
  checks::check_dtype("cuda_sum_of_squares", "data", dtype);
  if (out_sum_dtype != kFloat32 && out_sum_dtype != kFloat64)
    fail("Invalid dtype code for out_sum: " + std::to_string(out_sum_dtype) + " (expected 0 float32 or 3 float64)");
  if (w.items < 0) fail("Invalid items: " + std::to_string(w.items));
  if (segment_count < 0) fail("Invalid segment count: " + std::to_string(segment_count));
  if (w.work == nullptr) {
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    if (segment_count != 0 || active != nullptr)
      fail("work pointer is null with " + std::to_string(segment_count) + " segments (a null work list means the "
           "whole buffer, without segments or active flags)");
    if (w.items != chunks)
      fail("Invalid items: " + std::to_string(w.items) + " (the whole buffer of " + std::to_string(n) +
           " elements is " + std::to_string(chunks) + " chunks)");
  } else {
    if (w.items > n) fail("Invalid items: " + std::to_string(w.items) + " for a buffer of " + std::to_string(n) +
                          " elements");
    if (w.items > 0 && (segment_count == 0 || active == nullptr))
      fail("Invalid items: " + std::to_string(w.items) + " need segments and their active flags");
    if (!aligned_to(w.work, 8)) fail("work pointer is not 8-byte aligned");
  }
  if (w.items > 0) {
    if (data == nullptr) fail("data pointer is null");
    if (!aligned_to(data, dtype_size(dtype))) fail("data pointer is not element-aligned");
    if (scratch == nullptr) fail("scratch pointer is null");
    if (!aligned_to(scratch, 8)) fail("scratch pointer is not 8-byte aligned");
  }
  if (out_sum == nullptr || out_nonfinite == nullptr) fail("out_sum and out_nonfinite must not be null");
  if (!aligned_to(out_sum, dtype_size(out_sum_dtype)))
    fail("out_sum must be a " + std::to_string(dtype_size(out_sum_dtype)) + "-byte aligned " +
         (out_sum_dtype == kFloat64 ? "float64" : "float32") + " scalar");
  if (!aligned_to(out_nonfinite, 4)) fail("out_nonfinite must be a 4-byte aligned float32 scalar");
  check_device("cuda_sum_of_squares", l.device);

  DeviceGuard guard(l.device);
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(l.stream);
  const Items items = items_of(w, n);
  if (items.count > 0) {
    if (dtype == kBFloat16)
      launch_partial<bf16_t>(data, items, active, scratch, stream);
    else if (dtype == kFloat16)
      launch_partial<fp16_t>(data, items, active, scratch, stream);
    else if (dtype == kFloat64)
      launch_partial<double>(data, items, active, scratch, stream);
    else
      launch_partial<float>(data, items, active, scratch, stream);
  }
  sum_of_squares_combine_kernel<<<1, kCombineThreads, 0, stream>>>(scratch, scratch + items.count, items.count,
                                                                    out_sum, out_sum_dtype == kFloat64,
                                                                    out_nonfinite);
  check_launch("sum_of_squares_combine_kernel");
}

}  // namespace cuda
}  // namespace fusedopt
