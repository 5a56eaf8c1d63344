// 8-bit optimizer states (state dtype code kState8bit), shared by the CPU driver and the CUDA launcher: a state slot
// holds one byte per element and one float32 absmax per block of kQuantBlock elements. Blocks start at the segment's
// offset, which flat storage aligns to kQuantBlock, so block b of a buffer covers elements [b * 256, b * 256 + 256)
// and never crosses a parameter; the absmax of block b is absmax[b].
//
// The code is a small float on an integer grid q: magnitude byte m = E << 3 | M stands for q(m) = M when E == 0, else
// (8 + M) << (E - 1): three mantissa bits, so a value keeps a relative error of at most 1/16 wherever it lies between
// the block's absmax and absmax / top * 8, and the grid is uniform (step absmax / top) below that. A value x of a
// block is stored as the grid point nearest to |x| / absmax * top (ties to even).
//   signed states (first moments, momenta): sign bit + 7 magnitude bits, E <= 15, top = 15 << 14 = 245760 (absmax
//     maps to m = 127): 16 binades below the absmax;
//   nonnegative states (second moments, accumulators): 8 magnitude bits, E <= 31, top = 15 << 30: 32 binades, so a
//     small second moment beside a large one of its block does not round to zero (which would blow up m / sqrt(v)).
// Encode and decode are a few integer and float operations per element (no table, no search), so they vectorise on
// every ISA and give the same bits on CPU and GPU. A block whose values hold inf or NaN gets absmax NaN and decodes
// to NaN.
#pragma once

#include <math.h>
#include <stdint.h>

#include "fusedopt/common.h"

namespace fusedopt {

// The state dtype code of 8-bit states (beside the DType codes of dtype.h; fusedopt._kernels.STATE_8BIT).
constexpr int kState8bit = 4;
constexpr int64_t kQuantBlock = 256;
constexpr float kSignedTop = 245760.0f;           // 15 * 2^14
constexpr float kUnsignedTop = 16106127360.0f;    // 15 * 2^30

FUSEDOPT_HD float quant_top(bool is_signed) { return is_signed ? kSignedTop : kUnsignedTop; }

// The magnitude byte of y in [0, top]: y < 8 rounds to an integer (the uniform part of the grid), larger y to three
// mantissa bits, both to nearest even.
FUSEDOPT_HD uint32_t encode_magnitude(float y) {
  const float integer = (y + 12582912.0f) - 12582912.0f;  // 1.5 * 2^23: y rounded to an integer (for y < 2^22)
  const uint32_t u = float_as_bits(y);
  const uint32_t rounded = u + 0x7FFFFu + ((u >> 20) & 1u);
  const uint32_t normal = (rounded >> 20) - 1032u;  // (127 + 3) << 3 is q = 8, magnitude 8
  return y < 8.0f ? static_cast<uint32_t>(static_cast<int32_t>(integer)) : normal;
}

// q(m) as a float (exact).
FUSEDOPT_HD float decode_magnitude(uint32_t m) {
  return m < 8u ? static_cast<float>(static_cast<int32_t>(m)) : bits_as_float((m + 1032u) << 20);
}

// The byte of x in a block whose encode factor is inv = top / absmax (0 for an all-zero or non-finite block).
FUSEDOPT_HD uint8_t quantize8(float x, float inv, float top, bool is_signed) {
  float y = fabsf(x) * inv;
  y = y < top ? y : top;  // rounding of inv, and NaN
  const uint32_t sign = is_signed ? (float_as_bits(x) >> 31) << 7 : 0u;
  return static_cast<uint8_t>(encode_magnitude(y) | sign);
}

// The value of byte c in a block whose decode factor is scale = absmax / top.
FUSEDOPT_HD float dequantize8(uint8_t c, float scale, bool is_signed) {
  const uint32_t m = is_signed ? (c & 127u) : c;
  const float v = decode_magnitude(m) * scale;
  const uint32_t sign = is_signed ? static_cast<uint32_t>(c >> 7) << 31 : 0u;
  return bits_as_float(float_as_bits(v) | sign);
}

// The encode factor of a block of this absmax.
FUSEDOPT_HD float encode_factor(float absmax, float top) { return absmax > 0.0f ? top / absmax : 0.0f; }

}  // namespace fusedopt
