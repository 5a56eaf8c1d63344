// The two backends behind parallel_for (thread_pool.h):
//   - the OpenMP runtime already loaded in the process (torch's wheel brings one: libgomp.so.1 or a renamed copy such
//     as libgomp-<hash>.so.1; libomp and libiomp5 export the same GOMP_ entry points), found with dl_iterate_phdr and
//     called through dlsym'd pointers, so torch's parallel ops and the kernels share one team of threads instead of
//     two sets of spinning threads fighting over the cores;
//   - a lazily created pool per process, worker t always running range t (so a range's data stays in the same core's
//     cache from step to step, as with OpenMP's static schedule). Idle threads spin briefly, then sleep on a condition
//     variable. Used when no runtime is loaded, in a forked child, and when asked for.
// Compiled once, for the baseline ISA.
#include "thread_pool.h"

#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <string.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace fusedopt {
namespace cpu {
namespace {

// How long a thread that waits (a worker for its next range, the caller for the workers) polls before it sleeps.
// The successive regions of one step (LAMB runs three) and the steps of a small model follow each other within
// microseconds, so the handover costs no system call; a thread idle for longer leaves its core to others (the kernels
// share small machines with torch's own threads).
constexpr std::chrono::microseconds kSpin(50);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

// A place for one thread to wait until a condition holds: spin (bounded by kSpin), then sleep. The waker makes the
// condition true with a sequentially consistent store, then calls wake(); the waiter announces its sleep with a
// sequentially consistent store before its last check under the mutex, so one of the two always sees the other and no
// wake-up is lost.
struct Parking {
  std::atomic<bool> sleeping{false};
  std::mutex mutex;
  std::condition_variable cv;

  template <typename Ready>
  void wait(Ready ready) {
    if (ready()) return;
    const auto deadline = std::chrono::steady_clock::now() + kSpin;
    for (int i = 1;; ++i) {
      cpu_relax();
      if (ready()) return;
      if ((i & 63) == 0 && std::chrono::steady_clock::now() >= deadline) break;
    }
    std::unique_lock<std::mutex> lock(mutex);
    sleeping.store(true);
    cv.wait(lock, ready);
    sleeping.store(false, std::memory_order_relaxed);
  }

  void wake() {
    if (!sleeping.load()) return;
    { std::lock_guard<std::mutex> lock(mutex); }  // the waiter is inside cv.wait (or past it) once this is acquired
    cv.notify_one();
  }
};

// Range t of the static split of [0, n) into r ranges (thread_pool.h).
inline void static_range(int64_t n, int64_t r, int64_t t, int64_t* begin, int64_t* end) {
  int64_t q = n / r;
  const int64_t m = n % r;
  int64_t first;
  if (t < m) {
    ++q;
    first = q * t;
  } else {
    first = q * t + m;
  }
  *begin = first;
  *end = first + q;
}

// True on pool workers, on OpenMP team members while they run their range, and on a caller while it runs its ranges:
// a parallel_for from there runs inline.
thread_local bool t_in_region = false;

std::atomic<int> g_last_region_team{0};  // last_region_team()

// ---------------------------------------------------------------------------------------------- the OpenMP runtime

// The entry points of a loaded OpenMP runtime (libgomp's ABI), resolved once per process.
struct OpenMP {
  void (*parallel)(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags) = nullptr;  // GOMP_parallel
  int (*thread_num)() = nullptr;                                                                  // omp_get_thread_num
  int (*num_threads)() = nullptr;                                                                 // omp_get_num_threads
  int (*in_parallel)() = nullptr;  // omp_in_parallel; optional
  pid_t pid = 0;                   // the process that resolved them; a forked child must not use them
  std::string path;
};

bool is_openmp_runtime(const char* path) {
  const char* slash = strrchr(path, '/');
  const char* base = slash != nullptr ? slash + 1 : path;
  return strncmp(base, "libgomp", 7) == 0 || strncmp(base, "libiomp", 7) == 0 || strncmp(base, "libomp", 6) == 0;
}

int collect_runtime(dl_phdr_info* info, size_t, void* out) {
  if (info->dlpi_name != nullptr && info->dlpi_name[0] != '\0' && is_openmp_runtime(info->dlpi_name)) {
    try {
      static_cast<std::vector<std::string>*>(out)->emplace_back(info->dlpi_name);
    } catch (...) {
      return 1;
    }
  }
  return 0;
}

// The first runtime, in load order, that is mapped already and exports the entry points; nullptr when there is none.
// Paths are collected first and opened after dl_iterate_phdr returns: dlopen inside its callback would take the
// loader's locks in the opposite order of a concurrent dlopen. RTLD_NOLOAD never loads anything; the handle is kept,
// so the runtime stays mapped while its pointers are in use.
const OpenMP* resolve_openmp() noexcept {
  try {
    std::vector<std::string> paths;
    dl_iterate_phdr(collect_runtime, &paths);
    for (const std::string& path : paths) {
      void* handle = dlopen(path.c_str(), RTLD_NOLOAD | RTLD_LAZY);
      if (handle == nullptr) continue;
      std::unique_ptr<OpenMP> rt(new OpenMP);
      rt->parallel = reinterpret_cast<decltype(rt->parallel)>(dlsym(handle, "GOMP_parallel"));
      rt->thread_num = reinterpret_cast<decltype(rt->thread_num)>(dlsym(handle, "omp_get_thread_num"));
      rt->num_threads = reinterpret_cast<decltype(rt->num_threads)>(dlsym(handle, "omp_get_num_threads"));
      rt->in_parallel = reinterpret_cast<decltype(rt->in_parallel)>(dlsym(handle, "omp_in_parallel"));
      if (rt->parallel == nullptr || rt->thread_num == nullptr || rt->num_threads == nullptr) {
        dlclose(handle);
        continue;
      }
      rt->pid = getpid();
      rt->path = path;
      return rt.release();  // kept for the life of the process, as the handle
    }
  } catch (...) {
  }
  return nullptr;
}

// Resolved once, when the extension is loaded (the Python package imports torch first), so that the pid it records is
// that of the process that loaded both: a child forked later sees the parent's pid and keeps off the runtime. Found
// lazily instead, a child forked after torch ran a parallel op but before fusedopt's first region would resolve the
// runtime as its own and hang in its first region, as torch's own parallel ops do in such a child. A runtime loaded
// after the extension is not looked for.
const OpenMP* const g_openmp = resolve_openmp();

const OpenMP* openmp() noexcept { return g_openmp; }

// set_prefer_openmp. Constant-initialised, so dispatch.cpp's load-time setting from the environment cannot come first.
std::atomic<bool> g_prefer_openmp{true};

// The runtime found, when this is the process that found it: a forked child has only the forking thread, and the
// parent's team (and libgomp's idea of it) cannot be used there.
const OpenMP* live_openmp() noexcept {
  const OpenMP* rt = openmp();
  return rt != nullptr && rt->pid == getpid() ? rt : nullptr;
}

struct OpenMPRegion {
  const OpenMP* rt;
  int64_t n;
  RangeBody body;
  void* ctx;
  int team;  // written by team member 0, read by the caller after the join
};

// Each member of the team the runtime gave runs range t of the split of [0, n) into as many ranges as members.
void openmp_region(void* data) {
  OpenMPRegion& r = *static_cast<OpenMPRegion*>(data);
  const int t = r.rt->thread_num();
  const int team = r.rt->num_threads();
  if (t == 0) r.team = team;
  const int64_t ranges = r.n < team ? r.n : team;
  if (t >= ranges) return;
  int64_t begin, end;
  static_range(r.n, ranges, t, &begin, &end);
  const bool outer = t_in_region;
  t_in_region = true;
  r.body(r.ctx, begin, end);
  t_in_region = outer;
}

class Pool {
 public:
  void run(int64_t n, int ranges, RangeBody body, void* ctx) noexcept {
    std::lock_guard<std::mutex> region(region_mutex_);
    const int helpers = std::min(grow(ranges - 1), ranges - 1);
    body_ = body;
    ctx_ = ctx;
    n_ = n;
    ranges_ = ranges;
    pending_.store(helpers, std::memory_order_relaxed);
    ++region_;
    for (int w = 0; w < helpers; ++w) {
      Worker& worker = *workers_[w];
      worker.go.store(region_);  // publishes body_, ctx_, n_, ranges_ and pending_ to the worker
      worker.parking.wake();
    }
    t_in_region = true;
    run_range(0);
    for (int t = helpers + 1; t < ranges; ++t) run_range(t);  // ranges whose worker could not be created
    t_in_region = false;
    done_.wait([this] { return pending_.load() == 0; });  // acquires what the workers wrote
    g_last_region_team.store(helpers + 1, std::memory_order_relaxed);
  }

 private:
  struct alignas(64) Worker {
    std::atomic<uint64_t> go{0};  // the last region this worker was asked to help with
    Parking parking;
    std::thread thread;
  };

  void run_range(int t) noexcept {
    int64_t begin, end;
    static_range(n_, ranges_, t, &begin, &end);
    if (begin < end) body_(ctx_, begin, end);
  }

  // Worker `range - 1`, which runs range `range` of every region it is asked to help with.
  void work(Worker* self, int range) noexcept {
#if defined(__linux__)
    pthread_setname_np(pthread_self(), "fusedopt-pool");  // what `top -H` and /proc/<pid>/task/*/comm show
#endif
    t_in_region = true;
    uint64_t seen = 0;
    for (;;) {
      uint64_t region = seen;
      self->parking.wait([&] { return (region = self->go.load()) != seen; });
      seen = region;
      run_range(range);
      if (pending_.fetch_sub(1) == 1) done_.wake();
    }
  }

  // Makes at least `wanted` workers exist if the system allows; returns how many exist. Workers are never stopped:
  // the pool lives until the process ends (or is abandoned in a forked child, below).
  int grow(int wanted) noexcept {
    if (static_cast<int>(workers_.size()) >= wanted) return static_cast<int>(workers_.size());
    try {
      workers_.reserve(wanted);
    } catch (...) {
    }
    while (static_cast<int>(workers_.size()) < wanted && workers_.size() < workers_.capacity()) {
      try {
        std::unique_ptr<Worker> worker(new Worker);
        const int range = static_cast<int>(workers_.size()) + 1;
        Worker* raw = worker.get();
        worker->thread = std::thread([this, raw, range] { work(raw, range); });
        workers_.push_back(std::move(worker));  // within the reserved capacity: cannot throw
      } catch (...) {
        break;  // out of threads or memory: run() gives the remaining ranges to the caller
      }
    }
    return static_cast<int>(workers_.size());
  }

  std::mutex region_mutex_;  // one region at a time
  std::vector<std::unique_ptr<Worker>> workers_;
  uint64_t region_ = 0;
  // The current region, written under region_mutex_ before the workers are released, read by them until they count
  // themselves out of pending_.
  RangeBody body_ = nullptr;
  void* ctx_ = nullptr;
  int64_t n_ = 0;
  int ranges_ = 1;
  std::atomic<int> pending_{0};  // workers still running a range of the current region
  Parking done_;                 // where the caller waits for them
};

std::atomic<Pool*> g_pool{nullptr};

Pool& pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p != nullptr) return *p;
  Pool* fresh = new Pool;
  if (g_pool.compare_exchange_strong(p, fresh, std::memory_order_acq_rel)) return *fresh;
  delete fresh;  // another thread installed one first; ours started no thread yet
  return *p;
}

// In a forked child only the forking thread exists: the parent's workers are gone, and the pool's mutexes and
// condition variables may be in any state. The child abandons that pool and creates its own at its first region.
// The abandoned one is leaked on purpose: its std::thread objects still read as joinable, and destroying them would
// call std::terminate while joining them would wait forever.
void forget_pool_in_child() { g_pool.store(nullptr, std::memory_order_relaxed); }
const int g_atfork_registered = pthread_atfork(nullptr, nullptr, forget_pool_in_child);

}  // namespace

void parallel_for(int64_t n, int threads, RangeBody body, void* ctx) noexcept {
  if (n <= 0) return;
  const OpenMP* rt = nullptr;
  if (threads > 1 && n > 1 && !t_in_region) {
    rt = live_openmp();
    if (rt == nullptr || rt->in_parallel == nullptr || !rt->in_parallel()) {
      const int ranges = n < threads ? static_cast<int>(n) : threads;
      if (rt != nullptr && g_prefer_openmp.load(std::memory_order_relaxed)) {
        OpenMPRegion region{rt, n, body, ctx, 1};
        rt->parallel(openmp_region, &region, static_cast<unsigned>(ranges), 0);
        g_last_region_team.store(region.team, std::memory_order_relaxed);
      } else {
        pool().run(n, ranges, body, ctx);
      }
      return;
    }
  }
  body(ctx, 0, n);  // one thread, one item, or nested in a region (ours or the OpenMP runtime's)
  g_last_region_team.store(1, std::memory_order_relaxed);
}

const char* current_backend() noexcept {
  return live_openmp() != nullptr && g_prefer_openmp.load(std::memory_order_relaxed) ? "openmp" : "pool";
}

void set_prefer_openmp(bool prefer) noexcept { g_prefer_openmp.store(prefer); }

const char* openmp_runtime_path() noexcept {
  const OpenMP* rt = openmp();
  return rt != nullptr ? rt->path.c_str() : "";
}

int last_region_team() noexcept { return g_last_region_team.load(std::memory_order_relaxed); }

int hardware_threads() noexcept {
  const unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}

}  // namespace cpu
}  // namespace fusedopt
