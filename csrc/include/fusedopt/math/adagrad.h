// Adagrad: hyperparameters, per-segment coefficients and the per-element update, shared by the CPU driver and the
// CUDA launcher. Duchi, Hazan & Singer 2011, eq. (1) diagonal form; torch.optim.adagrad._single_tensor_adagrad.
#pragma once

#include <math.h>

#include "fusedopt/algorithm.h"

namespace fusedopt {
namespace algo {

struct adagrad {
  static constexpr Kind kKind = Kind::kElementwise;
  static constexpr const char* kStates[] = {"sum"};
  struct Hyper {
    double lr_decay, eps, weight_decay, maximize;
  };
  static constexpr const char* kFields[] = {"lr_decay", "eps", "weight_decay", "maximize"};

  FUSEDOPT_HD static bool uses_state(const Hyper&, int k) { return k == 0; }

  // T is the compute type: float, or double for float64 parameters.
  template <typename T>
  struct Coeffs {
    T grad_scale;           // negated when maximize
    T clr;                  // lr / (1 + (step - 1) * lr_decay)
    T eps;                  //
    T weight_decay;         //
    bool has_weight_decay;  // weight_decay != 0
  };

  template <typename T>
  FUSEDOPT_HD static Coeffs<T> make_coeffs(const Hyper& h, double lr, double step, double grad_scale) {
    Coeffs<T> c;
    c.grad_scale = signed_grad_scale<T>(h, grad_scale);
    c.clr = static_cast<T>(lr / (1.0 + (step - 1.0) * h.lr_decay));
    c.eps = static_cast<T>(h.eps);
    c.weight_decay = static_cast<T>(h.weight_decay);
    c.has_weight_decay = h.weight_decay != 0.0;
    return c;
  }

  // sum += g^2; p -= clr * g / (sqrt(sum) + eps)
  struct Op {
    FUSEDOPT_HD static constexpr bool uses(int k) { return k == 0; }
    template <typename T>
    FUSEDOPT_HD void operator()(const Coeffs<T>& c, T& p, T g, T& sum, T&, T&) const {
      g *= c.grad_scale;
      g = uniform_select(c.has_weight_decay, g + c.weight_decay * p, g);
      sum += g * g;
      p -= c.clr * (g / (square_root(sum) + c.eps));
    }
  };

  template <typename F>
  static void with_op(const Hyper&, F&& f) {
    f(Op{});
  }
};

}  // namespace algo
}  // namespace fusedopt
