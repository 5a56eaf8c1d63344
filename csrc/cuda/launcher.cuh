// The one CUDA launcher of the optimizer steps: each algorithm of the list runs on the kernels of its kind, which call
// the math header's pieces (make_coeffs, Op or the trust-ratio passes) exactly as the CPU driver does. Blocks stride
// over the work items of the segment table (one item per block at a time, 16-byte packs on the aligned path, a masked
// scalar tail); an item's segment gives its active flag and its step, from which thread 0 makes the coefficients once
// and shares them through shared memory. Included only by api.cu, after it validated the arguments.
//
// Launch sequence of one call, all on the caller's stream, none waiting for the host:
//   count_steps_kernel       (when the call counts the step) steps[s] += 1 for every active segment;
//   element-wise kind:       elementwise_kernel, then advance_scalars_kernel when the algorithm keeps scalar states
//                            (every block has read them by then);
//   trust-ratio kind:        trust_ratio_moments_kernel -> trust_ratio_sums_kernel   (kPassMoments)
//                            trust_ratio_apply_kernel                                 (kPassApply)
// Every kernel returns at once when *found_inf != 0, so a skipped step writes nothing and counts nothing.
#pragma once

#include <type_traits>

#include "device.cuh"
#include "fusedopt/algorithms.h"

namespace fusedopt {
namespace cuda {

// Everything a step kernel reads: one struct, passed by value.
template <typename A>
struct StepParams {
  void* param;
  const void* grad;
  void* states[algo::kMaxStates];  // null for the states this configuration does not use
  float* master;                   // only with 16-bit parameters
  bool grad_fp32;                  // 16-bit parameters: fp32 gradients (float64 parameters: float64 gradients)
  bool state_fp32;                 // 32/16-bit parameters: fp32 states, else bf16 (float64 parameters: float64)
  bool aligned;  // every array used is 16-byte aligned
  Items items;
  float* steps;
  const uint8_t* active;
  float* scalars;  // per-segment scalar states (algorithm.h), null when the algorithm keeps none
  int64_t segments;
  typename A::Hyper hyper;
  double lr;
  double grad_scale;
  DeviceScalars d;
  // Trust-ratio kind: per-item partial sums of squares (pass 1) and per-segment sums (between the passes).
  double* partial_w;
  double* partial_u;
  double* segment_w2;
  double* segment_u2;
};

__device__ __forceinline__ bool step_skipped(const float* found_inf) {
  return found_inf != nullptr && *found_inf != 0.0f;
}

// The step's lr: the device scalar of type C when there is one, else the host value.
template <typename C, typename A>
__device__ __forceinline__ double step_lr(const StepParams<A>& a) {
  return a.d.lr != nullptr ? static_cast<double>(*static_cast<const C*>(a.d.lr)) : a.lr;
}

// Segment s's coefficients in compute type C, from the math header as the CPU makes them, with the device's lr and
// gradient scale (device scalars of type C).
template <typename C, typename A>
__device__ __forceinline__ typename A::template Coeffs<C> segment_coeffs(const StepParams<A>& a, int64_t s) {
  const double scale = a.d.grad_scale != nullptr
                           ? a.grad_scale * static_cast<double>(*static_cast<const C*>(a.d.grad_scale))
                           : a.grad_scale;
  const float* scalars = a.scalars != nullptr ? a.scalars + s * algo::ScalarCount<A>::value : nullptr;
  return algo::make_segment_coeffs<C, A>(a.hyper, step_lr<C>(a), static_cast<double>(a.steps[s]), scale, scalars);
}

// The block's items (blockIdx.x, + gridDim.x, ...) of active segments: `make(s)` runs on thread 0 once per run of
// items of one segment and its result reaches every thread through shared memory; then `body(item, begin, end, made)`.
// Every test that decides whether a thread reaches a barrier (the item's segment, its active flag) is uniform over
// the block, so `body` may use barriers.
template <typename Shared, typename A, typename Make, typename Body>
__device__ __forceinline__ void for_each_active_item(const StepParams<A>& a, Make&& make, Body&& body) {
  __shared__ Shared shared;
  Shared made;
  int64_t current = -1;
  for (int64_t it = blockIdx.x; it < a.items.count; it += gridDim.x) {
    const int64_t s = a.items.segment[it];
    if (a.active[s] == 0) continue;
    if (s != current) {
      __syncthreads();  // every thread has read the previous segment's value
      if (threadIdx.x == 0) shared = make(s);
      __syncthreads();
      made = shared;
      current = s;
    }
    body(it, a.items.begin[it], a.items.end[it], made);
  }
}

// Active segments count this step, one thread per segment: a kernel of its own, ahead of the update, so that every
// block of the update reads the incremented step (a single kernel could not both increment and read it race-free).
__global__ void count_steps_kernel(float* steps, const uint8_t* active, int64_t count, const float* found_inf) {
  if (step_skipped(found_inf)) return;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s < count; s += stride)
    if (active[s] != 0) steps[s] += 1.0f;
}

// Every active segment's scalar states after the step, one thread per segment, in a kernel after the update's so
// that no block of the update reads an advanced value.
template <typename A, typename C>
__global__ void advance_scalars_kernel(const StepParams<A> a) {
  if (step_skipped(a.d.found_inf)) return;
  const double lr = step_lr<C>(a);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s < a.segments; s += stride)
    if (a.active[s] != 0)
      algo::advance_segment<A>(a.hyper, lr, static_cast<double>(a.steps[s]),
                               a.scalars + s * algo::ScalarCount<A>::value);
}

// ---------------------------------------------------------------------------------------------------------------
// Element-wise kind: Op (math/<algo>.h) on every element of the active items, in the compute type C of the parameter
// storage TP (double for float64, else float). For 32/16-bit parameters the gradient dtype (TP or fp32) and state
// dtype (fp32 or bf16) are uniform run-time switches on loads and stores only, so the math is instantiated once per
// op and param dtype; float64 parameters have float64 gradients and states.

// At least this many resident blocks (768 threads) per multiprocessor: enough 16-byte requests in flight to keep HBM
// busy. Every fp32 op fits in 80 registers without spilling (check with -Xptxas -v); left to itself ptxas takes up to
// 88 for the widest op, which leaves room for only 2 blocks. A float64 pack holds twice the registers: 2 blocks
// (128 registers each), so that the widest float64 op does not spill.
constexpr int kMinBlocks = 3;
template <typename TP>
struct MinBlocks {
  static constexpr int value = std::is_same<TP, double>::value ? 1 : kMinBlocks;
};

template <typename A, typename Op, typename TP>
__global__ void __launch_bounds__(kThreads, MinBlocks<TP>::value) elementwise_kernel(const StepParams<A> a) {
  using C = compute_t<TP>;
  using Coeffs = typename A::template Coeffs<C>;
  if (step_skipped(a.d.found_inf)) return;
  TP* p = static_cast<TP*>(a.param);
  const bool master = !std::is_same<TP, C>::value && a.master != nullptr;
  const Op op{};
  for_each_active_item<Coeffs>(
      a, [&](int64_t s) { return segment_coeffs<C>(a, s); },
      [&](int64_t, int64_t begin, int64_t end, const Coeffs& c) {
        for_each_element(
            begin, end, a.aligned && begin % kPack == 0,
            [&](int64_t q) {
              C pv[kPack], gv[kPack], v0[kPack] = {}, v1[kPack] = {}, v2[kPack] = {};
              // Every load of the pack first, so that all 16-byte requests are in flight together.
              if (master)
                load_pack(a.master, q, pv);
              else
                load_pack(p, q, pv);
              load_grad_pack<TP>(a.grad, a.grad_fp32, q, gv);
              if (Op::uses(0)) load_state_pack<TP>(a.states[0], a.state_fp32, q, v0);
              if (Op::uses(1)) load_state_pack<TP>(a.states[1], a.state_fp32, q, v1);
              if (Op::uses(2)) load_state_pack<TP>(a.states[2], a.state_fp32, q, v2);
#pragma unroll
              for (int e = 0; e < kPack; ++e) op(c, pv[e], gv[e], v0[e], v1[e], v2[e]);
              if (master) store_pack(a.master, q, pv);
              store_pack(p, q, pv);
              if (Op::uses(0)) store_state_pack<TP>(a.states[0], a.state_fp32, q, v0);
              if (Op::uses(1)) store_state_pack<TP>(a.states[1], a.state_fp32, q, v1);
              if (Op::uses(2)) store_state_pack<TP>(a.states[2], a.state_fp32, q, v2);
            },
            [&](int64_t i) {
              C pv = master ? a.master[i] : load(p[i]);
              const C gv = load_grad<TP>(a.grad, a.grad_fp32, i);
              C v0 = Op::uses(0) ? load_state<TP>(a.states[0], a.state_fp32, i) : C(0);
              C v1 = Op::uses(1) ? load_state<TP>(a.states[1], a.state_fp32, i) : C(0);
              C v2 = Op::uses(2) ? load_state<TP>(a.states[2], a.state_fp32, i) : C(0);
              op(c, pv, gv, v0, v1, v2);
              if (master) a.master[i] = pv;
              p[i] = store<TP>(pv);
              if (Op::uses(0)) store_state<TP>(a.states[0], a.state_fp32, i, v0);
              if (Op::uses(1)) store_state<TP>(a.states[1], a.state_fp32, i, v1);
              if (Op::uses(2)) store_state<TP>(a.states[2], a.state_fp32, i, v2);
            });
      });
}

// ---------------------------------------------------------------------------------------------------------------
// Trust-ratio kind, the CPU driver's two passes (csrc/cpu/driver.h run_trust_ratio) with the same pieces:
//   pass 1, per item: moments updated in place (states 0 and 1); each thread adds ||p||^2 and ||u||^2 of its elements
//     in registers (u from the stored moments, what pass 2 applies), then one fixed block tree and one store per item;
//   sums, per segment: A::segment_sums over its items' partials in item order (deterministic);
//   pass 2, per item: thread 0 makes the segment's A::scaled_lr from its sums; p -= scaled_lr * u, u recomputed from
//     the stored moments bit for bit.
// The partition (items, kThreads threads, fixed trees) depends on the segment table only, never on the grid.

template <typename A, typename TP>
__global__ void __launch_bounds__(kThreads) trust_ratio_moments_kernel(const StepParams<A> a) {
  using C = compute_t<TP>;
  using Coeffs = typename A::template Coeffs<C>;
  __shared__ double scratch[32];
  if (step_skipped(a.d.found_inf)) return;
  const TP* p = static_cast<const TP*>(a.param);
  const bool master = !std::is_same<TP, C>::value && a.master != nullptr;
  for_each_active_item<Coeffs>(
      a, [&](int64_t s) { return segment_coeffs<C>(a, s); },
      [&](int64_t it, int64_t begin, int64_t end, const Coeffs& c) {
        double w2 = 0.0, u2 = 0.0;
        auto element = [&](C pv, C gv, C& m, C& v) {
          A::moments(c, gv, m, v);
          m = stored_state_of<TP>(a.state_fp32, m);
          v = stored_state_of<TP>(a.state_fp32, v);
          const C u = A::direction(c, pv, m, v);
          w2 += square_term(pv);
          u2 += square_term(u);
        };
        for_each_run(
            begin, end, a.aligned && begin % kPack == 0,
            [&](int64_t q) {
              C pv[kPack], gv[kPack], mv[kPack], vv[kPack];
              if (master)
                load_pack(a.master, q, pv);
              else
                load_pack(p, q, pv);
              load_grad_pack<TP>(a.grad, a.grad_fp32, q, gv);
              load_state_pack<TP>(a.states[0], a.state_fp32, q, mv);
              load_state_pack<TP>(a.states[1], a.state_fp32, q, vv);
#pragma unroll
              for (int e = 0; e < kPack; ++e) element(pv[e], gv[e], mv[e], vv[e]);
              store_state_pack<TP>(a.states[0], a.state_fp32, q, mv);
              store_state_pack<TP>(a.states[1], a.state_fp32, q, vv);
            },
            [&](int64_t i) {
              const C pv = master ? a.master[i] : load(p[i]);
              C m = load_state<TP>(a.states[0], a.state_fp32, i);
              C v = load_state<TP>(a.states[1], a.state_fp32, i);
              element(pv, load_grad<TP>(a.grad, a.grad_fp32, i), m, v);
              store_state<TP>(a.states[0], a.state_fp32, i, m);
              store_state<TP>(a.states[1], a.state_fp32, i, v);
            });
        w2 = block_sum(w2, scratch);
        u2 = block_sum(u2, scratch);
        if (threadIdx.x == 0) {
          a.partial_w[it] = w2;
          a.partial_u[it] = u2;
        }
      });
}

// One thread per segment; inactive segments (and active ones without elements) get zero sums, as on the CPU.
template <typename A>
__global__ void trust_ratio_sums_kernel(const StepParams<A> a) {
  if (step_skipped(a.d.found_inf)) return;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s < a.segments; s += stride) {
    double w2 = 0.0, u2 = 0.0;  // in registers: one store each
    if (a.active[s] != 0) A::segment_sums(a.items.seg_first, a.partial_w, a.partial_u, s, w2, u2);
    a.segment_w2[s] = w2;
    a.segment_u2[s] = u2;
  }
}

template <typename A, typename C>
struct ApplySegment {
  typename A::template Coeffs<C> c;
  C scaled_lr;
};

template <typename A, typename TP>
__global__ void __launch_bounds__(kThreads) trust_ratio_apply_kernel(const StepParams<A> a) {
  using C = compute_t<TP>;
  if (step_skipped(a.d.found_inf)) return;
  TP* p = static_cast<TP*>(a.param);
  const bool master = !std::is_same<TP, C>::value && a.master != nullptr;
  for_each_active_item<ApplySegment<A, C>>(
      a,
      [&](int64_t s) {
        ApplySegment<A, C> made;
        made.c = segment_coeffs<C>(a, s);
        made.scaled_lr = A::scaled_lr(made.c, a.segment_w2[s], a.segment_u2[s]);
        return made;
      },
      [&](int64_t, int64_t begin, int64_t end, const ApplySegment<A, C>& made) {
        const typename A::template Coeffs<C>& c = made.c;
        const C scaled_lr = made.scaled_lr;
        for_each_element(
            begin, end, a.aligned && begin % kPack == 0,
            [&](int64_t q) {
              C pv[kPack], mv[kPack], vv[kPack];
              if (master)
                load_pack(a.master, q, pv);
              else
                load_pack(p, q, pv);
              load_state_pack<TP>(a.states[0], a.state_fp32, q, mv);
              load_state_pack<TP>(a.states[1], a.state_fp32, q, vv);
#pragma unroll
              for (int e = 0; e < kPack; ++e) A::apply(c, scaled_lr, pv[e], mv[e], vv[e]);
              if (master) store_pack(a.master, q, pv);
              store_pack(p, q, pv);
            },
            [&](int64_t i) {
              C pv = master ? a.master[i] : load(p[i]);
              A::apply(c, scaled_lr, pv, load_state<TP>(a.states[0], a.state_fp32, i),
                       load_state<TP>(a.states[1], a.state_fp32, i));
              if (master) a.master[i] = pv;
              p[i] = store<TP>(pv);
            });
      });
}

// ---------------------------------------------------------------------------------------------------------------
// Host side: the launch sequence of one validated call.

// Scratch memory of one call, from the stream-ordered allocator: allocated on the stream before the first kernel that
// uses it and freed on the stream after the last, so it is never shared between calls (no global cache) and, under
// CUDA graph capture, becomes the graph's own allocation and free nodes (legal in a capture, replayed every launch).
class StreamScratch {
 public:
  StreamScratch(size_t bytes, cudaStream_t stream) : stream_(stream) {
    if (bytes > 0) check_cuda(cudaMallocAsync(&ptr_, bytes, stream), "cudaMallocAsync(scratch)");
  }
  ~StreamScratch() {
    if (ptr_ != nullptr) cudaFreeAsync(ptr_, stream_);
  }
  StreamScratch(const StreamScratch&) = delete;
  StreamScratch& operator=(const StreamScratch&) = delete;
  double* doubles() const { return static_cast<double*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

inline unsigned segment_blocks(int64_t segments) {
  const int64_t blocks = (segments + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > 1024 ? 1024 : blocks));
}

template <typename A, typename TP>
void launch_trust_ratio(StepParams<A> a, int passes, double* segment_w2, double* segment_u2, cudaStream_t stream) {
  constexpr auto moments = &trust_ratio_moments_kernel<A, TP>;
  constexpr auto apply = &trust_ratio_apply_kernel<A, TP>;
  const bool run_moments = (passes & kPassMoments) != 0;
  // Per-item partials (pass 1) and, without the caller's arrays, the per-segment sums: one allocation.
  const int64_t partials = run_moments ? 2 * a.items.count : 0;
  const int64_t sums = segment_w2 == nullptr ? 2 * a.segments : 0;
  StreamScratch scratch(static_cast<size_t>(partials + sums) * sizeof(double), stream);
  a.partial_w = partials > 0 ? scratch.doubles() : nullptr;
  a.partial_u = partials > 0 ? scratch.doubles() + a.items.count : nullptr;
  a.segment_w2 = segment_w2 != nullptr ? segment_w2 : scratch.doubles() + partials;
  a.segment_u2 = segment_u2 != nullptr ? segment_u2 : scratch.doubles() + partials + a.segments;
  if (run_moments) {
    if (a.items.count > 0) {
      moments<<<grid_size<moments>(a.items.count), kThreads, 0, stream>>>(a);
      check_launch("trust_ratio_moments_kernel");
    }
    trust_ratio_sums_kernel<A><<<segment_blocks(a.segments), kThreads, 0, stream>>>(a);
    check_launch("trust_ratio_sums_kernel");
  }
  if ((passes & kPassApply) != 0 && a.items.count > 0) {
    apply<<<grid_size<apply>(a.items.count), kThreads, 0, stream>>>(a);
    check_launch("trust_ratio_apply_kernel");
  }
}

template <typename A, typename TP>
void launch_typed(const StepParams<A>& a, int passes, double* segment_w2, double* segment_u2, cudaStream_t stream) {
  if constexpr (A::kKind == algo::Kind::kElementwise) {
    if (a.items.count > 0) {
      A::with_op(a.hyper, [&](auto op) {
        constexpr auto kernel = &elementwise_kernel<A, decltype(op), TP>;
        kernel<<<grid_size<kernel>(a.items.count), kThreads, 0, stream>>>(a);
        check_launch("elementwise_kernel");
      });
    }
    if constexpr (algo::ScalarCount<A>::value > 0) {
      advance_scalars_kernel<A, compute_t<TP>><<<segment_blocks(a.segments), kThreads, 0, stream>>>(a);
      check_launch("advance_scalars_kernel");
    }
  } else if constexpr (A::kKind == algo::Kind::kTrustRatio) {
    static_assert(algo::ScalarCount<A>::value == 0, "scalar states are for element-wise algorithms");
    launch_trust_ratio<A, TP>(a, passes, segment_w2, segment_u2, stream);
  } else {
    // Factored algorithms have no CUDA driver yet: api.cu refuses them before any launch, and Python runs them on the
    // reference backend on a GPU (fusedopt._backend.resolve).
    throw std::invalid_argument("factored algorithms have no CUDA kernel");
  }
}

// The launches of one validated step of algorithm A on the current device.
template <typename A>
void launch_step(const FlatBuffers& b, const Segments& s, const DeviceWork& w, const StepArgs& args,
                 const typename A::Hyper& h, const DeviceScalars& d, bool counts_step, cudaStream_t stream) {
  if (s.count == 0) return;
  StepParams<A> a;
  a.param = b.param;
  a.grad = b.grad;
  bool aligned = aligned16(b.param) && aligned16(b.grad);
  for (int k = 0; k < algo::kMaxStates; ++k) {
    a.states[k] = A::uses_state(h, k) ? b.states[k] : nullptr;
    aligned = aligned && aligned16(a.states[k]);
  }
  a.master = b.param_dtype == kFloat32 || b.param_dtype == kFloat64 ? nullptr : b.master;
  a.grad_fp32 = b.grad_dtype == kFloat32;
  a.state_fp32 = b.state_dtype != kBFloat16;
  a.aligned = aligned && aligned16(a.master);
  a.items = items_of(w, b.n);
  a.steps = s.steps;
  a.active = s.active;
  a.scalars = s.scalars;
  a.segments = s.count;
  a.hyper = h;
  a.lr = args.lr;
  a.grad_scale = args.grad_scale;
  a.d = d;
  a.partial_w = a.partial_u = a.segment_w2 = a.segment_u2 = nullptr;
  if (counts_step) {
    count_steps_kernel<<<segment_blocks(s.count), kThreads, 0, stream>>>(s.steps, s.active, s.count, d.found_inf);
    check_launch("count_steps_kernel");
  }
  if (b.param_dtype == kBFloat16)
    launch_typed<A, bf16_t>(a, args.passes, args.segment_w2, args.segment_u2, stream);
  else if (b.param_dtype == kFloat16)
    launch_typed<A, fp16_t>(a, args.passes, args.segment_w2, args.segment_u2, stream);
  else if (b.param_dtype == kFloat64)
    launch_typed<A, double>(a, args.passes, args.segment_w2, args.segment_u2, stream);
  else
    launch_typed<A, float>(a, args.passes, args.segment_w2, args.segment_u2, stream);
}

}  // namespace cuda
}  // namespace fusedopt
