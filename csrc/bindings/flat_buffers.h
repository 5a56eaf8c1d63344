// Shared by the CPU and CUDA bindings: turns the raw addresses, dtype codes and hyperparameters that Python passes
// as ints and floats into the FlatBuffers, Segments and StepArgs the compiled entry points take.
#pragma once

#include <cstdint>

#include "fusedopt/api.h"

namespace fusedopt {
namespace bindings {

template <typename T>
inline T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

inline FlatBuffers buffers(uintptr_t param, uintptr_t grad, uintptr_t s0, uintptr_t s1, uintptr_t s2,
                           uintptr_t master, uintptr_t comp, int param_mode, uint64_t seed, int64_t n, int param_dtype,
                           int grad_dtype, int state_dtype) {
  FlatBuffers b;
  b.comp = ptr<void>(comp);
  b.param_mode = param_mode;
  b.seed = seed;
  b.param = ptr<void>(param);
  b.grad = ptr<const void>(grad);
  b.states[0] = ptr<void>(s0);
  b.states[1] = ptr<void>(s1);
  b.states[2] = ptr<void>(s2);
  b.master = ptr<float>(master);
  b.n = n;
  b.param_dtype = param_dtype;
  b.grad_dtype = grad_dtype;
  b.state_dtype = state_dtype;
  return b;
}

// The 8-bit state arguments (quant8.h): each slot's block absmaxes and the mask of signed slots.
inline void set_quantized(FlatBuffers& b, uintptr_t a0, uintptr_t a1, uintptr_t a2, int signed_states) {
  b.absmax[0] = ptr<float>(a0);
  b.absmax[1] = ptr<float>(a1);
  b.absmax[2] = ptr<float>(a2);
  b.signed_states = signed_states;
}

inline SamBuffers sam_buffers(uintptr_t param, uintptr_t grad, uintptr_t master, uintptr_t backup, int64_t n,
                              int param_dtype, int grad_dtype) {
  SamBuffers b;
  b.param = ptr<void>(param);
  b.grad = ptr<const void>(grad);
  b.master = ptr<const float>(master);
  b.backup = ptr<void>(backup);
  b.n = n;
  b.param_dtype = param_dtype;
  b.grad_dtype = grad_dtype;
  return b;
}

inline Segments segments(uintptr_t offsets, uintptr_t numels, uintptr_t steps, uintptr_t active, int64_t count,
                         uintptr_t scalars = 0, uintptr_t layout = 0) {
  Segments s;
  s.scalars = ptr<float>(scalars);
  s.layout = ptr<const int64_t>(layout);
  s.offsets = ptr<const int64_t>(offsets);
  s.numels = ptr<const int64_t>(numels);
  s.steps = ptr<float>(steps);
  s.active = ptr<const uint8_t>(active);
  s.count = count;
  return s;
}

inline StepArgs step_args(const std::vector<double>& hyper, double lr, double grad_scale, int passes,
                          uintptr_t segment_w2, uintptr_t segment_u2, uintptr_t factor_sums = 0,
                          int64_t factor_sums_count = 0) {
  StepArgs a;
  a.hyper = hyper.data();
  a.hyper_count = static_cast<int64_t>(hyper.size());
  a.lr = lr;
  a.grad_scale = grad_scale;
  a.passes = passes;
  a.segment_w2 = ptr<double>(segment_w2);
  a.segment_u2 = ptr<double>(segment_u2);
  a.factor_sums = ptr<double>(factor_sums);
  a.factor_sums_count = factor_sums_count;
  return a;
}

}  // namespace bindings
}  // namespace fusedopt
