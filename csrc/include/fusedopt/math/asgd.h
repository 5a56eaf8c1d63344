// ASGD (averaged SGD): hyperparameters, per-segment coefficients, the per-segment eta and mu and the per-element update,
// shared by the CPU driver and the CUDA launcher. Polyak & Juditsky 1992, "Acceleration of Stochastic Approximation by
// Averaging", with the step size eta_t = lr / (1 + lambd lr t)^alpha and averaging from step t0 of Bottou 2012,
// "Stochastic Gradient Descent Tricks", section 5.3; torch.optim.asgd._single_tensor_asgd, in its operation order.
#pragma once

#include <math.h>

#include "fusedopt/algorithm.h"

namespace fusedopt {
namespace algo {

struct asgd {
  static constexpr Kind kKind = Kind::kElementwise;
  static constexpr const char* kStates[] = {"ax"};
  // The step size and the averaging weight this step uses, float32 per parameter as torch keeps them; each step
  // writes those of the next.
  static constexpr const char* kScalars[] = {"eta", "mu"};
  struct Hyper {
    double lambd, alpha, t0, weight_decay, maximize;
  };
  static constexpr const char* kFields[] = {"lambd", "alpha", "t0", "weight_decay", "maximize"};

  FUSEDOPT_HD static bool uses_state(const Hyper&, int k) { return k < 1; }

  // T is the compute type: float, or double for float64 parameters.
  template <typename T>
  struct Coeffs {
    T grad_scale;    // negated when maximize
    T weight_decay;  // L2 coefficient added to the gradient
    T decay;         // 1 - lambd * eta
    T neg_eta;       // -eta
    T mu;            // weight of the new parameter in the average
    bool has_weight_decay;
    bool averaging;  // mu != 1: ax moves towards p by mu; else ax = p
  };

  // scalars: eta and mu before this step (lr and 1 at the first).
  template <typename T>
  FUSEDOPT_HD static Coeffs<T> make_coeffs(const Hyper& h, double, double, double grad_scale,
                                           const float* scalars) {
    const double eta = scalars[0];
    Coeffs<T> c;
    c.grad_scale = signed_grad_scale<T>(h, grad_scale);
    c.weight_decay = static_cast<T>(h.weight_decay);
    c.decay = static_cast<T>(1.0 - h.lambd * eta);
    c.neg_eta = static_cast<T>(-eta);
    c.mu = static_cast<T>(scalars[1]);
    c.has_weight_decay = h.weight_decay != 0.0;
    c.averaging = scalars[1] != 1.0f;
    return c;
  }

  // eta_{t+1} = lr / (1 + lambd lr t)^alpha and mu_{t+1} = 1 / max(1, t - t0), in double, stored as float32.
  FUSEDOPT_HD static void advance(const Hyper& h, double lr, double step, float* scalars) {
    scalars[0] = static_cast<float>(lr / pow(1.0 + h.lambd * lr * step, h.alpha));
    const double since = step - h.t0;
    scalars[1] = static_cast<float>(1.0 / (since > 1.0 ? since : 1.0));
  }

  // p = p (1 - lambd eta) - eta g; ax += (p - ax) mu, or ax = p while mu is 1.
  struct Op {
    FUSEDOPT_HD static constexpr bool uses(int k) { return k < 1; }
    template <typename T>
    FUSEDOPT_HD void operator()(const Coeffs<T>& c, T& p, T g, T& ax, T&, T&) const {
      g *= c.grad_scale;
      g = uniform_select(c.has_weight_decay, g + c.weight_decay * p, g);
      p *= c.decay;
      p += c.neg_eta * g;
      ax = uniform_select(c.averaging, ax + (p - ax) * c.mu, p);
    }
  };

  template <typename F>
  static void with_op(const Hyper&, F&& f) {
    f(Op{});
  }
};

}  // namespace algo
}  // namespace fusedopt
