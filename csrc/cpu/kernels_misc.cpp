// Adagrad, Lion, LAMB and reduction instantiations of the CPU driver for one ISA, plus this ISA's kernel table
// (this file is compiled once per ISA).
#include "driver.h"
#include "fusedopt/math/adagrad.h"
#include "fusedopt/math/lion.h"

namespace fusedopt {
namespace cpu {
namespace FUSEDOPT_ISA_NS {

void adam_kernel(const FlatBuffers& b, const AdamCoeffs& c, bool amsgrad, int threads);
void sgd_kernel(const FlatBuffers& b, const SgdCoeffs& c, bool momentum, int threads);
void rmsprop_kernel(const FlatBuffers& b, const RmspropCoeffs& c, bool centered, bool momentum, int threads);

static void adagrad_kernel(const FlatBuffers& b, const AdagradCoeffs& c, int threads) {
  run_elementwise(AdagradOp{c}, b, threads);
}

static void lion_kernel(const FlatBuffers& b, const LionCoeffs& c, int threads) {
  run_elementwise(LionOp{c}, b, threads);
}

static void lamb_kernel(const FlatBuffers& b, const LambCoeffs& c, const LambWork& w, int threads) {
  run_lamb(b, c, w, threads);
}

const KernelTable& kernel_table() {
  static const KernelTable table = {FUSEDOPT_ISA_NAME, adam_kernel,    sgd_kernel,
                                    rmsprop_kernel,    adagrad_kernel, lion_kernel,
                                    lamb_kernel,       sum_of_squares_kernel, round_copy_kernel};
  return table;
}

}  // namespace FUSEDOPT_ISA_NS
}  // namespace cpu
}  // namespace fusedopt
