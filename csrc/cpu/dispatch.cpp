// Checked CPU entry points: argument validation, run-time ISA selection (cpuid, FUSEDOPT_CPU_ISA), thread count, and
// the host-side halves of the deterministic reductions. Compiled once, for the baseline ISA.
#include <math.h>
#include <stdlib.h>

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <string>
#include <vector>

#include "fusedopt/dtype.h"
#include "kernels.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

FUSEDOPT_DECLARE_ISA_TABLE(baseline)
#if defined(FUSEDOPT_HAVE_AVX2)
FUSEDOPT_DECLARE_ISA_TABLE(avx2)
#endif
#if defined(FUSEDOPT_HAVE_AVX512)
FUSEDOPT_DECLARE_ISA_TABLE(avx512)
#endif

namespace fusedopt {
namespace cpu {
namespace {

struct IsaEntry {
  const char* name;
  const KernelTable* (*table)();
  bool (*runnable)();
};

const KernelTable* baseline_table() { return &baseline::kernel_table(); }
bool always() { return true; }
#if defined(FUSEDOPT_HAVE_AVX2)
const KernelTable* avx2_table() { return &avx2::kernel_table(); }
bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
#endif
#if defined(FUSEDOPT_HAVE_AVX512)
const KernelTable* avx512_table() { return &avx512::kernel_table(); }
bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}
#endif

// Ordered from least to most capable.
const std::vector<IsaEntry>& isa_entries() {
  static const std::vector<IsaEntry> entries = {
      {"baseline", baseline_table, always},
#if defined(FUSEDOPT_HAVE_AVX2)
      {"avx2", avx2_table, cpu_has_avx2},
#endif
#if defined(FUSEDOPT_HAVE_AVX512)
      {"avx512", avx512_table, cpu_has_avx512},
#endif
  };
  return entries;
}

std::string join(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

const KernelTable* best_table() {
  const KernelTable* best = nullptr;
  for (const auto& e : isa_entries())
    if (e.runnable()) best = e.table();
  return best;
}

const KernelTable* find_table(const std::string& name) {
  for (const auto& e : isa_entries()) {
    if (name == e.name) {
      if (!e.runnable())
        throw std::invalid_argument("CPU ISA '" + name + "' is compiled in but not supported by this CPU; supported: " +
                                    join(supported_isas()));
      return e.table();
    }
  }
  throw std::invalid_argument("Unknown CPU ISA '" + name + "'; expected one of baseline, avx2, avx512 (compiled: " +
                              join(compiled_isas()) + "; supported by this CPU: " + join(supported_isas()) + ")");
}

int default_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

std::string g_env_error;

// Selected at load: FUSEDOPT_CPU_ISA when set and usable, else the best ISA this CPU runs.
const KernelTable* initial_table() {
  const char* env = getenv("FUSEDOPT_CPU_ISA");
  if (env != nullptr && env[0] != '\0') {
    try {
      return find_table(env);
    } catch (const std::invalid_argument& e) {
      g_env_error = std::string("FUSEDOPT_CPU_ISA: ") + e.what();
    }
  }
  return best_table();
}

std::atomic<const KernelTable*> g_table{initial_table()};
std::atomic<int> g_threads{default_threads()};

const KernelTable& table() { return *g_table.load(std::memory_order_relaxed); }
int threads() { return g_threads.load(std::memory_order_relaxed); }

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument(msg); }

void check_dtype(const char* what, int code) {
  if (!is_valid_dtype(code))
    fail(std::string("Invalid dtype code for ") + what + ": " + std::to_string(code) +
         " (expected 0 float32, 1 bfloat16, 2 float16)");
}

// Validates one buffer set for an algorithm with the given state slots; a rejected call touches nothing.
void check_buffers(const char* algo, const FlatBuffers& b, const bool (&uses)[3], const char* const (&names)[3]) {
  const std::string a(algo);
  if (b.n < 0) fail(a + ": Invalid element count n: " + std::to_string(b.n));
  check_dtype("param", b.param_dtype);
  check_dtype("grad", b.grad_dtype);
  check_dtype("states", b.state_dtype);
  if (b.grad_dtype != b.param_dtype && b.grad_dtype != kFloat32)
    fail(a + ": grad dtype code " + std::to_string(b.grad_dtype) + " must equal the param dtype code " +
         std::to_string(b.param_dtype) + " or be 0 (float32)");
  if (b.state_dtype == kFloat16) fail(a + ": Invalid state dtype code 2 (float16); states are float32 or bfloat16");
  if (b.n == 0) return;
  if (b.param == nullptr) fail(a + ": param pointer is null");
  if (b.grad == nullptr) fail(a + ": grad pointer is null");
  for (int k = 0; k < 3; ++k) {
    if (uses[k] && b.states[k] == nullptr) fail(a + ": " + names[k] + " pointer is null");
  }
}

// fp32 parameters with fp32 master weights: update the master buffer as the parameter, then copy it into param.
template <typename Run>
void run_with_master(const FlatBuffers& b, Run&& run) {
  if (b.master != nullptr && b.param_dtype == kFloat32) {
    FlatBuffers m = b;
    m.param = b.master;
    m.master = nullptr;
    run(m);
    table().round_copy(b.param, kFloat32, b.master, b.n, threads());
  } else {
    run(b);
  }
}

}  // namespace

void adam(const FlatBuffers& b, const AdamCoeffs& c, bool amsgrad) {
  check_buffers("adam", b, {true, true, amsgrad}, {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"});
  if (b.n == 0) return;
  run_with_master(b, [&](const FlatBuffers& x) { table().adam(x, c, amsgrad, threads()); });
}

void sgd(const FlatBuffers& b, const SgdCoeffs& c, bool momentum) {
  check_buffers("sgd", b, {momentum, false, false}, {"momentum_buffer", "", ""});
  if (b.n == 0) return;
  run_with_master(b, [&](const FlatBuffers& x) { table().sgd(x, c, momentum, threads()); });
}

void rmsprop(const FlatBuffers& b, const RmspropCoeffs& c, bool centered, bool momentum) {
  check_buffers("rmsprop", b, {true, momentum, centered}, {"square_avg", "momentum_buffer", "grad_avg"});
  if (b.n == 0) return;
  run_with_master(b, [&](const FlatBuffers& x) { table().rmsprop(x, c, centered, momentum, threads()); });
}

void adagrad(const FlatBuffers& b, const AdagradCoeffs& c) {
  check_buffers("adagrad", b, {true, false, false}, {"sum", "", ""});
  if (b.n == 0) return;
  run_with_master(b, [&](const FlatBuffers& x) { table().adagrad(x, c, threads()); });
}

void lion(const FlatBuffers& b, const LionCoeffs& c) {
  check_buffers("lion", b, {true, false, false}, {"exp_avg", "", ""});
  if (b.n == 0) return;
  run_with_master(b, [&](const FlatBuffers& x) { table().lion(x, c, threads()); });
}

void lamb(const FlatBuffers& b, const LambCoeffs& c, const LambSegments& s, double lr, double max_trust_ratio) {
  std::vector<double> w2(s.count > 0 ? s.count : 0), u2(s.count > 0 ? s.count : 0);
  lamb_phases(b, c, s, lr, max_trust_ratio, kLambMoments | kLambApply, w2.data(), u2.data());
}

void lamb_phases(const FlatBuffers& b, const LambCoeffs& c, const LambSegments& s, double lr, double max_trust_ratio,
                 int phases, double* segment_w2, double* segment_u2) {
  check_buffers("lamb", b, {true, true, false}, {"exp_avg", "exp_avg_sq", ""});
  if (phases < kLambMoments || phases > (kLambMoments | kLambApply))
    fail("lamb: Invalid phases: " + std::to_string(phases) + " (expected 1, 2 or 3)");
  if (s.count < 0) fail("lamb: Invalid segment count: " + std::to_string(s.count));
  if (s.count > 0 && (s.offsets == nullptr || s.numels == nullptr)) fail("lamb: segment arrays are null");
  if (s.count > 0 && (segment_w2 == nullptr || segment_u2 == nullptr)) fail("lamb: segment sum arrays are null");
  std::vector<int64_t> begin, end, segment, first;
  first.reserve(s.count + 1);
  int64_t prev_end = 0;
  for (int64_t k = 0; k < s.count; ++k) {
    const int64_t off = s.offsets[k], num = s.numels[k];
    if (off < 0 || num < 0 || off > b.n || num > b.n - off)
      fail("lamb: segment " + std::to_string(k) + " (offset " + std::to_string(off) + ", numel " + std::to_string(num) +
           ") is outside the buffer of " + std::to_string(b.n) + " elements");
    if (off < prev_end)
      fail("lamb: segment " + std::to_string(k) + " at offset " + std::to_string(off) +
           " overlaps or precedes the previous segment (segments must be sorted and disjoint)");
    prev_end = off + num;
    first.push_back(static_cast<int64_t>(begin.size()));
    for (int64_t x = 0; x < num; x += kChunk) {
      begin.push_back(off + x);
      end.push_back(off + (num - x < kChunk ? num : x + kChunk));
      segment.push_back(k);
    }
  }
  first.push_back(static_cast<int64_t>(begin.size()));
  if (phases & kLambMoments) {  // segments without elements (empty shards) have zero sums
    std::fill(segment_w2, segment_w2 + s.count, 0.0);
    std::fill(segment_u2, segment_u2 + s.count, 0.0);
  }
  if (b.n == 0 || begin.empty()) return;
  const int64_t items = static_cast<int64_t>(begin.size());
  std::vector<double> pw(items), pu(items);
  std::vector<float> slr(s.count);
  LambWork w{begin.data(), end.data(), segment.data(), first.data(), items,    s.count, pw.data(),
             pu.data(),    slr.data(), segment_w2,     segment_u2,   lr,       max_trust_ratio, phases};
  run_with_master(b, [&](const FlatBuffers& x) { table().lamb(x, c, w, threads()); });
}

SumOfSquares sum_of_squares(const void* data, int64_t n, int dtype) {
  if (n < 0) fail("sum_of_squares: Invalid element count n: " + std::to_string(n));
  check_dtype("t", dtype);
  SumOfSquares r;
  if (n == 0) return r;
  if (data == nullptr) fail("sum_of_squares: data pointer is null");
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partials(chunks);
  std::vector<unsigned char> bad(chunks);
  table().sum_of_squares(data, n, dtype, partials.data(), bad.data(), threads());
  for (int64_t k = 0; k < chunks; ++k) {  // fixed combine order: bitwise identical for any thread count
    r.sum += partials[k];
    r.nonfinite = r.nonfinite || bad[k] != 0;
  }
  return r;
}

std::vector<std::string> compiled_isas() {
  std::vector<std::string> out;
  for (const auto& e : isa_entries()) out.emplace_back(e.name);
  return out;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (const auto& e : isa_entries())
    if (e.runnable()) out.emplace_back(e.name);
  return out;
}

std::string cpu_isa() { return table().name; }

void set_cpu_isa(const std::string& name) { g_table.store(find_table(name)); }

std::string isa_override_error() { return g_env_error; }

void set_num_threads(int n) {
  if (n < 1) fail("Invalid number of threads: " + std::to_string(n) + " (must be >= 1)");
  g_threads.store(n);
}

int get_num_threads() { return threads(); }

bool openmp_enabled() {
#if defined(_OPENMP)
  return true;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace fusedopt
