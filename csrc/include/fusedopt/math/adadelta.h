// Adadelta: hyperparameters, per-segment coefficients and the per-element update, shared by the CPU driver and the
// CUDA launcher. Zeiler 2012, "ADADELTA: An Adaptive Learning Rate Method", Algorithm 1 (with torch's lr and coupled
// weight decay); torch.optim.adadelta._single_tensor_adadelta, in its operation order.
#pragma once

#include <math.h>

#include "fusedopt/algorithm.h"

namespace fusedopt {
namespace algo {

struct adadelta {
  static constexpr Kind kKind = Kind::kElementwise;
  static constexpr const char* kStates[] = {"square_avg", "acc_delta"};
  struct Hyper {
    double rho, eps, weight_decay, maximize;
  };
  static constexpr const char* kFields[] = {"rho", "eps", "weight_decay", "maximize"};

  FUSEDOPT_HD static bool uses_state(const Hyper&, int k) { return k < 2; }

  // T is the compute type: float, or double for float64 parameters.
  template <typename T>
  struct Coeffs {
    T grad_scale;           // negated when maximize
    T lr;                   //
    T rho;                  //
    T one_minus_rho;        // weight of the new squared gradient and squared update
    T eps;                  //
    T weight_decay;         // L2 coefficient added to the gradient
    bool has_weight_decay;  // weight_decay != 0
  };

  template <typename T>
  FUSEDOPT_HD static Coeffs<T> make_coeffs(const Hyper& h, double lr, double, double grad_scale) {
    Coeffs<T> c;
    c.grad_scale = signed_grad_scale<T>(h, grad_scale);
    c.lr = static_cast<T>(lr);
    c.rho = static_cast<T>(h.rho);
    c.one_minus_rho = static_cast<T>(1.0 - h.rho);
    c.eps = static_cast<T>(h.eps);
    c.weight_decay = static_cast<T>(h.weight_decay);
    c.has_weight_decay = h.weight_decay != 0.0;
    return c;
  }

  // sq = rho sq + (1-rho) g^2; delta = sqrt(acc + eps) / sqrt(sq + eps) * g; acc = rho acc + (1-rho) delta^2;
  // p -= lr * delta
  struct Op {
    FUSEDOPT_HD static constexpr bool uses(int k) { return k < 2; }
    template <typename T>
    FUSEDOPT_HD void operator()(const Coeffs<T>& c, T& p, T g, T& square_avg, T& acc_delta, T&) const {
      g *= c.grad_scale;
      g = uniform_select(c.has_weight_decay, g + c.weight_decay * p, g);
      square_avg = square_avg * c.rho + c.one_minus_rho * g * g;
      const T delta = square_root(acc_delta + c.eps) / square_root(square_avg + c.eps) * g;
      acc_delta = acc_delta * c.rho + c.one_minus_rho * delta * delta;
      p -= c.lr * delta;
    }
  };

  template <typename F>
  static void with_op(const Hyper&, F&& f) {
    f(Op{});
  }
};

}  // namespace algo
}  // namespace fusedopt
