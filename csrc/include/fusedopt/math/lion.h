// Lion: hyperparameters, coefficients and the per-element update, shared by the CPU driver and the CUDA launcher.
// Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2 (no torch.optim counterpart; the lerp
// follows torch's formula so it matches the reference, which uses torch.lerp).
#pragma once

#include "fusedopt/algorithm.h"

namespace fusedopt {
namespace algo {

struct lion {
  static constexpr Kind kKind = Kind::kElementwise;
  static constexpr const char* kStates[] = {"exp_avg"};
  struct Hyper {
    double beta1, beta2, weight_decay, maximize;
  };
  static constexpr const char* kFields[] = {"beta1", "beta2", "weight_decay", "maximize"};

  FUSEDOPT_HD static bool uses_state(const Hyper&, int k) { return k == 0; }

  // T is the compute type: float, or double for float64 parameters.
  template <typename T>
  struct Coeffs {
    T grad_scale;    // negated when maximize
    T lr;            //
    T decay;         // 1 - lr * weight_decay
    T beta1_weight;  // 1 - beta1: interpolation for the update direction
    T beta2_weight;  // 1 - beta2: interpolation for the stored momentum
  };

  template <typename T>
  FUSEDOPT_HD static Coeffs<T> make_coeffs(const Hyper& h, double lr, double, double grad_scale) {
    Coeffs<T> c;
    c.grad_scale = signed_grad_scale<T>(h, grad_scale);
    c.lr = static_cast<T>(lr);
    c.decay = h.weight_decay != 0.0 ? static_cast<T>(1.0 - lr * h.weight_decay) : T(1);
    c.beta1_weight = static_cast<T>(1.0 - h.beta1);
    c.beta2_weight = static_cast<T>(1.0 - h.beta2);
    return c;
  }

  // p = p*(1 - lr wd); p -= lr * sign(lerp(m, g, 1-beta1)); m = lerp(m, g, 1-beta2)
  struct Op {
    FUSEDOPT_HD static constexpr bool uses(int k) { return k == 0; }
    template <typename T>
    FUSEDOPT_HD void operator()(const Coeffs<T>& c, T& p, T g, T& exp_avg, T&, T&) const {
      g *= c.grad_scale;
      p *= c.decay;
      p -= c.lr * sign(lerp(exp_avg, g, c.beta1_weight));
      exp_avg = lerp(exp_avg, g, c.beta2_weight);
    }
  };

  template <typename F>
  static void with_op(const Hyper&, F&& f) {
    f(Op{});
  }
};

}  // namespace algo
}  // namespace fusedopt
