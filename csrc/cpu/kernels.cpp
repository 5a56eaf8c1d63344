// Every algorithm of the list (and SAM's kernels, sam.h) instantiated on the CPU driver for one ISA, and this ISA's
// kernel table (this file is compiled once per ISA, into the namespace FUSEDOPT_ISA_NS).
#include "driver.h"
#include "sam.h"

namespace fusedopt {
namespace cpu {
namespace FUSEDOPT_ISA_NS {

const KernelTable& kernel_table() {
#define FUSEDOPT_TABLE_ENTRY(A) kernel<algo::A>,
  static const KernelTable table = {FUSEDOPT_ISA_NAME, FUSEDOPT_FOR_EACH_ALGORITHM(FUSEDOPT_TABLE_ENTRY)
                                                           sum_of_squares_kernel, sam_perturb_kernel,
                                                           sam_restore_kernel, sam_sum_of_squares_kernel};
#undef FUSEDOPT_TABLE_ENTRY
  return table;
}

}  // namespace FUSEDOPT_ISA_NS
}  // namespace cpu
}  // namespace fusedopt
