// pybind11 bindings of the CUDA entry points (fusedopt/cuda_api.h) as fusedopt._C.cuda_*: one step function per
// algorithm of the list, generated like the CPU ones in module.cpp, plus the sum of squares and SAM's kernels. Device
// pointers and the stream are Python ints; compiled by the host compiler (no CUDA headers); module.cpp calls
// register_cuda_bindings under FUSEDOPT_WITH_CUDA.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "flat_buffers.h"
#include "fusedopt/cuda_api.h"

namespace py = pybind11;
using namespace fusedopt;
using bindings::buffers;
using bindings::ptr;
using bindings::sam_buffers;
using bindings::segments;
using bindings::set_quantized;
using bindings::step_args;

namespace {

constexpr const char* kCudaStepDoc =
    "One step over a flat buffer set in device memory, asynchronous on `stream` of `device` (pointers as ints, 0 for "
    "absent buffers): param, grad, three state slots, master, the Kahan compensation, the param mode and the "
    "stochastic rounding seed (as the CPU step), n, param/grad/state dtype codes; the segment table "
    "(int64 offsets and numels, float32 steps counted on the device, uint8 active flags, count, float32 scalar "
    "states or 0); the device work list "
    "(int64 [item_begin | item_end | item_segment | seg_first], items); the algorithm's hyperparameters in "
    "algorithms()[name]['fields'] order; lr, grad_scale; optional device scalars lr_ptr (replaces lr) and "
    "grad_scale_ptr (multiplies grad_scale), float32 or, with float64 parameters, float64, and the float32 "
    "found_inf_ptr (non-zero: write nothing, count no step); for "
    "trust-ratio and factored algorithms the passes and per-segment float64 device sums (0: scratch of the call); "
    "for factored algorithms the device array of layout, row and column items (cuda_api.h DeviceWork) with the two "
    "item counts, and the float64 device row and column sums with their count (0: scratch); with 8-bit states "
    "(state dtype code 4) each slot's float32 device block absmaxes (0 for an unused slot) and the bit mask of signed "
    "slots.";

// The names of the step's positional arguments (python/fusedopt/_kernels.py passes them positionally).
#define FUSEDOPT_CUDA_STEP_ARGS                                                                                    \
  py::arg("param"), py::arg("grad"), py::arg("s0"), py::arg("s1"), py::arg("s2"), py::arg("master"),             \
      py::arg("comp"), py::arg("param_mode"), py::arg("seed"), py::arg("n"),                                        \
      py::arg("param_dtype"), py::arg("grad_dtype"), py::arg("state_dtype"), py::arg("seg_offsets"),               \
      py::arg("seg_numels"), py::arg("seg_steps"), py::arg("seg_active"), py::arg("seg_count"),                     \
      py::arg("seg_scalars"), py::arg("work"),                                                                     \
      py::arg("items"), py::arg("hyper"), py::arg("lr"), py::arg("grad_scale"), py::arg("lr_ptr"),                 \
      py::arg("grad_scale_ptr"), py::arg("found_inf_ptr"), py::arg("passes"), py::arg("segment_w2"),               \
      py::arg("segment_u2"), py::arg("factored"), py::arg("row_items"), py::arg("col_items"),                     \
      py::arg("factor_sums"), py::arg("factor_sums_count"), py::arg("device"), py::arg("stream"),                 \
      py::arg("absmax0") = 0, py::arg("absmax1") = 0, py::arg("absmax2") = 0, py::arg("signed_states") = 0

cuda::Launch launch(int device, uintptr_t stream) {
  cuda::Launch l;
  l.device = device;
  l.stream = static_cast<intptr_t>(stream);
  return l;
}

cuda::DeviceWork device_work(uintptr_t work, int64_t items) {
  cuda::DeviceWork w;
  w.work = ptr<const int64_t>(work);
  w.items = items;
  return w;
}

}  // namespace

void register_cuda_bindings(py::module_& m) {
#define FUSEDOPT_BIND_CUDA_STEP(A)                                                                                 \
  m.def(                                                                                                           \
      "cuda_" #A,                                                                                                  \
      [](uintptr_t param, uintptr_t grad, uintptr_t s0, uintptr_t s1, uintptr_t s2, uintptr_t master,               \
         uintptr_t comp, int param_mode, uint64_t seed, int64_t n, int param_dtype, int grad_dtype,               \
         int state_dtype, uintptr_t seg_offsets, uintptr_t seg_numels,                                             \
         uintptr_t seg_steps, uintptr_t seg_active, int64_t seg_count, uintptr_t seg_scalars, uintptr_t work,       \
         int64_t items,                                                                                            \
         const std::vector<double>& hyper, double lr, double grad_scale, uintptr_t lr_ptr, uintptr_t grad_scale_ptr, \
         uintptr_t found_inf_ptr, int passes, uintptr_t segment_w2, uintptr_t segment_u2, uintptr_t factored,      \
         int64_t row_items, int64_t col_items, uintptr_t factor_sums, int64_t factor_sums_count, int device,       \
         uintptr_t stream, uintptr_t absmax0, uintptr_t absmax1, uintptr_t absmax2, int signed_states) {           \
        FlatBuffers b = buffers(param, grad, s0, s1, s2, master, comp, param_mode, seed, n, param_dtype,          \
                                grad_dtype, state_dtype);                                                          \
        set_quantized(b, absmax0, absmax1, absmax2, signed_states);                                                \
        const Segments s =                                                                                         \
            segments(seg_offsets, seg_numels, seg_steps, seg_active, seg_count, seg_scalars);                      \
        const StepArgs args =                                                                                      \
            step_args(hyper, lr, grad_scale, passes, segment_w2, segment_u2, factor_sums, factor_sums_count);      \
        cuda::DeviceScalars d;                                                                                     \
        d.lr = ptr<const void>(lr_ptr);                                                                            \
        d.grad_scale = ptr<const void>(grad_scale_ptr);                                                            \
        d.found_inf = ptr<const float>(found_inf_ptr);                                                             \
        py::gil_scoped_release release;                                                                            \
        cuda::DeviceWork w = device_work(work, items);                                                             \
        w.factored = ptr<const int64_t>(factored);                                                                 \
        w.row_items = row_items;                                                                                   \
        w.col_items = col_items;                                                                                   \
        cuda::A(b, s, w, args, d, launch(device, stream));                                                         \
      },                                                                                                           \
      FUSEDOPT_CUDA_STEP_ARGS, kCudaStepDoc);
  FUSEDOPT_FOR_EACH_ALGORITHM(FUSEDOPT_BIND_CUDA_STEP)
#undef FUSEDOPT_BIND_CUDA_STEP

  m.def(
      "cuda_sam_perturb",
      [](uintptr_t param, uintptr_t grad, uintptr_t master, uintptr_t backup, int64_t n, int param_dtype,
         int grad_dtype, uintptr_t work, int64_t items, uintptr_t active, int64_t seg_count, double scale,
         uintptr_t scale_ptr, uintptr_t found_inf_ptr, bool adaptive, int device, uintptr_t stream) {
        const SamBuffers b = sam_buffers(param, grad, master, backup, n, param_dtype, grad_dtype);
        py::gil_scoped_release release;
        cuda::sam_perturb(b, device_work(work, items), ptr<const uint8_t>(active), seg_count, scale,
                          ptr<const void>(scale_ptr), ptr<const float>(found_inf_ptr), adaptive,
                          launch(device, stream));
      },
      py::arg("param"), py::arg("grad"), py::arg("master"), py::arg("backup"), py::arg("n"), py::arg("param_dtype"),
      py::arg("grad_dtype"), py::arg("work"), py::arg("items"), py::arg("active"), py::arg("seg_count"),
      py::arg("scale"), py::arg("scale_ptr"), py::arg("found_inf_ptr"), py::arg("adaptive"), py::arg("device"),
      py::arg("stream"),
      "SAM's perturbation over the active segments' work items in device memory, asynchronous on `stream`; "
      "scale_ptr (a device scalar of the compute dtype) replaces scale, found_inf_ptr non-zero writes nothing.");
  m.def(
      "cuda_sam_restore",
      [](uintptr_t param, uintptr_t master, uintptr_t backup, int64_t n, int param_dtype, uintptr_t work,
         int64_t items, uintptr_t active, int64_t seg_count, uintptr_t found_inf_ptr, int device, uintptr_t stream) {
        const SamBuffers b = sam_buffers(param, 0, master, backup, n, param_dtype, param_dtype);
        py::gil_scoped_release release;
        cuda::sam_restore(b, device_work(work, items), ptr<const uint8_t>(active), seg_count,
                          ptr<const float>(found_inf_ptr), launch(device, stream));
      },
      py::arg("param"), py::arg("master"), py::arg("backup"), py::arg("n"), py::arg("param_dtype"), py::arg("work"),
      py::arg("items"), py::arg("active"), py::arg("seg_count"), py::arg("found_inf_ptr"), py::arg("device"),
      py::arg("stream"), "The undo of cuda_sam_perturb: param := backup, or round(master) with master weights.");
  m.def(
      "cuda_sam_sum_of_squares",
      [](uintptr_t param, uintptr_t grad, uintptr_t master, int64_t n, int param_dtype, int grad_dtype,
         uintptr_t work, int64_t items, uintptr_t active, int64_t seg_count, uintptr_t scratch, uintptr_t out_sum,
         int out_sum_dtype, uintptr_t out_nonfinite, int device, uintptr_t stream) {
        const SamBuffers b = sam_buffers(param, grad, master, 0, n, param_dtype, grad_dtype);
        py::gil_scoped_release release;
        cuda::sam_sum_of_squares(b, device_work(work, items), ptr<const uint8_t>(active), seg_count,
                                 ptr<double>(scratch), ptr<void>(out_sum), out_sum_dtype, ptr<float>(out_nonfinite),
                                 launch(device, stream));
      },
      py::arg("param"), py::arg("grad"), py::arg("master"), py::arg("n"), py::arg("param_dtype"),
      py::arg("grad_dtype"), py::arg("work"), py::arg("items"), py::arg("active"), py::arg("seg_count"),
      py::arg("scratch"), py::arg("out_sum"), py::arg("out_sum_dtype"), py::arg("out_nonfinite"), py::arg("device"),
      py::arg("stream"),
      "ASAM's deterministic sum of squares of |w| * g over the active segments' work items, into the device scalars "
      "out_sum (float32, or float64 with out_sum_dtype 3) and out_nonfinite (float32); asynchronous on `stream`.");
  m.def("cuda_sum_of_squares_scratch", &cuda::sum_of_squares_scratch, py::arg("items"),
        "float64 elements of device scratch cuda_sum_of_squares needs for `items` work items.");
  m.def(
      "cuda_sum_of_squares",
      [](uintptr_t data, int64_t n, int dtype, uintptr_t work, int64_t items, uintptr_t active, int64_t seg_count,
         uintptr_t scratch, uintptr_t out_sum, int out_sum_dtype, uintptr_t out_nonfinite, int device,
         uintptr_t stream) {
        py::gil_scoped_release release;
        cuda::sum_of_squares(ptr<const void>(data), n, dtype, device_work(work, items), ptr<const uint8_t>(active),
                             seg_count, ptr<double>(scratch), ptr<void>(out_sum), out_sum_dtype,
                             ptr<float>(out_nonfinite), launch(device, stream));
      },
      py::arg("data"), py::arg("n"), py::arg("dtype"), py::arg("work"), py::arg("items"), py::arg("active"),
      py::arg("seg_count"), py::arg("scratch"), py::arg("out_sum"), py::arg("out_sum_dtype"),
      py::arg("out_nonfinite"), py::arg("device"), py::arg("stream"),
      "Deterministic sum of squares (fp32 squares; float64 ones of float64 data) over the active segments' work items "
      "(work 0: the whole buffer in ceil(n / chunk) items), written to the device scalars out_sum (float32, or "
      "float64 with out_sum_dtype 3) and out_nonfinite (float32, 1.0 for inf/nan); asynchronous on `stream` of "
      "`device`.");
}
