// SAM on the device (fusedopt/math/sam.h): the perturbation with its backup, the exact undo, and ASAM's deterministic
// sum of squares of |w| * g, with their checked entry points (fusedopt/cuda_api.h). Blocks stride over the work items
// of the segment table and skip those of inactive segments, as the step kernels do (launcher.cuh); 16-byte packs on
// the aligned path, a masked scalar tail. Nothing synchronises with the host.
#include <string>
#include <type_traits>

#include "device.cuh"
#include "fusedopt/checks.h"
#include "fusedopt/math/sam.h"

namespace fusedopt {
namespace cuda {
namespace {

struct SamParams {
  void* param;
  const void* grad;
  const float* master;
  void* backup;
  bool grad_fp32;  // 16-bit parameters with fp32 gradients
  bool aligned;    // every array used is 16-byte aligned
  Items items;
  const uint8_t* active;
  double scale;
  const void* scale_ptr;  // compute type; replaces scale
  const float* found_inf;
};

__device__ __forceinline__ bool skipped(const float* found_inf) { return found_inf != nullptr && *found_inf != 0.0f; }

// The 16-byte words of pack q of a TP array, copied as they are (a backup must keep p's bits, NaN payloads included).
template <typename TP>
__device__ __forceinline__ void load_words(const TP* base, int64_t q, uint4 (&w)[Storage<TP>::kWords]) {
  const uint4* src = reinterpret_cast<const uint4*>(base + q * kPack);
#pragma unroll
  for (int k = 0; k < Storage<TP>::kWords; ++k) w[k] = src[k];
}
template <typename TP>
__device__ __forceinline__ void store_words(TP* base, int64_t q, const uint4 (&w)[Storage<TP>::kWords]) {
  uint4* dst = reinterpret_cast<uint4*>(base + q * kPack);
#pragma unroll
  for (int k = 0; k < Storage<TP>::kWords; ++k) dst[k] = w[k];
}

// Calls body(begin, end) for the block's items (blockIdx.x, + gridDim.x, ...) of active segments; the active test is
// uniform over the block.
template <typename Body>
__device__ __forceinline__ void for_each_active(const Items& items, const uint8_t* active, Body&& body) {
  for (int64_t it = blockIdx.x; it < items.count; it += gridDim.x) {
    if (active[items.segment[it]] == 0) continue;
    body(items.begin[it], items.end[it]);
  }
}

template <typename TP, bool Master, bool Adaptive>
__global__ void __launch_bounds__(kThreads) sam_perturb_kernel(const SamParams a) {
  using C = compute_t<TP>;
  if (skipped(a.found_inf)) return;
  TP* p = static_cast<TP*>(a.param);
  TP* backup = static_cast<TP*>(a.backup);
  const C scale = a.scale_ptr != nullptr ? *static_cast<const C*>(a.scale_ptr) : static_cast<C>(a.scale);
  for_each_active(a.items, a.active, [&](int64_t begin, int64_t end) {
    for_each_element(
        begin, end, a.aligned && begin % kPack == 0,
        [&](int64_t q) {
          C w[kPack], g[kPack];
          if constexpr (Master) {
            load_pack_ro(a.master, q, w);
          } else {
            uint4 words[Storage<TP>::kWords];
            load_words(p, q, words);
            store_words(backup, q, words);
            unpack(words, w, TP{});
          }
          load_grad_pack<TP>(a.grad, a.grad_fp32, q, g);
#pragma unroll
          for (int e = 0; e < kPack; ++e) w[e] = sam::perturbed<Adaptive>(w[e], g[e], scale);
          store_pack(p, q, w);
        },
        [&](int64_t i) {
          C w;
          if constexpr (Master) {
            w = a.master[i];
          } else {
            const TP stored = p[i];
            backup[i] = stored;
            w = load(stored);
          }
          p[i] = store<TP>(sam::perturbed<Adaptive>(w, load_grad<TP>(a.grad, a.grad_fp32, i), scale));
        });
  });
}

template <typename TP, bool Master>
__global__ void __launch_bounds__(kThreads) sam_restore_kernel(const SamParams a) {
  if (skipped(a.found_inf)) return;
  TP* p = static_cast<TP*>(a.param);
  const TP* backup = static_cast<const TP*>(a.backup);
  for_each_active(a.items, a.active, [&](int64_t begin, int64_t end) {
    for_each_element(
        begin, end, a.aligned && begin % kPack == 0,
        [&](int64_t q) {
          if constexpr (Master) {
            float w[kPack];
            load_pack_ro(a.master, q, w);
            store_pack(p, q, w);
          } else {
            uint4 words[Storage<TP>::kWords];
            load_words(backup, q, words);
            store_words(p, q, words);
          }
        },
        [&](int64_t i) {
          if constexpr (Master)
            p[i] = store<TP>(a.master[i]);
          else
            p[i] = backup[i];
        });
  });
}

// Phase 1 of ASAM's norm, as sum_of_squares_partial_kernel (reductions.cu): thread t takes the runs t, t + kThreads,
// ... of kPack elements, a fixed block tree, one partial and one flag per item (zero for inactive segments).
template <typename TP, bool Master>
__global__ void __launch_bounds__(kThreads) sam_sum_of_squares_partial_kernel(const SamParams a, double* partial,
                                                                             double* flags) {
  using C = compute_t<TP>;
  __shared__ double scratch[32];
  const TP* p = static_cast<const TP*>(a.param);
  for (int64_t it = blockIdx.x; it < a.items.count; it += gridDim.x) {
    if (a.active[a.items.segment[it]] == 0) {  // uniform over the block
      if (threadIdx.x == 0) {
        partial[it] = 0.0;
        flags[it] = 0.0;
      }
      continue;
    }
    const int64_t begin = a.items.begin[it], end = a.items.end[it];
    double acc = 0.0;
    int bad = 0;
    auto element = [&](C w, C g) {
      const C t = sam::adaptive_norm_term(w, g);
      acc += square_term(t);
      bad |= is_nonfinite(t) ? 1 : 0;
    };
    for_each_run(
        begin, end, a.aligned && begin % kPack == 0,
        [&](int64_t q) {
          C w[kPack], g[kPack];
          if constexpr (Master)
            load_pack_ro(a.master, q, w);
          else
            load_pack_ro(p, q, w);
          load_grad_pack<TP>(a.grad, a.grad_fp32, q, g);
#pragma unroll
          for (int e = 0; e < kPack; ++e) element(w[e], g[e]);
        },
        [&](int64_t i) {
          const C w = Master ? static_cast<C>(a.master[i]) : load(p[i]);
          element(w, load_grad<TP>(a.grad, a.grad_fp32, i));
        });
    acc = block_sum(acc, scratch);
    bad = __syncthreads_or(bad);
    if (threadIdx.x == 0) {
      partial[it] = acc;
      flags[it] = bad ? 1.0 : 0.0;
    }
  }
}

// Calls f(Type<param>, Bool<master>) for the parameter dtype; master weights only with 16-bit parameters.
template <typename T>
struct Type {
  using type = T;
};
template <bool B>
struct Bool {
  static constexpr bool value = B;
};
template <typename F>
void dispatch_param(const SamBuffers& b, F&& f) {
  if (b.param_dtype == kFloat64) {
    f(Type<double>{}, Bool<false>{});
  } else if (b.param_dtype == kFloat32) {
    f(Type<float>{}, Bool<false>{});
  } else if (b.param_dtype == kBFloat16) {
    if (b.master != nullptr)
      f(Type<bf16_t>{}, Bool<true>{});
    else
      f(Type<bf16_t>{}, Bool<false>{});
  } else {
    if (b.master != nullptr)
      f(Type<fp16_t>{}, Bool<true>{});
    else
      f(Type<fp16_t>{}, Bool<false>{});
  }
}

bool aligned_to(const void* p, int bytes) { return (reinterpret_cast<uintptr_t>(p) % bytes) == 0; }

void check_aligned(const std::string& fn, const char* what, const void* p, int bytes) {
  if (!aligned_to(p, bytes))
    checks::fail(fn + ": " + what + " pointer " + std::to_string(reinterpret_cast<uintptr_t>(p)) + " is not " +
                 std::to_string(bytes) + "-byte aligned");
}

// The checks every SAM entry point shares (the CPU ones' plus alignment, the device work list and the device), then
// the kernel parameters.
SamParams checked_params(const std::string& fn, const SamBuffers& b, const DeviceWork& w, const uint8_t* active,
                         int64_t segment_count, bool reads_grad, bool needs_backup, const float* found_inf,
                         const Launch& l) {
  checks::check_sam_buffers(fn, b, reads_grad, needs_backup);
  if (segment_count < 0) checks::fail(fn + ": Invalid segment count: " + std::to_string(segment_count));
  if (w.items < 0 || w.items > b.n)
    checks::fail(fn + ": Invalid items: " + std::to_string(w.items) + " for a buffer of " + std::to_string(b.n) +
                 " elements");
  if (w.items > 0 && (segment_count == 0 || active == nullptr || w.work == nullptr))
    checks::fail(fn + ": Invalid items: " + std::to_string(w.items) + " need the work list, segments and their "
                 "active flags");
  check_aligned(fn, "work", w.work, 8);
  check_aligned(fn, "found_inf", found_inf, 4);
  if (b.n > 0) {
    check_aligned(fn, "param", b.param, dtype_size(b.param_dtype));
    if (reads_grad) check_aligned(fn, "grad", b.grad, dtype_size(b.grad_dtype));
    check_aligned(fn, "master", b.master, 4);
    if (b.master == nullptr) check_aligned(fn, "backup", b.backup, dtype_size(b.param_dtype));
  }
  check_device(fn, l.device);
  SamParams a;
  a.param = b.param;
  a.grad = reads_grad ? b.grad : nullptr;
  a.master = b.master;
  a.backup = b.master == nullptr ? b.backup : nullptr;
  a.grad_fp32 = b.grad_dtype == kFloat32;
  a.aligned = aligned16(a.param) && aligned16(a.grad) && aligned16(a.master) && aligned16(a.backup);
  a.items = items_of(w, b.n);
  a.active = active;
  a.scale = 1.0;
  a.scale_ptr = nullptr;
  a.found_inf = found_inf;
  return a;
}

}  // namespace

void sam_perturb(const SamBuffers& b, const DeviceWork& w, const uint8_t* active, int64_t segment_count, double scale,
                 const void* scale_ptr, const float* found_inf, bool adaptive, const Launch& l) {
  const std::string fn = "cuda_sam_perturb";
  check_aligned(fn, "scale", scale_ptr, b.param_dtype == kFloat64 ? 8 : 4);  // before the device check
  SamParams a = checked_params(fn, b, w, active, segment_count, true, true, found_inf, l);
  a.scale = scale;
  a.scale_ptr = scale_ptr;
  if (a.items.count == 0) return;
  DeviceGuard guard(l.device);
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(l.stream);
  dispatch_param(b, [&](auto tp, auto master) {
    using TP = typename decltype(tp)::type;
    constexpr bool kMaster = decltype(master)::value;
    if (adaptive) {
      constexpr auto kernel = &sam_perturb_kernel<TP, kMaster, true>;
      kernel<<<grid_size<kernel>(a.items.count), kThreads, 0, stream>>>(a);
    } else {
      constexpr auto kernel = &sam_perturb_kernel<TP, kMaster, false>;
      kernel<<<grid_size<kernel>(a.items.count), kThreads, 0, stream>>>(a);
    }
    check_launch("sam_perturb_kernel");
  });
}

void sam_restore(const SamBuffers& b, const DeviceWork& w, const uint8_t* active, int64_t segment_count,
                 const float* found_inf, const Launch& l) {
  SamParams a = checked_params("cuda_sam_restore", b, w, active, segment_count, false, true, found_inf, l);
  if (a.items.count == 0) return;
  DeviceGuard guard(l.device);
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(l.stream);
  dispatch_param(b, [&](auto tp, auto master) {
    constexpr auto kernel = &sam_restore_kernel<typename decltype(tp)::type, decltype(master)::value>;
    kernel<<<grid_size<kernel>(a.items.count), kThreads, 0, stream>>>(a);
    check_launch("sam_restore_kernel");
  });
}

void sam_sum_of_squares(const SamBuffers& b, const DeviceWork& w, const uint8_t* active, int64_t segment_count,
                        double* scratch, void* out_sum, int out_sum_dtype, float* out_nonfinite, const Launch& l) {
  const std::string fn = "cuda_sam_sum_of_squares";
  if (out_sum_dtype != kFloat32 && out_sum_dtype != kFloat64)
    checks::fail(fn + ": Invalid dtype code for out_sum: " + std::to_string(out_sum_dtype) +
                 " (expected 0 float32 or 3 float64)");
  if (out_sum == nullptr || out_nonfinite == nullptr) checks::fail(fn + ": out_sum and out_nonfinite must not be null");
  check_aligned(fn, "out_sum", out_sum, dtype_size(out_sum_dtype));
  check_aligned(fn, "out_nonfinite", out_nonfinite, 4);
  if (w.items > 0 && scratch == nullptr) checks::fail(fn + ": scratch pointer is null");
  check_aligned(fn, "scratch", scratch, 8);
  const SamParams a = checked_params(fn, b, w, active, segment_count, true, false, nullptr, l);
  DeviceGuard guard(l.device);
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(l.stream);
  if (a.items.count > 0) {
    dispatch_param(b, [&](auto tp, auto master) {
      constexpr auto kernel = &sam_sum_of_squares_partial_kernel<typename decltype(tp)::type, decltype(master)::value>;
      kernel<<<grid_size<kernel>(a.items.count), kThreads, 0, stream>>>(a, scratch, scratch + a.items.count);
      check_launch("sam_sum_of_squares_partial_kernel");
    });
  }
  launch_sum_of_squares_combine(scratch, a.items.count, out_sum, out_sum_dtype == kFloat64, out_nonfinite, stream);
}

}  // namespace cuda
}  // namespace fusedopt
