// LAMB: hyperparameters, per-segment coefficients and the per-element pieces (moment update, update direction,
// trust-ratio step), shared by the CPU driver and the CUDA kernels. You et al. 2020, "Large Batch Optimization for Deep
// Learning", Algorithm 2 (no torch.optim counterpart; first/second moment EMAs, norms per parameter tensor).
// A trust-ratio algorithm: the drivers run pass 1 (moments, per-segment sums of squares of p and u), combine the sums
// per segment, then pass 2 (the update); see csrc/cpu/driver.h.
#pragma once

#include <math.h>

#include "fusedopt/algorithm.h"

namespace fusedopt {
namespace algo {

struct lamb {
  static constexpr Kind kKind = Kind::kTrustRatio;
  static constexpr const char* kStates[] = {"exp_avg", "exp_avg_sq"};
  // max_trust_ratio < 0 (or NaN) means no clamp (Python's None).
  struct Hyper {
    double beta1, beta2, eps, weight_decay, bias_correction, max_trust_ratio, maximize;
  };
  static constexpr const char* kFields[] = {"beta1",           "beta2",           "eps",     "weight_decay",
                                            "bias_correction", "max_trust_ratio", "maximize"};

  FUSEDOPT_HD static bool uses_state(const Hyper&, int k) { return k < 2; }

  // T is the compute type: float, or double for float64 parameters.
  template <typename T>
  struct Coeffs {
    T grad_scale;            // negated when maximize
    T beta1_weight;          // 1 - beta1
    T beta2;                 //
    T one_minus_beta2;       //
    T bc1;                   // 1 - beta1^step, or 1 without bias correction (m/1 is exact)
    T bc2;                   // 1 - beta2^step, or 1
    T eps;                   //
    T weight_decay;          //
    bool has_weight_decay;   // weight_decay != 0
    double lr;               // the trust ratio multiplies lr in double
    double max_trust_ratio;  //
  };

  template <typename T>
  FUSEDOPT_HD static Coeffs<T> make_coeffs(const Hyper& h, double lr, double step, double grad_scale) {
    const bool bias_correction = h.bias_correction != 0.0;
    Coeffs<T> c;
    c.grad_scale = signed_grad_scale<T>(h, grad_scale);
    c.beta1_weight = static_cast<T>(1.0 - h.beta1);
    c.beta2 = static_cast<T>(h.beta2);
    c.one_minus_beta2 = static_cast<T>(1.0 - h.beta2);
    c.bc1 = bias_correction ? static_cast<T>(1.0 - pow(h.beta1, step)) : T(1);
    c.bc2 = bias_correction ? static_cast<T>(1.0 - pow(h.beta2, step)) : T(1);
    c.eps = static_cast<T>(h.eps);
    c.weight_decay = static_cast<T>(h.weight_decay);
    c.has_weight_decay = h.weight_decay != 0.0;
    c.lr = lr;
    c.max_trust_ratio = h.max_trust_ratio;
    return c;
  }

  // u = m/bc1 / (sqrt(v/bc2) + eps) + wd * p: a pure function of the stored moments, so pass 2 recomputes it bit for
  // bit.
  template <typename T>
  FUSEDOPT_HD static T direction(const Coeffs<T>& c, T p, T exp_avg, T exp_avg_sq) {
    T u = (exp_avg / c.bc1) / (square_root(exp_avg_sq / c.bc2) + c.eps);
    u = uniform_select(c.has_weight_decay, u + c.weight_decay * p, u);
    return u;
  }

  // Pass 1: update the moments in place; p is read, not written.
  template <typename T>
  FUSEDOPT_HD static void moments(const Coeffs<T>& c, T g, T& exp_avg, T& exp_avg_sq) {
    g *= c.grad_scale;
    exp_avg = lerp(exp_avg, g, c.beta1_weight);
    exp_avg_sq = exp_avg_sq * c.beta2 + c.one_minus_beta2 * g * g;
  }

  // Between the passes, per segment: the sums of squares of p and u over its work items, added in item order (fixed, so
  // the norms are bitwise reproducible).
  FUSEDOPT_HD static void segment_sums(const int64_t* seg_first, const double* partial_w, const double* partial_u,
                                       int64_t segment, double& w2, double& u2) {
    w2 = 0.0;
    u2 = 0.0;
    for (int64_t it = seg_first[segment]; it < seg_first[segment + 1]; ++it) {
      w2 += partial_w[it];
      u2 += partial_u[it];
    }
  }

  // lr * ||p|| / ||u||, the ratio 1 when either norm is 0 and clamped to max_trust_ratio unless that is negative or
  // NaN (None); rounded once to T.
  template <typename T>
  FUSEDOPT_HD static T scaled_lr(const Coeffs<T>& c, double w2, double u2) {
    const double wn = sqrt(w2), un = sqrt(u2);
    double ratio = (wn > 0.0 && un > 0.0) ? wn / un : 1.0;
    if (c.max_trust_ratio >= 0.0 && ratio > c.max_trust_ratio) ratio = c.max_trust_ratio;
    return static_cast<T>(c.lr * ratio);
  }

  // Pass 2: p -= (lr * trust_ratio) * u.
  template <typename T>
  FUSEDOPT_HD static void apply(const Coeffs<T>& c, T scaled_lr, T& p, T exp_avg, T exp_avg_sq) {
    p -= scaled_lr * direction(c, p, exp_avg, exp_avg_sq);
  }
};

}  // namespace algo
}  // namespace fusedopt
