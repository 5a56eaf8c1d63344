// Muon's element-wise passes: hyperparameters, per-segment coefficients and the per-element updates, shared by the CPU
// driver and the CUDA launcher. Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks", as
// torch.optim.muon._single_tensor_muon computes it. A step is two calls around the Newton-Schulz orthogonalization,
// which runs in torch (fusedopt/_newton_schulz.py) between them:
//   phase 0 (momentum): B = lerp(B, g, 1 - mu); update = nesterov ? lerp(g, B, mu) : B      (p unchanged)
//   phase 1 (apply):    p = p * (1 - lr * wd); p = p - lr * lr_ratio(A, B) * O, O the orthogonalized update
// The `update` slot is fusedopt's scratch, not a torch.optim state: phase 0 writes it, the orthogonalization replaces
// it by O, phase 1 reads it.
#pragma once

#include <math.h>

#include "fusedopt/algorithm.h"

namespace fusedopt {
namespace algo {

struct muon {
  static constexpr Kind kKind = Kind::kElementwise;
  static constexpr const char* kStates[] = {"momentum_buffer", "update"};
  // The segment's learning-rate multiplier from its matrix shape (torch's adjust_lr_fn: sqrt(max(1, A/B)) or
  // 0.2 sqrt(max(A, B))), filled by the Python side; a per-segment coefficient, not a torch.optim state.
  // The segment's matrix shape, A rows by B columns (the last two dimensions: a stack of expert matrices is adjusted
  // per matrix), for torch's adjust_lr_fn; filled by the Python side, not torch.optim states. Exact in float32.
  static constexpr const char* kScalars[] = {"rows", "cols"};
  // adjust_lr: 0 for torch's "original" (and None), 1 for "match_rms_adamw".
  struct Hyper {
    double momentum, nesterov, weight_decay, adjust_lr, phase, maximize;
  };
  static constexpr const char* kFields[] = {"momentum", "nesterov", "weight_decay", "adjust_lr", "phase",
                                            "maximize"};

  static constexpr double kMomentumPhase = 0.0;

  FUSEDOPT_HD static bool uses_state(const Hyper& h, int k) { return h.phase == kMomentumPhase ? k < 2 : k == 1; }

  template <typename T>
  struct Coeffs {
    T grad_scale;          // negated when maximize
    T momentum;            // mu: the Nesterov blend's weight
    T one_minus_momentum;  // 1 - mu: the momentum buffer's lerp weight
    T decay;               // 1 - lr * weight_decay
    T step_size;           // -lr * lr_ratio(shape), rounded once (torch's alpha=-adjusted_lr)
  };

  template <typename T>
  FUSEDOPT_HD static Coeffs<T> make_coeffs(const Hyper& h, double lr, double, double grad_scale,
                                           const float* scalars) {
    Coeffs<T> c;
    c.grad_scale = signed_grad_scale<T>(h, grad_scale);
    c.momentum = static_cast<T>(h.momentum);
    c.one_minus_momentum = static_cast<T>(1.0 - h.momentum);
    c.decay = static_cast<T>(1.0 - lr * h.weight_decay);
    c.step_size = static_cast<T>(-(lr * lr_ratio(h, scalars[0], scalars[1])));
    return c;
  }

  // torch's _adjust_lr: sqrt(max(1, A/B)) ("original"), so that tall matrices take updates of the same RMS as wide
  // ones, or 0.2 sqrt(max(A, B)) ("match_rms_adamw", Moonshot's: the RMS of an AdamW update), in double.
  FUSEDOPT_HD static double lr_ratio(const Hyper& h, double rows, double cols) {
    if (h.adjust_lr != 0.0) return 0.2 * sqrt(rows > cols ? rows : cols);
    const double aspect = rows / cols;
    return sqrt(aspect > 1.0 ? aspect : 1.0);
  }

  // The shape does not change with a step.
  FUSEDOPT_HD static void advance(const Hyper&, double, double, float*) {}

  template <bool Nesterov>
  struct MomentumOp {
    FUSEDOPT_HD static constexpr bool uses(int k) { return k < 2; }
    template <typename T>
    FUSEDOPT_HD void operator()(const Coeffs<T>& c, T&, T g, T& momentum_buffer, T& update, T&) const {
      g *= c.grad_scale;
      momentum_buffer = lerp(momentum_buffer, g, c.one_minus_momentum);
      update = Nesterov ? lerp(g, momentum_buffer, c.momentum) : momentum_buffer;
    }
  };

  struct ApplyOp {
    FUSEDOPT_HD static constexpr bool uses(int k) { return k == 1; }
    template <typename T>
    FUSEDOPT_HD void operator()(const Coeffs<T>& c, T& p, T, T&, T& update, T&) const {
      p *= c.decay;
      p = p + c.step_size * update;
    }
  };

  template <typename F>
  static void with_op(const Hyper& h, F&& f) {
    if (h.phase != kMomentumPhase)
      f(ApplyOp{});
    else if (h.nesterov != 0.0)
      f(MomentumOp<true>{});
    else
      f(MomentumOp<false>{});
  }
};

}  // namespace algo
}  // namespace fusedopt
