// Adafactor: hyperparameters, per-segment coefficients and the per-element pieces, shared by the CPU driver and the
// CUDA kernels. Shazeer and Stern 2018, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", Algorithms 4
// and 5, as torch.optim.Adafactor computes them (its single-tensor path): relative step size
// alpha = max(eps2, RMS(p)) * min(lr, 1/sqrt(t)), beta2_t = 1 - t^beta2_decay, decoupled weight decay p *= 1 - lr*wd,
// eps1 applied to the row mean and to the estimate, update clipped by max(1, RMS(u)/d).
// A factored algorithm: a parameter of two or more dimensions keeps row and column factors of the second moment over
// its last two dimensions (row_var: one per row, col_var: one per column, for each leading index), a vector or scalar
// keeps the whole `variance`. The drivers run the reductions of csrc/cpu/driver.h (run_factored).
#pragma once

#include <math.h>

#include "fusedopt/algorithm.h"

namespace fusedopt {
namespace algo {

struct adafactor {
  static constexpr Kind kKind = Kind::kFactored;
  // Compact state buffers: row_var and col_var hold the factors of the parameters of two or more dimensions,
  // variance the second moment of the others (Segments::layout gives each segment's offset in each).
  static constexpr const char* kStates[] = {"row_var", "col_var", "variance"};
  // eps1 is resolved by the caller (torch.optim's None is the parameter dtype's machine epsilon).
  struct Hyper {
    double beta2_decay, eps1, eps2, d, weight_decay, maximize;
  };
  static constexpr const char* kFields[] = {"beta2_decay", "eps1", "eps2", "d", "weight_decay", "maximize"};

  // Which slots a step uses depends on its parameters' shapes, not on the hyperparameters: the step checks each
  // segment's slots against the layout instead (a compact buffer is empty, and its pointer null, when no parameter
  // keeps that state).
  FUSEDOPT_HD static bool uses_state(const Hyper&, int) { return false; }

  template <typename T>
  struct Coeffs {
    T grad_scale;           // negated when maximize
    T new_weight;           // 1 - beta2_t = t^beta2_decay: the lerp weight of this step's mean square
    T eps1;                 // floor of the row factors' mean
    T eps1_squared;         // floor of the estimate (torch squares eps1 in double, then rounds)
    T decay;                // 1 - lr * weight_decay
    bool has_weight_decay;  // weight_decay != 0
    double eps2;            // floor of RMS(p)
    double rho;             // min(lr, 1/sqrt(t))
    double d;               // clipping threshold of RMS(u)
  };

  template <typename T>
  FUSEDOPT_HD static Coeffs<T> make_coeffs(const Hyper& h, double lr, double step, double grad_scale) {
    Coeffs<T> c;
    c.grad_scale = signed_grad_scale<T>(h, grad_scale);
    c.new_weight = static_cast<T>(pow(step, h.beta2_decay));
    c.eps1 = static_cast<T>(h.eps1);
    c.eps1_squared = static_cast<T>(h.eps1 * h.eps1);
    c.decay = static_cast<T>(1.0 - lr * h.weight_decay);
    c.has_weight_decay = h.weight_decay != 0.0;
    c.eps2 = h.eps2;
    const double inverse_sqrt_step = 1.0 / sqrt(step);
    c.rho = lr < inverse_sqrt_step ? lr : inverse_sqrt_step;
    c.d = h.d;
    return c;
  }

  // A factor (or the whole variance) moved toward this step's mean square.
  template <typename T>
  FUSEDOPT_HD static T moved_factor(const Coeffs<T>& c, T factor, T mean_square) {
    return lerp(factor, mean_square, c.new_weight);
  }

  // The mean of a matrix's row factors, floored at eps1: the denominator of its estimates.
  template <typename T>
  FUSEDOPT_HD static T row_mean(const Coeffs<T>& c, T mean) {
    return mean < c.eps1 ? c.eps1 : mean;
  }

  // The second-moment estimate of element (r, c) of a factored matrix: row_var[r] * col_var[c] / row_mean.
  template <typename T>
  FUSEDOPT_HD static T factored_estimate(T row_factor, T col_factor, T row_mean) {
    return (row_factor * col_factor) / row_mean;
  }

  // u = g / sqrt(max(estimate, eps1^2)), as torch: the reciprocal square root first, then the gradient's product.
  template <typename T>
  FUSEDOPT_HD static T direction(const Coeffs<T>& c, T g, T estimate) {
    const T floored = estimate < c.eps1_squared ? c.eps1_squared : estimate;
    return g * (T(1) / square_root(floored));
  }

  // -alpha / max(1, RMS(u) / d), alpha = max(eps2, RMS(p)) * rho, from the segment's sums of squares of p (before
  // weight decay) and of u; rounded once to T.
  template <typename T>
  FUSEDOPT_HD static T step_size(const Coeffs<T>& c, double p2, double u2, int64_t numel) {
    const double root_n = sqrt(static_cast<double>(numel));
    const double rms_p = sqrt(p2) / root_n;
    const double alpha = (rms_p > c.eps2 ? rms_p : c.eps2) * c.rho;
    const double clip = sqrt(u2) / (root_n * c.d);
    return static_cast<T>(-alpha / (clip > 1.0 ? clip : 1.0));
  }

  // p = p * (1 - lr*wd) + step_size * u.
  template <typename T>
  FUSEDOPT_HD static void apply(const Coeffs<T>& c, T step_size, T& p, T u) {
    p = uniform_select(c.has_weight_decay, p * c.decay, p);
    p = p + step_size * u;
  }
};

}  // namespace algo
}  // namespace fusedopt
