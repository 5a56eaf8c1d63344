// How a step keeps the parameters of a flat buffer set (FlatBuffers::param_mode), shared by the CPU driver and the
// CUDA launcher: every kernel reads a parameter's value with ParamIO::read and writes its new value with
// ParamIO::write, so a mode is defined once, here.
//   nearest:    p is the value; the new value is rounded to nearest (16-bit parameters lose updates below half an ulp).
//   master:     an fp32 copy is the value; p receives it rounded to nearest.
//   kahan:      the value is p + comp, comp a compensation buffer of p's dtype that carries each rounding error into
//               the next step (Kahan summation of the updates): p = round(v), comp = round(v - p).
//   stochastic: p is the value; the new value is rounded up or down at random, up with probability equal to its
//               distance from the value below over the gap (unbiased: E[round(v)] = v). The random bits come from a
//               counter-based hash of (seed, the segment's step, the segment, the element), so a run is reproducible
//               and the CPU and CUDA kernels write the same bits. bfloat16 parameters only.
#pragma once

#include <type_traits>

#include "fusedopt/dtype.h"

namespace fusedopt {

enum ParamMode : int { kParamNearest = 0, kParamMaster = 1, kParamKahan = 2, kParamStochastic = 3 };

// A 32-bit integer hash with good avalanche (the "lowbias32" constants of Chris Wellons' hash prospector).
FUSEDOPT_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// The key of segment `segment`'s stochastic roundings at step `step` (its count after this step's increment).
FUSEDOPT_HD uint32_t rounding_key(uint64_t seed, float step, int64_t segment) {
  const uint32_t s = mix32(static_cast<uint32_t>(seed) ^ mix32(static_cast<uint32_t>(seed >> 32) + 0x632BE5ABu));
  return mix32(s ^ mix32(static_cast<uint32_t>(step) * 0x9E3779B9u + static_cast<uint32_t>(segment)));
}

// The random bits of element i (its index in the flat buffer) under a segment's key.
FUSEDOPT_HD uint32_t rounding_bits(uint32_t key, int64_t i) {
  return mix32(static_cast<uint32_t>(i) * 0x9E3779B1u ^ key ^ static_cast<uint32_t>(i >> 32));
}

// fp32 -> bf16 rounded stochastically with the low 16 bits of `bits`: adding them below the kept 16 bits carries into
// the kept part with probability (dropped part) / 2^16, so the magnitude rounds away from zero with the probability
// of its distance from the value toward zero. inf and NaN round to nearest (NaN stays NaN).
FUSEDOPT_HD bf16_t store_stochastic_bf16(float x, uint32_t bits) {
  const uint32_t u = float_as_bits(x);
  const bool finite = (u & 0x7F800000u) != 0x7F800000u;
  return finite ? bf16_t{static_cast<uint16_t>((u + (bits & 0xFFFFu)) >> 16)} : store<bf16_t>(x);
}

// Reads and writes the parameter values of one flat buffer set in mode Mode (TP: the parameter storage type).
template <typename TP, int Mode>
struct ParamIO {
  using C = compute_t<TP>;
  float* master = nullptr;  // kParamMaster: the fp32 values
  TP* comp = nullptr;       // kParamKahan: the compensation, p's dtype

  FUSEDOPT_HD C read(const TP* p, int64_t i) const {
    if constexpr (Mode == kParamMaster)
      return static_cast<C>(master[i]);
    else if constexpr (Mode == kParamKahan)
      return load(p[i]) + load(comp[i]);
    else
      return load(p[i]);
  }

  // `key`: the segment's rounding_key (read in stochastic mode only).
  FUSEDOPT_HD void write(TP* p, int64_t i, C v, uint32_t key) const {
    if constexpr (Mode == kParamMaster) {
      master[i] = static_cast<float>(v);
      p[i] = store<TP>(v);
    } else if constexpr (Mode == kParamKahan) {
      const TP rounded = store<TP>(v);
      p[i] = rounded;
      comp[i] = store<TP>(v - load(rounded));  // exact in fp32: v and its rounding are within one ulp of p
    } else if constexpr (Mode == kParamStochastic && std::is_same<TP, bf16_t>::value) {
      p[i] = store_stochastic_bf16(v, rounding_bits(key, i));
    } else {
      p[i] = store<TP>(v);
    }
  }
};

}  // namespace fusedopt
