// The one CUDA launcher of the optimizer steps: each algorithm of the list runs on the kernels of its kind, which call
// the math header's pieces (make_coeffs, Op or the trust-ratio passes) exactly as the CPU driver does. Blocks stride
// over the work items of the segment table (one item per block at a time, 16-byte packs on the aligned path, a masked
// scalar tail); an item's segment gives its active flag and its step, from which thread 0 makes the coefficients once
// and shares them through shared memory. Included only by api.cu, after it validated the arguments.
//
// Launch sequence of one call, all on the caller's stream, none waiting for the host:
//   count_steps_kernel       (when the call counts the step) steps[s] += 1 for every active segment;
//   element-wise kind:       elementwise_kernel (elementwise8_kernel with 8-bit states), then advance_scalars_kernel
//                            when the algorithm keeps scalar states (every block has read them by then);
//   trust-ratio kind:        trust_ratio_moments_kernel -> trust_ratio_sums_kernel   (kPassMoments)
//                            trust_ratio_apply_kernel                                 (kPassApply)
//                            (trust_ratio_moments8_kernel, trust_ratio_apply8_kernel with 8-bit states)
//   factored kind:           factored_rows_kernel, factored_columns_kernel, factored_vectors_kernel ->
//                            factored_moment_sums_kernel                              (kPassMoments)
//                            factored_column_factors_kernel, factored_row_means_kernel,
//                            factored_u2_kernel -> factored_u2_sums_kernel             (kPassNorms)
//                            factored_apply_kernel                                    (kPassApply)
// Every kernel returns at once when *found_inf != 0, so a skipped step writes nothing and counts nothing.
#pragma once

#include <type_traits>

#include "device.cuh"
#include "fusedopt/algorithms.h"
#include "fusedopt/quant8.h"

namespace fusedopt {
namespace cuda {

// Everything a step kernel reads: one struct, passed by value.
template <typename A>
struct StepParams {
  void* param;
  const void* grad;
  void* states[algo::kMaxStates];  // null for the states this configuration does not use
  float* master;                   // only with 16-bit parameters (param mode kParamMaster)
  void* comp;                      // the Kahan compensation, p's dtype (param mode kParamKahan)
  int param_mode;                  // param_io.h ParamMode (kParamNearest for fp32 and float64 parameters)
  uint64_t seed;                   // stochastic rounding (param mode kParamStochastic, bf16 parameters)
  bool grad_fp32;                  // 16-bit parameters: fp32 gradients (float64 parameters: float64 gradients)
  bool state_fp32;                 // 32/16-bit parameters: fp32 states, else bf16 (float64 parameters: float64)
  bool aligned;  // every array used is 16-byte aligned
  // 8-bit states (quant8.h, element-wise and trust-ratio kinds): the used slots hold bytes, absmax[k] their block
  // absmaxes, bit k of signed_states whether slot k is signed.
  bool quantized;
  float* absmax[algo::kMaxStates];
  int signed_states;
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
  // Factored kind (cuda_api.h DeviceWork, api.h Layout): segment offsets, the layout, the row and column items, the
  // per-row-item sums of squares of p, the row and column sums (StepArgs::factor_sums).
  const int64_t* offsets;
  const int64_t* layout;
  const int64_t* row_first;
  const int64_t* row_item;
  int64_t row_items;
  const int64_t* col_item;
  int64_t col_items;
  double* row_partial;
  double* factor_sums;
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

// Parameter values in the step's param mode (param_io.h, ParamIO for one element; here also a pack of kPack): read as
// the master's, as p + comp (Kahan) or as p; written back to the master and p, split into p and comp, rounded
// stochastically with segment key `key`, or rounded to nearest.
template <typename A, typename TP>
__device__ __forceinline__ bool has_master(const StepParams<A>& a) {
  return !std::is_same<TP, compute_t<TP>>::value && a.master != nullptr;
}

template <typename A, typename TP, typename C>
__device__ __forceinline__ void read_param_pack(const StepParams<A>& a, const TP* p, int64_t q, C (&pv)[kPack]) {
  if (has_master<A, TP>(a)) {
    load_pack(a.master, q, pv);
    return;
  }
  load_pack(p, q, pv);
  if (a.param_mode == kParamKahan) {
    C cv[kPack];
    load_pack(static_cast<const TP*>(a.comp), q, cv);
#pragma unroll
    for (int e = 0; e < kPack; ++e) pv[e] += cv[e];
  }
}

template <typename A, typename TP>
__device__ __forceinline__ compute_t<TP> read_param(const StepParams<A>& a, const TP* p, int64_t i) {
  using C = compute_t<TP>;
  if (has_master<A, TP>(a)) return C(a.master[i]);
  if (a.param_mode == kParamKahan) return load(p[i]) + load(static_cast<const TP*>(a.comp)[i]);
  return load(p[i]);
}

template <typename A, typename TP>
__device__ __forceinline__ void write_param(const StepParams<A>& a, TP* p, int64_t i, compute_t<TP> v, uint32_t key) {
  if (has_master<A, TP>(a)) {
    a.master[i] = static_cast<float>(v);
    p[i] = store<TP>(v);
  } else if (a.param_mode == kParamKahan) {
    const TP rounded = store<TP>(v);
    p[i] = rounded;
    static_cast<TP*>(a.comp)[i] = store<TP>(v - load(rounded));
  } else if constexpr (std::is_same<TP, bf16_t>::value) {
    p[i] = a.param_mode == kParamStochastic ? store_stochastic_bf16(v, rounding_bits(key, i)) : store<TP>(v);
  } else {
    p[i] = store<TP>(v);
  }
}

template <typename A, typename TP, typename C>
__device__ __forceinline__ void write_param_pack(const StepParams<A>& a, TP* p, int64_t q, const C (&pv)[kPack],
                                                 uint32_t key) {
  if (has_master<A, TP>(a)) {
    store_pack(a.master, q, pv);
    store_pack(p, q, pv);
  } else if (a.param_mode == kParamKahan || a.param_mode == kParamStochastic) {
    C rounded[kPack], residual[kPack];  // values p holds exactly, so store_pack writes them as they are
#pragma unroll
    for (int e = 0; e < kPack; ++e) {
      if constexpr (std::is_same<TP, bf16_t>::value)
        rounded[e] = a.param_mode == kParamStochastic
                         ? load(store_stochastic_bf16(pv[e], rounding_bits(key, q * kPack + e)))
                         : load(store<TP>(pv[e]));
      else
        rounded[e] = load(store<TP>(pv[e]));
      residual[e] = pv[e] - rounded[e];
    }
    store_pack(p, q, rounded);
    if (a.param_mode == kParamKahan) store_pack(static_cast<TP*>(a.comp), q, residual);
  } else {
    store_pack(p, q, pv);
  }
}

// The rounding key of segment s at this step (its count is already incremented), for stochastic rounding.
template <typename A>
__device__ __forceinline__ uint32_t segment_key(const StepParams<A>& a, int64_t s) {
  return a.param_mode == kParamStochastic ? rounding_key(a.seed, a.steps[s], s) : 0u;
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
  const Op op{};
  for_each_active_item<Coeffs>(
      a, [&](int64_t s) { return segment_coeffs<C>(a, s); },
      [&](int64_t it, int64_t begin, int64_t end, const Coeffs& c) {
        const uint32_t key = segment_key(a, a.items.segment[it]);
        for_each_element(
            begin, end, a.aligned && begin % kPack == 0,
            [&](int64_t q) {
              C pv[kPack], gv[kPack], v0[kPack] = {}, v1[kPack] = {}, v2[kPack] = {};
              // Every load of the pack first, so that all 16-byte requests are in flight together.
              read_param_pack(a, p, q, pv);
              load_grad_pack<TP>(a.grad, a.grad_fp32, q, gv);
              if (Op::uses(0)) load_state_pack<TP>(a.states[0], a.state_fp32, q, v0);
              if (Op::uses(1)) load_state_pack<TP>(a.states[1], a.state_fp32, q, v1);
              if (Op::uses(2)) load_state_pack<TP>(a.states[2], a.state_fp32, q, v2);
#pragma unroll
              for (int e = 0; e < kPack; ++e) op(c, pv[e], gv[e], v0[e], v1[e], v2[e]);
              write_param_pack(a, p, q, pv, key);
              if (Op::uses(0)) store_state_pack<TP>(a.states[0], a.state_fp32, q, v0);
              if (Op::uses(1)) store_state_pack<TP>(a.states[1], a.state_fp32, q, v1);
              if (Op::uses(2)) store_state_pack<TP>(a.states[2], a.state_fp32, q, v2);
            },
            [&](int64_t i) {
              C pv = read_param(a, p, i);
              const C gv = load_grad<TP>(a.grad, a.grad_fp32, i);
              C v0 = Op::uses(0) ? load_state<TP>(a.states[0], a.state_fp32, i) : C(0);
              C v1 = Op::uses(1) ? load_state<TP>(a.states[1], a.state_fp32, i) : C(0);
              C v2 = Op::uses(2) ? load_state<TP>(a.states[2], a.state_fp32, i) : C(0);
              op(c, pv, gv, v0, v1, v2);
              write_param(a, p, i, pv, key);
              if (Op::uses(0)) store_state<TP>(a.states[0], a.state_fp32, i, v0);
              if (Op::uses(1)) store_state<TP>(a.states[1], a.state_fp32, i, v1);
              if (Op::uses(2)) store_state<TP>(a.states[2], a.state_fp32, i, v2);
            });
      });
}

// ---------------------------------------------------------------------------------------------------------------
// Element-wise kind with 8-bit states (quant8.h): the CPU driver's elementwise_block8 with one CUDA block per
// quantization block, thread j on its element j. Each used slot is decoded with the block's old absmax, Op runs in
// float, the new absmax is the largest |value| of the block (NaN when one is inf or NaN), then every value is encoded
// with it. Blocks stride over virtual indices it * kItemBlocks + k, the k-th quantization block of item `it` (none past
// the item's end), so that a short work list still spreads over the device.
static_assert(kThreads == kQuantBlock, "one thread per element of a quantization block");
constexpr int64_t kItemBlocks = kChunk / kQuantBlock;  // quantization blocks of a full work item
static_assert(kChunk % kQuantBlock == 0, "work items start on quantization block boundaries");

// The absmax convention of quant8.h (the CPU's block_absmax): the largest |value| of a block, NaN when one is inf or
// NaN. A max ignores order, but fmaxf drops NaN, so each value enters as max_term (|x|, inf when not finite) and the
// block's largest term becomes its absmax through absmax_of.
__device__ __forceinline__ float max_term(float x) { return fabsf(x) < INFINITY ? fabsf(x) : INFINITY; }
__device__ __forceinline__ float absmax_of(float largest) {
  return largest < INFINITY ? largest : bits_as_float(0x7FC00000u);  // the CPU's NAN
}

// The largest m over the warp, in every lane (every lane must call it).
__device__ __forceinline__ float warp_max(float m) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) m = fmaxf(m, __shfl_xor_sync(0xFFFFFFFFu, m, offset));
  return m;
}

// Per used slot, the largest m[k] of the block (max_term values), in every thread.
template <typename Op>
__device__ __forceinline__ void block_max(float (&m)[algo::kMaxStates],
                                          float (&scratch)[algo::kMaxStates][kThreads / 32]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < algo::kMaxStates; ++k) {
    if (!Op::uses(k)) continue;
    m[k] = warp_max(m[k]);
    if (lane == 0) scratch[k][warp] = m[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < algo::kMaxStates; ++k) {
    if (!Op::uses(k)) continue;
    float r = 0.0f;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) r = fmaxf(r, scratch[k][w]);
    m[k] = r;
  }
  __syncthreads();  // scratch is rewritten for the next block
}

template <typename A, typename Op, typename TP>
__global__ void __launch_bounds__(kThreads) elementwise8_kernel(const StepParams<A> a) {
  using Coeffs = typename A::template Coeffs<float>;
  static_assert(std::is_same<compute_t<TP>, float>::value, "8-bit states are for parameters computed in float");
  __shared__ Coeffs shared;
  __shared__ float scratch[algo::kMaxStates][kThreads / 32];
  if (step_skipped(a.d.found_inf)) return;
  TP* p = static_cast<TP*>(a.param);
  const Op op{};
  Coeffs c;
  int64_t current = -1;
  const int64_t blocks = a.items.count * kItemBlocks;
  for (int64_t v = blockIdx.x; v < blocks; v += gridDim.x) {
    // Every test up to the barriers is uniform over the block.
    const int64_t it = v / kItemBlocks;
    const int64_t s = a.items.segment[it];
    const int64_t begin = a.items.begin[it] + (v % kItemBlocks) * kQuantBlock, item_end = a.items.end[it];
    if (a.active[s] == 0 || begin >= item_end) continue;
    if (s != current) {
      __syncthreads();  // every thread has read the previous segment's coefficients
      if (threadIdx.x == 0) shared = segment_coeffs<float>(a, s);
      __syncthreads();
      c = shared;
      current = s;
    }
    const int64_t block = begin / kQuantBlock;  // segment offsets are block-aligned (checks::check_quantized)
    const int64_t i = begin + threadIdx.x;
    const bool in = i < item_end;  // the last block of a segment may be partial
    const uint32_t key = segment_key(a, s);
    float values[algo::kMaxStates] = {}, m[algo::kMaxStates] = {};
    if (in) {
      float pv = read_param(a, p, i);
      const float gv = load_grad<TP>(a.grad, a.grad_fp32, i);
#pragma unroll
      for (int k = 0; k < algo::kMaxStates; ++k) {
        if (!Op::uses(k)) continue;
        const bool is_signed = ((a.signed_states >> k) & 1) != 0;
        const float scale = a.absmax[k][block] / quant_top(is_signed);
        values[k] = dequantize8(static_cast<const uint8_t*>(a.states[k])[i], scale, is_signed);
      }
      op(c, pv, gv, values[0], values[1], values[2]);
      write_param(a, p, i, pv, key);
#pragma unroll
      for (int k = 0; k < algo::kMaxStates; ++k) m[k] = max_term(values[k]);
    }
    block_max<Op>(m, scratch);  // every thread has read the old absmaxes before thread 0 writes the new ones
#pragma unroll
    for (int k = 0; k < algo::kMaxStates; ++k) {
      if (!Op::uses(k)) continue;
      const bool is_signed = ((a.signed_states >> k) & 1) != 0;
      const float top = quant_top(is_signed);
      const float absmax = absmax_of(m[k]);
      if (threadIdx.x == 0) a.absmax[k][block] = absmax;
      if (in) static_cast<uint8_t*>(a.states[k])[i] = quantize8(values[k], encode_factor(absmax, top), top, is_signed);
    }
  }
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
              read_param_pack(a, p, q, pv);
              load_grad_pack<TP>(a.grad, a.grad_fp32, q, gv);
              load_state_pack<TP>(a.states[0], a.state_fp32, q, mv);
              load_state_pack<TP>(a.states[1], a.state_fp32, q, vv);
#pragma unroll
              for (int e = 0; e < kPack; ++e) element(pv[e], gv[e], mv[e], vv[e]);
              store_state_pack<TP>(a.states[0], a.state_fp32, q, mv);
              store_state_pack<TP>(a.states[1], a.state_fp32, q, vv);
            },
            [&](int64_t i) {
              const C pv = read_param(a, p, i);
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
  for_each_active_item<ApplySegment<A, C>>(
      a,
      [&](int64_t s) {
        ApplySegment<A, C> made;
        made.c = segment_coeffs<C>(a, s);
        made.scaled_lr = A::scaled_lr(made.c, a.segment_w2[s], a.segment_u2[s]);
        return made;
      },
      [&](int64_t it, int64_t begin, int64_t end, const ApplySegment<A, C>& made) {
        const typename A::template Coeffs<C>& c = made.c;
        const C scaled_lr = made.scaled_lr;
        const uint32_t key = segment_key(a, a.items.segment[it]);
        for_each_element(
            begin, end, a.aligned && begin % kPack == 0,
            [&](int64_t q) {
              C pv[kPack], mv[kPack], vv[kPack];
              read_param_pack(a, p, q, pv);
              load_state_pack<TP>(a.states[0], a.state_fp32, q, mv);
              load_state_pack<TP>(a.states[1], a.state_fp32, q, vv);
#pragma unroll
              for (int e = 0; e < kPack; ++e) A::apply(c, scaled_lr, pv[e], mv[e], vv[e]);
              write_param_pack(a, p, q, pv, key);
            },
            [&](int64_t i) {
              C pv = read_param(a, p, i);
              A::apply(c, scaled_lr, pv, load_state<TP>(a.states[0], a.state_fp32, i),
                       load_state<TP>(a.states[1], a.state_fp32, i));
              write_param(a, p, i, pv, key);
            });
      });
}

// ---------------------------------------------------------------------------------------------------------------
// Trust-ratio kind with 8-bit moments (quant8.h): the CPU driver's trust_ratio_pass1_8bit / trust_ratio_pass2_8bit.
//   pass 1, per item as trust_ratio_moments_kernel, with the same element-to-thread partition (so the same reduction
//     structure): thread t visits the runs begin + (t + k * kThreads) * kPack. Since items start on a quantization
//     block boundary, the 32 runs of a warp in one round are exactly one quantization block: warp w takes blocks w,
//     w + 8, .. of the item and its lanes find the block's new absmaxes with a warp max, no block barrier. Each lane
//     decodes its run with the old absmaxes, moves the moments in float, encodes them with the new absmaxes, then
//     decodes the stored codes again: u and ||u||^2 come from exactly what pass 2 reads, as on the CPU;
//   sums: trust_ratio_sums_kernel on the partials, unchanged;
//   pass 2, per item as trust_ratio_apply_kernel: p -= scaled_lr * u with m and v decoded with the new absmaxes.
// Never instantiated for float64 parameters (no 8-bit states).
static_assert(kPack == sizeof(uint64_t), "a pack of codes is one 8-byte access");
static_assert(kQuantBlock == 32 * kPack, "a warp's runs of one round are one quantization block");

template <typename A>
__device__ __forceinline__ bool slot_signed(const StepParams<A>& a, int k) {
  return ((a.signed_states >> k) & 1) != 0;
}

// The kPack codes of pack q of a byte buffer, one 8-byte access (pack path: the buffer is 16-byte aligned).
__device__ __forceinline__ void load_codes(const void* base, int64_t q, uint8_t (&c)[kPack]) {
  const uint64_t word = static_cast<const uint64_t*>(base)[q];
#pragma unroll
  for (int e = 0; e < kPack; ++e) c[e] = static_cast<uint8_t>(word >> (8 * e));
}

__device__ __forceinline__ void store_codes(void* base, int64_t q, const uint8_t (&c)[kPack]) {
  uint64_t word = 0;
#pragma unroll
  for (int e = 0; e < kPack; ++e) word |= static_cast<uint64_t>(c[e]) << (8 * e);
  static_cast<uint64_t*>(base)[q] = word;
}

template <typename A, typename TP>
__global__ void __launch_bounds__(kThreads) trust_ratio_moments8_kernel(const StepParams<A> a) {
  using Coeffs = typename A::template Coeffs<float>;
  static_assert(std::is_same<compute_t<TP>, float>::value, "8-bit states are for parameters computed in float");
  __shared__ double scratch[32];
  if (step_skipped(a.d.found_inf)) return;
  const TP* p = static_cast<const TP*>(a.param);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const bool is_signed[2] = {slot_signed(a, 0), slot_signed(a, 1)};
  const float top[2] = {quant_top(is_signed[0]), quant_top(is_signed[1])};
  for_each_active_item<Coeffs>(
      a, [&](int64_t s) { return segment_coeffs<float>(a, s); },
      [&](int64_t it, int64_t begin, int64_t end, const Coeffs& c) {
        const bool vec = a.aligned && begin % kPack == 0;
        double w2 = 0.0, u2 = 0.0;
        // The loop test is uniform over the warp (warp_max needs every lane); a lane past the end has n = 0.
        for (int64_t x = begin + warp * kQuantBlock; x < end; x += kThreads / 32 * kQuantBlock) {
          const int64_t block = x / kQuantBlock;  // segment offsets are block-aligned (checks::check_quantized)
          const int64_t r = x + lane * kPack;
          const int n = r >= end ? 0 : (end - r < kPack ? static_cast<int>(end - r) : kPack);
          const bool pack = vec && n == kPack;
          float pv[kPack] = {}, gv[kPack] = {}, values[2][kPack];
          uint8_t code[2][kPack] = {};
          if (pack) {
            read_param_pack(a, p, r / kPack, pv);
            load_grad_pack<TP>(a.grad, a.grad_fp32, r / kPack, gv);
            load_codes(a.states[0], r / kPack, code[0]);
            load_codes(a.states[1], r / kPack, code[1]);
          } else {
#pragma unroll
            for (int e = 0; e < kPack; ++e) {
              if (e >= n) continue;
              pv[e] = read_param(a, p, r + e);
              gv[e] = load_grad<TP>(a.grad, a.grad_fp32, r + e);
              code[0][e] = static_cast<const uint8_t*>(a.states[0])[r + e];
              code[1][e] = static_cast<const uint8_t*>(a.states[1])[r + e];
            }
          }
          float largest[2] = {0.0f, 0.0f};
#pragma unroll
          for (int k = 0; k < 2; ++k) {
            const float scale = a.absmax[k][block] / top[k];  // the old absmax
#pragma unroll
            for (int e = 0; e < kPack; ++e) values[k][e] = dequantize8(code[k][e], scale, is_signed[k]);
          }
#pragma unroll
          for (int e = 0; e < kPack; ++e) {
            A::moments(c, gv[e], values[0][e], values[1][e]);
            if (e < n) {
              largest[0] = fmaxf(largest[0], max_term(values[0][e]));
              largest[1] = fmaxf(largest[1], max_term(values[1][e]));
            }
          }
          largest[0] = warp_max(largest[0]);
          largest[1] = warp_max(largest[1]);
          __syncwarp();  // every lane has read the old absmaxes before lane 0 writes the new ones
#pragma unroll
          for (int k = 0; k < 2; ++k) {
            const float absmax = absmax_of(largest[k]);
            if (lane == 0) a.absmax[k][block] = absmax;
            const float inv = encode_factor(absmax, top[k]), scale = absmax / top[k];
#pragma unroll
            for (int e = 0; e < kPack; ++e) {
              code[k][e] = quantize8(values[k][e], inv, top[k], is_signed[k]);
              values[k][e] = dequantize8(code[k][e], scale, is_signed[k]);  // what pass 2 will read
            }
          }
#pragma unroll
          for (int e = 0; e < kPack; ++e) {
            if (e >= n) continue;
            w2 += square_term(pv[e]);
            u2 += square_term(A::direction(c, pv[e], values[0][e], values[1][e]));
          }
          if (pack) {
            store_codes(a.states[0], r / kPack, code[0]);
            store_codes(a.states[1], r / kPack, code[1]);
          } else {
#pragma unroll
            for (int e = 0; e < kPack; ++e) {
              if (e >= n) continue;
              static_cast<uint8_t*>(a.states[0])[r + e] = code[0][e];
              static_cast<uint8_t*>(a.states[1])[r + e] = code[1][e];
            }
          }
        }
        w2 = block_sum(w2, scratch);
        u2 = block_sum(u2, scratch);
        if (threadIdx.x == 0) {
          a.partial_w[it] = w2;
          a.partial_u[it] = u2;
        }
      });
}

template <typename A, typename TP>
__global__ void __launch_bounds__(kThreads) trust_ratio_apply8_kernel(const StepParams<A> a) {
  static_assert(std::is_same<compute_t<TP>, float>::value, "8-bit states are for parameters computed in float");
  if (step_skipped(a.d.found_inf)) return;
  TP* p = static_cast<TP*>(a.param);
  const bool m_signed = slot_signed(a, 0), v_signed = slot_signed(a, 1);
  const float m_top = quant_top(m_signed), v_top = quant_top(v_signed);
  for_each_active_item<ApplySegment<A, float>>(
      a,
      [&](int64_t s) {
        ApplySegment<A, float> made;
        made.c = segment_coeffs<float>(a, s);
        made.scaled_lr = A::scaled_lr(made.c, a.segment_w2[s], a.segment_u2[s]);
        return made;
      },
      [&](int64_t it, int64_t begin, int64_t end, const ApplySegment<A, float>& made) {
        const typename A::template Coeffs<float>& c = made.c;
        const float scaled_lr = made.scaled_lr;
        const uint32_t key = segment_key(a, a.items.segment[it]);
        // The decode factors of m and v for the block of element i (a pack never crosses a block).
        auto m_scale = [&](int64_t i) { return a.absmax[0][i / kQuantBlock] / m_top; };
        auto v_scale = [&](int64_t i) { return a.absmax[1][i / kQuantBlock] / v_top; };
        for_each_element(
            begin, end, a.aligned && begin % kPack == 0,
            [&](int64_t q) {
              float pv[kPack];
              uint8_t mc[kPack], vc[kPack];
              read_param_pack(a, p, q, pv);
              load_codes(a.states[0], q, mc);
              load_codes(a.states[1], q, vc);
              const float ms = m_scale(q * kPack), vs = v_scale(q * kPack);
#pragma unroll
              for (int e = 0; e < kPack; ++e)
                A::apply(c, scaled_lr, pv[e], dequantize8(mc[e], ms, m_signed), dequantize8(vc[e], vs, v_signed));
              write_param_pack(a, p, q, pv, key);
            },
            [&](int64_t i) {
              float pv = read_param(a, p, i);
              A::apply(c, scaled_lr, pv, dequantize8(static_cast<const uint8_t*>(a.states[0])[i], m_scale(i), m_signed),
                       dequantize8(static_cast<const uint8_t*>(a.states[1])[i], v_scale(i), v_signed));
              write_param(a, p, i, pv, key);
            });
      });
}

// ---------------------------------------------------------------------------------------------------------------
// Factored kind, the CPU driver's passes (csrc/cpu/driver.h run_factored) with the same pieces of the math header:
//   moments: per row item (one row), a block sums the row's squares of g and of p (fixed tree) and moves its row
//     factor; per column item, a thread per column sums its squares down the rows in row order; per work item of a
//     vector, the variance moves and the block sums p^2; per segment, a block adds its items' sums of p^2 and each
//     leading index's row factors (fixed trees);
//   norms: per column item, the column factors move to the sums / total rows; per segment, the row sums become the
//     row means; per work item, the block sums u^2 (u from the stored states); per segment, a block adds its items';
//   apply: per work item, thread 0 makes the segment's step size from its sums; p = p*(1 - lr*wd) + step_size*u.
// The partition (items, kThreads threads, fixed trees) depends on the layout only, never on the grid.

__device__ __forceinline__ int64_t layout_at(const int64_t* layout, int64_t s, int column) {
  return layout[s * kLayoutColumns + column];
}

// Segment s's coefficients, made by thread 0 and shared with the block (every thread must call it).
template <typename C, typename A>
__device__ __forceinline__ typename A::template Coeffs<C> block_coeffs(const StepParams<A>& a, int64_t s,
                                                                       typename A::template Coeffs<C>* shared) {
  __syncthreads();  // every thread has read the previous value
  if (threadIdx.x == 0) *shared = segment_coeffs<C>(a, s);
  __syncthreads();
  return *shared;
}

// u of element i of segment s: from the row and column factors and the row mean of its matrix, or from its variance.
template <typename A, typename TP>
__device__ __forceinline__ compute_t<TP> factored_direction(const StepParams<A>& a,
                                                            const typename A::template Coeffs<compute_t<TP>>& c,
                                                            int64_t s, int64_t i) {
  using C = compute_t<TP>;
  const int64_t* row = a.layout + s * kLayoutColumns;
  const C g = load_grad<TP>(a.grad, a.grad_fp32, i) * c.grad_scale;
  const int64_t local = i - a.offsets[s];
  if (row[kTotalRows] == 0)
    return A::direction(c, g, load_state<TP>(a.states[2], a.state_fp32, row[kVarianceAt] + local));
  const int64_t cols = row[kCols], q = local / cols, j = local - q * cols, lead = q / row[kRows];
  const C row_factor = load_state<TP>(a.states[0], a.state_fp32, row[kRowVarAt] + q);
  const C col_factor = load_state<TP>(a.states[1], a.state_fp32, row[kColVarAt] + lead * cols + j);
  const C mean = static_cast<C>(a.factor_sums[row[kRowSumAt] + lead]);
  return A::direction(c, g, A::factored_estimate(row_factor, col_factor, mean));
}

template <typename A, typename TP>
__global__ void __launch_bounds__(kThreads) factored_rows_kernel(const StepParams<A> a) {
  using C = compute_t<TP>;
  using Coeffs = typename A::template Coeffs<C>;
  __shared__ double scratch[32];
  __shared__ Coeffs shared;
  if (step_skipped(a.d.found_inf)) return;
  const TP* p = static_cast<const TP*>(a.param);
  for (int64_t it = blockIdx.x; it < a.row_items; it += gridDim.x) {
    const int64_t s = a.row_item[2 * it], q = a.row_item[2 * it + 1];
    if (a.active[s] == 0) continue;
    const Coeffs c = block_coeffs<C>(a, s, &shared);
    const int64_t cols = layout_at(a.layout, s, kCols), base = a.offsets[s] + q * cols;
    double g2 = 0.0, p2 = 0.0;
    for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
      g2 += square_term(load_grad<TP>(a.grad, a.grad_fp32, base + j) * c.grad_scale);
      p2 += square_term(read_param(a, p, base + j));
    }
    g2 = block_sum(g2, scratch);
    p2 = block_sum(p2, scratch);
    if (threadIdx.x == 0) {
      const int64_t at = layout_at(a.layout, s, kRowVarAt) + q;
      const C mean_square = static_cast<C>(g2 / static_cast<double>(cols));
      store_state<TP>(a.states[0], a.state_fp32, at,
                      A::moved_factor(c, load_state<TP>(a.states[0], a.state_fp32, at), mean_square));
      a.row_partial[it] = p2;
    }
  }
}

template <typename A, typename TP>
__global__ void __launch_bounds__(kThreads) factored_columns_kernel(const StepParams<A> a) {
  using C = compute_t<TP>;
  using Coeffs = typename A::template Coeffs<C>;
  __shared__ Coeffs shared;
  if (step_skipped(a.d.found_inf)) return;
  for (int64_t it = blockIdx.x; it < a.col_items; it += gridDim.x) {
    const int64_t* item = a.col_item + 4 * it;
    const int64_t s = item[0], lead = item[1];
    if (a.active[s] == 0) continue;
    const Coeffs c = block_coeffs<C>(a, s, &shared);
    const int64_t rows = layout_at(a.layout, s, kRows), cols = layout_at(a.layout, s, kCols);
    const int64_t base = a.offsets[s] + lead * rows * cols;
    double* out = a.factor_sums + layout_at(a.layout, s, kColSumAt) + lead * cols;
    for (int64_t j = item[2] + threadIdx.x; j < item[3]; j += kThreads) {
      double sum = 0.0;
      for (int64_t r = 0; r < rows; ++r)
        sum += square_term(load_grad<TP>(a.grad, a.grad_fp32, base + r * cols + j) * c.grad_scale);
      out[j] = sum;
    }
  }
}

template <typename A, typename TP>
__global__ void __launch_bounds__(kThreads) factored_vectors_kernel(const StepParams<A> a) {
  using C = compute_t<TP>;
  using Coeffs = typename A::template Coeffs<C>;
  __shared__ double scratch[32];
  if (step_skipped(a.d.found_inf)) return;
  const TP* p = static_cast<const TP*>(a.param);
  for_each_active_item<Coeffs>(
      a, [&](int64_t s) { return segment_coeffs<C>(a, s); },
      [&](int64_t it, int64_t begin, int64_t end, const Coeffs& c) {
        const int64_t s = a.items.segment[it];
        if (layout_at(a.layout, s, kTotalRows) != 0) return;  // uniform over the block
        const int64_t shift = layout_at(a.layout, s, kVarianceAt) - a.offsets[s];
        double p2 = 0.0;
        for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
          const C g = load_grad<TP>(a.grad, a.grad_fp32, i) * c.grad_scale;
          const C v = load_state<TP>(a.states[2], a.state_fp32, shift + i);
          store_state<TP>(a.states[2], a.state_fp32, shift + i, A::moved_factor(c, v, g * g));
          p2 += square_term(read_param(a, p, i));
        }
        p2 = block_sum(p2, scratch);
        if (threadIdx.x == 0) a.partial_w[it] = p2;
      });
}

// A block per segment: its sum of p^2 and, for a stack of matrices, each leading index's sum of row factors.
template <typename A, typename TP>
__global__ void __launch_bounds__(kThreads) factored_moment_sums_kernel(const StepParams<A> a) {
  __shared__ double scratch[32];
  if (step_skipped(a.d.found_inf)) return;
  for (int64_t s = blockIdx.x; s < a.segments; s += gridDim.x) {
    if (a.active[s] == 0) continue;
    const int64_t* row = a.layout + s * kLayoutColumns;
    const bool factored = row[kTotalRows] != 0;
    const int64_t first = factored ? a.row_first[s] : a.items.seg_first[s];
    const int64_t last = factored ? a.row_first[s + 1] : a.items.seg_first[s + 1];
    const double* partials = factored ? a.row_partial : a.partial_w;
    double p2 = 0.0;
    for (int64_t k = first + threadIdx.x; k < last; k += kThreads) p2 += partials[k];
    p2 = block_sum(p2, scratch);
    if (threadIdx.x == 0) a.segment_w2[s] = p2;
    if (!factored) continue;
    const int64_t rows = row[kRows];
    for (int64_t lead = 0; lead < row[kLead]; ++lead) {
      double total = 0.0;
      for (int64_t r = threadIdx.x; r < rows; r += kThreads)
        total += static_cast<double>(load_state<TP>(a.states[0], a.state_fp32, row[kRowVarAt] + lead * rows + r));
      total = block_sum(total, scratch);
      if (threadIdx.x == 0) a.factor_sums[row[kRowSumAt] + lead] = total;
    }
  }
}

template <typename A, typename TP>
__global__ void __launch_bounds__(kThreads) factored_column_factors_kernel(const StepParams<A> a) {
  using C = compute_t<TP>;
  using Coeffs = typename A::template Coeffs<C>;
  __shared__ Coeffs shared;
  if (step_skipped(a.d.found_inf)) return;
  for (int64_t it = blockIdx.x; it < a.col_items; it += gridDim.x) {
    const int64_t* item = a.col_item + 4 * it;
    const int64_t s = item[0], lead = item[1];
    if (a.active[s] == 0) continue;
    const Coeffs c = block_coeffs<C>(a, s, &shared);
    const int64_t cols = layout_at(a.layout, s, kCols);
    const double total_rows = static_cast<double>(layout_at(a.layout, s, kTotalRows));
    const int64_t at = layout_at(a.layout, s, kColVarAt) + lead * cols;
    const double* sums = a.factor_sums + layout_at(a.layout, s, kColSumAt) + lead * cols;
    for (int64_t j = item[2] + threadIdx.x; j < item[3]; j += kThreads) {
      const C old = load_state<TP>(a.states[1], a.state_fp32, at + j);
      store_state<TP>(a.states[1], a.state_fp32, at + j, A::moved_factor(c, old, static_cast<C>(sums[j] / total_rows)));
    }
  }
}

// A thread per segment: the row sums of each leading index become its row mean (floored at eps1).
template <typename A, typename TP>
__global__ void factored_row_means_kernel(const StepParams<A> a) {
  using C = compute_t<TP>;
  if (step_skipped(a.d.found_inf)) return;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s < a.segments; s += stride) {
    const int64_t* row = a.layout + s * kLayoutColumns;
    if (a.active[s] == 0 || row[kTotalRows] == 0) continue;
    const typename A::template Coeffs<C> c = segment_coeffs<C>(a, s);
    double* sums = a.factor_sums + row[kRowSumAt];
    const double total_rows = static_cast<double>(row[kTotalRows]);
    for (int64_t lead = 0; lead < row[kLead]; ++lead)
      sums[lead] = static_cast<double>(A::row_mean(c, static_cast<C>(sums[lead] / total_rows)));
  }
}

template <typename A, typename TP>
__global__ void __launch_bounds__(kThreads) factored_u2_kernel(const StepParams<A> a) {
  using C = compute_t<TP>;
  using Coeffs = typename A::template Coeffs<C>;
  __shared__ double scratch[32];
  if (step_skipped(a.d.found_inf)) return;
  for_each_active_item<Coeffs>(
      a, [&](int64_t s) { return segment_coeffs<C>(a, s); },
      [&](int64_t it, int64_t begin, int64_t end, const Coeffs& c) {
        const int64_t s = a.items.segment[it];
        double u2 = 0.0;
        for (int64_t i = begin + threadIdx.x; i < end; i += kThreads)
          u2 += square_term(factored_direction<A, TP>(a, c, s, i));
        u2 = block_sum(u2, scratch);
        if (threadIdx.x == 0) a.partial_u[it] = u2;
      });
}

template <typename A>
__global__ void __launch_bounds__(kThreads) factored_u2_sums_kernel(const StepParams<A> a) {
  __shared__ double scratch[32];
  if (step_skipped(a.d.found_inf)) return;
  for (int64_t s = blockIdx.x; s < a.segments; s += gridDim.x) {
    if (a.active[s] == 0) continue;
    double u2 = 0.0;
    for (int64_t k = a.items.seg_first[s] + threadIdx.x; k < a.items.seg_first[s + 1]; k += kThreads)
      u2 += a.partial_u[k];
    u2 = block_sum(u2, scratch);
    if (threadIdx.x == 0) a.segment_u2[s] = u2;
  }
}

template <typename A, typename C>
struct FactoredApply {
  typename A::template Coeffs<C> c;
  C step_size;
};

template <typename A, typename TP>
__global__ void __launch_bounds__(kThreads) factored_apply_kernel(const StepParams<A> a) {
  using C = compute_t<TP>;
  if (step_skipped(a.d.found_inf)) return;
  TP* p = static_cast<TP*>(a.param);
  for_each_active_item<FactoredApply<A, C>>(
      a,
      [&](int64_t s) {
        FactoredApply<A, C> made;
        made.c = segment_coeffs<C>(a, s);
        made.step_size = A::step_size(made.c, a.segment_w2[s], a.segment_u2[s], layout_at(a.layout, s, kNumel));
        return made;
      },
      [&](int64_t it, int64_t begin, int64_t end, const FactoredApply<A, C>& made) {
        const int64_t s = a.items.segment[it];
        const uint32_t key = segment_key(a, s);
        for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
          C pv = read_param(a, p, i);
          A::apply(made.c, made.step_size, pv, factored_direction<A, TP>(a, made.c, s, i));
          write_param(a, p, i, pv, key);
        }
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

// A kernel that strides over the work items (one block per item).
template <auto Kernel, typename A>
void launch_over_items(const StepParams<A>& a, const char* name, cudaStream_t stream) {
  Kernel<<<grid_size<Kernel>(a.items.count), kThreads, 0, stream>>>(a);
  check_launch(name);
}

template <typename A, typename TP>
void launch_trust_ratio(StepParams<A> a, int passes, double* segment_w2, double* segment_u2, cudaStream_t stream) {
  constexpr auto moments = &trust_ratio_moments_kernel<A, TP>;
  constexpr auto apply = &trust_ratio_apply_kernel<A, TP>;
  // 8-bit states have their own pass kernels, never instantiated for float64 parameters (checks::check_quantized
  // refuses them): there the float kernels stand in, never launched.
  constexpr auto moments8 = [] {
    if constexpr (kFloat64Params<TP>)
      return &trust_ratio_moments_kernel<A, TP>;
    else
      return &trust_ratio_moments8_kernel<A, TP>;
  }();
  constexpr auto apply8 = [] {
    if constexpr (kFloat64Params<TP>)
      return &trust_ratio_apply_kernel<A, TP>;
    else
      return &trust_ratio_apply8_kernel<A, TP>;
  }();
  const bool quantized = !kFloat64Params<TP> && a.quantized;
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
      if (quantized)
        launch_over_items<moments8>(a, "trust_ratio_moments8_kernel", stream);
      else
        launch_over_items<moments>(a, "trust_ratio_moments_kernel", stream);
    }
    trust_ratio_sums_kernel<A><<<segment_blocks(a.segments), kThreads, 0, stream>>>(a);
    check_launch("trust_ratio_sums_kernel");
  }
  if ((passes & kPassApply) != 0 && a.items.count > 0) {
    if (quantized)
      launch_over_items<apply8>(a, "trust_ratio_apply8_kernel", stream);
    else
      launch_over_items<apply>(a, "trust_ratio_apply_kernel", stream);
  }
}

// The factored kind's passes. The row partials, the item partials and, without the caller's arrays, the per-segment
// and factor sums come from one stream-ordered allocation; the scratch sums are zeroed on the stream first (inactive
// segments keep zero sums, as on the CPU).
template <typename A, typename TP>
void launch_factored(StepParams<A> a, int passes, double* segment_w2, double* segment_u2, double* factor_sums,
                     int64_t factor_sums_count, cudaStream_t stream) {
  const bool own_sums = segment_w2 == nullptr;
  const int64_t partials = a.row_items + 2 * a.items.count;
  const int64_t sums = own_sums ? 2 * a.segments + factor_sums_count : 0;
  StreamScratch scratch(static_cast<size_t>(partials + sums) * sizeof(double), stream);
  a.row_partial = scratch.doubles();
  a.partial_w = scratch.doubles() + a.row_items;
  a.partial_u = a.partial_w + a.items.count;
  if (own_sums) {
    double* own = scratch.doubles() + partials;
    check_cuda(cudaMemsetAsync(own, 0, static_cast<size_t>(sums) * sizeof(double), stream), "cudaMemsetAsync(sums)");
    a.segment_w2 = own;
    a.segment_u2 = own + a.segments;
    a.factor_sums = own + 2 * a.segments;
  } else {
    a.segment_w2 = segment_w2;
    a.segment_u2 = segment_u2;
    a.factor_sums = factor_sums;
  }
  const unsigned segment_grid = static_cast<unsigned>(a.segments < 4096 ? (a.segments < 1 ? 1 : a.segments) : 4096);
  auto grid = [](int64_t work) { return static_cast<unsigned>(work < 1 ? 1 : (work > 65535 ? 65535 : work)); };
  if (passes & kPassMoments) {
    if (a.row_items > 0) {
      factored_rows_kernel<A, TP><<<grid(a.row_items), kThreads, 0, stream>>>(a);
      check_launch("factored_rows_kernel");
    }
    if (a.col_items > 0) {
      factored_columns_kernel<A, TP><<<grid(a.col_items), kThreads, 0, stream>>>(a);
      check_launch("factored_columns_kernel");
    }
    if (a.items.count > 0) {
      factored_vectors_kernel<A, TP><<<grid(a.items.count), kThreads, 0, stream>>>(a);
      check_launch("factored_vectors_kernel");
    }
    factored_moment_sums_kernel<A, TP><<<segment_grid, kThreads, 0, stream>>>(a);
    check_launch("factored_moment_sums_kernel");
  }
  if (passes & kPassNorms) {
    if (a.col_items > 0) {
      factored_column_factors_kernel<A, TP><<<grid(a.col_items), kThreads, 0, stream>>>(a);
      check_launch("factored_column_factors_kernel");
    }
    factored_row_means_kernel<A, TP><<<segment_blocks(a.segments), kThreads, 0, stream>>>(a);
    check_launch("factored_row_means_kernel");
    if (a.items.count > 0) {
      factored_u2_kernel<A, TP><<<grid(a.items.count), kThreads, 0, stream>>>(a);
      check_launch("factored_u2_kernel");
    }
    factored_u2_sums_kernel<A><<<segment_grid, kThreads, 0, stream>>>(a);
    check_launch("factored_u2_sums_kernel");
  }
  if ((passes & kPassApply) && a.items.count > 0) {
    factored_apply_kernel<A, TP><<<grid(a.items.count), kThreads, 0, stream>>>(a);
    check_launch("factored_apply_kernel");
  }
}

template <typename A, typename TP>
void launch_typed(const StepParams<A>& a, const StepArgs& args, cudaStream_t stream) {
  const int passes = args.passes;
  double* segment_w2 = args.segment_w2;
  double* segment_u2 = args.segment_u2;
  if constexpr (A::kKind == algo::Kind::kElementwise) {
    if (a.items.count > 0) {
      A::with_op(a.hyper, [&](auto op) {
        if constexpr (!kFloat64Params<TP>) {
          if (a.quantized) {
            constexpr auto kernel = &elementwise8_kernel<A, decltype(op), TP>;
            kernel<<<grid_size<kernel>(a.items.count * kItemBlocks), kThreads, 0, stream>>>(a);
            check_launch("elementwise8_kernel");
            return;
          }
        }
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
    launch_factored<A, TP>(a, passes, segment_w2, segment_u2, args.factor_sums, args.factor_sums_count, stream);
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
    // A factored algorithm's slots are used by segment shape (its layout), not by configuration.
    a.states[k] = A::uses_state(h, k) || A::kKind == algo::Kind::kFactored ? b.states[k] : nullptr;
    aligned = aligned && aligned16(a.states[k]);
  }
  const bool sixteen_bit = b.param_dtype == kBFloat16 || b.param_dtype == kFloat16;
  a.master = sixteen_bit ? b.master : nullptr;
  a.comp = sixteen_bit ? b.comp : nullptr;
  a.param_mode = sixteen_bit ? b.param_mode : kParamNearest;
  a.seed = b.seed;
  a.grad_fp32 = b.grad_dtype == kFloat32;
  a.state_fp32 = b.state_dtype != kBFloat16;
  a.aligned = aligned && aligned16(a.master) && aligned16(a.comp);
  a.quantized = b.state_dtype == kState8bit;  // element-wise and trust-ratio algorithms (checks::check_quantized)
  for (int k = 0; k < algo::kMaxStates; ++k) a.absmax[k] = a.quantized ? b.absmax[k] : nullptr;
  a.signed_states = b.signed_states;
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
  a.offsets = s.offsets;
  a.layout = w.factored;
  a.row_first = w.factored != nullptr ? w.factored + s.count * kLayoutColumns : nullptr;
  a.row_item = w.factored != nullptr ? a.row_first + s.count + 1 : nullptr;
  a.row_items = w.row_items;
  a.col_item = w.factored != nullptr ? a.row_item + 2 * w.row_items : nullptr;
  a.col_items = w.col_items;
  a.row_partial = a.factor_sums = nullptr;
  if (counts_step) {
    count_steps_kernel<<<segment_blocks(s.count), kThreads, 0, stream>>>(s.steps, s.active, s.count, d.found_inf);
    check_launch("count_steps_kernel");
  }
  if (b.param_dtype == kBFloat16)
    launch_typed<A, bf16_t>(a, args, stream);
  else if (b.param_dtype == kFloat16)
    launch_typed<A, fp16_t>(a, args, stream);
  else if (b.param_dtype == kFloat64)
    launch_typed<A, double>(a, args, stream);
  else
    launch_typed<A, float>(a, args, stream);
}

}  // namespace cuda
}  // namespace fusedopt
