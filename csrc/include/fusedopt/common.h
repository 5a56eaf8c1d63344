// Shared macros and tiny helpers for the compiled core (host C++, CUDA device code and the per-ISA CPU builds).
// Everything here is header-only, torch-free and safe to include from .cu files.
#pragma once

#include <math.h>
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

FUSEDOPT_HD uint64_t double_as_bits(double f) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(f));
#else
  uint64_t u;
  memcpy(&u, &f, 8);
  return u;
#endif
}

FUSEDOPT_HD double bits_as_double(uint64_t u) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(u));
#else
  double f;
  memcpy(&f, &u, 8);
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

// The float64 compute type's select (float64 parameters), the same blend on 64-bit patterns.
FUSEDOPT_HD double uniform_select(bool flag, double a, double b) {
#if defined(__CUDA_ARCH__)
  return flag ? a : b;
#else
  const uint64_t mask = 0u - static_cast<uint64_t>(flag);
  return bits_as_double((double_as_bits(a) & mask) | (double_as_bits(b) & ~mask));
#endif
}

// The helpers below serve both compute types: T is float (fp32/bf16/fp16 storage) or double (float64 storage).

// torch.lerp as ATen computes it (aten/src/ATen/native/Lerp.h): the two-sided form keeps the result exact at
// weight 0 and 1. `w` is uniform across a launch, so the branch never diverges.
template <typename T>
FUSEDOPT_HD T lerp(T start, T end, T w) {
  const T diff = end - start;
  return uniform_select(w < T(0.5) && w > T(-0.5), start + w * diff, end - diff * (T(1) - w));
}

// torch.sign, branch-free and select-friendly: sign(0) = sign(-0) = 0 (keeps zero padding at zero) and sign(NaN) = 0,
// as torch.sign gives on the CPU and on CUDA ((0 < x) - (x < 0)).
template <typename T>
FUSEDOPT_HD T sign(T x) {
  const T s = x < T(0) ? T(-1) : T(0);
  return x > T(0) ? T(1) : s;
}

// torch.maximum: NaN when either operand is NaN (fmaxf would drop it, and does not vectorise without fast-math).
template <typename T>
FUSEDOPT_HD T nan_maximum(T a, T b) {
  const T m = a > b ? a : b;
  return a != a ? a : m;
}

// sqrt and fabs in the compute type (sqrtf/fabsf for float: the single-precision instructions).
FUSEDOPT_HD float square_root(float x) { return sqrtf(x); }
FUSEDOPT_HD double square_root(double x) { return sqrt(x); }
FUSEDOPT_HD float magnitude(float x) { return fabsf(x); }
FUSEDOPT_HD double magnitude(double x) { return fabs(x); }

}  // namespace fusedopt
