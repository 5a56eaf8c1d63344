// Adamax: hyperparameters, per-segment coefficients and the per-element update, shared by the CPU driver and the CUDA
// launcher. Kingma & Ba 2015, Algorithm 2 (the infinity-norm second moment); torch.optim.adamax._single_tensor_adamax.
#pragma once

#include <math.h>

#include "fusedopt/algorithm.h"

namespace fusedopt {
namespace algo {

struct adamax {
  static constexpr Kind kKind = Kind::kElementwise;
  static constexpr const char* kStates[] = {"exp_avg", "exp_inf"};
  struct Hyper {
    double beta1, beta2, eps, weight_decay, maximize;
  };
  static constexpr const char* kFields[] = {"beta1", "beta2", "eps", "weight_decay", "maximize"};

  FUSEDOPT_HD static bool uses_state(const Hyper&, int k) { return k < 2; }

  // T is the compute type: float, or double for float64 parameters.
  template <typename T>
  struct Coeffs {
    T grad_scale;           // negated when maximize
    T beta1_weight;         // 1 - beta1
    T beta2;                //
    T eps;                  //
    T weight_decay;         // L2 coefficient added to the gradient
    T clr;                  // lr / (1 - beta1^step)
    bool has_weight_decay;  // weight_decay != 0
  };

  template <typename T>
  FUSEDOPT_HD static Coeffs<T> make_coeffs(const Hyper& h, double lr, double step, double grad_scale) {
    Coeffs<T> c;
    c.grad_scale = signed_grad_scale<T>(h, grad_scale);
    c.beta1_weight = static_cast<T>(1.0 - h.beta1);
    c.beta2 = static_cast<T>(h.beta2);
    c.eps = static_cast<T>(h.eps);
    c.weight_decay = static_cast<T>(h.weight_decay);
    c.clr = static_cast<T>(lr / (1.0 - pow(h.beta1, step)));
    c.has_weight_decay = h.weight_decay != 0.0;
    return c;
  }

  // m = lerp(m, g, 1-beta1); u = max(beta2 u, |g| + eps); p -= clr * m / u
  struct Op {
    FUSEDOPT_HD static constexpr bool uses(int k) { return k < 2; }
    template <typename T>
    FUSEDOPT_HD void operator()(const Coeffs<T>& c, T& p, T g, T& exp_avg, T& exp_inf, T&) const {
      g *= c.grad_scale;
      g = uniform_select(c.has_weight_decay, g + c.weight_decay * p, g);
      exp_avg = lerp(exp_avg, g, c.beta1_weight);
      exp_inf = nan_maximum(exp_inf * c.beta2, magnitude(g) + c.eps);
      p -= c.clr * (exp_avg / exp_inf);
    }
  };

  template <typename F>
  static void with_op(const Hyper&, F&& f) {
    f(Op{});
  }
};

}  // namespace algo
}  // namespace fusedopt
