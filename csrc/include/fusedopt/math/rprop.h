// Rprop: hyperparameters, per-segment coefficients and the per-element update, shared by the CPU driver and the CUDA
// launcher. Riedmiller & Braun 1993, "A Direct Adaptive Method for Faster Backpropagation Learning: The RPROP
// Algorithm" (the variant without weight backtracking, as torch implements it); torch.optim.rprop._single_tensor_rprop.
// The first value of step_size is the group's lr, written by the Python layer when the state is created; the kernel
// itself never reads lr.
#pragma once

#include "fusedopt/algorithm.h"

namespace fusedopt {
namespace algo {

struct rprop {
  static constexpr Kind kKind = Kind::kElementwise;
  static constexpr const char* kStates[] = {"prev", "step_size"};
  struct Hyper {
    double etaminus, etaplus, step_size_min, step_size_max, maximize;
  };
  static constexpr const char* kFields[] = {"etaminus", "etaplus", "step_size_min", "step_size_max", "maximize"};

  FUSEDOPT_HD static bool uses_state(const Hyper&, int k) { return k < 2; }

  // T is the compute type: float, or double for float64 parameters.
  template <typename T>
  struct Coeffs {
    T grad_scale;     // negated when maximize
    T etaminus;       // step size factor where the gradient changed sign
    T etaplus;        // step size factor where it kept its sign
    T step_size_min;  //
    T step_size_max;  //
  };

  template <typename T>
  FUSEDOPT_HD static Coeffs<T> make_coeffs(const Hyper& h, double, double, double grad_scale) {
    Coeffs<T> c;
    c.grad_scale = signed_grad_scale<T>(h, grad_scale);
    c.etaminus = static_cast<T>(h.etaminus);
    c.etaplus = static_cast<T>(h.etaplus);
    c.step_size_min = static_cast<T>(h.step_size_min);
    c.step_size_max = static_cast<T>(h.step_size_max);
    return c;
  }

  // factor = etaplus, etaminus or 1 as sign(g * prev) is +, - or 0 (torch.sign(NaN) = 0: a NaN product keeps the step
  // size); step_size = min(max(step_size * factor, min), max); g = 0 where the sign changed;
  // p -= sign(g) * step_size (a NaN gradient leaves p, as torch's addcmul of its sign 0 does); prev = g
  struct Op {
    FUSEDOPT_HD static constexpr bool uses(int k) { return k < 2; }
    template <typename T>
    FUSEDOPT_HD void operator()(const Coeffs<T>& c, T& p, T g, T& prev, T& step_size, T&) const {
      g *= c.grad_scale;
      const T product = g * prev;  // in the compute type: its sign is that of torch's g.mul(prev).sign()
      T factor = product < T(0) ? c.etaminus : T(1);
      factor = product > T(0) ? c.etaplus : factor;
      T s = step_size * factor;
      s = s < c.step_size_min ? c.step_size_min : s;  // torch.clamp_: NaN propagates, max wins when min > max
      s = s > c.step_size_max ? c.step_size_max : s;
      step_size = s;
      // torch zeroes the gradient where its sign tensor holds etaminus (where the sign changed)
      g = factor == c.etaminus ? T(0) : g;
      p -= sign(g) * s;
      prev = g;
    }
  };

  template <typename F>
  static void with_op(const Hyper&, F&& f) {
    f(Op{});
  }
};

}  // namespace algo
}  // namespace fusedopt
