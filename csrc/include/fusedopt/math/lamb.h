// Per-element LAMB pieces (moment update, update direction, trust-ratio step), shared by CPU and CUDA.
// You et al. 2020, "Large Batch Optimization for Deep Learning", Algorithm 2 (no torch.optim counterpart; moments as
// torch.optim.adam, norms per parameter tensor). The drivers run two passes, see csrc/cpu/driver.h.
#pragma once

#include <math.h>

#include "fusedopt/common.h"

namespace fusedopt {

struct LambCoeffs {
  float grad_scale;       // grad_scale, negated when maximize
  float beta1_weight;     // 1 - beta1
  float beta2;            //
  float one_minus_beta2;  //
  float bc1;              // 1 - beta1^step, or 1 without bias correction (m/1 is exact)
  float bc2;              // 1 - beta2^step, or 1
  float eps;              //
  float weight_decay;     //
  bool has_weight_decay;  // weight_decay != 0
};

// u = m/bc1 / (sqrt(v/bc2) + eps) + wd * p: a pure function of the stored moments, so pass 2 recomputes it bit for bit.
FUSEDOPT_HD float lamb_direction(const LambCoeffs& c, float p, float exp_avg, float exp_avg_sq) {
  float u = (exp_avg / c.bc1) / (sqrtf(exp_avg_sq / c.bc2) + c.eps);
  u = uniform_select(c.has_weight_decay, u + c.weight_decay * p, u);
  return u;
}

// Pass 1: update the moments in place and return u (for the norm); p is read, not written.
FUSEDOPT_HD float lamb_moments(const LambCoeffs& c, float p, float g, float& exp_avg, float& exp_avg_sq) {
  g *= c.grad_scale;
  exp_avg = lerp(exp_avg, g, c.beta1_weight);
  exp_avg_sq = exp_avg_sq * c.beta2 + c.one_minus_beta2 * g * g;
  return lamb_direction(c, p, exp_avg, exp_avg_sq);
}

// Between the passes, per segment: the sums of squares of p and u over its work items, added in item order (fixed, so
// the norms are bitwise reproducible), then lr * trust ratio.
FUSEDOPT_HD void lamb_segment_sums(const int64_t* seg_first, const double* partial_w, const double* partial_u,
                                   int64_t segment, double& w2, double& u2) {
  w2 = 0.0;
  u2 = 0.0;
  for (int64_t it = seg_first[segment]; it < seg_first[segment + 1]; ++it) {
    w2 += partial_w[it];
    u2 += partial_u[it];
  }
}

// ||p|| / ||u||, 1 when either norm is 0, clamped to max_trust_ratio unless that is negative or NaN (None); times lr.
FUSEDOPT_HD float lamb_scaled_lr(double w2, double u2, double lr, double max_trust_ratio) {
  const double wn = sqrt(w2), un = sqrt(u2);
  double ratio = (wn > 0.0 && un > 0.0) ? wn / un : 1.0;
  if (max_trust_ratio >= 0.0 && ratio > max_trust_ratio) ratio = max_trust_ratio;
  return static_cast<float>(lr * ratio);
}

// Pass 2: p -= (lr * trust_ratio) * u, with lr * trust_ratio computed per segment in double.
FUSEDOPT_HD void lamb_apply(const LambCoeffs& c, float scaled_lr, float& p, float exp_avg, float exp_avg_sq) {
  p -= scaled_lr * lamb_direction(c, p, exp_avg, exp_avg_sq);
}

}  // namespace fusedopt
