// RMSprop instantiations of the CPU driver for one ISA (this file is compiled once per ISA).
#include "driver.h"
#include "fusedopt/math/rmsprop.h"

namespace fusedopt {
namespace cpu {
namespace FUSEDOPT_ISA_NS {

void rmsprop_kernel(const FlatBuffers& b, const RmspropCoeffs& c, bool centered, bool momentum, int threads) {
  if (centered) {
    if (momentum)
      run_elementwise(RmspropOp<true, true>{c}, b, threads);
    else
      run_elementwise(RmspropOp<true, false>{c}, b, threads);
  } else {
    if (momentum)
      run_elementwise(RmspropOp<false, true>{c}, b, threads);
    else
      run_elementwise(RmspropOp<false, false>{c}, b, threads);
  }
}

}  // namespace FUSEDOPT_ISA_NS
}  // namespace cpu
}  // namespace fusedopt
