// SGD with momentum, dampening and Nesterov: hyperparameters, per-segment coefficients and the per-element update,
// shared by the CPU driver and the CUDA launcher. Sutskever et al. 2013, eq. 1-2 (Nesterov: eq. 3-4, torch's
// formulation); torch.optim.sgd._single_tensor_sgd.
#pragma once

#include "fusedopt/algorithm.h"

namespace fusedopt {
namespace algo {

struct sgd {
  static constexpr Kind kKind = Kind::kElementwise;
  static constexpr const char* kStates[] = {"momentum_buffer"};
  struct Hyper {
    double momentum, dampening, weight_decay, nesterov, maximize;
  };
  static constexpr const char* kFields[] = {"momentum", "dampening", "weight_decay", "nesterov", "maximize"};

  FUSEDOPT_HD static bool uses_state(const Hyper& h, int k) { return k == 0 && h.momentum != 0.0; }

  // T is the compute type: float, or double for float64 parameters.
  template <typename T>
  struct Coeffs {
    T grad_scale;           // negated when maximize
    T lr;                   //
    T weight_decay;         //
    T momentum;             //
    T one_minus_damp;       // 1 - dampening
    bool has_weight_decay;  // weight_decay != 0
    bool nesterov;          //
    bool first_step;        // the segment's first step: momentum_buffer starts as the gradient (torch's clone)
  };

  template <typename T>
  FUSEDOPT_HD static Coeffs<T> make_coeffs(const Hyper& h, double lr, double step, double grad_scale) {
    Coeffs<T> c;
    c.grad_scale = signed_grad_scale<T>(h, grad_scale);
    c.lr = static_cast<T>(lr);
    c.weight_decay = static_cast<T>(h.weight_decay);
    c.momentum = static_cast<T>(h.momentum);
    c.one_minus_damp = static_cast<T>(1.0 - h.dampening);
    c.has_weight_decay = h.weight_decay != 0.0;
    c.nesterov = h.nesterov != 0.0;
    c.first_step = step <= 1.0;
    return c;
  }

  // buf = first ? g : momentum*buf + (1-dampening)*g;  g = nesterov ? g + momentum*buf : buf;  p -= lr*g
  template <bool Momentum>
  struct Op {
    FUSEDOPT_HD static constexpr bool uses(int k) { return Momentum && k == 0; }
    template <typename T>
    FUSEDOPT_HD void operator()(const Coeffs<T>& c, T& p, T g, T& momentum_buffer, T&, T&) const {
      g *= c.grad_scale;
      g = uniform_select(c.has_weight_decay, g + c.weight_decay * p, g);
      if (Momentum) {
        momentum_buffer = uniform_select(c.first_step, g, momentum_buffer * c.momentum + c.one_minus_damp * g);
        g = uniform_select(c.nesterov, g + c.momentum * momentum_buffer, momentum_buffer);
      }
      p -= c.lr * g;
    }
  };

  template <typename F>
  static void with_op(const Hyper& h, F&& f) {
    if (h.momentum != 0.0)
      f(Op<true>{});
    else
      f(Op<false>{});
  }
};

}  // namespace algo
}  // namespace fusedopt
