// Adam/AdamW instantiations of the CPU driver for one ISA (this file is compiled once per ISA).
#include "driver.h"
#include "fusedopt/math/adam.h"

namespace fusedopt {
namespace cpu {
namespace FUSEDOPT_ISA_NS {

void adam_kernel(const FlatBuffers& b, const AdamCoeffs& c, bool amsgrad, int threads) {
  if (amsgrad)
    run_elementwise(AdamOp<true>{c}, b, threads);
  else
    run_elementwise(AdamOp<false>{c}, b, threads);
}

}  // namespace FUSEDOPT_ISA_NS
}  // namespace cpu
}  // namespace fusedopt
