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

  // T is the compute type: float, or double for float64 parameters.
  template <typename T>
  struct Coeffs {
    T grad_scale;       // negated when maximize
    T beta1_weight;     // 1 - beta1: lerp weight of the first moment
    T beta2;            //
    T one_minus_beta2;  //
    T eps;              //
    T weight_decay;     // L2 coefficient added to the gradient
    T decay;            // decoupled: 1 - lr * weight_decay, else 1
    T step_size;        // lr / (1 - beta1^step)
    T bc2_sqrt;         // sqrt(1 - beta2^step)
    bool coupled_wd;    // weight_decay != 0 and not decoupled
  };

  // In double, rounded once to T: the bias corrections depend on the segment's own step.
  template <typename T>
  FUSEDOPT_HD static Coeffs<T> make_coeffs(const Hyper& h, double lr, double step, double grad_scale) {
    const bool decoupled_wd = h.weight_decay != 0.0 && h.decoupled != 0.0;
    Coeffs<T> c;
    c.grad_scale = signed_grad_scale<T>(h, grad_scale);
    c.beta1_weight = static_cast<T>(1.0 - h.beta1);
    c.beta2 = static_cast<T>(h.beta2);
    c.one_minus_beta2 = static_cast<T>(1.0 - h.beta2);
    c.eps = static_cast<T>(h.eps);
    c.weight_decay = static_cast<T>(h.weight_decay);
    c.decay = decoupled_wd ? static_cast<T>(1.0 - lr * h.weight_decay) : T(1);
    c.step_size = static_cast<T>(lr / (1.0 - pow(h.beta1, step)));
    c.bc2_sqrt = static_cast<T>(sqrt(1.0 - pow(h.beta2, step)));
    c.coupled_wd = h.weight_decay != 0.0 && h.decoupled == 0.0;
    return c;
  }

  // m = lerp(m, g, 1-beta1); v = beta2 v + (1-beta2) g^2; p -= step_size * m / (sqrt(v or vmax) / sqrt(bc2) + eps)
  template <bool Amsgrad>
  struct Op {
    FUSEDOPT_HD static constexpr bool uses(int k) { return k < (Amsgrad ? 3 : 2); }
    template <typename T>
    FUSEDOPT_HD void operator()(const Coeffs<T>& c, T& p, T g, T& exp_avg, T& exp_avg_sq, T& max_exp_avg_sq) const {
      g *= c.grad_scale;
      p *= c.decay;  // exact when 1
      g = uniform_select(c.coupled_wd, g + c.weight_decay * p, g);
      exp_avg = lerp(exp_avg, g, c.beta1_weight);
      exp_avg_sq = exp_avg_sq * c.beta2 + c.one_minus_beta2 * g * g;
      T second = exp_avg_sq;
      if (Amsgrad) {
        max_exp_avg_sq = nan_maximum(max_exp_avg_sq, exp_avg_sq);
        second = max_exp_avg_sq;
      }
      const T denom = square_root(second) / c.bc2_sqrt + c.eps;
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
