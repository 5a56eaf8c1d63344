// SGD and RMSprop instantiations of the CUDA launcher (math: csrc/include/fusedopt/math/{sgd,rmsprop}.h).
#include "fusedopt/math/rmsprop.h"
#include "fusedopt/math/sgd.h"
#include "kernels.cuh"
#include "launcher.cuh"

namespace fusedopt {
namespace cuda {

void launch_sgd(const FlatBuffers& b, const SgdCoeffs& c, bool momentum, const DeviceScalars& d, const Hyper& h,
                cudaStream_t stream) {
  if (momentum)
    launch_elementwise(SgdOp<true>{c}, b, d, h, stream);
  else
    launch_elementwise(SgdOp<false>{c}, b, d, h, stream);
}

void launch_rmsprop(const FlatBuffers& b, const RmspropCoeffs& c, bool centered, bool momentum,
                    const DeviceScalars& d, const Hyper& h, cudaStream_t stream) {
  if (centered) {
    if (momentum)
      launch_elementwise(RmspropOp<true, true>{c}, b, d, h, stream);
    else
      launch_elementwise(RmspropOp<true, false>{c}, b, d, h, stream);
  } else {
    if (momentum)
      launch_elementwise(RmspropOp<false, true>{c}, b, d, h, stream);
    else
      launch_elementwise(RmspropOp<false, false>{c}, b, d, h, stream);
  }
}

}  // namespace cuda
}  // namespace fusedopt
