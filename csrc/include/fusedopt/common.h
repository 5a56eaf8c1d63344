// Shared macros and tiny helpers for the compiled core (host C++, CUDA device code and the per-ISA CPU builds).
// Everything here is header-only, torch-free and safe to include from .cu files.
#pragma once

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define FUSEDOPT_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
#define FUSEDOPT_HD inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define FUSEDOPT_HD __forceinline
#else
#define FUSEDOPT_HD inline
#endif

#if defined(__GNUC__) || defined(__clang__)
#define FUSEDOPT_RESTRICT __restrict__
#else
#define FUSEDOPT_RESTRICT __restrict
#endif

namespace fusedopt {

// Elements per unit of CPU work and per partial sum of the deterministic reductions. The partition depends only on
// the element count (never on the thread count), which is what makes reductions bitwise reproducible.
constexpr int64_t kChunk = 16384;

FUSEDOPT_HD uint32_t float_as_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
#endif
}

FUSEDOPT_HD float bits_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, 4);
  return f;
#endif
}

// `flag ? a : b` for a flag that is uniform over the launch (a mode such as nesterov). On the host it is a bit blend:
// GCC cannot vectorise a float select whose condition is a scalar, and would otherwise leave the whole loop scalar.
// Both operands are always evaluated, which is harmless (kernels are built with -fno-trapping-math).
FUSEDOPT_HD float uniform_select(bool flag, float a, float b) {
#if defined(__CUDA_ARCH__)
  return flag ? a : b;
#else
  const uint32_t mask = 0u - static_cast<uint32_t>(flag);
  return bits_as_float((float_as_bits(a) & mask) | (float_as_bits(b) & ~mask));
#endif
}

// torch.lerp as ATen computes it (aten/src/ATen/native/Lerp.h): the two-sided form keeps the result exact at
// weight 0 and 1. `w` is uniform across a launch, so the branch never diverges.
FUSEDOPT_HD float lerp(float start, float end, float w) {
  const float diff = end - start;
  return uniform_select(w < 0.5f && w > -0.5f, start + w * diff, end - diff * (1.0f - w));
}

// Branch-free select-friendly sign: sign(0) = 0 (keeps zero padding at zero), NaN propagates as in torch.sign.
FUSEDOPT_HD float sign(float x) {
  const float s = x < 0.0f ? -1.0f : x;
  return x > 0.0f ? 1.0f : s;
}

// torch.maximum: NaN when either operand is NaN (fmaxf would drop it, and does not vectorise without fast-math).
FUSEDOPT_HD float nan_maximum(float a, float b) {
  const float m = a > b ? a : b;
  return a != a ? a : m;
}

}  // namespace fusedopt
