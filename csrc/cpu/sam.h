// SAM's CPU kernels on the driver (driver.h): the perturbation w -> w + e with its backup, its exact undo, and ASAM's
// deterministic sum of squares of |w| * g, each one parallel region over the work items of the active segments.
// Included by kernels.cpp after driver.h, so it is compiled once per ISA into FUSEDOPT_ISA_NS.
#pragma once

#include "driver.h"
#include "fusedopt/math/sam.h"

namespace fusedopt {
namespace cpu {
namespace FUSEDOPT_ISA_NS {

// p := round(w + e), w from the master weights or from p itself; without master weights the same pass copies p's bits
// into the backup, which the undo copies back (p + e - e is not p in floating point).
template <bool Adaptive, bool Master, typename C, typename TP, typename TG>
inline void sam_perturb_range(C scale, TP* FUSEDOPT_RESTRICT p, const TG* FUSEDOPT_RESTRICT g,
                              const float* FUSEDOPT_RESTRICT master, TP* FUSEDOPT_RESTRICT backup, int64_t begin,
                              int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    C w;
    if constexpr (Master) {
      w = master[i];
    } else {
      const TP stored = p[i];
      backup[i] = stored;
      w = load(stored);
    }
    p[i] = store<TP>(sam::perturbed<Adaptive>(w, static_cast<C>(load(g[i])), scale));
  }
}

inline void sam_perturb_kernel(const SamBuffers& b, const Work& w, double scale, bool adaptive, int threads) {
  dispatch_param_grad(b.param_dtype, b.grad_dtype, b.master != nullptr ? kParamMaster : kParamNearest, [&](auto tp, auto tg, auto master) {
    using TP = typename decltype(tp)::type;
    using TG = typename decltype(tg)::type;
    using C = compute_t<TP>;
    constexpr bool kMaster = decltype(master)::value;
    TP* p = static_cast<TP*>(b.param);
    const TG* g = static_cast<const TG*>(b.grad);
    TP* backup = static_cast<TP*>(b.backup);
    const C s = static_cast<C>(scale);  // rounded once, as the reference rounds its Python float
    auto run = [&](auto adaptive_tag) {
      constexpr bool kAdaptive = decltype(adaptive_tag)::value;
      parallel_ranges(w.items, threads, [&](int64_t first, int64_t last) {
        for (int64_t it = first; it < last; ++it)
          sam_perturb_range<kAdaptive, kMaster, C, TP, TG>(s, p, g, b.master, backup, w.item_begin[it],
                                                          w.item_end[it]);
      });
    };
    if (adaptive)
      run(Bool<true>{});
    else
      run(Bool<false>{});
  });
}

// Undo: p := round(master) with master weights (the master was never perturbed), else p := backup, bit for bit.
inline void sam_restore_kernel(const SamBuffers& b, const Work& w, int threads) {
  dispatch_param_grad(b.param_dtype, b.grad_dtype, b.master != nullptr ? kParamMaster : kParamNearest, [&](auto tp, auto, auto master) {
    using TP = typename decltype(tp)::type;
    constexpr bool kMaster = decltype(master)::value;
    TP* FUSEDOPT_RESTRICT p = static_cast<TP*>(b.param);
    const TP* FUSEDOPT_RESTRICT backup = static_cast<const TP*>(b.backup);
    const float* FUSEDOPT_RESTRICT m = b.master;
    parallel_ranges(w.items, threads, [&](int64_t first, int64_t last) {
      for (int64_t it = first; it < last; ++it) {
        const int64_t begin = w.item_begin[it], end = w.item_end[it];
        if constexpr (kMaster) {
          for (int64_t i = begin; i < end; ++i) p[i] = store<TP>(m[i]);
        } else {
          memcpy(p + begin, backup + begin, static_cast<size_t>(end - begin) * sizeof(TP));
        }
      }
    });
  });
}

// Sum of squares of |w| * g over [begin, end), w from the master weights when there are some: element i goes to lane
// (i - begin) % kNormLanes (double lanes, combined in lane order), so the result depends on the index range alone.
template <bool Master, typename C, typename TP, typename TG>
inline double sam_adaptive_range(const TP* FUSEDOPT_RESTRICT p, const TG* FUSEDOPT_RESTRICT g,
                                 const float* FUSEDOPT_RESTRICT master, int64_t begin, int64_t end, bool* bad) {
  double lanes[kNormLanes] = {};
  bool any_nonfinite = false;
  auto element = [&](int64_t i, int l) FUSEDOPT_ALWAYS_INLINE {
    const C w = Master ? static_cast<C>(master[i]) : load(p[i]);
    const C t = sam::adaptive_norm_term(w, static_cast<C>(load(g[i])));
    lanes[l] += square_term(t);
    any_nonfinite |= is_nonfinite(t);
  };
  int64_t i = begin;
  for (; i + kNormLanes <= end; i += kNormLanes)
    for (int l = 0; l < kNormLanes; ++l) element(i + l, l);
  for (int l = 0; i < end; ++i, ++l) element(i, l);
  double total = 0.0;
  for (int l = 0; l < kNormLanes; ++l) total += lanes[l];
  *bad = any_nonfinite;
  return total;
}

inline void sam_sum_of_squares_kernel(const SamBuffers& b, const Work& w, double* partials, unsigned char* nonfinite,
                                      int threads) {
  dispatch_param_grad(b.param_dtype, b.grad_dtype, b.master != nullptr ? kParamMaster : kParamNearest, [&](auto tp, auto tg, auto master) {
    using TP = typename decltype(tp)::type;
    using TG = typename decltype(tg)::type;
    constexpr bool kMaster = decltype(master)::value;
    const TP* p = static_cast<const TP*>(b.param);
    const TG* g = static_cast<const TG*>(b.grad);
    parallel_ranges(w.items, threads, [&](int64_t first, int64_t last) {
      for (int64_t it = first; it < last; ++it) {
        bool bad = false;
        partials[it] = sam_adaptive_range<kMaster, compute_t<TP>, TP, TG>(p, g, b.master, w.item_begin[it],
                                                                          w.item_end[it], &bad);
        nonfinite[it] = bad ? 1 : 0;
      }
    });
  });
}

}  // namespace FUSEDOPT_ISA_NS
}  // namespace cpu
}  // namespace fusedopt
