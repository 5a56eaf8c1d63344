// Adam/AdamW instantiations of the CUDA launcher (math: csrc/include/fusedopt/math/adam.h).
#include "fusedopt/math/adam.h"
#include "kernels.cuh"
#include "launcher.cuh"

namespace fusedopt {
namespace cuda {

void launch_adam(const FlatBuffers& b, const AdamCoeffs& c, bool amsgrad, const DeviceScalars& d, const Hyper& h,
                 cudaStream_t stream) {
  if (amsgrad)
    launch_elementwise(AdamOp<true>{c}, b, d, h, stream);
  else
    launch_elementwise(AdamOp<false>{c}, b, d, h, stream);
}

}  // namespace cuda
}  // namespace fusedopt
