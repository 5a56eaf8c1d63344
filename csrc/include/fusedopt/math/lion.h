// Per-element Lion update, shared by the CPU driver and the CUDA launcher.
// Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2 (no torch.optim counterpart;
// the lerp follows torch's formula so it matches the reference, which uses torch.lerp).
#pragma once

#include "fusedopt/common.h"

namespace fusedopt {

struct LionCoeffs {
  float grad_scale;    // grad_scale, negated when maximize
  float lr;            //
  float decay;         // 1 - lr * weight_decay
  float beta1_weight;  // 1 - beta1: interpolation for the update direction
  float beta2_weight;  // 1 - beta2: interpolation for the stored momentum
};

// p = p*(1 - lr wd); p -= lr * sign(lerp(m, g, 1-beta1)); m = lerp(m, g, 1-beta2)
FUSEDOPT_HD void lion_update(const LionCoeffs& c, float& p, float g, float& exp_avg) {
  g *= c.grad_scale;
  p *= c.decay;
  p -= c.lr * sign(lerp(exp_avg, g, c.beta1_weight));
  exp_avg = lerp(exp_avg, g, c.beta2_weight);
}

// State 0: exp_avg.
struct LionOp {
  static constexpr int kStates = 1;
  FUSEDOPT_HD static constexpr bool uses(int k) { return k < kStates; }
  LionCoeffs c;
  FUSEDOPT_HD void operator()(float& p, float g, float& s0, float&, float&) const { lion_update(c, p, g, s0); }
};

}  // namespace fusedopt
