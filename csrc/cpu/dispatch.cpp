// Checked CPU entry points: argument validation, the work list of the active segments, per-segment step counts and
// coefficients, run-time ISA selection (cpuid, FUSEDOPT_CPU_ISA), thread count, and the host-side halves of the
// deterministic reductions. Compiled once, for the baseline ISA.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <string>
#include <vector>

#include "fusedopt/checks.h"
#include "fusedopt/dtype.h"
#include "kernels.h"
#include "thread_pool.h"

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

// FUSEDOPT_THREADS_BACKEND at load: "pool" keeps the kernels on their own pool, "openmp" (the default) uses the OpenMP
// runtime loaded in the process when there is one (thread_pool.h).
bool initial_thread_backend() {
  const char* env = getenv("FUSEDOPT_THREADS_BACKEND");
  if (env != nullptr && env[0] != '\0') {
    try {
      set_thread_backend(env);
    } catch (const std::invalid_argument& e) {
      g_env_error += (g_env_error.empty() ? "" : "; ") + std::string("FUSEDOPT_THREADS_BACKEND: ") + e.what();
    }
  }
  return true;
}
const bool g_thread_backend_read = initial_thread_backend();
// Threads of the kernels: the count set with set_num_threads when there is one (> 0), else the count Python follows
// from torch.get_num_threads() (follow_threads), so the kernels use what torch uses.
std::atomic<int> g_threads_fixed{0};
// Until Python first follows torch's count: the machine's hardware threads. A forked child keeps both counts (its thread
// pool starts afresh, thread_pool.h).
std::atomic<int> g_threads_followed{hardware_threads()};

const KernelTable& table() { return *g_table.load(std::memory_order_relaxed); }

// The table entry of algorithm A.
template <typename A>
struct KernelOf;
#define FUSEDOPT_KERNEL_OF(A)                                                       \
  template <>                                                                       \
  struct KernelOf<algo::A> {                                                        \
    static decltype(KernelTable::A) get(const KernelTable& t) { return t.A; }       \
  };
FUSEDOPT_FOR_EACH_ALGORITHM(FUSEDOPT_KERNEL_OF)
#undef FUSEDOPT_KERNEL_OF
template <typename A>
auto kernel_of(const KernelTable& t) {
  return KernelOf<A>::get(t);
}
int threads() {
  const int fixed = g_threads_fixed.load(std::memory_order_relaxed);
  return fixed > 0 ? fixed : g_threads_followed.load(std::memory_order_relaxed);
}

using checks::fail;

// Validates the segment table and builds the work list of its active segments (chunks of at most kChunk elements,
// starting on a kChunk boundary of their segment).
struct WorkList {
  std::vector<int64_t> begin, end, segment, first;
  Work work() const {
    Work w;
    w.item_begin = begin.data();
    w.item_end = end.data();
    w.item_segment = segment.data();
    w.seg_first = first.data();
    w.items = static_cast<int64_t>(begin.size());
    w.segments = static_cast<int64_t>(first.size()) - 1;
    return w;
  }
};

WorkList work_list(const char* algo_name, int64_t n, const Segments& s, bool needs_steps) {
  const std::string a(algo_name);
  if (s.count < 0) fail(a + ": Invalid segment count: " + std::to_string(s.count));
  if (s.count > 0 && (s.offsets == nullptr || s.numels == nullptr || s.active == nullptr))
    fail(a + ": segment offsets, numels and active flags must not be null");
  if (s.count > 0 && needs_steps && s.steps == nullptr) fail(a + ": segment steps must not be null");
  WorkList l;
  l.first.reserve(s.count + 1);
  int64_t prev_end = 0;
  for (int64_t k = 0; k < s.count; ++k) {
    const int64_t off = s.offsets[k], num = s.numels[k];
    if (off < 0 || num < 0 || off > n || num > n - off)
      fail(a + ": segment " + std::to_string(k) + " (offset " + std::to_string(off) + ", numel " +
           std::to_string(num) + ") is outside the buffer of " + std::to_string(n) + " elements");
    if (off < prev_end)
      fail(a + ": segment " + std::to_string(k) + " at offset " + std::to_string(off) +
           " overlaps or precedes the previous segment (segments must be sorted and disjoint)");
    prev_end = off + num;
    l.first.push_back(static_cast<int64_t>(l.begin.size()));
    if (s.active[k] == 0) continue;
    for (int64_t x = 0; x < num; x += kChunk) {
      l.begin.push_back(off + x);
      l.end.push_back(off + (num - x < kChunk ? num : x + kChunk));
      l.segment.push_back(k);
    }
  }
  l.first.push_back(static_cast<int64_t>(l.begin.size()));
  return l;
}

// Factored algorithms: checks the layout table (api.h Layout; checks::check_passes checks the passes), then lists
// the row items (whole rows, about kChunk elements each) and column items (kColumnBlock columns of one leading index)
// of the active factored segments. The partition depends on the layout alone.
struct FactoredItems {
  std::vector<int64_t> row_item, row_first, col_item;
};

template <typename A>
FactoredItems factored_items(const char* algo_name, const FlatBuffers& b, const Segments& s, const StepArgs& args) {
  auto state_name = [](int slot) { return std::string(A::kStates[slot]); };
  const std::string a(algo_name);
  if (s.count > 0 && s.layout == nullptr) fail(a + ": segment layout must not be null (a factored algorithm)");
  FactoredItems f;
  f.row_first.push_back(0);
  for (int64_t k = 0; k < s.count; ++k) {
    const int64_t* row = s.layout + k * kLayoutColumns;
    const int64_t lead = row[kLead], rows = row[kRows], cols = row[kCols], total_rows = row[kTotalRows];
    const int64_t numel = s.numels[k];
    const std::string segment = a + ": segment " + std::to_string(k);
    for (int c = 0; c < kLayoutColumns; ++c)
      if (row[c] < 0) fail(segment + " has a negative entry in its layout (column " + std::to_string(c) + ")");
    if (total_rows > 0 && (lead * rows * cols != numel || rows > total_rows))
      fail(segment + " (numel " + std::to_string(numel) + ") is not " + std::to_string(lead) + " x " +
           std::to_string(rows) + " x " + std::to_string(cols) + " (of " + std::to_string(total_rows) + " rows)");
    if (total_rows == 0 && (numel > row[kNumel]))
      fail(segment + " (numel " + std::to_string(numel) + ") is larger than its parameter (" +
           std::to_string(row[kNumel]) + ")");
    if (total_rows > 0 && (row[kRowSumAt] + lead > args.factor_sums_count ||
                           row[kColSumAt] + lead * cols > args.factor_sums_count))
      fail(segment + " needs factor sums beyond the " + std::to_string(args.factor_sums_count) + " given");
    if (s.active[k] != 0 && (total_rows > 0 ? lead * cols : numel) > 0) {
      for (int slot = 0; slot < 3; ++slot)  // a vector keeps slot 2, a stack of matrices slots 0 and 1
        if ((slot == 2) == (total_rows == 0) && b.states[slot] == nullptr)
          fail(a + ": " + state_name(slot) + " pointer is null (segment " + std::to_string(k) + " keeps it)");
    }
    if (s.active[k] != 0 && total_rows > 0 && cols > 0) {
      const int64_t per_item = cols >= kChunk ? 1 : kChunk / cols;
      for (int64_t q = 0; q < lead * rows; q += per_item)
        f.row_item.insert(f.row_item.end(), {k, q, std::min(lead * rows, q + per_item)});
      // Column items also for a shard without rows: its column factors follow the (all-reduced) sums too.
      for (int64_t l = 0; l < lead; ++l)
        for (int64_t c0 = 0; c0 < cols; c0 += kColumnBlock)
          f.col_item.insert(f.col_item.end(), {k, l, c0, std::min(cols, c0 + kColumnBlock)});
    }
    f.row_first.push_back(static_cast<int64_t>(f.row_item.size() / 3));
  }
  return f;
}

// Counts the step of every active segment (when the call counts steps) and makes its coefficients in compute type T
// (in double, on the host, rounded once to T) from its scalar states, which it then advances: the kernel reads only
// the coefficients.
template <typename A, typename T>
std::vector<typename A::template Coeffs<T>> count_and_make_coeffs(const typename A::Hyper& h, const Segments& s,
                                                                  const StepArgs& args, bool counts_step) {
  constexpr int kScalars = algo::ScalarCount<A>::value;
  std::vector<typename A::template Coeffs<T>> coeffs(s.count > 0 ? s.count : 0);
  for (int64_t k = 0; k < s.count; ++k) {
    if (s.active[k] == 0) continue;
    if (counts_step) s.steps[k] += 1.0f;
    const double step = static_cast<double>(s.steps[k]);
    float* scalars = kScalars > 0 ? s.scalars + k * kScalars : nullptr;
    coeffs[k] = algo::make_segment_coeffs<T, A>(h, args.lr, step, args.grad_scale, scalars);
    algo::advance_segment<A>(h, args.lr, step, scalars);
  }
  return coeffs;
}

// The checked step of algorithm A: validate, count the step of every active segment, make each active segment's
// coefficients (in double, on the host; float64 parameters keep them in double), then run the kernel of the selected
// ISA over the work list.
template <typename A>
void step(const char* algo_name, const FlatBuffers& b, const Segments& s, const StepArgs& args) {
  const typename A::Hyper h = checks::hyper_from<A>(algo_name, args);
  checks::check_buffers<A>(algo_name, b, h);
  checks::check_passes<A>(algo_name, s.count, args);
  checks::check_quantized<A>(algo_name, b, s);
  const bool counts_step = checks::counts_step<A>(args);
  const WorkList list = work_list(algo_name, b.n, s, true);
  // Checked before any step is counted.
  const FactoredItems factored =
      A::kKind == algo::Kind::kFactored ? factored_items<A>(algo_name, b, s, args) : FactoredItems{};
  static_assert(algo::ScalarCount<A>::value == 0 || A::kKind == algo::Kind::kElementwise,
                "scalar states are advanced once per call: element-wise algorithms only");
  if (algo::ScalarCount<A>::value > 0 && s.count > 0 && s.scalars == nullptr)
    fail(std::string(algo_name) + ": segment scalars must not be null (this algorithm keeps per-segment scalar states)");
  std::vector<typename A::template Coeffs<float>> coeffs32;
  std::vector<typename A::template Coeffs<double>> coeffs64;
  SegmentCoeffs<A> coeffs;
  if (b.param_dtype == kFloat64) {
    coeffs64 = count_and_make_coeffs<A, double>(h, s, args, counts_step);
    coeffs.fp64 = coeffs64.data();
  } else {
    coeffs32 = count_and_make_coeffs<A, float>(h, s, args, counts_step);
    coeffs.fp32 = coeffs32.data();
  }
  Work w = list.work();
  std::vector<uint32_t> keys;
  if (b.param_mode == kParamStochastic) {  // after the step counts: the key of the step being taken
    keys.resize(s.count);
    for (int64_t k = 0; k < s.count; ++k) keys[k] = rounding_key(b.seed, s.steps[k], k);
    w.rounding_key = keys.data();
  }
  std::vector<double> pw, pu, w2, u2, slr;
  if (A::kKind == algo::Kind::kTrustRatio) {
    pw.resize(w.items);
    pu.resize(w.items);
    slr.resize(s.count);
    w.partial_w = pw.data();
    w.partial_u = pu.data();
    w.scaled_lr = slr.data();
    w.passes = args.passes;
    if (args.segment_w2 != nullptr) {
      w.segment_w2 = args.segment_w2;
      w.segment_u2 = args.segment_u2;
    } else {
      w2.resize(s.count);
      u2.resize(s.count);
      w.segment_w2 = w2.data();
      w.segment_u2 = u2.data();
    }
    if (args.passes & kPassMoments) {  // segments without items (empty shards, no gradient) have zero sums
      std::fill(w.segment_w2, w.segment_w2 + s.count, 0.0);
      std::fill(w.segment_u2, w.segment_u2 + s.count, 0.0);
    }
  }
  std::vector<double> row_partial_w, factor_sums, step_size;
  if (A::kKind == algo::Kind::kFactored) {
    pw.resize(w.items);
    pu.resize(w.items);
    row_partial_w.resize(factored.row_item.size() / 3);
    step_size.resize(s.count);
    if (args.segment_w2 == nullptr) {  // one call runs every pass: scratch sums
      w2.assign(s.count, 0.0);
      u2.assign(s.count, 0.0);
      factor_sums.assign(args.factor_sums_count, 0.0);
    }
    w.offsets = s.offsets;
    w.numels = s.numels;
    w.active = s.active;
    w.layout = s.layout;
    w.row_item = factored.row_item.data();
    w.row_first = factored.row_first.data();
    w.row_items = static_cast<int64_t>(row_partial_w.size());
    w.col_item = factored.col_item.data();
    w.col_items = static_cast<int64_t>(factored.col_item.size() / 4);
    w.row_partial_w = row_partial_w.data();
    w.partial_w = pw.data();
    w.partial_u = pu.data();
    w.segment_w2 = args.segment_w2 != nullptr ? args.segment_w2 : w2.data();
    w.segment_u2 = args.segment_u2 != nullptr ? args.segment_u2 : u2.data();
    w.factor_sums = args.factor_sums != nullptr ? args.factor_sums : factor_sums.data();
    w.step_size = step_size.data();
    w.passes = args.passes;
    // A shard without elements still moves its column factors (the row-less shard of a sharded matrix).
    if (w.items == 0 && w.col_items == 0) return;
    kernel_of<A>(table())(b, h, w, coeffs, threads());
    return;
  }
  if (b.n == 0 || w.items == 0) return;
  kernel_of<A>(table())(b, h, w, coeffs, threads());
}

SumOfSquares combine(const KernelTable& t, const void* data, int dtype, const Work& w) {
  SumOfSquares r;
  if (w.items == 0) return r;
  std::vector<double> partials(w.items);
  std::vector<unsigned char> bad(w.items);
  t.sum_of_squares(data, dtype, w, partials.data(), bad.data(), threads());
  for (int64_t k = 0; k < w.items; ++k) {  // fixed combine order: bitwise identical for any thread count
    r.sum += partials[k];
    r.nonfinite = r.nonfinite || bad[k] != 0;
  }
  return r;
}

}  // namespace

#define FUSEDOPT_DEFINE_STEP(A) \
  void A(const FlatBuffers& b, const Segments& s, const StepArgs& args) { step<algo::A>(#A, b, s, args); }
FUSEDOPT_FOR_EACH_ALGORITHM(FUSEDOPT_DEFINE_STEP)
#undef FUSEDOPT_DEFINE_STEP

SumOfSquares sum_of_squares(const void* data, int64_t n, int dtype) {
  if (n < 0) fail("sum_of_squares: Invalid element count n: " + std::to_string(n));
  checks::check_dtype("sum_of_squares", "t", dtype);
  if (n == 0) return SumOfSquares{};
  if (data == nullptr) fail("sum_of_squares: data pointer is null");
  const int64_t offset = 0;
  const uint8_t active = 1;
  Segments whole;
  whole.offsets = &offset;
  whole.numels = &n;
  whole.active = &active;
  whole.count = 1;
  const WorkList list = work_list("sum_of_squares", n, whole, false);
  return combine(table(), data, dtype, list.work());
}

SumOfSquares sum_of_squares_segments(const void* data, int64_t n, int dtype, const Segments& s) {
  if (n < 0) fail("sum_of_squares: Invalid element count n: " + std::to_string(n));
  checks::check_dtype("sum_of_squares", "t", dtype);
  const WorkList list = work_list("sum_of_squares", n, s, false);
  if (!list.begin.empty() && data == nullptr) fail("sum_of_squares: data pointer is null");
  return combine(table(), data, dtype, list.work());
}

void sam_perturb(const SamBuffers& b, const Segments& s, double scale, bool adaptive) {
  checks::check_sam_buffers("sam_perturb", b, true, true);
  const WorkList list = work_list("sam_perturb", b.n, s, false);
  const Work w = list.work();
  if (b.n == 0 || w.items == 0) return;
  table().sam_perturb(b, w, scale, adaptive, threads());
}

void sam_restore(const SamBuffers& b, const Segments& s) {
  checks::check_sam_buffers("sam_restore", b, false, true);
  const WorkList list = work_list("sam_restore", b.n, s, false);
  const Work w = list.work();
  if (b.n == 0 || w.items == 0) return;
  table().sam_restore(b, w, threads());
}

SumOfSquares sam_sum_of_squares(const SamBuffers& b, const Segments& s) {
  checks::check_sam_buffers("sam_sum_of_squares", b, true, false);
  const WorkList list = work_list("sam_sum_of_squares", b.n, s, false);
  const Work w = list.work();
  SumOfSquares r;
  if (b.n == 0 || w.items == 0) return r;
  std::vector<double> partials(w.items);
  std::vector<unsigned char> bad(w.items);
  table().sam_sum_of_squares(b, w, partials.data(), bad.data(), threads());
  for (int64_t k = 0; k < w.items; ++k) {  // fixed combine order, as combine() above
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
  g_threads_fixed.store(n);
}

void reset_num_threads() { g_threads_fixed.store(0); }

void follow_threads(int n) {
  if (n < 1) fail("Invalid number of threads: " + std::to_string(n) + " (must be >= 1)");
  g_threads_followed.store(n);
}

int get_num_threads() { return threads(); }

std::string thread_backend() { return current_backend(); }

void set_thread_backend(const std::string& name) {
  if (name == "openmp")
    set_prefer_openmp(true);
  else if (name == "pool")
    set_prefer_openmp(false);
  else
    fail("Unknown thread backend '" + name + "'; expected openmp or pool");
}

std::string openmp_runtime() { return openmp_runtime_path(); }

int last_region_threads() { return last_region_team(); }

}  // namespace cpu
}  // namespace fusedopt
