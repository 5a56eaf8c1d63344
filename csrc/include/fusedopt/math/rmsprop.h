// Per-element RMSprop (optionally centered, with momentum), shared by the CPU driver and the CUDA launcher.
// Hinton, Coursera lecture 6e; centered form: Graves 2013, eq. 38-40; torch.optim.rmsprop._single_tensor_rmsprop.
#pragma once

#include "fusedopt/common.h"

namespace fusedopt {

struct RmspropCoeffs {
  float grad_scale;       // grad_scale, negated when maximize
  float lr;               //
  float alpha;            //
  float one_minus_alpha;  // also the lerp weight of grad_avg
  float eps;              //
  float weight_decay;     //
  float momentum;         //
  bool has_weight_decay;  // weight_decay != 0
};

// sq = alpha sq + (1-alpha) g^2; avg = sqrt(sq - ga^2 | sq) + eps; buf = momentum buf + g/avg; p -= lr*(buf | g/avg)
template <bool Centered, bool Momentum>
FUSEDOPT_HD void rmsprop_update(const RmspropCoeffs& c, float& p, float g, float& square_avg, float& momentum_buffer,
                                float& grad_avg) {
  g *= c.grad_scale;
  g = uniform_select(c.has_weight_decay, g + c.weight_decay * p, g);
  square_avg = square_avg * c.alpha + c.one_minus_alpha * g * g;
  float avg;
  if (Centered) {
    grad_avg = lerp(grad_avg, g, c.one_minus_alpha);
    avg = sqrtf(square_avg - grad_avg * grad_avg) + c.eps;
  } else {
    avg = sqrtf(square_avg) + c.eps;
  }
  if (Momentum) {
    momentum_buffer = momentum_buffer * c.momentum + g / avg;
    p -= c.lr * momentum_buffer;
  } else {
    p -= c.lr * (g / avg);
  }
}

// State 0 square_avg, 1 momentum_buffer (momentum > 0), 2 grad_avg (centered). Unused slots are never loaded/stored.
template <bool Centered, bool Momentum>
struct RmspropOp {
  FUSEDOPT_HD static constexpr bool uses(int k) { return k == 0 || (k == 1 && Momentum) || (k == 2 && Centered); }
  RmspropCoeffs c;
  FUSEDOPT_HD void operator()(float& p, float g, float& s0, float& s1, float& s2) const {
    rmsprop_update<Centered, Momentum>(c, p, g, s0, s1, s2);
  }
};

}  // namespace fusedopt
