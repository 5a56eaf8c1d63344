// NAdam (Adam with Nesterov momentum): hyperparameters, per-segment coefficients, the per-segment mu_product and the
// per-element update, shared by the CPU driver and the CUDA launcher. Dozat 2016, "Incorporating Nesterov Momentum
// into Adam", Algorithm 2 with the momentum schedule mu_t = beta1 (1 - 0.5 * 0.96^(t psi)); torch.optim.nadam.
// _single_tensor_nadam, in its operation order (decoupled weight decay: p *= 1 - lr * wd first, as NAdamW).
#pragma once

#include <math.h>

#include "fusedopt/algorithm.h"

namespace fusedopt {
namespace algo {

struct nadam {
  static constexpr Kind kKind = Kind::kElementwise;
  static constexpr const char* kStates[] = {"exp_avg", "exp_avg_sq"};
  // The product of the momentum schedule up to this step, a float32 per parameter as torch keeps it.
  static constexpr const char* kScalars[] = {"mu_product"};
  struct Hyper {
    double beta1, beta2, eps, weight_decay, momentum_decay, decoupled, maximize;
  };
  static constexpr const char* kFields[] = {"beta1", "beta2", "eps", "weight_decay", "momentum_decay", "decoupled",
                                            "maximize"};

  FUSEDOPT_HD static bool uses_state(const Hyper&, int k) { return k < 2; }

  // mu_t = beta1 (1 - 0.5 * 0.96^(t psi)), in double as torch computes it.
  FUSEDOPT_HD static double mu_at(const Hyper& h, double step) {
    return h.beta1 * (1.0 - 0.5 * pow(0.96, step * h.momentum_decay));
  }

  // torch multiplies the float32 tensor mu_product by mu_t rounded to float32.
  FUSEDOPT_HD static float mu_product_after(const Hyper& h, double step, float mu_product) {
    return mu_product * static_cast<float>(mu_at(h, step));
  }

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
    T bc2;              // 1 - beta2^step
    T grad_weight;      // -lr (1 - mu_t) / (1 - mu_product_t)
    T avg_weight;       // -lr mu_{t+1} / (1 - mu_product_t mu_{t+1})
    bool coupled_wd;    // weight_decay != 0 and not decoupled
  };

  // scalars[0]: mu_product before this step (1 at the first).
  template <typename T>
  FUSEDOPT_HD static Coeffs<T> make_coeffs(const Hyper& h, double lr, double step, double grad_scale,
                                           const float* scalars) {
    const double mu = mu_at(h, step);
    const double mu_next = mu_at(h, step + 1.0);
    const double mu_product = mu_product_after(h, step, scalars[0]);
    const double mu_product_next = mu_product * mu_next;
    Coeffs<T> c;
    c.grad_scale = signed_grad_scale<T>(h, grad_scale);
    c.beta1_weight = static_cast<T>(1.0 - h.beta1);
    c.beta2 = static_cast<T>(h.beta2);
    c.one_minus_beta2 = static_cast<T>(1.0 - h.beta2);
    c.eps = static_cast<T>(h.eps);
    c.weight_decay = static_cast<T>(h.weight_decay);
    c.decay = h.weight_decay != 0.0 && h.decoupled != 0.0 ? static_cast<T>(1.0 - lr * h.weight_decay) : T(1);
    c.bc2 = static_cast<T>(1.0 - pow(h.beta2, step));
    c.grad_weight = static_cast<T>(-lr * (1.0 - mu) / (1.0 - mu_product));
    c.avg_weight = static_cast<T>((-lr * mu_next) / (1.0 - mu_product_next));
    c.coupled_wd = h.weight_decay != 0.0 && h.decoupled == 0.0;
    return c;
  }

  FUSEDOPT_HD static void advance(const Hyper& h, double, double step, float* scalars) {
    scalars[0] = mu_product_after(h, step, scalars[0]);
  }

  // m = lerp(m, g, 1-beta1), v = beta2 v + (1-beta2) g^2, d = sqrt(v / bc2) + eps;
  // p += grad_weight g / d, then p += avg_weight m / d (torch's two addcdiv).
  struct Op {
    FUSEDOPT_HD static constexpr bool uses(int k) { return k < 2; }
    template <typename T>
    FUSEDOPT_HD void operator()(const Coeffs<T>& c, T& p, T g, T& exp_avg, T& exp_avg_sq, T&) const {
      g *= c.grad_scale;
      p *= c.decay;  // exact when 1
      g = uniform_select(c.coupled_wd, g + c.weight_decay * p, g);
      exp_avg = lerp(exp_avg, g, c.beta1_weight);
      exp_avg_sq = exp_avg_sq * c.beta2 + c.one_minus_beta2 * g * g;
      const T denom = square_root(exp_avg_sq / c.bc2) + c.eps;
      p += (c.grad_weight * g) / denom;
      p += (c.avg_weight * exp_avg) / denom;
    }
  };

  template <typename F>
  static void with_op(const Hyper&, F&& f) {
    f(Op{});
  }
};

}  // namespace algo
}  // namespace fusedopt
