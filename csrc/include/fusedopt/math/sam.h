// Sharpness-Aware Minimization's per-element pieces, shared by the CPU driver (csrc/cpu/sam.h) and the CUDA kernels
// (csrc/cuda/sam.cu, csrc/cuda/reductions.cu). Foret et al. 2021, eq. 2: e = rho * g / ||g||; ASAM (Kwon et al. 2021,
// eq. 9 with T_w = |w|): e = rho * w^2 * g / || |w| g ||. The global norm and rho / (norm + 1e-12) are made by the
// caller (python/fusedopt/optim/sam.py) and arrive here as one `scale`; no torch.optim counterpart.
#pragma once

#include "fusedopt/common.h"

namespace fusedopt {
namespace sam {

// ASAM's norm term |w| * g, whose squares the reduction sums (SAM sums the squares of g itself).
template <typename C>
FUSEDOPT_HD C adaptive_norm_term(C w, C g) {
  return magnitude(w) * g;
}

// The perturbed weight w + e, e = scale * g, or scale * (w * w * g) for ASAM. Adaptive is a template parameter so the
// CPU loop stays branch-free; the product order is the reference's (python/fusedopt/reference.py sam_perturb).
template <bool Adaptive, typename C>
FUSEDOPT_HD C perturbed(C w, C g, C scale) {
  const C direction = Adaptive ? w * w * g : g;
  return w + scale * direction;
}

}  // namespace sam
}  // namespace fusedopt
