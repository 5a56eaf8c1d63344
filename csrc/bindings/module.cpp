// Thin pybind11 module fusedopt._C: raw pointers (Python ints), int64 counts, dtype codes, segment tables and each
// algorithm's hyperparameters in, std::invalid_argument -> ValueError out. One step function per algorithm of the list
// (fusedopt/algorithms.h). Torch-free; the GIL is released around every kernel.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "fusedopt/api.h"
#include "flat_buffers.h"

namespace py = pybind11;

#if defined(FUSEDOPT_WITH_CUDA)
void register_cuda_bindings(pybind11::module_& m);  // csrc/bindings/cuda_bindings.cpp
#endif
using namespace fusedopt;
using bindings::buffers;
using bindings::ptr;
using bindings::sam_buffers;
using bindings::segments;
using bindings::set_quantized;
using bindings::step_args;

namespace {

constexpr const char* kStepDoc =
    "One step over a flat buffer set (pointers as ints, 0 for absent buffers): param, grad, three state slots, "
    "master, the Kahan compensation, the param mode (0 nearest, 1 master, 2 kahan, 3 stochastic) and the "
    "stochastic rounding seed, n, param/grad/state dtype codes; the segment table (int64 offsets and numels, float32 steps counted "
    "by the call, uint8 active flags, count, float32 (count, len(scalars)) scalar states or 0 for an algorithm "
    "without them), int64 (count, 10) layout of a factored algorithm or 0 (api.h Layout); the algorithm's "
    "hyperparameters in algorithms()[name]['fields'] order; lr, grad_scale; for trust-ratio and factored algorithms "
    "the passes and per-segment float64 sums (0: scratch); for factored ones the float64 row and column sums and "
    "their count (0: scratch); with 8-bit states (state dtype code 4) each slot's float32 block absmaxes (0 for an "
    "unused slot) and the bit mask of signed slots.";

template <typename A>
py::dict describe() {
  py::dict d;
  d["kind"] = A::kKind == algo::Kind::kElementwise ? "elementwise"
              : A::kKind == algo::Kind::kTrustRatio ? "trust_ratio"
                                                     : "factored";
  py::list fields, states, scalars;
  for (const char* f : A::kFields) fields.append(f);
  for (const char* s : A::kStates) states.append(s);
  if constexpr (algo::ScalarCount<A>::value > 0)
    for (const char* s : A::kScalars) scalars.append(s);
  d["fields"] = fields;
  d["states"] = states;
  d["scalars"] = scalars;
  return d;
}

py::dict algorithms() {
  py::dict d;
#define FUSEDOPT_DESCRIBE(A) d[#A] = describe<algo::A>();
  FUSEDOPT_FOR_EACH_ALGORITHM(FUSEDOPT_DESCRIBE)
#undef FUSEDOPT_DESCRIBE
  return d;
}

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

#define FUSEDOPT_BIND_STEP(A)                                                                                  \
  m.def(                                                                                                     \
      #A,                                                                                                    \
      [](uintptr_t param, uintptr_t grad, uintptr_t s0, uintptr_t s1, uintptr_t s2, uintptr_t master,         \
         uintptr_t comp, int param_mode, uint64_t seed, int64_t n, int param_dtype, int grad_dtype,            \
         int state_dtype, uintptr_t seg_offsets, uintptr_t seg_numels,                                         \
         uintptr_t seg_steps, uintptr_t seg_active, int64_t seg_count, uintptr_t seg_scalars,                \
         uintptr_t seg_layout, const std::vector<double>& hyper, double lr, double grad_scale, int passes,   \
         uintptr_t segment_w2, uintptr_t segment_u2, uintptr_t factor_sums, int64_t factor_sums_count,       \
         uintptr_t absmax0, uintptr_t absmax1, uintptr_t absmax2, int signed_states) {                        \
        FlatBuffers b = buffers(param, grad, s0, s1, s2, master, comp, param_mode, seed, n, param_dtype,    \
                                grad_dtype, state_dtype);                                                    \
        set_quantized(b, absmax0, absmax1, absmax2, signed_states);                                          \
        const Segments s =                                                                                   \
            segments(seg_offsets, seg_numels, seg_steps, seg_active, seg_count, seg_scalars, seg_layout);    \
        const StepArgs args =                                                                                \
            step_args(hyper, lr, grad_scale, passes, segment_w2, segment_u2, factor_sums, factor_sums_count); \
        py::gil_scoped_release release;                                                                      \
        cpu::A(b, s, args);                                                                                  \
      },                                                                                                     \
      kStepDoc);
  FUSEDOPT_FOR_EACH_ALGORITHM(FUSEDOPT_BIND_STEP)
#undef FUSEDOPT_BIND_STEP

  m.def("algorithms", &algorithms,
        "{name: {'kind': 'elementwise' | 'trust_ratio' | 'factored', 'fields': hyperparameter names in the order the step takes "
        "them, 'states': state slot names, 'scalars': per-segment scalar state names}} for every algorithm of the compiled core.");

  m.def(
      "sum_of_squares_segments",
      [](uintptr_t data, int64_t n, int dtype, uintptr_t seg_offsets, uintptr_t seg_numels, uintptr_t seg_active,
         int64_t seg_count) {
        const Segments s = segments(seg_offsets, seg_numels, 0, seg_active, seg_count);
        SumOfSquares r;
        {
          py::gil_scoped_release release;
          r = cpu::sum_of_squares_segments(ptr<const void>(data), n, dtype, s);
        }
        return py::make_tuple(r.sum, r.nonfinite);
      },
      "(sum of fp32 squares over the active segments, any inf/nan among them), thread-count independent.");

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

  m.def(
      "sam_perturb",
      [](uintptr_t param, uintptr_t grad, uintptr_t master, uintptr_t backup, int64_t n, int param_dtype,
         int grad_dtype, uintptr_t seg_offsets, uintptr_t seg_numels, uintptr_t seg_active, int64_t seg_count,
         double scale, bool adaptive) {
        const SamBuffers b = sam_buffers(param, grad, master, backup, n, param_dtype, grad_dtype);
        const Segments s = segments(seg_offsets, seg_numels, 0, seg_active, seg_count);
        py::gil_scoped_release release;
        cpu::sam_perturb(b, s, scale, adaptive);
      },
      "SAM's perturbation over the active segments (pointers as ints, 0 for absent buffers): param, grad, master, "
      "backup, n, param/grad dtype codes, the segment table, scale, adaptive (ASAM).");
  m.def(
      "sam_restore",
      [](uintptr_t param, uintptr_t master, uintptr_t backup, int64_t n, int param_dtype, uintptr_t seg_offsets,
         uintptr_t seg_numels, uintptr_t seg_active, int64_t seg_count) {
        const SamBuffers b = sam_buffers(param, 0, master, backup, n, param_dtype, param_dtype);
        const Segments s = segments(seg_offsets, seg_numels, 0, seg_active, seg_count);
        py::gil_scoped_release release;
        cpu::sam_restore(b, s);
      },
      "Undo of sam_perturb over the active segments: param := backup, or round(master) with master weights.");
  m.def(
      "sam_sum_of_squares",
      [](uintptr_t param, uintptr_t grad, uintptr_t master, int64_t n, int param_dtype, int grad_dtype,
         uintptr_t seg_offsets, uintptr_t seg_numels, uintptr_t seg_active, int64_t seg_count) {
        const SamBuffers b = sam_buffers(param, grad, master, 0, n, param_dtype, grad_dtype);
        const Segments s = segments(seg_offsets, seg_numels, 0, seg_active, seg_count);
        SumOfSquares r;
        {
          py::gil_scoped_release release;
          r = cpu::sam_sum_of_squares(b, s);
        }
        return py::make_tuple(r.sum, r.nonfinite);
      },
      "(sum of squares of |w| * g over the active segments, any inf/nan among those terms), w the master weights "
      "when given; thread-count independent.");

  m.def("build_info", [] {
    py::dict d;
    d["version"] = FUSEDOPT_VERSION;
    d["cpu_isas_compiled"] = cpu::compiled_isas();
    d["cpu_isas_supported"] = cpu::supported_isas();
    d["cpu_isa"] = cpu::cpu_isa();
    d["num_threads"] = cpu::get_num_threads();
    d["thread_backend"] = cpu::thread_backend();
    d["openmp_runtime"] = cpu::openmp_runtime();
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
      "Why FUSEDOPT_CPU_ISA or FUSEDOPT_THREADS_BACKEND was rejected at load (None when unset or valid).");
  m.def("set_num_threads", &cpu::set_num_threads, py::arg("n"),
        "Fix the threads used by the CPU kernels (>= 1); by default they follow torch.get_num_threads().");
  m.def("reset_num_threads", &cpu::reset_num_threads, "Let the CPU kernels follow torch's thread count again.");
  m.def("follow_threads", &cpu::follow_threads, py::arg("n"), "The thread count to use while none is fixed.");
  m.def("get_num_threads", &cpu::get_num_threads);
  m.def("thread_backend", &cpu::thread_backend,
        "Where the next parallel region of the CPU kernels runs: 'openmp' (the OpenMP runtime already loaded in the "
        "process, torch's) or 'pool' (fusedopt's own threads: no runtime loaded, a forked child, or asked for).");
  m.def("set_thread_backend", &cpu::set_thread_backend, py::arg("name"),
        "'openmp' (default; FUSEDOPT_THREADS_BACKEND=openmp): use a loaded OpenMP runtime when there is one; "
        "'pool' (FUSEDOPT_THREADS_BACKEND=pool): always fusedopt's own pool. For debugging and benchmarks.");
  m.def("last_region_threads", &cpu::last_region_threads,
        "Threads that ran the last parallel region of this process (1 when it ran on the calling thread alone).");
#if defined(FUSEDOPT_WITH_CUDA)
  register_cuda_bindings(m);
#endif
}
