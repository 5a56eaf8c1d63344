// Adagrad and Lion instantiations of the CUDA launcher (math: csrc/include/fusedopt/math/{adagrad,lion}.h).
#include "fusedopt/math/adagrad.h"
#include "fusedopt/math/lion.h"
#include "kernels.cuh"
#include "launcher.cuh"

namespace fusedopt {
namespace cuda {

void launch_adagrad(const FlatBuffers& b, const AdagradCoeffs& c, const DeviceScalars& d, const Hyper& h,
                    cudaStream_t stream) {
  launch_elementwise(AdagradOp{c}, b, d, h, stream);
}

void launch_lion(const FlatBuffers& b, const LionCoeffs& c, const DeviceScalars& d, const Hyper& h,
                 cudaStream_t stream) {
  launch_elementwise(LionOp{c}, b, d, h, stream);
}

}  // namespace cuda
}  // namespace fusedopt
