// Storage dtypes of the compiled core, their compute types (float; double for float64 storage) and the conversions.
// Host versions are branch-free bit manipulation (the compiler vectorises them); CUDA uses the cuda_fp16/bf16 intrinsics.
#pragma once

#include "fusedopt/common.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace fusedopt {

// Dtype codes shared with Python (fusedopt._kernels.DTYPE_CODES): 0 = float32, 1 = bfloat16, 2 = float16,
// 3 = float64.
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

FUSEDOPT_HD bool is_valid_dtype(int code) {
  return code == kFloat32 || code == kBFloat16 || code == kFloat16 || code == kFloat64;
}
FUSEDOPT_HD int dtype_size(int code) { return code == kFloat64 ? 8 : (code == kFloat32 ? 4 : 2); }

// Storage wrappers: distinct types so templates can tell bf16 from fp16 (both are 16-bit patterns).
struct bf16_t {
  uint16_t bits;
};
struct fp16_t {
  uint16_t bits;
};

// bf16 -> fp32 is exact: the bf16 pattern is the top half of the fp32 pattern.
FUSEDOPT_HD float bf16_bits_to_float(uint16_t h) { return bits_as_float(static_cast<uint32_t>(h) << 16); }

// fp32 -> bf16, round to nearest even; NaN -> canonical quiet NaN 0x7FC0 (as c10::BFloat16 does).
FUSEDOPT_HD uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = float_as_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
}

// fp16 -> fp32. Normal, inf and NaN: rebias the exponent (15 -> 127), with inf/NaN pushed to exponent 255.
// Subnormals (|h| < 2^-14) are k * 2^-24 with k < 1024, exact as an int-to-float conversion and a power-of-two scale.
FUSEDOPT_HD float fp16_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t a = h & 0x7FFFu;
  const uint32_t rebias = a >= 0x7C00u ? 0x70000000u : 0x38000000u;
  const float normal = bits_as_float((a << 13) + rebias);
  const float subnormal = static_cast<float>(static_cast<int32_t>(a)) * 5.9604644775390625e-8f;  // 2^-24
  const float mag = a < 0x0400u ? subnormal : normal;
  return bits_as_float(float_as_bits(mag) | sign);
}

// fp32 -> fp16, round to nearest even, overflow -> inf, NaN -> quiet NaN.
// Normal range: rebias and round on the integer pattern. Subnormal range: adding 0.5f puts the value in a binade whose
// ulp is 2^-24, so the FPU itself rounds to the fp16 subnormal grid (RNE) and the low mantissa bits are the result.
FUSEDOPT_HD uint16_t float_to_fp16_bits(float f) {
  const uint32_t u = float_as_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  const uint32_t normal = (a - 0x38000000u + 0x0FFFu + ((a >> 13) & 1u)) >> 13;
  const float af = bits_as_float(a);
  const uint32_t subnormal = float_as_bits(af + 0.5f) - 0x3F000000u;
  uint32_t r = a < 0x38800000u ? subnormal : normal;  // 2^-14: smallest fp16 normal
  r = a >= 0x477FF000u ? 0x7C00u : r;                // rounds to >= 65520: inf
  r = a > 0x7F800000u ? 0x7E00u : r;                 // NaN
  return static_cast<uint16_t>(r | sign);
}

// The type a storage type is computed in: float for fp32, bf16 and fp16 (one rounding policy for all of them), double
// for float64, whose parameters, gradients and states are all float64 (as torch.optim computes them).
template <typename T>
struct Compute {
  using type = float;
};
template <>
struct Compute<double> {
  using type = double;
};
template <typename T>
using compute_t = typename Compute<T>::type;

// Typed load/store used by every kernel, to and from the compute type.
FUSEDOPT_HD float load(float x) { return x; }
FUSEDOPT_HD double load(double x) { return x; }
FUSEDOPT_HD float load(bf16_t x) {
#if defined(__CUDACC__) && defined(__CUDA_ARCH__)
  return __bfloat162float(__ushort_as_bfloat16(x.bits));
#else
  return bf16_bits_to_float(x.bits);
#endif
}
FUSEDOPT_HD float load(fp16_t x) {
#if defined(__CUDACC__) && defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(x.bits));
#else
  return fp16_bits_to_float(x.bits);
#endif
}

template <typename T>
FUSEDOPT_HD T store(float x);
template <typename T>
FUSEDOPT_HD T store(double x);
template <>
FUSEDOPT_HD float store<float>(float x) {
  return x;
}
template <>
FUSEDOPT_HD double store<double>(double x) {
  return x;
}
template <>
FUSEDOPT_HD bf16_t store<bf16_t>(float x) {
#if defined(__CUDACC__) && defined(__CUDA_ARCH__)
  return bf16_t{__bfloat16_as_ushort(__float2bfloat16_rn(x))};
#else
  return bf16_t{float_to_bf16_bits(x)};
#endif
}
template <>
FUSEDOPT_HD fp16_t store<fp16_t>(float x) {
#if defined(__CUDACC__) && defined(__CUDA_ARCH__)
  return fp16_t{__half_as_ushort(__float2half_rn(x))};
#else
  return fp16_t{float_to_fp16_bits(x)};
#endif
}

}  // namespace fusedopt
