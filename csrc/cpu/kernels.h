// Table of unchecked CPU kernels exported by each per-ISA build of the driver (baseline, avx2, avx512), one entry per
// algorithm of the list. dispatch.cpp validates arguments and builds the work list, then calls through the table of
// the ISA selected at run time.
#pragma once

#include "fusedopt/api.h"

namespace fusedopt {
namespace cpu {

// Work list built by the dispatcher: item i is [item_begin[i], item_end[i]) of segment item_segment[i], at most kChunk
// elements, for the active segments only; the items of segment s are seg_first[s] .. seg_first[s+1]-1. The partition
// depends on the layout alone, never on the thread count, which keeps reductions bitwise reproducible.
// Columns per column item of a factored algorithm (a column sum over the rows of kColumnBlock columns at a time).
constexpr int64_t kColumnBlock = 64;

struct Work {
  const int64_t* item_begin = nullptr;
  const int64_t* item_end = nullptr;
  const int64_t* item_segment = nullptr;
  const int64_t* seg_first = nullptr;  // segments + 1 entries
  int64_t items = 0;
  int64_t segments = 0;
  // Trust-ratio kind: scratch and per-segment sums (see StepArgs).
  double* partial_w = nullptr;  // items
  double* partial_u = nullptr;  // items
  double* scaled_lr = nullptr;  // segments (the compute type's value, exact in double)
  double* segment_w2 = nullptr;
  double* segment_u2 = nullptr;
  int passes = kPassMoments | kPassApply;
  // Factored kind (run_factored in driver.h): the segment table and its layout (Segments::layout, api.h Layout); row
  // items {segment, first row, end row} over a factored segment's lead*rows rows, the row items of segment s being
  // row_first[s] .. row_first[s+1]-1; column items {segment, leading index, first column, end column}; both depend on
  // the layout alone. Per row item the sum of squares of p (work items use partial_w and partial_u); the row and
  // column sums (StepArgs::factor_sums); per segment the step size (the compute type's value).
  const int64_t* offsets = nullptr;
  const int64_t* numels = nullptr;
  const uint8_t* active = nullptr;
  const int64_t* layout = nullptr;
  const int64_t* row_item = nullptr;  // 3 per item
  const int64_t* row_first = nullptr;  // segments + 1 entries
  int64_t row_items = 0;
  const int64_t* col_item = nullptr;  // 4 per item
  int64_t col_items = 0;
  double* row_partial_w = nullptr;
  double* factor_sums = nullptr;
  double* step_size = nullptr;
  // Stochastic rounding of the parameters (param_io.h): each segment's rounding key for this step; null otherwise.
  const uint32_t* rounding_key = nullptr;
};

// Algorithm A's coefficients, one per segment (indexed by segment, valid for the active ones), in the compute type of
// the buffer set: fp32 for float32/bfloat16/float16 parameters, fp64 for float64 ones; the other pointer is null.
template <typename A>
struct SegmentCoeffs {
  const typename A::template Coeffs<float>* fp32 = nullptr;
  const typename A::template Coeffs<double>* fp64 = nullptr;
};

struct KernelTable {
  const char* name;
#define FUSEDOPT_KERNEL_ENTRY(A) \
  void (*A)(const FlatBuffers&, const algo::A::Hyper&, const Work&, const SegmentCoeffs<algo::A>&, int threads);
  FUSEDOPT_FOR_EACH_ALGORITHM(FUSEDOPT_KERNEL_ENTRY)
#undef FUSEDOPT_KERNEL_ENTRY
  // One partial sum and one non-finite flag per work item.
  void (*sum_of_squares)(const void* data, int dtype, const Work& w, double* partials, unsigned char* nonfinite,
                         int threads);
  // SAM (csrc/cpu/sam.h): the perturbation, its undo, ASAM's per-item sums of squares of |w| * g.
  void (*sam_perturb)(const SamBuffers& b, const Work& w, double scale, bool adaptive, int threads);
  void (*sam_restore)(const SamBuffers& b, const Work& w, int threads);
  void (*sam_sum_of_squares)(const SamBuffers& b, const Work& w, double* partials, unsigned char* nonfinite,
                             int threads);
};

}  // namespace cpu
}  // namespace fusedopt

#define FUSEDOPT_DECLARE_ISA_TABLE(ns) \
  namespace fusedopt {                 \
  namespace cpu {                      \
  namespace ns {                       \
  const KernelTable& kernel_table();   \
  }                                    \
  }                                    \
  }
