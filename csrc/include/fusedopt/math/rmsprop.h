// RMSprop (optionally centered, with momentum): hyperparameters, coefficients and the per-element update, shared by
// the CPU driver and the CUDA launcher. Hinton, Coursera lecture 6e; centered form: Graves 2013, eq. 38-40;
// torch.optim.rmsprop._single_tensor_rmsprop.
#pragma once

#include <math.h>

#include "fusedopt/algorithm.h"

namespace fusedopt {
namespace algo {

struct rmsprop {
  static constexpr Kind kKind = Kind::kElementwise;
  static constexpr const char* kStates[] = {"square_avg", "momentum_buffer", "grad_avg"};
  struct Hyper {
    double alpha, eps, weight_decay, momentum, centered, maximize;
  };
  static constexpr const char* kFields[] = {"alpha", "eps", "weight_decay", "momentum", "centered", "maximize"};

  FUSEDOPT_HD static bool uses_state(const Hyper& h, int k) {
    return k == 0 || (k == 1 && h.momentum > 0.0) || (k == 2 && h.centered != 0.0);
  }

  // T is the compute type: float, or double for float64 parameters.
  template <typename T>
  struct Coeffs {
    T grad_scale;           // negated when maximize
    T lr;                   //
    T alpha;                //
    T one_minus_alpha;      // also the lerp weight of grad_avg
    T eps;                  //
    T weight_decay;         //
    T momentum;             //
    bool has_weight_decay;  // weight_decay != 0
  };

  template <typename T>
  FUSEDOPT_HD static Coeffs<T> make_coeffs(const Hyper& h, double lr, double, double grad_scale) {
    Coeffs<T> c;
    c.grad_scale = signed_grad_scale<T>(h, grad_scale);
    c.lr = static_cast<T>(lr);
    c.alpha = static_cast<T>(h.alpha);
    c.one_minus_alpha = static_cast<T>(1.0 - h.alpha);
    c.eps = static_cast<T>(h.eps);
    c.weight_decay = static_cast<T>(h.weight_decay);
    c.momentum = static_cast<T>(h.momentum);
    c.has_weight_decay = h.weight_decay != 0.0;
    return c;
  }

  // sq = alpha sq + (1-alpha) g^2; avg = sqrt(sq - ga^2 | sq) + eps; buf = momentum buf + g/avg; p -= lr*(buf | g/avg)
  template <bool Centered, bool Momentum>
  struct Op {
    FUSEDOPT_HD static constexpr bool uses(int k) { return k == 0 || (k == 1 && Momentum) || (k == 2 && Centered); }
    template <typename T>
    FUSEDOPT_HD void operator()(const Coeffs<T>& c, T& p, T g, T& square_avg, T& momentum_buffer, T& grad_avg) const {
      g *= c.grad_scale;
      g = uniform_select(c.has_weight_decay, g + c.weight_decay * p, g);
      square_avg = square_avg * c.alpha + c.one_minus_alpha * g * g;
      T avg;
      if (Centered) {
        grad_avg = lerp(grad_avg, g, c.one_minus_alpha);
        avg = square_root(square_avg - grad_avg * grad_avg) + c.eps;
      } else {
        avg = square_root(square_avg) + c.eps;
      }
      if (Momentum) {
        momentum_buffer = momentum_buffer * c.momentum + g / avg;
        p -= c.lr * momentum_buffer;
      } else {
        p -= c.lr * (g / avg);
      }
    }
  };

  template <typename F>
  static void with_op(const Hyper& h, F&& f) {
    const bool momentum = h.momentum > 0.0;
    if (h.centered != 0.0) {
      if (momentum)
        f(Op<true, true>{});
      else
        f(Op<true, false>{});
    } else {
      if (momentum)
        f(Op<false, true>{});
      else
        f(Op<false, false>{});
    }
  }
};

}  // namespace algo
}  // namespace fusedopt
