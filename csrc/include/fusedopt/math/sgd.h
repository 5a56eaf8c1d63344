// Per-element SGD (with momentum, dampening, Nesterov), shared by the CPU driver and the CUDA launcher.
// Sutskever et al. 2013, eq. 1-2 (Nesterov: eq. 3-4, torch's formulation); torch.optim.sgd._single_tensor_sgd.
#pragma once

#include "fusedopt/common.h"

namespace fusedopt {

struct SgdCoeffs {
  float grad_scale;        // grad_scale, negated when maximize
  float lr;                //
  float weight_decay;      //
  float momentum;          //
  float one_minus_damp;    // 1 - dampening
  bool has_weight_decay;   // weight_decay != 0
  bool nesterov;           //
  bool first_step;         // momentum_buffer is initialised to the gradient on the first step
};

// buf = first ? g : momentum*buf + (1-dampening)*g;  g = nesterov ? g + momentum*buf : buf;  p -= lr*g
template <bool Momentum>
FUSEDOPT_HD void sgd_update(const SgdCoeffs& c, float& p, float g, float& momentum_buffer) {
  g *= c.grad_scale;
  g = uniform_select(c.has_weight_decay, g + c.weight_decay * p, g);
  if (Momentum) {
    momentum_buffer = uniform_select(c.first_step, g, momentum_buffer * c.momentum + c.one_minus_damp * g);
    g = uniform_select(c.nesterov, g + c.momentum * momentum_buffer, momentum_buffer);
  }
  p -= c.lr * g;
}

// State 0: momentum_buffer (only when momentum != 0).
template <bool Momentum>
struct SgdOp {
  static constexpr int kStates = Momentum ? 1 : 0;
  FUSEDOPT_HD static constexpr bool uses(int k) { return k < kStates; }
  SgdCoeffs c;
  FUSEDOPT_HD void operator()(float& p, float g, float& s0, float&, float&) const { sgd_update<Momentum>(c, p, g, s0); }
};

}  // namespace fusedopt
