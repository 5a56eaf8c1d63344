// The one CPU driver: one parallel region (parallel_for, thread_pool.h: torch's OpenMP runtime or the project's own
// pool) over the work items of the active segments (chunks of at most kChunk elements), a vectorisable inner loop over
// the per-element math of csrc/include/fusedopt/math with each segment's own coefficients, and deterministic per-item
// reductions. Included by csrc/cpu/kernels.cpp, which is compiled once per ISA with FUSEDOPT_ISA_NS naming the
// namespace (baseline, avx2, avx512).
//
// Everything defined here lives in that per-ISA namespace (or is always_inline), and only plain C arrays are used, so
// no inline function compiled with AVX-512 flags can be merged by the linker into the code of another ISA.
#pragma once

#include <string.h>

#include <type_traits>

#include <math.h>
#include <stdint.h>

#include "fusedopt/common.h"
#include "fusedopt/dtype.h"
#include "fusedopt/math/norm.h"
#include "fusedopt/quant8.h"
#include "kernels.h"
#include "thread_pool.h"

#if defined(__GNUC__) || defined(__clang__)
#define FUSEDOPT_ALWAYS_INLINE __attribute__((always_inline))
#else
#define FUSEDOPT_ALWAYS_INLINE
#endif

#ifndef FUSEDOPT_ISA_NS
#error "FUSEDOPT_ISA_NS must name the ISA namespace of this build (set by CMakeLists.txt)"
#endif

namespace fusedopt {
namespace cpu {
namespace FUSEDOPT_ISA_NS {

// Runs f(begin, end) over static contiguous ranges of [0, n) (parallel_for, thread_pool.h: split as OpenMP's
// schedule(static) by the number of threads that actually run, returns when all are done). The lambda and the
// trampoline that calls it stay in this ISA's namespace; only a plain function pointer and a context pointer reach
// parallel_for. f must not throw (RangeBody is noexcept).
template <typename F>
FUSEDOPT_ALWAYS_INLINE inline void parallel_ranges(int64_t n, int threads, const F& f) {
  parallel_for(
      n, threads,
      [](void* ctx, int64_t begin, int64_t end) noexcept { (*static_cast<const F*>(ctx))(begin, end); },
      const_cast<F*>(&f));
}

template <typename T>
struct Type {
  using type = T;
};
template <bool B>
struct Bool {
  static constexpr bool value = B;
};
template <int M>
struct Mode {
  static constexpr int value = M;
};

// Calls f(Type<param>, Type<grad>, Mode<param mode>) for the combinations the dispatcher allows: grad dtype = param
// dtype or fp32; param modes other than nearest only with 16-bit parameters (stochastic: bf16 only); float64 parameters
// with float64 gradients only.
template <typename F>
void dispatch_param_grad(int param_dtype, int grad_dtype, int param_mode, F&& f) {
  auto with_mode = [&](auto tp, auto tg) {
    if (param_mode == kParamMaster)
      f(tp, tg, Mode<kParamMaster>{});
    else if (param_mode == kParamKahan)
      f(tp, tg, Mode<kParamKahan>{});
    else if (param_mode == kParamStochastic && std::is_same<typename decltype(tp)::type, bf16_t>::value)
      f(tp, tg, Mode<kParamStochastic>{});
    else
      f(tp, tg, Mode<kParamNearest>{});
  };
  if (param_dtype == kFloat32) {
    f(Type<float>{}, Type<float>{}, Mode<kParamNearest>{});
  } else if (param_dtype == kFloat64) {
    f(Type<double>{}, Type<double>{}, Mode<kParamNearest>{});
  } else if (param_dtype == kBFloat16) {
    if (grad_dtype == kFloat32)
      with_mode(Type<bf16_t>{}, Type<float>{});
    else
      with_mode(Type<bf16_t>{}, Type<bf16_t>{});
  } else {
    if (grad_dtype == kFloat32)
      with_mode(Type<fp16_t>{}, Type<float>{});
    else
      with_mode(Type<fp16_t>{}, Type<fp16_t>{});
  }
}

// Calls f(Type<param>, Type<grad>, Type<state>, Mode<param mode>) for the combinations the dispatcher allows: those
// of dispatch_param_grad, with fp32 or bf16 states (float64 parameters: float64 states only), and with Quantized
// 8-bit states (uint8_t, quant8.h) for the drivers that implement them (checks::check_quantized).
template <bool Quantized = false, typename F>
void dispatch_dtypes(const FlatBuffers& b, F&& f) {
  dispatch_param_grad(b.param_dtype, b.grad_dtype, b.param_mode, [&](auto tp, auto tg, auto mode) {
    using TP = typename decltype(tp)::type;
    if constexpr (std::is_same<TP, double>::value) {
      f(tp, tg, Type<double>{}, mode);
    } else {
      if constexpr (Quantized) {
        if (b.state_dtype == kState8bit) {
          f(tp, tg, Type<uint8_t>{}, mode);
          return;
        }
      }
      if (b.state_dtype == kBFloat16)
        f(tp, tg, Type<bf16_t>{}, mode);
      else
        f(tp, tg, Type<float>{}, mode);
    }
  });
}

// The parameter reader/writer of mode M over b's buffers.
template <typename TP, int M>
ParamIO<TP, M> param_io(const FlatBuffers& b) {
  ParamIO<TP, M> io;
  io.master = b.master;
  io.comp = static_cast<TP*>(b.comp);
  return io;
}

// The rounding key of segment s (stochastic mode; 0 otherwise).
FUSEDOPT_ALWAYS_INLINE inline uint32_t key_of(const Work& w, int64_t s) {
  return w.rounding_key != nullptr ? w.rounding_key[s] : 0u;
}

// The coefficients of compute type C (float or double) among an algorithm's per-segment coefficients.
template <typename C, typename A>
FUSEDOPT_HD const typename A::template Coeffs<C>* coeffs_of(const SegmentCoeffs<A>& segment_coeffs) {
  if constexpr (std::is_same<C, double>::value)
    return segment_coeffs.fp64;
  else
    return segment_coeffs.fp32;
}

// Inner loop over [begin, end) with one segment's coefficients, in compute type C (compute_t<TP>): the compiler
// vectorises it (unused states are compile-time dead, uniform mode flags are unswitched or if-converted) and emits the
// scalar remainder from the same source, so the tail runs the same math.
template <typename Op, typename Coeffs, typename C, typename TP, typename TG, typename TS, typename IO>
inline void elementwise_range(const Op op, const Coeffs c, TP* FUSEDOPT_RESTRICT p, const TG* FUSEDOPT_RESTRICT g,
                              TS* FUSEDOPT_RESTRICT s0, TS* FUSEDOPT_RESTRICT s1, TS* FUSEDOPT_RESTRICT s2,
                              const IO io, uint32_t key, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    C pv = io.read(p, i);
    const C gv = load(g[i]);
    C a = Op::uses(0) ? load(s0[i]) : C(0);
    C bb = Op::uses(1) ? load(s1[i]) : C(0);
    C cc = Op::uses(2) ? load(s2[i]) : C(0);
    op(c, pv, gv, a, bb, cc);
    io.write(p, i, pv, key);
    if (Op::uses(0)) s0[i] = store<TS>(a);
    if (Op::uses(1)) s1[i] = store<TS>(bb);
    if (Op::uses(2)) s2[i] = store<TS>(cc);
  }
}

// The largest |v| of n values, NaN when one is inf or NaN (quant8.h: such a block decodes to NaN). The magnitudes'
// bit patterns order as their values, inf and NaN above every finite one: an unsigned max, which vectorises.
inline float block_absmax(const float* FUSEDOPT_RESTRICT v, int64_t n) {
  uint32_t largest = 0;
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t bits = float_as_bits(v[j]) & 0x7FFFFFFFu;
    largest = bits > largest ? bits : largest;
  }
  return largest >= 0x7F800000u ? NAN : bits_as_float(largest);
}

// The 8-bit states of a driver call (quant8.h): the byte buffers, their block absmaxes, signedness and code tops.
struct Quantized {
  uint8_t* codes[algo::kMaxStates];
  float* absmax[algo::kMaxStates];
  bool is_signed[algo::kMaxStates];
  float top[algo::kMaxStates];
};

inline Quantized quantized_of(const FlatBuffers& b) {
  Quantized q;
  for (int k = 0; k < algo::kMaxStates; ++k) {
    q.codes[k] = static_cast<uint8_t*>(b.states[k]);
    q.absmax[k] = b.absmax[k];
    q.is_signed[k] = ((b.signed_states >> k) & 1) != 0;
    q.top[k] = quant_top(q.is_signed[k]);
  }
  return q;
}

// Decode and encode of one block's slot, with the slot's signedness a constant (one loop each, vectorised).
template <bool Signed>
FUSEDOPT_ALWAYS_INLINE inline void decode_block(const uint8_t* FUSEDOPT_RESTRICT in, float* FUSEDOPT_RESTRICT v,
                                                float scale, int64_t n) {
  for (int64_t j = 0; j < n; ++j) v[j] = dequantize8(in[j], scale, Signed);
}

template <bool Signed>
FUSEDOPT_ALWAYS_INLINE inline void encode_block(const float* FUSEDOPT_RESTRICT v, uint8_t* FUSEDOPT_RESTRICT out,
                                                float inv, int64_t n) {
  const float top = quant_top(Signed);
  for (int64_t j = 0; j < n; ++j) out[j] = quantize8(v[j], inv, top, Signed);
}

// Slot k of the block starting at `begin` (n elements): decoded into `values` with the block's absmax, or encoded from
// them with their new absmax, which is written.
inline void decode_slot(const Quantized& q, int k, int64_t begin, int64_t n, float* values) {
  const float scale = q.absmax[k][begin / kQuantBlock] / q.top[k];
  if (q.is_signed[k])
    decode_block<true>(q.codes[k] + begin, values, scale, n);
  else
    decode_block<false>(q.codes[k] + begin, values, scale, n);
}

inline void encode_slot(const Quantized& q, int k, int64_t begin, int64_t n, const float* values) {
  const float absmax = block_absmax(values, n);
  q.absmax[k][begin / kQuantBlock] = absmax;
  const float inv = encode_factor(absmax, q.top[k]);
  if (q.is_signed[k])
    encode_block<true>(values, q.codes[k] + begin, inv, n);
  else
    encode_block<false>(values, q.codes[k] + begin, inv, n);
}

// One block of [begin, end) (begin on a block boundary, at most kQuantBlock elements) with 8-bit states: the states are
// decoded with the block's absmax, updated with the parameters in float, kept in a local buffer while their new absmax
// is found, then encoded with it. Still one pass over memory: the block's values stay in L1.
template <typename Op, typename Coeffs, typename TP, typename TG, typename IO>
inline void elementwise_block8(const Op op, const Coeffs c, TP* FUSEDOPT_RESTRICT p, const TG* FUSEDOPT_RESTRICT g,
                               const Quantized& q, const IO io, uint32_t key, int64_t begin, int64_t end) {
  float values[algo::kMaxStates][kQuantBlock];
  const int64_t n = end - begin;
  for (int k = 0; k < algo::kMaxStates; ++k)
    if (Op::uses(k)) decode_slot(q, k, begin, n, values[k]);
  float* FUSEDOPT_RESTRICT v0 = values[0];
  float* FUSEDOPT_RESTRICT v1 = values[1];
  float* FUSEDOPT_RESTRICT v2 = values[2];
  for (int64_t j = 0; j < n; ++j) {
    const int64_t i = begin + j;
    float pv = io.read(p, i);
    const float gv = load(g[i]);
    float a = Op::uses(0) ? v0[j] : 0.0f;
    float bb = Op::uses(1) ? v1[j] : 0.0f;
    float cc = Op::uses(2) ? v2[j] : 0.0f;
    op(c, pv, gv, a, bb, cc);
    io.write(p, i, pv, key);
    if (Op::uses(0)) v0[j] = a;
    if (Op::uses(1)) v1[j] = bb;
    if (Op::uses(2)) v2[j] = cc;
  }
  for (int k = 0; k < algo::kMaxStates; ++k)
    if (Op::uses(k)) encode_slot(q, k, begin, n, values[k]);
}

// One parallel region over the work items, static contiguous ranges (one pass over memory).
template <typename Op, typename A>
void run_elementwise(const Op& op, const FlatBuffers& b, const Work& w, const SegmentCoeffs<A>& segment_coeffs,
                     int threads) {
  dispatch_dtypes<true>(b, [&](auto tp, auto tg, auto ts, auto mode) {
    using TP = typename decltype(tp)::type;
    using TG = typename decltype(tg)::type;
    using TS = typename decltype(ts)::type;
    using C = compute_t<TP>;
    using Coeffs = typename A::template Coeffs<C>;
    using IO = ParamIO<TP, decltype(mode)::value>;
    const Coeffs* coeffs = coeffs_of<C>(segment_coeffs);
    TP* p = static_cast<TP*>(b.param);
    const TG* g = static_cast<const TG*>(b.grad);
    TS* s0 = static_cast<TS*>(b.states[0]);
    TS* s1 = static_cast<TS*>(b.states[1]);
    TS* s2 = static_cast<TS*>(b.states[2]);
    const IO io = param_io<TP, decltype(mode)::value>(b);
    const Op local = op;
    if constexpr (std::is_same<TS, uint8_t>::value) {
      const Quantized q = quantized_of(b);
      parallel_ranges(w.items, threads, [&](int64_t first, int64_t last) {
        for (int64_t it = first; it < last; ++it) {
          const int64_t s = w.item_segment[it];
          for (int64_t x = w.item_begin[it]; x < w.item_end[it]; x += kQuantBlock) {
            const int64_t end = w.item_end[it] - x < kQuantBlock ? w.item_end[it] : x + kQuantBlock;
            elementwise_block8<Op, Coeffs, TP, TG, IO>(local, coeffs[s], p, g, q, io, key_of(w, s), x, end);
          }
        }
      });
    } else {
      parallel_ranges(w.items, threads, [&](int64_t first, int64_t last) {
        for (int64_t it = first; it < last; ++it) {
          const int64_t s = w.item_segment[it];
          elementwise_range<Op, Coeffs, C, TP, TG, TS, IO>(local, coeffs[s], p, g, s0, s1, s2, io, key_of(w, s),
                                                           w.item_begin[it], w.item_end[it]);
        }
      });
    }
  });
}

// Sum of squares of [begin, end): element i goes to lane (i - begin) % kNormLanes (16). Each lane sums its fp32
// squares over a block of kNormBlock elements in two 8-float vectors (GCC/Clang vector extension: packed on every ISA;
// wider vector types spill to the stack on AVX2, and plain double lanes stay scalar), then adds the block's lanes into
// double lanes, combined in lane order at the end. The order depends on the index range only, so the result is the same
// for every thread count. Sets *bad when an element is inf/NaN.
typedef float NormVector __attribute__((vector_size(8 * sizeof(float))));
static_assert(kNormLanes == 16, "two 8-float vectors make the 16 lanes");
constexpr int64_t kNormBlock = 64 * kNormLanes;

template <typename T>
FUSEDOPT_HD NormVector load_norm_vector(const T* x) {
  NormVector v;
  if constexpr (std::is_same<T, float>::value) {
    memcpy(&v, x, sizeof(v));
  } else {
    for (int l = 0; l < 8; ++l) v[l] = load(x[l]);
  }
  return v;
}

template <typename T>
inline double sum_squares_range(const T* FUSEDOPT_RESTRICT x, int64_t begin, int64_t end, bool* bad) {
  double lanes[kNormLanes] = {};
  NormVector nonfinite = {};  // v - v: 0 for finite v, NaN for inf/NaN
  int64_t i = begin;
  while (i + kNormLanes <= end) {
    const int64_t block_end = end - i < kNormBlock ? end : i + kNormBlock;
    NormVector low = {}, high = {};
    for (; i + kNormLanes <= block_end; i += kNormLanes) {
      const NormVector a = load_norm_vector(x + i), b = load_norm_vector(x + i + 8);
      low += a * a;
      high += b * b;
      nonfinite += (a - a) + (b - b);
    }
    for (int l = 0; l < 8; ++l) {
      lanes[l] += static_cast<double>(low[l]);
      lanes[8 + l] += static_cast<double>(high[l]);
    }
  }
  bool any_nonfinite = false;
  for (int l = 0; i < end; ++i, ++l) {
    const float v = load(x[i]);
    lanes[l] += square_term(v);
    any_nonfinite |= is_nonfinite(v);
  }
  double total = 0.0;
  for (int l = 0; l < kNormLanes; ++l) total += lanes[l];
  for (int l = 0; l < 8; ++l) any_nonfinite |= nonfinite[l] != 0.0f;  // NaN compares unequal to 0
  *bad = any_nonfinite;
  return total;
}

// float64 elements: squares and sums in double, element i in lane (i - begin) % kNormLanes, the 16 lanes as four
// 4-double vectors (packed on every ISA; two halves on the baseline's SSE2).
typedef double NormVector64 __attribute__((vector_size(4 * sizeof(double))));

template <>
inline double sum_squares_range<double>(const double* FUSEDOPT_RESTRICT x, int64_t begin, int64_t end, bool* bad) {
  NormVector64 vlanes[kNormLanes / 4] = {};
  NormVector64 nonfinite = {};  // v - v: 0 for finite v, NaN for inf/NaN
  int64_t i = begin;
  for (; i + kNormLanes <= end; i += kNormLanes) {
    for (int k = 0; k < kNormLanes / 4; ++k) {
      NormVector64 v;
      memcpy(&v, x + i + 4 * k, sizeof(v));
      vlanes[k] += v * v;
      nonfinite += v - v;
    }
  }
  double lanes[kNormLanes];
  for (int k = 0; k < kNormLanes / 4; ++k)
    for (int l = 0; l < 4; ++l) lanes[4 * k + l] = vlanes[k][l];
  bool any_nonfinite = false;
  for (int l = 0; i < end; ++i, ++l) {
    lanes[l] += square_term(x[i]);
    any_nonfinite |= is_nonfinite(x[i]);
  }
  double total = 0.0;
  for (int l = 0; l < kNormLanes; ++l) total += lanes[l];
  for (int l = 0; l < 4; ++l) any_nonfinite |= nonfinite[l] != 0.0;  // NaN compares unequal to 0
  *bad = any_nonfinite;
  return total;
}

inline void sum_of_squares_kernel(const void* data, int dtype, const Work& w, double* partials,
                                  unsigned char* nonfinite, int threads) {
  auto run = [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* x = static_cast<const T*>(data);
    parallel_ranges(w.items, threads, [&](int64_t first, int64_t last) {
      for (int64_t it = first; it < last; ++it) {
        bool bad = false;
        partials[it] = sum_squares_range<T>(x, w.item_begin[it], w.item_end[it], &bad);
        nonfinite[it] = bad ? 1 : 0;
      }
    });
  };
  if (dtype == kBFloat16)
    run(Type<bf16_t>{});
  else if (dtype == kFloat16)
    run(Type<fp16_t>{});
  else if (dtype == kFloat64)
    run(Type<double>{});
  else
    run(Type<float>{});
}

// Trust-ratio algorithms, two passes in three successive parallel regions, each a join (bytes per parameter:
// docs/cpu_kernels.md):
//   pass 1 reads p (or master), g, m, v; writes m, v; accumulates per-item ||p||^2 and ||u||^2 (u is not stored);
//   combine: per segment, its items' partial sums in item order -> trust ratio -> lr * ratio (deterministic);
//   pass 2 reads p (or master), m, v; recomputes u from the stored moments (bit-identical); writes p (and master).
// Storing u instead would cost a write and a read of n values, the same traffic as re-reading m and v in pass 2,
// and would need a scratch buffer or clobber the gradient.
template <typename A, typename TP, typename TG, typename TS, typename IO>
inline void trust_ratio_pass1(const typename A::template Coeffs<compute_t<TP>> c, const TP* FUSEDOPT_RESTRICT p,
                              const TG* FUSEDOPT_RESTRICT g, TS* FUSEDOPT_RESTRICT m, TS* FUSEDOPT_RESTRICT v,
                              const IO io, int64_t begin, int64_t end, double* w2, double* u2) {
  using C = compute_t<TP>;
  double lw[kNormLanes] = {};
  double lu[kNormLanes] = {};
  auto element = [&](int64_t i, int l) FUSEDOPT_ALWAYS_INLINE {
    const C pv = io.read(p, i);
    C mm = load(m[i]);
    C vv = load(v[i]);
    A::moments(c, load(g[i]), mm, vv);
    const TS ms = store<TS>(mm);
    const TS vs = store<TS>(vv);
    m[i] = ms;
    v[i] = vs;
    // u from the stored (possibly rounded) moments, exactly what pass 2 applies.
    const C u = A::direction(c, pv, load(ms), load(vs));
    lw[l] += square_term(pv);
    lu[l] += square_term(u);
  };
  int64_t i = begin;
  for (; i + kNormLanes <= end; i += kNormLanes)
    for (int l = 0; l < kNormLanes; ++l) element(i + l, l);
  for (int l = 0; i < end; ++i, ++l) element(i, l);
  double sw = 0.0, su = 0.0;
  for (int l = 0; l < kNormLanes; ++l) {
    sw += lw[l];
    su += lu[l];
  }
  *w2 = sw;
  *u2 = su;
}

template <typename A, typename TP, typename TS, typename IO>
inline void trust_ratio_pass2(const typename A::template Coeffs<compute_t<TP>> c, compute_t<TP> scaled_lr,
                              TP* FUSEDOPT_RESTRICT p, const TS* FUSEDOPT_RESTRICT m, const TS* FUSEDOPT_RESTRICT v,
                              const IO io, uint32_t key, int64_t begin, int64_t end) {
  using C = compute_t<TP>;
  for (int64_t i = begin; i < end; ++i) {
    C pv = io.read(p, i);
    A::apply(c, scaled_lr, pv, load(m[i]), load(v[i]));
    io.write(p, i, pv, key);
  }
}

// The two passes with 8-bit moments (quant8.h), block by block: pass 1 decodes m and v, moves them, finds the blocks'
// new absmaxes and encodes them, then decodes the stored codes again so that u (and its sum of squares) comes from
// exactly what pass 2 will read; pass 2 decodes and applies. Element i of an item goes to lane (i - begin) % 16, as
// in the float passes.
template <typename A, typename TP, typename TG, typename IO>
inline void trust_ratio_pass1_8bit(const typename A::template Coeffs<float> c, const TP* FUSEDOPT_RESTRICT p,
                                   const TG* FUSEDOPT_RESTRICT g, const Quantized& q, const IO io, int64_t begin,
                                   int64_t end, double* w2, double* u2) {
  double lw[kNormLanes] = {};
  double lu[kNormLanes] = {};
  float m[kQuantBlock], v[kQuantBlock];
  for (int64_t x = begin; x < end; x += kQuantBlock) {
    const int64_t n = end - x < kQuantBlock ? end - x : kQuantBlock;
    decode_slot(q, 0, x, n, m);
    decode_slot(q, 1, x, n, v);
    for (int64_t j = 0; j < n; ++j) A::moments(c, static_cast<float>(load(g[x + j])), m[j], v[j]);
    encode_slot(q, 0, x, n, m);
    encode_slot(q, 1, x, n, v);
    decode_slot(q, 0, x, n, m);
    decode_slot(q, 1, x, n, v);
    for_each_in_lanes(0, n, [&](int64_t j, int l) FUSEDOPT_ALWAYS_INLINE {
      const float pv = io.read(p, x + j);
      lw[l] += square_term(pv);
      lu[l] += square_term(A::direction(c, pv, m[j], v[j]));
    });
  }
  double sw = 0.0, su = 0.0;
  for (int l = 0; l < kNormLanes; ++l) {
    sw += lw[l];
    su += lu[l];
  }
  *w2 = sw;
  *u2 = su;
}

template <typename A, typename TP, typename IO>
inline void trust_ratio_pass2_8bit(const typename A::template Coeffs<float> c, float scaled_lr,
                                   TP* FUSEDOPT_RESTRICT p, const Quantized& q, const IO io, uint32_t key,
                                   int64_t begin, int64_t end) {
  float m[kQuantBlock], v[kQuantBlock];
  for (int64_t x = begin; x < end; x += kQuantBlock) {
    const int64_t n = end - x < kQuantBlock ? end - x : kQuantBlock;
    decode_slot(q, 0, x, n, m);
    decode_slot(q, 1, x, n, v);
    for (int64_t j = 0; j < n; ++j) {
      float pv = io.read(p, x + j);
      A::apply(c, scaled_lr, pv, m[j], v[j]);
      io.write(p, x + j, pv, key);
    }
  }
}

template <typename A>
void run_trust_ratio(const FlatBuffers& b, const Work& w, const SegmentCoeffs<A>& segment_coeffs, int threads) {
  dispatch_dtypes<true>(b, [&](auto tp, auto tg, auto ts, auto mode) {
    using TP = typename decltype(tp)::type;
    using TG = typename decltype(tg)::type;
    using TS = typename decltype(ts)::type;
    using IO = ParamIO<TP, decltype(mode)::value>;
    const auto* coeffs = coeffs_of<compute_t<TP>>(segment_coeffs);
    TP* p = static_cast<TP*>(b.param);
    const TG* g = static_cast<const TG*>(b.grad);
    TS* m = static_cast<TS*>(b.states[0]);
    TS* v = static_cast<TS*>(b.states[1]);
    const IO io = param_io<TP, decltype(mode)::value>(b);
    const bool moments = (w.passes & kPassMoments) != 0, apply = (w.passes & kPassApply) != 0;
    constexpr bool kQuantized = std::is_same<TS, uint8_t>::value;
    [[maybe_unused]] const Quantized q = kQuantized ? quantized_of(b) : Quantized{};
    if (moments) {
      parallel_ranges(w.items, threads, [&](int64_t first, int64_t last) {
        for (int64_t it = first; it < last; ++it) {
          if constexpr (kQuantized)
            trust_ratio_pass1_8bit<A, TP, TG, IO>(coeffs[w.item_segment[it]], p, g, q, io, w.item_begin[it],
                                                  w.item_end[it], &w.partial_w[it], &w.partial_u[it]);
          else
            trust_ratio_pass1<A, TP, TG, TS, IO>(coeffs[w.item_segment[it]], p, g, m, v, io, w.item_begin[it],
                                                 w.item_end[it], &w.partial_w[it], &w.partial_u[it]);
        }
      });
    }
    // Per segment: its sums from its items' partials in item order, then lr * trust ratio. A segment reads only its
    // own sums, so both fit in one region after pass 1's join.
    parallel_ranges(w.segments, threads, [&](int64_t first, int64_t last) {
      for (int64_t s = first; s < last; ++s) {
        if (moments) A::segment_sums(w.seg_first, w.partial_w, w.partial_u, s, w.segment_w2[s], w.segment_u2[s]);
        if (apply) w.scaled_lr[s] = A::scaled_lr(coeffs[s], w.segment_w2[s], w.segment_u2[s]);
      }
    });
    if (apply) {
      parallel_ranges(w.items, threads, [&](int64_t first, int64_t last) {
        for (int64_t it = first; it < last; ++it) {
          const int64_t s = w.item_segment[it];
          if constexpr (kQuantized)
            trust_ratio_pass2_8bit<A, TP, IO>(coeffs[s], w.scaled_lr[s], p, q, io, key_of(w, s), w.item_begin[it],
                                              w.item_end[it]);
          else
            trust_ratio_pass2<A, TP, TS, IO>(coeffs[s], w.scaled_lr[s], p, m, v, io, key_of(w, s),
                                             w.item_begin[it], w.item_end[it]);
        }
      });
    }
  });
}

// Factored algorithms (Adafactor): three passes, each a few parallel regions (joins); a sharded parameter's sums are
// all-reduced between the passes (kPassMoments, kPassNorms, kPassApply; api.h). Segment s (layout row L) is a stack of
// lead x rows x cols matrices, or a vector:
//   moments: per row item, each row's mean square of the scaled gradient moves its row factor, and the item's sum of
//            p^2; per column item, each column's sum of squares over the rows, in row order; per work item of a
//            vector, the variance moves, and the item's sum of p^2; per segment, its row factors' sum for each leading
//            index and its sum of p^2, from its items in item order;
//   norms:   per column item, the column factors move to the column sums / total rows; per segment, the row sums
//            become the row means (floored at eps1); per work item, the sum of u^2 (u from the stored states); per
//            segment, its sum of u^2 in item order;
//   apply:   per segment, the step size from its sums; per work item, p = p*(1 - lr*wd) + step_size*u.
// Every sum has a fixed order that depends on the layout alone, so the result is the same for every thread count.

// Calls f(i, lane) for i in [begin, end), element begin + k in lane k % kNormLanes, in blocks the compiler vectorises.
template <typename F>
FUSEDOPT_ALWAYS_INLINE inline void for_each_in_lanes(int64_t begin, int64_t end, F&& f) {
  int64_t i = begin;
  for (; i + kNormLanes <= end; i += kNormLanes)
    for (int l = 0; l < kNormLanes; ++l) f(i + l, l);
  for (int l = 0; i < end; ++i, ++l) f(i, l);
}

FUSEDOPT_ALWAYS_INLINE inline double lane_total(const double* lanes) {
  double total = 0.0;
  for (int l = 0; l < kNormLanes; ++l) total += lanes[l];
  return total;
}

template <typename A>
void run_factored(const FlatBuffers& b, const Work& w, const SegmentCoeffs<A>& segment_coeffs, int threads) {
  dispatch_dtypes(b, [&](auto tp, auto tg, auto ts, auto mode) {
    using TP = typename decltype(tp)::type;
    using TG = typename decltype(tg)::type;
    using TS = typename decltype(ts)::type;
    using C = compute_t<TP>;
    using Coeffs = typename A::template Coeffs<C>;
    const ParamIO<TP, decltype(mode)::value> io = param_io<TP, decltype(mode)::value>(b);
    const Coeffs* coeffs = coeffs_of<C>(segment_coeffs);
    TP* p = static_cast<TP*>(b.param);
    const TG* g = static_cast<const TG*>(b.grad);
    TS* row_var = static_cast<TS*>(b.states[0]);
    TS* col_var = static_cast<TS*>(b.states[1]);
    TS* variance = static_cast<TS*>(b.states[2]);
    double* sums = w.factor_sums;
    auto param_at = [&](int64_t i) FUSEDOPT_ALWAYS_INLINE { return io.read(p, i); };
    auto grad_at = [&](const Coeffs& c, int64_t i) FUSEDOPT_ALWAYS_INLINE { return load(g[i]) * c.grad_scale; };
    auto at = [&](int64_t s, int column) { return w.layout[s * kLayoutColumns + column]; };
    auto factored = [&](int64_t s) { return at(s, kTotalRows) > 0; };
    // u of every element of [begin, end) of factored segment s, from the stored factors and the row means, row by row.
    auto for_each_factored = [&](int64_t s, int64_t begin, int64_t end, auto&& f) FUSEDOPT_ALWAYS_INLINE {
      const int64_t rows = at(s, kRows), cols = at(s, kCols), off = w.offsets[s];
      const TS* rv = row_var + at(s, kRowVarAt);
      const TS* cv_all = col_var + at(s, kColVarAt);
      const double* means = sums + at(s, kRowSumAt);
      const Coeffs c = coeffs[s];
      int64_t i = begin;
      while (i < end) {
        const int64_t q = (i - off) / cols, j0 = (i - off) - q * cols, lead = q / rows;
        const int64_t n = end - i < cols - j0 ? end - i : cols - j0;
        const C row_factor = load(rv[q]);
        const C mean = static_cast<C>(means[lead]);
        const TS* cv = cv_all + lead * cols + j0 - i;
        for_each_in_lanes(i, i + n, [&](int64_t k, int l) FUSEDOPT_ALWAYS_INLINE {
          f(k, A::direction(c, grad_at(c, k), A::factored_estimate(row_factor, load(cv[k]), mean)), l);
        });
        i += n;
      }
    };
    // u of every element of [begin, end) of vector segment s, from its stored variance.
    auto for_each_vector = [&](int64_t s, int64_t begin, int64_t end, auto&& f) FUSEDOPT_ALWAYS_INLINE {
      const TS* var = variance + at(s, kVarianceAt) - w.offsets[s];
      const Coeffs c = coeffs[s];
      for_each_in_lanes(begin, end, [&](int64_t k, int l) FUSEDOPT_ALWAYS_INLINE {
        f(k, A::direction(c, grad_at(c, k), load(var[k])), l);
      });
    };

    if (w.passes & kPassMoments) {
      parallel_ranges(w.row_items, threads, [&](int64_t first, int64_t last) {
        for (int64_t it = first; it < last; ++it) {
          const int64_t s = w.row_item[3 * it], cols = at(s, kCols), off = w.offsets[s];
          const Coeffs c = coeffs[s];
          TS* rv = row_var + at(s, kRowVarAt);
          double lp[kNormLanes] = {};
          for (int64_t q = w.row_item[3 * it + 1]; q < w.row_item[3 * it + 2]; ++q) {
            double lg[kNormLanes] = {};
            for_each_in_lanes(off + q * cols, off + (q + 1) * cols, [&](int64_t i, int l) FUSEDOPT_ALWAYS_INLINE {
              lg[l] += square_term(grad_at(c, i));
              lp[l] += square_term(param_at(i));
            });
            const C mean_square = static_cast<C>(lane_total(lg) / static_cast<double>(cols));
            rv[q] = store<TS>(A::moved_factor(c, load(rv[q]), mean_square));
          }
          w.row_partial_w[it] = lane_total(lp);
        }
      });
      parallel_ranges(w.col_items, threads, [&](int64_t first, int64_t last) {
        for (int64_t it = first; it < last; ++it) {
          const int64_t* item = w.col_item + 4 * it;
          const int64_t s = item[0], lead = item[1], c0 = item[2], width = item[3] - item[2];
          const int64_t rows = at(s, kRows), cols = at(s, kCols);
          const Coeffs c = coeffs[s];
          const int64_t base = w.offsets[s] + lead * rows * cols + c0;
          double acc[kColumnBlock] = {};
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t j = 0; j < width; ++j) acc[j] += square_term(grad_at(c, base + r * cols + j));
          double* out = sums + at(s, kColSumAt) + lead * cols + c0;
          for (int64_t j = 0; j < width; ++j) out[j] = acc[j];
        }
      });
      parallel_ranges(w.items, threads, [&](int64_t first, int64_t last) {
        for (int64_t it = first; it < last; ++it) {
          const int64_t s = w.item_segment[it];
          if (factored(s)) continue;
          const Coeffs c = coeffs[s];
          TS* var = variance + at(s, kVarianceAt) - w.offsets[s];
          double lp[kNormLanes] = {};
          for_each_in_lanes(w.item_begin[it], w.item_end[it], [&](int64_t i, int l) FUSEDOPT_ALWAYS_INLINE {
            const C gv = grad_at(c, i);
            var[i] = store<TS>(A::moved_factor(c, load(var[i]), gv * gv));
            lp[l] += square_term(param_at(i));
          });
          w.partial_w[it] = lane_total(lp);
        }
      });
      parallel_ranges(w.segments, threads, [&](int64_t first, int64_t last) {
        for (int64_t s = first; s < last; ++s) {
          if (w.active[s] == 0) continue;
          double p2 = 0.0;
          if (factored(s)) {
            for (int64_t it = w.row_first[s]; it < w.row_first[s + 1]; ++it) p2 += w.row_partial_w[it];
            const int64_t rows = at(s, kRows);
            const TS* rv = row_var + at(s, kRowVarAt);
            for (int64_t lead = 0; lead < at(s, kLead); ++lead) {
              double total = 0.0;
              for (int64_t r = 0; r < rows; ++r) total += static_cast<double>(load(rv[lead * rows + r]));
              sums[at(s, kRowSumAt) + lead] = total;
            }
          } else {
            for (int64_t it = w.seg_first[s]; it < w.seg_first[s + 1]; ++it) p2 += w.partial_w[it];
          }
          w.segment_w2[s] = p2;
        }
      });
    }
    if (w.passes & kPassNorms) {
      parallel_ranges(w.col_items, threads, [&](int64_t first, int64_t last) {
        for (int64_t it = first; it < last; ++it) {
          const int64_t* item = w.col_item + 4 * it;
          const int64_t s = item[0], lead = item[1], cols = at(s, kCols);
          const double total_rows = static_cast<double>(at(s, kTotalRows));
          const Coeffs c = coeffs[s];
          TS* cv = col_var + at(s, kColVarAt) + lead * cols;
          const double* column_sums = sums + at(s, kColSumAt) + lead * cols;
          for (int64_t j = item[2]; j < item[3]; ++j)
            cv[j] = store<TS>(A::moved_factor(c, load(cv[j]), static_cast<C>(column_sums[j] / total_rows)));
        }
      });
      parallel_ranges(w.segments, threads, [&](int64_t first, int64_t last) {
        for (int64_t s = first; s < last; ++s) {
          if (w.active[s] == 0 || !factored(s)) continue;
          const double total_rows = static_cast<double>(at(s, kTotalRows));
          double* row_sums = sums + at(s, kRowSumAt);
          for (int64_t lead = 0; lead < at(s, kLead); ++lead)
            row_sums[lead] = static_cast<double>(A::row_mean(coeffs[s], static_cast<C>(row_sums[lead] / total_rows)));
        }
      });
      parallel_ranges(w.items, threads, [&](int64_t first, int64_t last) {
        for (int64_t it = first; it < last; ++it) {
          const int64_t s = w.item_segment[it];
          double lu[kNormLanes] = {};
          auto add = [&](int64_t, C u, int l) FUSEDOPT_ALWAYS_INLINE { lu[l] += square_term(u); };
          if (factored(s))
            for_each_factored(s, w.item_begin[it], w.item_end[it], add);
          else
            for_each_vector(s, w.item_begin[it], w.item_end[it], add);
          w.partial_u[it] = lane_total(lu);
        }
      });
      for (int64_t s = 0; s < w.segments; ++s) {
        if (w.active[s] == 0) continue;
        double u2 = 0.0;
        for (int64_t it = w.seg_first[s]; it < w.seg_first[s + 1]; ++it) u2 += w.partial_u[it];
        w.segment_u2[s] = u2;
      }
    }
    if (w.passes & kPassApply) {
      for (int64_t s = 0; s < w.segments; ++s)
        if (w.active[s] != 0)
          w.step_size[s] =
              static_cast<double>(A::step_size(coeffs[s], w.segment_w2[s], w.segment_u2[s], at(s, kNumel)));
      parallel_ranges(w.items, threads, [&](int64_t first, int64_t last) {
        for (int64_t it = first; it < last; ++it) {
          const int64_t s = w.item_segment[it];
          const Coeffs c = coeffs[s];
          const C step = static_cast<C>(w.step_size[s]);
          const uint32_t key = key_of(w, s);
          auto update = [&](int64_t i, C u, int) FUSEDOPT_ALWAYS_INLINE {
            C pv = param_at(i);
            A::apply(c, step, pv, u);
            io.write(p, i, pv, key);
          };
          if (factored(s))
            for_each_factored(s, w.item_begin[it], w.item_end[it], update);
          else
            for_each_vector(s, w.item_begin[it], w.item_end[it], update);
        }
      });
    }
  });
}

// The kernel of algorithm A: its driver, chosen by its kind, with the op its modes select.
template <typename A>
void kernel(const FlatBuffers& b, const typename A::Hyper& h, const Work& w, const SegmentCoeffs<A>& coeffs,
            int threads) {
  if constexpr (A::kKind == algo::Kind::kElementwise) {
    A::with_op(h, [&](auto op) { run_elementwise(op, b, w, coeffs, threads); });
  } else if constexpr (A::kKind == algo::Kind::kTrustRatio) {
    run_trust_ratio<A>(b, w, coeffs, threads);
  } else {
    run_factored<A>(b, w, coeffs, threads);
  }
}

}  // namespace FUSEDOPT_ISA_NS
}  // namespace cpu
}  // namespace fusedopt
