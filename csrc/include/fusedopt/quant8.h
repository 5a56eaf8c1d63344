// 8-bit optimizer states (state dtype code kState8bit), shared by the CPU driver and the CUDA launcher: a state slot
// holds one byte per element and one float32 absmax per block of kQuantBlock elements. Blocks start at the segment's
// offset, which flat storage aligns to kQuantBlock, so block b of a buffer covers elements [b * 256, b * 256 + 256)
// and never crosses a parameter; the absmax of block b is absmax[b].
//
// The code is a small float shifted by 8: magnitude byte m stands for the grid point q(m) = f(m) - 8, where f(m) is the
// float whose exponent and three mantissa bits are m + 1040 (130 << 3: f(0) = 8). So q is 0, 1, .., 7 (step 1), then
// 8, 10, .., 22 (step 2), 24, 28, .. : uniform below 8 and three mantissa bits of q + 8 above, a relative error of at
// most 1/16 of |q| + 8. A value x of a block is stored as the grid point nearest to |x| / absmax * top, top being
// q of the largest magnitude (ties away from zero):
//   signed states (first moments, momenta): sign bit + 7 magnitude bits, top = q(127) = 491512, so the smallest
//     nonzero value is absmax / 491512;
//   nonnegative states (second moments, accumulators): 8 magnitude bits, top = q(255) ~ 1.875 * 2^34 (smallest
//     nonzero: absmax / 3.2e10), so a small second moment beside a large one of its block does not round to zero
//     (which would blow up m / sqrt(v)).
// Encode and decode are a handful of integer and float operations per element with no branch, table or search, so
// they vectorise on every ISA and give the same bits on CPU and GPU. A block whose values hold inf or NaN gets absmax
// NaN and decodes to NaN.
#pragma once

#include <math.h>
#include <stdint.h>

#include "fusedopt/common.h"

namespace fusedopt {

// The state dtype code of 8-bit states (beside the DType codes of dtype.h; fusedopt._kernels.STATE_8BIT).
constexpr int kState8bit = 4;
constexpr int64_t kQuantBlock = 256;
constexpr float kSignedTop = 491512.0f;            // q(127) = 1.875 * 2^18 - 8
constexpr float kUnsignedTop = 32212254720.0f;      // q(255) = 1.875 * 2^34 - 8, rounded to float

FUSEDOPT_HD float quant_top(bool is_signed) { return is_signed ? kSignedTop : kUnsignedTop; }

// The magnitude byte of y in [0, top]: y + 8 rounded to three mantissa bits (to nearest, ties away from zero).
FUSEDOPT_HD uint32_t encode_magnitude(float y) { return ((float_as_bits(y + 8.0f) + 0x80000u) >> 20) - 1040u; }

// q(m) as a float.
FUSEDOPT_HD float decode_magnitude(uint32_t m) { return bits_as_float((m + 1040u) << 20) - 8.0f; }

// The byte of x in a block whose encode factor is inv = top / absmax (0 for an all-zero or non-finite block).
FUSEDOPT_HD uint8_t quantize8(float x, float inv, float top, bool is_signed) {
  float y = fabsf(x) * inv;
  y = y < top ? y : top;  // rounding of inv, and NaN
  const uint32_t sign = is_signed ? (float_as_bits(x) >> 24) & 0x80u : 0u;
  return static_cast<uint8_t>(encode_magnitude(y) | sign);
}

// The value of byte c in a block whose decode factor is scale = absmax / top.
FUSEDOPT_HD float dequantize8(uint8_t c, float scale, bool is_signed) {
  const uint32_t m = is_signed ? (c & 127u) : c;
  const float v = decode_magnitude(m) * scale;
  const uint32_t sign = is_signed ? (static_cast<uint32_t>(c) << 24) & 0x80000000u : 0u;
  return bits_as_float(float_as_bits(v) | sign);
}

// The encode factor of a block of this absmax.
FUSEDOPT_HD float encode_factor(float absmax, float top) { return absmax > 0.0f ? top / absmax : 0.0f; }

}  // namespace fusedopt
