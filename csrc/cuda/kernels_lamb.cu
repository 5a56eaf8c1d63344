// LAMB on the GPU, mirroring the CPU driver's two passes (csrc/cpu/driver.h run_lamb) with a deterministic reduction:
//   pass 1 (one block per work item): moments updated in place, per-item partial ||p||^2 and ||u||^2 in double;
//   segment sums (one thread per segment): its items' partials in item order -> segment_w2, segment_u2;
//   (the caller may all-reduce segment_w2/segment_u2 across ranks here: phases kLambMoments, then kLambApply)
//   ratios (one thread per segment): trust ratio from the segment sums -> lr * ratio;
//   pass 2 (one block per work item): u recomputed from the stored moments (bit-identical), p -= scaled_lr * u.
// The partition (items of kChunk elements, kThreads threads, fixed tree) depends only on the segment table.
#include "fusedopt/math/lamb.h"
#include "kernels.cuh"
#include "launcher.cuh"

namespace fusedopt {
namespace cuda {
namespace {

struct LambArgs {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  float* master;
  bool grad_fp32;
  bool state_fp32;
  bool aligned;
  LambDeviceWork w;
  DeviceScalars d;
  Hyper h;
};

// Pass 1 on one element; adds to the thread's sums of squares.
__device__ __forceinline__ void lamb_pass1_element(const LambCoeffs& c, bool state_fp32, float pv, float gv, float& m,
                                                   float& v, double& w2, double& u2) {
  lamb_moments(c, pv, gv, m, v);
  if (!state_fp32) {  // u from the stored (rounded) moments, exactly what pass 2 applies
    m = load(store<bf16_t>(m));
    v = load(store<bf16_t>(v));
  }
  const float u = lamb_direction(c, pv, m, v);
  w2 += square_term(pv);
  u2 += square_term(u);
}

template <typename TP>
__global__ void __launch_bounds__(kThreads) lamb_pass1_kernel(const LambCoeffs host, const LambArgs a) {
  __shared__ double scratch[32];
  LambCoeffs c;
  if (!block_coeffs(host, a.d, a.h, c)) return;
  TP* p = static_cast<TP*>(a.param);
  for (int64_t it = blockIdx.x; it < a.w.items; it += gridDim.x) {
    const int64_t begin = a.w.item_begin[it];
    const int64_t end = a.w.item_end[it];
    const bool vec = a.aligned && begin % kPack == 0;
    double w2 = 0.0, u2 = 0.0;
    // Pack j of the item: elements begin + j*kPack ..; thread t takes packs t, t + kThreads, ... in order, and the
    // elements of a pack in order, on the vector and the scalar path alike (same sums for any alignment).
    for (int64_t q0 = begin + static_cast<int64_t>(threadIdx.x) * kPack; q0 < end; q0 += kThreads * kPack) {
      if (vec && q0 + kPack <= end) {
        const int64_t q = q0 / kPack;
        float pv[kPack], gv[kPack], mv[kPack], vv[kPack];
        if (a.master != nullptr)
          load_pack(a.master, q, pv);
        else
          load_pack(p, q, pv);
        load_pack_either_ro<TP>(a.grad, a.grad_fp32, q, gv);
        load_pack_either<bf16_t>(a.exp_avg, a.state_fp32, q, mv);
        load_pack_either<bf16_t>(a.exp_avg_sq, a.state_fp32, q, vv);
#pragma unroll
        for (int e = 0; e < kPack; ++e) lamb_pass1_element(c, a.state_fp32, pv[e], gv[e], mv[e], vv[e], w2, u2);
        store_pack_either<bf16_t>(a.exp_avg, a.state_fp32, q, mv);
        store_pack_either<bf16_t>(a.exp_avg_sq, a.state_fp32, q, vv);
      } else {
        const int64_t stop = q0 + kPack < end ? q0 + kPack : end;
        for (int64_t i = q0; i < stop; ++i) {
          const float pv = a.master != nullptr ? a.master[i] : load(p[i]);
          const float gv = load_either<TP>(a.grad, a.grad_fp32, i);
          float mm = load_either<bf16_t>(a.exp_avg, a.state_fp32, i);
          float vv = load_either<bf16_t>(a.exp_avg_sq, a.state_fp32, i);
          lamb_pass1_element(c, a.state_fp32, pv, gv, mm, vv, w2, u2);
          store_either<bf16_t>(a.exp_avg, a.state_fp32, i, mm);
          store_either<bf16_t>(a.exp_avg_sq, a.state_fp32, i, vv);
        }
      }
    }
    w2 = block_sum(w2, scratch);
    u2 = block_sum(u2, scratch);
    if (threadIdx.x == 0) {
      a.w.partial_w[it] = w2;
      a.w.partial_u[it] = u2;
    }
  }
}

// One thread per segment: its partial sums, as the CPU driver adds them (math/lamb.h).
__global__ void lamb_segment_sums_kernel(const LambDeviceWork w) {
  const int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s >= w.segments) return;
  lamb_segment_sums(w.seg_first, w.partial_w, w.partial_u, s, w.segment_w2[s], w.segment_u2[s]);
}

// One thread per segment: lr * trust ratio, as the CPU driver computes it (math/lamb.h).
__global__ void lamb_ratio_kernel(const LambDeviceWork w, double lr, double max_trust_ratio, const float* lr_dev) {
  const int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s >= w.segments) return;
  const double rate = lr_dev != nullptr ? static_cast<double>(*lr_dev) : lr;
  w.scaled_lr[s] = lamb_scaled_lr(w.segment_w2[s], w.segment_u2[s], rate, max_trust_ratio);
}

template <typename TP>
__global__ void __launch_bounds__(kThreads) lamb_pass2_kernel(const LambCoeffs host, const LambArgs a) {
  LambCoeffs c;
  if (!block_coeffs(host, a.d, a.h, c)) return;
  TP* p = static_cast<TP*>(a.param);
  for (int64_t it = blockIdx.x; it < a.w.items; it += gridDim.x) {
    const int64_t begin = a.w.item_begin[it];
    const int64_t end = a.w.item_end[it];
    const float scaled_lr = a.w.scaled_lr[a.w.item_segment[it]];
    const bool vec = a.aligned && begin % kPack == 0;
    for (int64_t q0 = begin + static_cast<int64_t>(threadIdx.x) * kPack; q0 < end; q0 += kThreads * kPack) {
      if (vec && q0 + kPack <= end) {
        const int64_t q = q0 / kPack;
        float pv[kPack], mv[kPack], vv[kPack];
        if (a.master != nullptr)
          load_pack(a.master, q, pv);
        else
          load_pack(p, q, pv);
        load_pack_either<bf16_t>(a.exp_avg, a.state_fp32, q, mv);
        load_pack_either<bf16_t>(a.exp_avg_sq, a.state_fp32, q, vv);
#pragma unroll
        for (int e = 0; e < kPack; ++e) lamb_apply(c, scaled_lr, pv[e], mv[e], vv[e]);
        if (a.master != nullptr) store_pack(a.master, q, pv);
        store_pack(p, q, pv);
      } else {
        const int64_t stop = q0 + kPack < end ? q0 + kPack : end;
        for (int64_t i = q0; i < stop; ++i) {
          float pv = a.master != nullptr ? a.master[i] : load(p[i]);
          lamb_apply(c, scaled_lr, pv, load_either<bf16_t>(a.exp_avg, a.state_fp32, i),
                     load_either<bf16_t>(a.exp_avg_sq, a.state_fp32, i));
          if (a.master != nullptr) a.master[i] = pv;
          p[i] = store<TP>(pv);
        }
      }
    }
  }
}

template <typename TP>
void launch_lamb_typed(const LambCoeffs& c, const LambArgs& a, double lr, double max_trust_ratio,
                       cudaStream_t stream) {
  constexpr auto pass1 = &lamb_pass1_kernel<TP>;
  constexpr auto pass2 = &lamb_pass2_kernel<TP>;
  const unsigned segment_blocks = static_cast<unsigned>((a.w.segments + kThreads - 1) / kThreads);
  if (a.w.phases & kLambMoments) {
    pass1<<<grid_size<pass1>(a.w.items), kThreads, 0, stream>>>(c, a);
    check_launch("lamb_pass1_kernel");
    lamb_segment_sums_kernel<<<segment_blocks, kThreads, 0, stream>>>(a.w);
    check_launch("lamb_segment_sums_kernel");
  }
  if (a.w.phases & kLambApply) {
    lamb_ratio_kernel<<<segment_blocks, kThreads, 0, stream>>>(a.w, lr, max_trust_ratio, a.d.lr);
    check_launch("lamb_ratio_kernel");
    pass2<<<grid_size<pass2>(a.w.items), kThreads, 0, stream>>>(c, a);
    check_launch("lamb_pass2_kernel");
  }
}

}  // namespace

void launch_lamb(const FlatBuffers& b, const LambCoeffs& c, const LambDeviceWork& w, double lr,
                 double max_trust_ratio, const DeviceScalars& d, const Hyper& h, cudaStream_t stream) {
  if (w.items <= 0 || w.segments <= 0) return;
  LambArgs a;
  a.param = b.param;
  a.grad = b.grad;
  a.exp_avg = b.states[0];
  a.exp_avg_sq = b.states[1];
  a.master = b.master;
  a.grad_fp32 = b.grad_dtype == kFloat32;
  a.state_fp32 = b.state_dtype != kBFloat16;
  a.aligned = aligned16(a.param) && aligned16(a.grad) && aligned16(a.exp_avg) && aligned16(a.exp_avg_sq) &&
              aligned16(a.master);
  a.w = w;
  a.d = d;
  a.h = h;
  if (b.param_dtype == kBFloat16)
    launch_lamb_typed<bf16_t>(c, a, lr, max_trust_ratio, stream);
  else if (b.param_dtype == kFloat16)
    launch_lamb_typed<fp16_t>(c, a, lr, max_trust_ratio, stream);
  else
    launch_lamb_typed<float>(c, a, lr, max_trust_ratio, stream);
}

}  // namespace cuda
}  // namespace fusedopt
