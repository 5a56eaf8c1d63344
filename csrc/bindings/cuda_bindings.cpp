// pybind11 bindings of the CUDA entry points (fusedopt/cuda_api.h) as fusedopt._C.cuda_*: raw device pointers and a
// stream handle as Python ints, coefficients precomputed in double by python/fusedopt/_compiled_cuda.py.
// Compiled by the host compiler (no CUDA headers); module.cpp calls register_cuda_bindings under FUSEDOPT_WITH_CUDA.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "fusedopt/cuda_api.h"
#include "flat_buffers.h"

namespace py = pybind11;
using namespace fusedopt;
using bindings::buffers;
using bindings::ptr;

namespace {

cuda::DeviceScalars scalars(uintptr_t grad_scale_ptr, uintptr_t found_inf_ptr, uintptr_t lr_ptr, uintptr_t step_ptr) {
  cuda::DeviceScalars d;
  d.grad_scale = ptr<const float>(grad_scale_ptr);
  d.found_inf = ptr<const float>(found_inf_ptr);
  d.lr = ptr<const float>(lr_ptr);
  d.step = ptr<const float>(step_ptr);
  return d;
}

cuda::Launch launch(int device, uintptr_t stream) {
  cuda::Launch l;
  l.device = device;
  l.stream = static_cast<intptr_t>(stream);
  return l;
}

// Keyword arguments shared by every update: device scalars (0 = absent) and where to run.
#define FUSEDOPT_DEVICE_ARGS                                                                               \
  py::arg("grad_scale_ptr") = 0, py::arg("found_inf_ptr") = 0, py::arg("lr_ptr") = 0, py::arg("step_ptr") = 0, \
      py::arg("device") = 0, py::arg("stream") = 0

}  // namespace

void register_cuda_bindings(py::module_& m) {
  m.def(
      "cuda_adam",
      [](uintptr_t param, uintptr_t grad, uintptr_t exp_avg, uintptr_t exp_avg_sq, uintptr_t max_exp_avg_sq,
         uintptr_t master, int64_t n, int param_dtype, int grad_dtype, int state_dtype, double grad_scale,
         double beta1_weight, double beta2, double one_minus_beta2, double eps, double weight_decay, double decay,
         double step_size, double bc2_sqrt, bool coupled_wd, bool amsgrad, double beta1, bool decoupled,
         uintptr_t grad_scale_ptr, uintptr_t found_inf_ptr, uintptr_t lr_ptr, uintptr_t step_ptr, int device,
         uintptr_t stream) {
        const FlatBuffers b = buffers(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master, n, param_dtype,
                                      grad_dtype, state_dtype);
        AdamCoeffs c{};
        c.grad_scale = float(grad_scale);
        c.beta1_weight = float(beta1_weight);
        c.beta2 = float(beta2);
        c.one_minus_beta2 = float(one_minus_beta2);
        c.eps = float(eps);
        c.weight_decay = float(weight_decay);
        c.decay = float(decay);
        c.step_size = float(step_size);
        c.bc2_sqrt = float(bc2_sqrt);
        c.coupled_wd = coupled_wd;
        cuda::Hyper h;
        h.beta1 = beta1;
        h.beta2 = beta2;
        h.weight_decay = weight_decay;
        h.decoupled = decoupled && weight_decay != 0.0;
        cuda::adam(b, c, amsgrad, scalars(grad_scale_ptr, found_inf_ptr, lr_ptr, step_ptr), h, launch(device, stream));
      },
      py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("max_exp_avg_sq"),
      py::arg("master"), py::arg("n"), py::arg("param_dtype"), py::arg("grad_dtype"), py::arg("state_dtype"),
      py::arg("grad_scale"), py::arg("beta1_weight"), py::arg("beta2"), py::arg("one_minus_beta2"), py::arg("eps"),
      py::arg("weight_decay"), py::arg("decay"), py::arg("step_size"), py::arg("bc2_sqrt"), py::arg("coupled_wd"),
      py::arg("amsgrad"), py::arg("beta1"), py::arg("decoupled"), FUSEDOPT_DEVICE_ARGS,
      "Adam/AdamW step on a CUDA device (pointers as ints, 0 for absent buffers; asynchronous on `stream`).");

  m.def(
      "cuda_sgd",
      [](uintptr_t param, uintptr_t grad, uintptr_t momentum_buffer, uintptr_t master, int64_t n, int param_dtype,
         int grad_dtype, int state_dtype, double grad_scale, double lr, double weight_decay, double momentum,
         double one_minus_dampening, bool nesterov, bool first_step, uintptr_t grad_scale_ptr,
         uintptr_t found_inf_ptr, uintptr_t lr_ptr, uintptr_t step_ptr, int device, uintptr_t stream) {
        const FlatBuffers b =
            buffers(param, grad, momentum_buffer, 0, 0, master, n, param_dtype, grad_dtype, state_dtype);
        SgdCoeffs c{};
        c.grad_scale = float(grad_scale);
        c.lr = float(lr);
        c.weight_decay = float(weight_decay);
        c.momentum = float(momentum);
        c.one_minus_damp = float(one_minus_dampening);
        c.has_weight_decay = weight_decay != 0.0;
        c.nesterov = nesterov;
        c.first_step = first_step;
        cuda::sgd(b, c, momentum != 0.0, scalars(grad_scale_ptr, found_inf_ptr, lr_ptr, step_ptr), cuda::Hyper{},
                  launch(device, stream));
      },
      py::arg("param"), py::arg("grad"), py::arg("momentum_buffer"), py::arg("master"), py::arg("n"),
      py::arg("param_dtype"), py::arg("grad_dtype"), py::arg("state_dtype"), py::arg("grad_scale"), py::arg("lr"),
      py::arg("weight_decay"), py::arg("momentum"), py::arg("one_minus_dampening"), py::arg("nesterov"),
      py::arg("first_step"), FUSEDOPT_DEVICE_ARGS, "SGD step on a CUDA device.");

  m.def(
      "cuda_rmsprop",
      [](uintptr_t param, uintptr_t grad, uintptr_t square_avg, uintptr_t momentum_buffer, uintptr_t grad_avg,
         uintptr_t master, int64_t n, int param_dtype, int grad_dtype, int state_dtype, double grad_scale, double lr,
         double alpha, double one_minus_alpha, double eps, double weight_decay, double momentum, bool centered,
         uintptr_t grad_scale_ptr, uintptr_t found_inf_ptr, uintptr_t lr_ptr, uintptr_t step_ptr, int device,
         uintptr_t stream) {
        const FlatBuffers b = buffers(param, grad, square_avg, momentum_buffer, grad_avg, master, n, param_dtype,
                                      grad_dtype, state_dtype);
        RmspropCoeffs c{};
        c.grad_scale = float(grad_scale);
        c.lr = float(lr);
        c.alpha = float(alpha);
        c.one_minus_alpha = float(one_minus_alpha);
        c.eps = float(eps);
        c.weight_decay = float(weight_decay);
        c.momentum = float(momentum);
        c.has_weight_decay = weight_decay != 0.0;
        cuda::rmsprop(b, c, centered, momentum > 0.0, scalars(grad_scale_ptr, found_inf_ptr, lr_ptr, step_ptr),
                      cuda::Hyper{}, launch(device, stream));
      },
      py::arg("param"), py::arg("grad"), py::arg("square_avg"), py::arg("momentum_buffer"), py::arg("grad_avg"),
      py::arg("master"), py::arg("n"), py::arg("param_dtype"), py::arg("grad_dtype"), py::arg("state_dtype"),
      py::arg("grad_scale"), py::arg("lr"), py::arg("alpha"), py::arg("one_minus_alpha"), py::arg("eps"),
      py::arg("weight_decay"), py::arg("momentum"), py::arg("centered"), FUSEDOPT_DEVICE_ARGS,
      "RMSprop step on a CUDA device.");

  m.def(
      "cuda_adagrad",
      [](uintptr_t param, uintptr_t grad, uintptr_t sum, uintptr_t master, int64_t n, int param_dtype, int grad_dtype,
         int state_dtype, double grad_scale, double clr, double eps, double weight_decay, double lr_decay,
         uintptr_t grad_scale_ptr, uintptr_t found_inf_ptr, uintptr_t lr_ptr, uintptr_t step_ptr, int device,
         uintptr_t stream) {
        const FlatBuffers b = buffers(param, grad, sum, 0, 0, master, n, param_dtype, grad_dtype, state_dtype);
        AdagradCoeffs c{};
        c.grad_scale = float(grad_scale);
        c.clr = float(clr);
        c.eps = float(eps);
        c.weight_decay = float(weight_decay);
        c.has_weight_decay = weight_decay != 0.0;
        cuda::Hyper h;
        h.lr_decay = lr_decay;
        cuda::adagrad(b, c, scalars(grad_scale_ptr, found_inf_ptr, lr_ptr, step_ptr), h, launch(device, stream));
      },
      py::arg("param"), py::arg("grad"), py::arg("sum"), py::arg("master"), py::arg("n"), py::arg("param_dtype"),
      py::arg("grad_dtype"), py::arg("state_dtype"), py::arg("grad_scale"), py::arg("clr"), py::arg("eps"),
      py::arg("weight_decay"), py::arg("lr_decay") = 0.0, FUSEDOPT_DEVICE_ARGS, "Adagrad step on a CUDA device.");

  m.def(
      "cuda_lion",
      [](uintptr_t param, uintptr_t grad, uintptr_t exp_avg, uintptr_t master, int64_t n, int param_dtype,
         int grad_dtype, int state_dtype, double grad_scale, double lr, double decay, double beta1_weight,
         double beta2_weight, double weight_decay, uintptr_t grad_scale_ptr, uintptr_t found_inf_ptr,
         uintptr_t lr_ptr, uintptr_t step_ptr, int device, uintptr_t stream) {
        const FlatBuffers b = buffers(param, grad, exp_avg, 0, 0, master, n, param_dtype, grad_dtype, state_dtype);
        LionCoeffs c{};
        c.grad_scale = float(grad_scale);
        c.lr = float(lr);
        c.decay = float(decay);
        c.beta1_weight = float(beta1_weight);
        c.beta2_weight = float(beta2_weight);
        cuda::Hyper h;
        h.weight_decay = weight_decay;
        cuda::lion(b, c, scalars(grad_scale_ptr, found_inf_ptr, lr_ptr, step_ptr), h, launch(device, stream));
      },
      py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("master"), py::arg("n"), py::arg("param_dtype"),
      py::arg("grad_dtype"), py::arg("state_dtype"), py::arg("grad_scale"), py::arg("lr"), py::arg("decay"),
      py::arg("beta1_weight"), py::arg("beta2_weight"), py::arg("weight_decay") = 0.0, FUSEDOPT_DEVICE_ARGS,
      "Lion step on a CUDA device.");

  m.def(
      "cuda_lamb",
      [](uintptr_t param, uintptr_t grad, uintptr_t exp_avg, uintptr_t exp_avg_sq, uintptr_t master, int64_t n,
         int param_dtype, int grad_dtype, int state_dtype, uintptr_t item_begin, uintptr_t item_end,
         uintptr_t item_segment, uintptr_t seg_first, int64_t items, int64_t segments, uintptr_t partial_w,
         uintptr_t partial_u, uintptr_t scaled_lr, double grad_scale, double lr, double beta1_weight, double beta2,
         double one_minus_beta2, double bc1, double bc2, double eps, double weight_decay, double max_trust_ratio,
         double beta1, bool bias_correction, uintptr_t segment_w2, uintptr_t segment_u2, int phases,
         uintptr_t grad_scale_ptr, uintptr_t found_inf_ptr, uintptr_t lr_ptr, uintptr_t step_ptr, int device,
         uintptr_t stream) {
        const FlatBuffers b = buffers(param, grad, exp_avg, exp_avg_sq, 0, master, n, param_dtype, grad_dtype,
                                      state_dtype);
        LambCoeffs c{};
        c.grad_scale = float(grad_scale);
        c.beta1_weight = float(beta1_weight);
        c.beta2 = float(beta2);
        c.one_minus_beta2 = float(one_minus_beta2);
        c.bc1 = float(bc1);
        c.bc2 = float(bc2);
        c.eps = float(eps);
        c.weight_decay = float(weight_decay);
        c.has_weight_decay = weight_decay != 0.0;
        cuda::LambDeviceWork w;
        w.item_begin = ptr<const int64_t>(item_begin);
        w.item_end = ptr<const int64_t>(item_end);
        w.item_segment = ptr<const int64_t>(item_segment);
        w.seg_first = ptr<const int64_t>(seg_first);
        w.items = items;
        w.segments = segments;
        w.partial_w = ptr<double>(partial_w);
        w.partial_u = ptr<double>(partial_u);
        w.scaled_lr = ptr<float>(scaled_lr);
        w.segment_w2 = ptr<double>(segment_w2);
        w.segment_u2 = ptr<double>(segment_u2);
        w.phases = phases;
        cuda::Hyper h;
        h.beta1 = beta1;
        h.beta2 = beta2;
        h.bias_correction = bias_correction;
        cuda::lamb(b, c, w, lr, max_trust_ratio, scalars(grad_scale_ptr, found_inf_ptr, lr_ptr, step_ptr), h,
                   launch(device, stream));
      },
      py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("master"), py::arg("n"),
      py::arg("param_dtype"), py::arg("grad_dtype"), py::arg("state_dtype"), py::arg("item_begin"),
      py::arg("item_end"), py::arg("item_segment"), py::arg("seg_first"), py::arg("items"), py::arg("segments"),
      py::arg("partial_w"), py::arg("partial_u"), py::arg("scaled_lr"), py::arg("grad_scale"), py::arg("lr"),
      py::arg("beta1_weight"), py::arg("beta2"), py::arg("one_minus_beta2"), py::arg("bc1"), py::arg("bc2"),
      py::arg("eps"), py::arg("weight_decay"), py::arg("max_trust_ratio"), py::arg("beta1"),
      py::arg("bias_correction"), py::arg("segment_w2"), py::arg("segment_u2"), py::arg("phases") = 3,
      FUSEDOPT_DEVICE_ARGS,
      "LAMB step on a CUDA device over a device work list (see _compiled_cuda.py); max_trust_ratio < 0: no clamp. "
      "phases 1 (moments, per-segment sums into segment_w2/segment_u2), 2 (trust ratios from them, update) or 3.");

  m.def("cuda_sum_of_squares_scratch", &cuda::sum_of_squares_scratch, py::arg("n"),
        "Doubles of device scratch cuda_sum_of_squares needs for n elements.");
  m.def(
      "cuda_sum_of_squares",
      [](uintptr_t data, int64_t n, int dtype, uintptr_t scratch, uintptr_t out_sum, uintptr_t out_sum64,
         uintptr_t out_nonfinite, int device, uintptr_t stream) {
        cuda::sum_of_squares(ptr<const void>(data), n, dtype, ptr<double>(scratch), ptr<float>(out_sum),
                             ptr<double>(out_sum64), ptr<float>(out_nonfinite), launch(device, stream));
      },
      py::arg("data"), py::arg("n"), py::arg("dtype"), py::arg("scratch"), py::arg("out_sum") = 0,
      py::arg("out_sum64") = 0, py::arg("out_nonfinite") = 0, py::arg("device") = 0, py::arg("stream") = 0,
      "Deterministic sum of squares left in device memory (fp32 and/or double sum, fp32 0/1 non-finite flag).");
  m.def(
      "cuda_clip_coefficient",
      [](uintptr_t sums, uintptr_t flags, int64_t count, double max_norm, uintptr_t out_coef, uintptr_t inv_scale_ptr,
         double inv_scale, uintptr_t out_norm, uintptr_t out_found_inf, int device, uintptr_t stream) {
        cuda::clip_coefficient(ptr<const float>(sums), ptr<const float>(flags), count, max_norm,
                               ptr<const float>(inv_scale_ptr), float(inv_scale), ptr<float>(out_coef),
                               ptr<float>(out_norm), ptr<float>(out_found_inf), launch(device, stream));
      },
      py::arg("sums"), py::arg("flags"), py::arg("count"), py::arg("max_norm"), py::arg("out_coef"),
      py::arg("inv_scale_ptr") = 0, py::arg("inv_scale") = 1.0, py::arg("out_norm") = 0, py::arg("out_found_inf") = 0,
      py::arg("device") = 0, py::arg("stream") = 0,
      "Clip coefficient min(max_norm/(norm+1e-6), 1) * inv_scale from `count` fp32 sums of squares, on the device.");
  m.def("cuda_device_count", &cuda::device_count, "CUDA devices visible to the runtime (0 without a driver).");
  m.def("cuda_runtime_version", &cuda::runtime_version, "CUDA runtime version this module was built with.");
  m.def("cuda_driver_version", &cuda::driver_version, "CUDA driver version (0 without a driver).");
}
