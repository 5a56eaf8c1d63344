// Thin pybind11 module fusedopt._C: raw pointers (Python ints), int64 counts, dtype codes and precomputed
// coefficients in, std::invalid_argument -> ValueError out. Torch-free; the GIL is released around every kernel.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>

#include "fusedopt/api.h"
#include "flat_buffers.h"

namespace py = pybind11;

#if defined(FUSEDOPT_WITH_CUDA)
void register_cuda_bindings(pybind11::module_& m);  // csrc/bindings/cuda_bindings.cpp
#endif
using namespace fusedopt;
using bindings::buffers;
using bindings::ptr;

namespace {

std::string compiler() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return "gcc " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__) + "." +
         std::to_string(__GNUC_PATCHLEVEL__);
#elif defined(_MSC_VER)
  return "msvc " + std::to_string(_MSC_VER);
#else
  return "unknown";
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusedopt compiled core (torch-free): flat optimizer kernels over raw pointers.";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const std::invalid_argument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });

  m.def(
      "adam",
      [](uintptr_t param, uintptr_t grad, uintptr_t exp_avg, uintptr_t exp_avg_sq, uintptr_t max_exp_avg_sq,
         uintptr_t master, int64_t n, int param_dtype, int grad_dtype, int state_dtype, double grad_scale,
         double beta1_weight, double beta2, double one_minus_beta2, double eps, double weight_decay, double decay,
         double step_size, double bc2_sqrt, bool coupled_wd, bool amsgrad) {
        const FlatBuffers b = buffers(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master, n, param_dtype,
                                      grad_dtype, state_dtype);
        const AdamCoeffs c{float(grad_scale),   float(beta1_weight), float(beta2),     float(one_minus_beta2),
                           float(eps),          float(weight_decay), float(decay),     float(step_size),
                           float(bc2_sqrt),     coupled_wd};
        py::gil_scoped_release release;
        cpu::adam(b, c, amsgrad);
      },
      py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("max_exp_avg_sq"),
      py::arg("master"), py::arg("n"), py::arg("param_dtype"), py::arg("grad_dtype"), py::arg("state_dtype"),
      py::arg("grad_scale"), py::arg("beta1_weight"), py::arg("beta2"), py::arg("one_minus_beta2"), py::arg("eps"),
      py::arg("weight_decay"), py::arg("decay"), py::arg("step_size"), py::arg("bc2_sqrt"), py::arg("coupled_wd"),
      py::arg("amsgrad"),
      "Adam/AdamW step over n elements (pointers as ints, 0 for absent buffers; coefficients precomputed in double).");

  m.def(
      "sgd",
      [](uintptr_t param, uintptr_t grad, uintptr_t momentum_buffer, uintptr_t master, int64_t n, int param_dtype,
         int grad_dtype, int state_dtype, double grad_scale, double lr, double weight_decay, double momentum,
         double one_minus_dampening, bool nesterov, bool first_step) {
        const FlatBuffers b =
            buffers(param, grad, momentum_buffer, 0, 0, master, n, param_dtype, grad_dtype, state_dtype);
        const SgdCoeffs c{float(grad_scale),        float(lr), float(weight_decay), float(momentum),
                          float(one_minus_dampening), weight_decay != 0.0, nesterov, first_step};
        py::gil_scoped_release release;
        cpu::sgd(b, c, momentum != 0.0);
      },
      py::arg("param"), py::arg("grad"), py::arg("momentum_buffer"), py::arg("master"), py::arg("n"),
      py::arg("param_dtype"), py::arg("grad_dtype"), py::arg("state_dtype"), py::arg("grad_scale"), py::arg("lr"),
      py::arg("weight_decay"), py::arg("momentum"), py::arg("one_minus_dampening"), py::arg("nesterov"),
      py::arg("first_step"), "SGD step over n elements.");

  m.def(
      "rmsprop",
      [](uintptr_t param, uintptr_t grad, uintptr_t square_avg, uintptr_t momentum_buffer, uintptr_t grad_avg,
         uintptr_t master, int64_t n, int param_dtype, int grad_dtype, int state_dtype, double grad_scale, double lr,
         double alpha, double one_minus_alpha, double eps, double weight_decay, double momentum, bool centered) {
        const FlatBuffers b = buffers(param, grad, square_avg, momentum_buffer, grad_avg, master, n, param_dtype,
                                      grad_dtype, state_dtype);
        const RmspropCoeffs c{float(grad_scale), float(lr),           float(alpha),    float(one_minus_alpha),
                              float(eps),        float(weight_decay), float(momentum), weight_decay != 0.0};
        py::gil_scoped_release release;
        cpu::rmsprop(b, c, centered, momentum > 0.0);
      },
      py::arg("param"), py::arg("grad"), py::arg("square_avg"), py::arg("momentum_buffer"), py::arg("grad_avg"),
      py::arg("master"), py::arg("n"), py::arg("param_dtype"), py::arg("grad_dtype"), py::arg("state_dtype"),
      py::arg("grad_scale"), py::arg("lr"), py::arg("alpha"), py::arg("one_minus_alpha"), py::arg("eps"),
      py::arg("weight_decay"), py::arg("momentum"), py::arg("centered"), "RMSprop step over n elements.");

  m.def(
      "adagrad",
      [](uintptr_t param, uintptr_t grad, uintptr_t sum, uintptr_t master, int64_t n, int param_dtype, int grad_dtype,
         int state_dtype, double grad_scale, double clr, double eps, double weight_decay) {
        const FlatBuffers b = buffers(param, grad, sum, 0, 0, master, n, param_dtype, grad_dtype, state_dtype);
        const AdagradCoeffs c{float(grad_scale), float(clr), float(eps), float(weight_decay), weight_decay != 0.0};
        py::gil_scoped_release release;
        cpu::adagrad(b, c);
      },
      py::arg("param"), py::arg("grad"), py::arg("sum"), py::arg("master"), py::arg("n"), py::arg("param_dtype"),
      py::arg("grad_dtype"), py::arg("state_dtype"), py::arg("grad_scale"), py::arg("clr"), py::arg("eps"),
      py::arg("weight_decay"), "Adagrad step over n elements.");

  m.def(
      "lion",
      [](uintptr_t param, uintptr_t grad, uintptr_t exp_avg, uintptr_t master, int64_t n, int param_dtype,
         int grad_dtype, int state_dtype, double grad_scale, double lr, double decay, double beta1_weight,
         double beta2_weight) {
        const FlatBuffers b = buffers(param, grad, exp_avg, 0, 0, master, n, param_dtype, grad_dtype, state_dtype);
        const LionCoeffs c{float(grad_scale), float(lr), float(decay), float(beta1_weight), float(beta2_weight)};
        py::gil_scoped_release release;
        cpu::lion(b, c);
      },
      py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("master"), py::arg("n"), py::arg("param_dtype"),
      py::arg("grad_dtype"), py::arg("state_dtype"), py::arg("grad_scale"), py::arg("lr"), py::arg("decay"),
      py::arg("beta1_weight"), py::arg("beta2_weight"), "Lion step over n elements.");

  m.def(
      "lamb",
      [](uintptr_t param, uintptr_t grad, uintptr_t exp_avg, uintptr_t exp_avg_sq, uintptr_t master, int64_t n,
         int param_dtype, int grad_dtype, int state_dtype, uintptr_t segment_offsets, uintptr_t segment_numels,
         int64_t segment_count, double grad_scale, double lr, double beta1_weight, double beta2,
         double one_minus_beta2, double bc1, double bc2, double eps, double weight_decay, double max_trust_ratio,
         int phases, uintptr_t segment_w2, uintptr_t segment_u2) {
        const FlatBuffers b = buffers(param, grad, exp_avg, exp_avg_sq, 0, master, n, param_dtype, grad_dtype,
                                      state_dtype);
        const LambCoeffs c{float(grad_scale), float(beta1_weight), float(beta2),        float(one_minus_beta2),
                           float(bc1),        float(bc2),          float(eps),          float(weight_decay),
                           weight_decay != 0.0};
        LambSegments s;
        s.offsets = ptr<const int64_t>(segment_offsets);
        s.numels = ptr<const int64_t>(segment_numels);
        s.count = segment_count;
        py::gil_scoped_release release;
        if (phases == (kLambMoments | kLambApply) && segment_w2 == 0 && segment_u2 == 0)
          cpu::lamb(b, c, s, lr, max_trust_ratio);
        else
          cpu::lamb_phases(b, c, s, lr, max_trust_ratio, phases, ptr<double>(segment_w2), ptr<double>(segment_u2));
      },
      py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("master"), py::arg("n"),
      py::arg("param_dtype"), py::arg("grad_dtype"), py::arg("state_dtype"), py::arg("segment_offsets"),
      py::arg("segment_numels"), py::arg("segment_count"), py::arg("grad_scale"), py::arg("lr"),
      py::arg("beta1_weight"), py::arg("beta2"), py::arg("one_minus_beta2"), py::arg("bc1"), py::arg("bc2"),
      py::arg("eps"), py::arg("weight_decay"), py::arg("max_trust_ratio"), py::arg("phases") = 3,
      py::arg("segment_w2") = 0, py::arg("segment_u2") = 0,
      "LAMB step over the given segments (int64 offset/numel arrays); max_trust_ratio < 0 means no clamp (None). "
      "phases 1 runs pass 1 and writes the per-segment sums of squares of p and u to segment_w2/segment_u2 (float64 "
      "arrays of segment_count), phases 2 runs pass 2 from them, 3 both.");

  m.def(
      "sum_of_squares",
      [](uintptr_t data, int64_t n, int dtype) {
        SumOfSquares r;
        {
          py::gil_scoped_release release;
          r = cpu::sum_of_squares(ptr<const void>(data), n, dtype);
        }
        return py::make_tuple(r.sum, r.nonfinite);
      },
      py::arg("data"), py::arg("n"), py::arg("dtype"),
      "(sum of fp32 squares as a double, any inf/nan) with a thread-count-independent reduction.");

  m.def("build_info", [] {
    py::dict d;
    d["version"] = FUSEDOPT_VERSION;
    d["cpu_isas_compiled"] = cpu::compiled_isas();
    d["cpu_isas_supported"] = cpu::supported_isas();
    d["cpu_isa"] = cpu::cpu_isa();
    d["openmp"] = cpu::openmp_enabled();
    d["num_threads"] = cpu::get_num_threads();
#if defined(FUSEDOPT_WITH_CUDA)
    d["cuda_built"] = true;
#else
    d["cuda_built"] = false;
#endif
    d["compiler"] = compiler();
    d["chunk_elements"] = kChunk;
    return d;
  });
  m.def("cpu_isa", &cpu::cpu_isa, "Name of the CPU ISA whose kernels run now.");
  m.def("supported_isas", &cpu::supported_isas, "ISAs compiled in and runnable on this CPU, least capable first.");
  m.def("compiled_isas", &cpu::compiled_isas, "ISAs compiled into this build.");
  m.def("set_cpu_isa", &cpu::set_cpu_isa, py::arg("name"), "Force the CPU ISA (baseline, avx2, avx512).");
  m.def(
      "isa_override_error",
      []() -> py::object {
        const std::string e = cpu::isa_override_error();
        if (e.empty()) return py::none();
        return py::str(e);
      },
      "Why FUSEDOPT_CPU_ISA was rejected at load (None when unset or valid).");
  m.def("set_num_threads", &cpu::set_num_threads, py::arg("n"), "Threads used by the CPU kernels (>= 1).");
  m.def("get_num_threads", &cpu::get_num_threads);
#if defined(FUSEDOPT_WITH_CUDA)
  register_cuda_bindings(m);
#endif
}
