// The thread pool behind parallel_for (thread_pool.h): one lazily created pool per process, worker t always running
// range t (so a range's data stays in the same core's cache from step to step, as with OpenMP's static schedule).
// Idle threads spin briefly, then sleep on a condition variable. Compiled once, for the baseline ISA.
#include "thread_pool.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
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

// True on pool workers and on a caller while it runs its ranges: a parallel_for from there runs inline.
thread_local bool t_in_region = false;

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
  if (threads <= 1 || n == 1 || t_in_region) {
    body(ctx, 0, n);
    return;
  }
  const int ranges = n < threads ? static_cast<int>(n) : threads;
  pool().run(n, ranges, body, ctx);
}

int hardware_threads() noexcept {
  const unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}

}  // namespace cpu
}  // namespace fusedopt
