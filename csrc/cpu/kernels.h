// Table of unchecked CPU kernels exported by each per-ISA build of the driver (baseline, avx2, avx512).
// dispatch.cpp validates arguments, then calls through the table of the ISA selected at run time.
#pragma once

#include "fusedopt/api.h"

namespace fusedopt {
namespace cpu {

// LAMB work list built by the dispatcher: each item is a chunk [begin, end) of one segment; the items of segment s are
// seg_first[s] .. seg_first[s+1]-1. Per-item partial sums and per-segment scaled learning rates are scratch space.
// `phases` selects pass 1 (moments, then the per-segment sums of squares of p and u into segment_w2/segment_u2),
// pass 2 (trust ratios from segment_w2/segment_u2, then the update) or both; a sharded parameter's sums are
// all-reduced across ranks between the two.
struct LambWork {
  const int64_t* item_begin;
  const int64_t* item_end;
  const int64_t* item_segment;
  const int64_t* seg_first;  // count + 1 entries
  int64_t items;
  int64_t segments;
  double* partial_w;  // items
  double* partial_u;  // items
  float* scaled_lr;    // segments
  double* segment_w2;  // segments: sum of p*p
  double* segment_u2;  // segments: sum of u*u
  double lr;
  double max_trust_ratio;
  int phases;  // kLambMoments | kLambApply
};

struct KernelTable {
  const char* name;
  void (*adam)(const FlatBuffers&, const AdamCoeffs&, bool amsgrad, int threads);
  void (*sgd)(const FlatBuffers&, const SgdCoeffs&, bool momentum, int threads);
  void (*rmsprop)(const FlatBuffers&, const RmspropCoeffs&, bool centered, bool momentum, int threads);
  void (*adagrad)(const FlatBuffers&, const AdagradCoeffs&, int threads);
  void (*lion)(const FlatBuffers&, const LionCoeffs&, int threads);
  void (*lamb)(const FlatBuffers&, const LambCoeffs&, const LambWork&, int threads);
  // Writes one partial sum and one non-finite flag per chunk of kChunk elements.
  void (*sum_of_squares)(const void* data, int64_t n, int dtype, double* partials, unsigned char* nonfinite,
                         int threads);
  // Parallel copy fp32 -> param dtype (fp32 params with fp32 master weights).
  void (*round_copy)(void* dst, int dst_dtype, const float* src, int64_t n, int threads);
};

}  // namespace cpu
}  // namespace fusedopt

#define FUSEDOPT_DECLARE_ISA_TABLE(ns)      \
  namespace fusedopt {                      \
  namespace cpu {                           \
  namespace ns {                            \
  const KernelTable& kernel_table();        \
  }                                         \
  }                                         \
  }
