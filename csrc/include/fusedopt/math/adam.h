// Adam / AdamW: hyperparameters, per-segment coefficients and the per-element update, shared by the CPU driver and
// the CUDA launcher. Kingma & Ba 2015, Algorithm 1 (AdamW: Loshchilov & Hutter 2019, Algorithm 2, line 12);
// torch.optim.adam._single_tensor_adam.
#pragma once

#include <math.h>

#include "fusedopt/algorithm.h"

namespace fusedopt {
namespace algo {

struct adam {
  static constexpr Kind kKind = Kind::kElementwise;
  // Slots of FlatBuffers::states, named as torch.optim names them.
  static constexpr const char* kStates[] = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"};
  // Hyperparameters as Python passes them, in this order (booleans as 0/1).
  struct Hyper {
    double beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled;
  };
  static constexpr const char* kFields[] = {"beta1", "beta2", "eps", "weight_decay", "amsgrad", "maximize", "decoupled"};

  FUSEDOPT_HD static bool uses_state(const Hyper& h, int k) { return k < 2 || (k == 2 && h.amsgrad != 0.0); }

  struct Coeffs {
    float grad_scale;       // negated when maximize
    float beta1_weight;     // 1 - beta1: lerp weight of the first moment
    float beta2;            //
    float one_minus_beta2;  //
    float eps;              //
    float weight_decay;     // L2 coefficient added to the gradient
    float decay;            // decoupled: 1 - lr * weight_decay, else 1
    float step_size;        // lr / (1 - beta1^step)
    float bc2_sqrt;         // sqrt(1 - beta2^step)
    bool coupled_wd;        // weight_decay != 0 and not decoupled
  };

  // In double, rounded once: the bias corrections depend on the segment's own step.
  FUSEDOPT_HD static Coeffs make_coeffs(const Hyper& h, double lr, double step, double grad_scale) {
    const bool decoupled_wd = h.weight_decay != 0.0 && h.decoupled != 0.0;
    Coeffs c;
    c.grad_scale = static_cast<float>(h.maximize != 0.0 ? -grad_scale : grad_scale);
    c.beta1_weight = static_cast<float>(1.0 - h.beta1);
    c.beta2 = static_cast<float>(h.beta2);
    c.one_minus_beta2 = static_cast<float>(1.0 - h.beta2);
    c.eps = static_cast<float>(h.eps);
    c.weight_decay = static_cast<float>(h.weight_decay);
    c.decay = decoupled_wd ? static_cast<float>(1.0 - lr * h.weight_decay) : 1.0f;
    c.step_size = static_cast<float>(lr / (1.0 - pow(h.beta1, step)));
    c.bc2_sqrt = static_cast<float>(sqrt(1.0 - pow(h.beta2, step)));
    c.coupled_wd = h.weight_decay != 0.0 && h.decoupled == 0.0;
    return c;
  }

  // m = lerp(m, g, 1-beta1); v = beta2 v + (1-beta2) g^2; p -= step_size * m / (sqrt(v or vmax) / sqrt(bc2) + eps)
  template <bool Amsgrad>
  struct Op {
    FUSEDOPT_HD static constexpr bool uses(int k) { return k < (Amsgrad ? 3 : 2); }
    FUSEDOPT_HD void operator()(const Coeffs& c, float& p, float g, float& exp_avg, float& exp_avg_sq,
                                float& max_exp_avg_sq) const {
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
  };

  template <typename F>
  static void with_op(const Hyper& h, F&& f) {
    if (h.amsgrad != 0.0)
      f(Op<true>{});
    else
      f(Op<false>{});
  }
};

}  // namespace algo
}  // namespace fusedopt
