// Deterministic device reductions: sum of squares (global gradient norm) in two phases, and the clip coefficient.
// Phase 1: a fixed grid of G = min(chunks, kMaxReduceBlocks) blocks, block b summing chunks b, b+G, ... of kChunk
// elements (thread t: packs t, t+kThreads, ... of each chunk, elements of a pack in order, on the vector and the scalar
// path alike), fixed block tree -> G partial sums and flags. Phase 2: one block combines the G partials in a fixed
// tree. G depends on n only, so the result is bitwise identical run to run and on any GPU. Nothing leaves the device.
#include "kernels.cuh"
#include "launcher.cuh"

namespace fusedopt {
namespace cuda {
namespace {

constexpr int64_t kMaxReduceBlocks = 1024;  // also the block size of the combine kernel

template <typename T>
__global__ void __launch_bounds__(kThreads) sum_squares_partial_kernel(const T* x, int64_t n, bool aligned,
                                                                      int64_t blocks, double* scratch) {
  __shared__ double shared[32];
  double acc = 0.0;
  int bad = 0;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  for (int64_t ck = blockIdx.x; ck < chunks; ck += blocks) {
    const int64_t begin = ck * kChunk;
    const int64_t end = n - begin < kChunk ? n : begin + kChunk;
    for (int64_t q0 = begin + static_cast<int64_t>(threadIdx.x) * kPack; q0 < end; q0 += kThreads * kPack) {
      if (aligned && q0 + kPack <= end) {
        float v[kPack];
        load_pack_ro(x, q0 / kPack, v);
#pragma unroll
        for (int e = 0; e < kPack; ++e) {
          acc += square_term(v[e]);
          bad |= is_nonfinite(v[e]) ? 1 : 0;
        }
      } else {
        const int64_t stop = q0 + kPack < end ? q0 + kPack : end;
        for (int64_t i = q0; i < stop; ++i) {
          const float v = load(x[i]);
          acc += square_term(v);
          bad |= is_nonfinite(v) ? 1 : 0;
        }
      }
    }
  }
  acc = block_sum(acc, shared);
  bad = __syncthreads_or(bad);
  if (threadIdx.x == 0) {
    scratch[blockIdx.x] = acc;
    scratch[blocks + blockIdx.x] = bad ? 1.0 : 0.0;
  }
}

__global__ void __launch_bounds__(kMaxReduceBlocks) sum_squares_combine_kernel(const double* scratch, int64_t blocks,
                                                                              float* out_sum, double* out_sum64,
                                                                              float* out_nonfinite) {
  __shared__ double shared[32];
  const int64_t t = threadIdx.x;
  double v = t < blocks ? scratch[t] : 0.0;
  const int bad = __syncthreads_or(t < blocks && scratch[blocks + t] != 0.0);
  v = block_sum(v, shared);
  if (t == 0) {
    if (out_sum != nullptr) *out_sum = static_cast<float>(v);
    if (out_sum64 != nullptr) *out_sum64 = v;
    if (out_nonfinite != nullptr) *out_nonfinite = bad ? 1.0f : 0.0f;
  }
}

__global__ void clip_coefficient_kernel(const float* sums, const float* flags, int64_t count, float max_norm,
                                        const float* inv_scale_dev, float inv_scale, float* out_coef,
                                        float* out_norm, float* out_found_inf) {
  double total = 0.0;
  bool bad = false;
  for (int64_t i = 0; i < count; ++i) {
    total += static_cast<double>(sums[i]);
    if (flags != nullptr && flags[i] != 0.0f) bad = true;
  }
  const float scale = inv_scale_dev != nullptr ? *inv_scale_dev : inv_scale;
  // The norm of the unscaled gradient, in fp32 from here on as torch.nn.utils.clip_grad_norm_ computes it.
  const float norm = static_cast<float>(sqrt(total)) * scale;
  float coef = max_norm / (norm + 1e-6f);
  coef = coef > 1.0f ? 1.0f : coef;  // torch.clamp(max=1): NaN stays NaN
  if (out_coef != nullptr) *out_coef = coef * scale;
  if (out_norm != nullptr) *out_norm = norm;
  if (out_found_inf != nullptr) *out_found_inf = (bad || !isfinite(norm)) ? 1.0f : 0.0f;
}

}  // namespace

int64_t sum_of_squares_blocks(int64_t n) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int64_t g = chunks < kMaxReduceBlocks ? chunks : kMaxReduceBlocks;
  return g < 1 ? 1 : g;
}

void launch_sum_of_squares(const void* data, int64_t n, int dtype, double* scratch, float* out_sum,
                           double* out_sum64, float* out_nonfinite, cudaStream_t stream) {
  const int64_t blocks = sum_of_squares_blocks(n);
  const bool aligned = aligned16(data);
  if (dtype == kBFloat16)
    sum_squares_partial_kernel<bf16_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        static_cast<const bf16_t*>(data), n, aligned, blocks, scratch);
  else if (dtype == kFloat16)
    sum_squares_partial_kernel<fp16_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        static_cast<const fp16_t*>(data), n, aligned, blocks, scratch);
  else
    sum_squares_partial_kernel<float><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        static_cast<const float*>(data), n, aligned, blocks, scratch);
  check_launch("sum_squares_partial_kernel");
  sum_squares_combine_kernel<<<1, kMaxReduceBlocks, 0, stream>>>(scratch, blocks, out_sum, out_sum64,
                                                                  out_nonfinite);
  check_launch("sum_squares_combine_kernel");
}

void launch_clip_coefficient(const float* sums, const float* flags, int64_t count, double max_norm,
                             const float* inv_scale_dev, float inv_scale, float* out_coef, float* out_norm,
                             float* out_found_inf, cudaStream_t stream) {
  clip_coefficient_kernel<<<1, 1, 0, stream>>>(sums, flags, count, static_cast<float>(max_norm), inv_scale_dev,
                                               inv_scale, out_coef, out_norm, out_found_inf);
  check_launch("clip_coefficient_kernel");
}

}  // namespace cuda
}  // namespace fusedopt
