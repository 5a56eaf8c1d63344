// Per-element Adagrad, shared by the CPU driver and the CUDA launcher.
// Duchi, Hazan & Singer 2011, eq. (1) diagonal form; torch.optim.adagrad._single_tensor_adagrad.
#pragma once

#include "fusedopt/common.h"

namespace fusedopt {

struct AdagradCoeffs {
  float grad_scale;       // grad_scale, negated when maximize
  float clr;              // lr / (1 + (step - 1) * lr_decay)
  float eps;              //
  float weight_decay;     //
  bool has_weight_decay;  // weight_decay != 0
};

// sum += g^2; p -= clr * g / (sqrt(sum) + eps)
FUSEDOPT_HD void adagrad_update(const AdagradCoeffs& c, float& p, float g, float& sum) {
  g *= c.grad_scale;
  g = uniform_select(c.has_weight_decay, g + c.weight_decay * p, g);
  sum += g * g;
  p -= c.clr * (g / (sqrtf(sum) + c.eps));
}

// State 0: sum.
struct AdagradOp {
  static constexpr int kStates = 1;
  FUSEDOPT_HD static constexpr bool uses(int k) { return k < kStates; }
  AdagradCoeffs c;
  FUSEDOPT_HD void operator()(float& p, float g, float& s0, float&, float&) const { adagrad_update(c, p, g, s0); }
};

}  // namespace fusedopt
