// Shared by the CPU and CUDA bindings: turns the raw addresses and dtype codes that Python passes as ints into the
// FlatBuffers the compiled entry points take.
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
                           uintptr_t master, int64_t n, int param_dtype, int grad_dtype, int state_dtype) {
  FlatBuffers b;
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

}  // namespace bindings
}  // namespace fusedopt
