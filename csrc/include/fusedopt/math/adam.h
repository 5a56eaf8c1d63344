// Per-element Adam / AdamW update, shared by the CPU driver and the CUDA launcher.
// Kingma & Ba 2015, Algorithm 1 (AdamW: Loshchilov & Hutter 2019, Algorithm 2, line 12); torch.optim.adam._single_tensor_adam.
#pragma once

#include "fusedopt/common.h"

namespace fusedopt {

// Coefficients computed once per step on the host in double, rounded once to float.
struct AdamCoeffs {
  float grad_scale;       // grad_scale, negated when maximize
  float beta1_weight;     // 1 - beta1: lerp weight of the first moment
  float beta2;            //
  float one_minus_beta2;  //
  float eps;              //
  float weight_decay;     // L2 coefficient added to the gradient (0 when decoupled)
  float decay;            // decoupled: 1 - lr * weight_decay, else 1
  float step_size;        // lr / (1 - beta1^step)
  float bc2_sqrt;         // sqrt(1 - beta2^step)
  bool coupled_wd;        // weight_decay != 0 and not decoupled
};

// m = lerp(m, g, 1-beta1); v = beta2 v + (1-beta2) g^2; p -= step_size * m / (sqrt(v or vmax) / sqrt(bc2) + eps)
template <bool Amsgrad>
FUSEDOPT_HD void adam_update(const AdamCoeffs& c, float& p, float g, float& exp_avg, float& exp_avg_sq,
                             float& max_exp_avg_sq) {
  g *= c.grad_scale;
  p *= c.decay;  // exact when 1
  g = uniform_select(c.coupled_wd, g + c.weight_decay * p, g);
  exp_avg = lerp(exp_avg, g, c.beta1_weight);
  exp_avg_sq = exp_avg_sq * c.beta2 + c.one_minus_beta2 * g * g;
  float second = exp_avg_sq;
  if (Amsgrad) {
    max_exp_avg_sq = nan_maximum(max_exp_avg_sq, exp_avg_sq);
    second = max_exp_avg_sq;
  }
  const float denom = sqrtf(second) / c.bc2_sqrt + c.eps;
  p -= c.step_size * (exp_avg / denom);
}

// Functor view for the drivers: state 0 exp_avg, 1 exp_avg_sq, 2 max_exp_avg_sq (amsgrad only).
template <bool Amsgrad>
struct AdamOp {
  static constexpr int kStates = Amsgrad ? 3 : 2;
  FUSEDOPT_HD static constexpr bool uses(int k) { return k < kStates; }
  AdamCoeffs c;
  FUSEDOPT_HD void operator()(float& p, float g, float& s0, float& s1, float& s2) const {
    adam_update<Amsgrad>(c, p, g, s0, s1, s2);
  }
};

}  // namespace fusedopt
