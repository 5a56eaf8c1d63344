// Storage dtypes of the compiled core and their conversions to/from the fp32 compute type.
// Host versions are branch-free bit manipulation (the compiler vectorises them); CUDA uses the cuda_fp16/bf16 intrinsics.
#pragma once

#include "fusedopt/common.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace fusedopt {

// Dtype codes shared with Python (fusedopt._compiled): 0 = float32, 1 = bfloat16, 2 = float16.
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

FUSEDOPT_HD bool is_valid_dtype(int code) { return code == kFloat32 || code == kBFloat16 || code == kFloat16; }
FUSEDOPT_HD int dtype_size(int code) { return code == kFloat32 ? 4 : 2; }

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

// Typed load/store used by every kernel: the compute type is always float.
FUSEDOPT_HD float load(float x) { return x; }
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
template <>
FUSEDOPT_HD float store<float>(float x) {
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
