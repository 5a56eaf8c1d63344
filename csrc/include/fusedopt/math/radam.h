// RAdam (rectified adaptive moments): hyperparameters, per-segment coefficients and the per-element update, shared by the CPU
// driver and the CUDA launcher. Liu et al. 2020, "On the Variance of the Adaptive Learning Rate and Beyond",
// Algorithm 2; torch.optim.radam._single_tensor_radam (decoupled weight decay: p *= 1 - lr * wd first).
#pragma once

#include <math.h>

#include "fusedopt/algorithm.h"

namespace fusedopt {
namespace algo {

struct radam {
  static constexpr Kind kKind = Kind::kElementwise;
  static constexpr const char* kStates[] = {"exp_avg", "exp_avg_sq"};
  struct Hyper {
    double beta1, beta2, eps, weight_decay, decoupled, maximize;
  };
  static constexpr const char* kFields[] = {"beta1", "beta2", "eps", "weight_decay", "decoupled", "maximize"};

  FUSEDOPT_HD static bool uses_state(const Hyper&, int k) { return k < 2; }

  // T is the compute type: float, or double for float64 parameters.
  template <typename T>
  struct Coeffs {
    T grad_scale;       // negated when maximize
    T beta1_weight;     // 1 - beta1
    T beta2;            //
    T one_minus_beta2;  //
    T eps;              //
    T weight_decay;     // L2 coefficient added to the gradient
    T decay;            // decoupled: 1 - lr * weight_decay, else 1
    T bc1;              // 1 - beta1^step
    T lr;               //
    T bc2_sqrt;         // sqrt(1 - beta2^step)
    T rect;             // the variance rectification term r_t (eq. 6), when rectified
    bool coupled_wd;    // weight_decay != 0 and not decoupled
    bool rectified;     // rho_t > 5: the adaptive step; else the un-adapted momentum step
  };

  // rho_inf = 2/(1-beta2) - 1; rho_t = rho_inf - 2 t beta2^t / (1 - beta2^t), in double as torch computes them.
  template <typename T>
  FUSEDOPT_HD static Coeffs<T> make_coeffs(const Hyper& h, double lr, double step, double grad_scale) {
    const double bc2 = 1.0 - pow(h.beta2, step);
    const double rho_inf = 2.0 / (1.0 - h.beta2) - 1.0;
    const double rho_t = rho_inf - 2.0 * step * pow(h.beta2, step) / bc2;
    const bool rectified = rho_t > 5.0;
    Coeffs<T> c;
    c.grad_scale = signed_grad_scale<T>(h, grad_scale);
    c.beta1_weight = static_cast<T>(1.0 - h.beta1);
    c.beta2 = static_cast<T>(h.beta2);
    c.one_minus_beta2 = static_cast<T>(1.0 - h.beta2);
    c.eps = static_cast<T>(h.eps);
    c.weight_decay = static_cast<T>(h.weight_decay);
    c.decay = h.weight_decay != 0.0 && h.decoupled != 0.0 ? static_cast<T>(1.0 - lr * h.weight_decay) : T(1);
    c.bc1 = static_cast<T>(1.0 - pow(h.beta1, step));
    c.lr = static_cast<T>(lr);
    c.bc2_sqrt = static_cast<T>(sqrt(bc2));
    c.rect = rectified ? static_cast<T>(sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf /
                                             ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)))
                       : T(1);
    c.coupled_wd = h.weight_decay != 0.0 && h.decoupled == 0.0;
    c.rectified = rectified;
    return c;
  }

  // m = lerp(m, g, 1-beta1), v = beta2 v + (1-beta2) g^2; u = m/bc1 * lr, times sqrt(bc2)/(sqrt(v)+eps) * r_t when rectified; p -= u (torch's op order)
  struct Op {
    FUSEDOPT_HD static constexpr bool uses(int k) { return k < 2; }
    template <typename T>
    FUSEDOPT_HD void operator()(const Coeffs<T>& c, T& p, T g, T& exp_avg, T& exp_avg_sq, T&) const {
      g *= c.grad_scale;
      p *= c.decay;  // exact when 1
      g = uniform_select(c.coupled_wd, g + c.weight_decay * p, g);
      exp_avg = lerp(exp_avg, g, c.beta1_weight);
      exp_avg_sq = exp_avg_sq * c.beta2 + c.one_minus_beta2 * g * g;
      const T u = (exp_avg / c.bc1) * c.lr;
      // torch computes sqrt(bc2) / (sqrt(v) + eps) as a scalar over a tensor: reciprocal, then product.
      const T adapted = (u * ((T(1) / (square_root(exp_avg_sq) + c.eps)) * c.bc2_sqrt)) * c.rect;
      p -= uniform_select(c.rectified, adapted, u);
    }
  };

  template <typename F>
  static void with_op(const Hyper&, F&& f) {
    f(Op{});
  }
};

}  // namespace algo
}  // namespace fusedopt
