// SGD instantiations of the CPU driver for one ISA (this file is compiled once per ISA).
#include "driver.h"
#include "fusedopt/math/sgd.h"

namespace fusedopt {
namespace cpu {
namespace FUSEDOPT_ISA_NS {

void sgd_kernel(const FlatBuffers& b, const SgdCoeffs& c, bool momentum, int threads) {
  if (momentum)
    run_elementwise(SgdOp<true>{c}, b, threads);
  else
    run_elementwise(SgdOp<false>{c}, b, threads);
}

}  // namespace FUSEDOPT_ISA_NS
}  // namespace cpu
}  // namespace fusedopt
