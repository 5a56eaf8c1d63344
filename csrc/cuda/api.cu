// Checked CUDA entry points (fusedopt/cuda_api.h), one per algorithm of the list: validate every argument on the host
// and throw std::invalid_argument naming it before any launch (so a rejected call changes nothing, and the checks run
// on machines without a GPU), make the requested device current, then run the launcher's sequence on the given stream.
// No entry point synchronises with the host.
#include <cuda_runtime.h>

#include <string>

#include "fusedopt/checks.h"
#include "fusedopt/cuda_api.h"
#include "launcher.cuh"

namespace fusedopt {
namespace cuda {
namespace {

using checks::fail;

bool aligned_to(const void* p, int bytes) { return (reinterpret_cast<uintptr_t>(p) % bytes) == 0; }

void check_aligned(const std::string& fn, const char* what, const void* p, int bytes) {
  if (!aligned_to(p, bytes))
    fail(fn + ": " + what + " pointer " + std::to_string(reinterpret_cast<uintptr_t>(p)) + " is not " +
         std::to_string(bytes) + "-byte aligned");
}

// Element alignment is required (a misaligned element access is a fault on the device); 16-byte alignment is not (the
// launcher takes the scalar path without it).
template <typename A>
void check_alignment(const std::string& fn, const FlatBuffers& b, const typename A::Hyper& h) {
  if (b.n == 0) return;
  check_aligned(fn, "param", b.param, dtype_size(b.param_dtype));
  check_aligned(fn, "grad", b.grad, dtype_size(b.grad_dtype));
  constexpr int kSlots = static_cast<int>(sizeof(A::kStates) / sizeof(A::kStates[0]));
  const bool quantized = b.state_dtype == kState8bit;  // bytes, with float32 block absmaxes
  for (int k = 0; k < algo::kMaxStates; ++k) {
    if (!A::uses_state(h, k)) continue;
    check_aligned(fn, k < kSlots ? A::kStates[k] : "state", b.states[k], quantized ? 1 : dtype_size(b.state_dtype));
    if (quantized) check_aligned(fn, "absmax", b.absmax[k], 4);
  }
  check_aligned(fn, "master", b.master, 4);
  check_aligned(fn, "compensation", b.comp, dtype_size(b.param_dtype));
}

// The device lr and grad_scale are of the compute type: float64 with float64 parameters, else float32.
int scalar_size(const FlatBuffers& b) { return b.param_dtype == kFloat64 ? 8 : 4; }

// The segment table and work list live in device memory, so only their counts and pointers can be checked here
// (python/fusedopt/_kernels.py checks the table's contents on its host copy).
void check_segments(const std::string& fn, int64_t n, const Segments& s, const DeviceWork& w) {
  if (s.count < 0) fail(fn + ": Invalid segment count: " + std::to_string(s.count));
  if (w.items < 0) fail(fn + ": Invalid items: " + std::to_string(w.items));
  // Every item holds at least one element of the buffer and belongs to a segment.
  if (w.items > n) fail(fn + ": Invalid items: " + std::to_string(w.items) + " for a buffer of " + std::to_string(n) +
                        " elements");
  if (w.items > 0 && s.count == 0) fail(fn + ": Invalid items: " + std::to_string(w.items) + " without segments");
  if (s.count == 0) return;
  if (s.offsets == nullptr || s.numels == nullptr || s.steps == nullptr || s.active == nullptr)
    fail(fn + ": segment offsets, numels, steps and active flags must not be null");
  if (w.work == nullptr) fail(fn + ": work pointer is null (the work list covers every segment)");
  check_aligned(fn, "seg_offsets", s.offsets, 8);
  check_aligned(fn, "seg_numels", s.numels, 8);
  check_aligned(fn, "seg_steps", s.steps, 4);
  check_aligned(fn, "seg_scalars", s.scalars, 4);
  check_aligned(fn, "work", w.work, 8);
}

void check_scalars(const std::string& fn, const FlatBuffers& b, const DeviceScalars& d, const StepArgs& args) {
  check_aligned(fn, "lr_ptr", d.lr, scalar_size(b));
  check_aligned(fn, "grad_scale_ptr", d.grad_scale, scalar_size(b));
  check_aligned(fn, "found_inf_ptr", d.found_inf, 4);
  check_aligned(fn, "segment_w2", args.segment_w2, 8);
  check_aligned(fn, "segment_u2", args.segment_u2, 8);
}

// Factored algorithms (checks::check_passes checks the passes): the device array of layout and items, the row and
// column sums, the compact state buffers. Their contents live in device memory: python/fusedopt/_kernels.py checks
// the layout on its host copy.
template <typename A>
void check_factored(const std::string& fn, const FlatBuffers& b, const Segments& s, const DeviceWork& w,
                    const StepArgs& args) {
  if (w.row_items < 0 || w.col_items < 0) fail(fn + ": Invalid row or column item count");
  if (s.count > 0 && w.factored == nullptr) fail(fn + ": factored pointer is null (a factored algorithm)");
  check_aligned(fn, "factored", w.factored, 8);
  check_aligned(fn, "factor_sums", args.factor_sums, 8);
  for (int k = 0; k < 3; ++k) check_aligned(fn, A::kStates[k], b.states[k], dtype_size(b.state_dtype));
}

template <typename A>
void step(const std::string& fn, const FlatBuffers& b, const Segments& s, const DeviceWork& w, const StepArgs& args,
          const DeviceScalars& d, const Launch& l) {
  const typename A::Hyper h = checks::hyper_from<A>(fn, args);
  checks::check_buffers<A>(fn, b, h);
  checks::check_passes<A>(fn, s.count, args);
  // The offsets are in device memory: _kernels.py checks their block alignment on its host copy.
  Segments host_view = s;
  host_view.offsets = nullptr;
  checks::check_quantized<A>(fn, b, host_view);
  check_alignment<A>(fn, b, h);
  check_segments(fn, b.n, s, w);
  if (algo::ScalarCount<A>::value > 0 && s.count > 0 && s.scalars == nullptr)
    fail(fn + ": segment scalars must not be null (this algorithm keeps per-segment scalar states)");
  check_scalars(fn, b, d, args);
  if (A::kKind == algo::Kind::kFactored) check_factored<A>(fn, b, s, w, args);
  check_device(fn, l.device);
  DeviceGuard guard(l.device);
  launch_step<A>(b, s, w, args, h, d, checks::counts_step<A>(args), reinterpret_cast<cudaStream_t>(l.stream));
}

}  // namespace

#define FUSEDOPT_DEFINE_CUDA_STEP(A)                                                                              \
  void A(const FlatBuffers& b, const Segments& s, const DeviceWork& w, const StepArgs& args, const DeviceScalars& d, \
         const Launch& l) {                                                                                       \
    step<algo::A>("cuda_" #A, b, s, w, args, d, l);                                                                \
  }
FUSEDOPT_FOR_EACH_ALGORITHM(FUSEDOPT_DEFINE_CUDA_STEP)
#undef FUSEDOPT_DEFINE_CUDA_STEP

}  // namespace cuda
}  // namespace fusedopt
