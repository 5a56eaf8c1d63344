// Where the CPU kernels' parallel regions run: on the OpenMP runtime already loaded in the process (torch's), found at
// run time and called through its GOMP_parallel entry point, or else on the project's own pool of persistent worker
// threads. Either way the compiled core links no OpenMP runtime of its own. Compiled once, for the baseline ISA; the
// interface is a plain function pointer and a context pointer, so no template crosses the per-ISA namespaces.
#pragma once

#include <stdint.h>

namespace fusedopt {
namespace cpu {

// The work of one range [begin, end) of a region. noexcept is part of the type: a body must not throw, and the
// kernels never do (they validate nothing and allocate nothing; dispatch.cpp checks every argument before). A throw
// would end the process through std::terminate, on the worker thread as on the calling one.
using RangeBody = void (*)(void* ctx, int64_t begin, int64_t end) noexcept;

// Runs body over [0, n) split into r contiguous ranges, as OpenMP's schedule(static) without a chunk size: with
// q = n / r and m = n % r, ranges 0 .. m-1 hold q + 1 items and the others q, in order. Every range is run exactly once;
// the call returns once every range is done, and everything the ranges wrote is visible to the caller. Which items
// a range holds depends on n and r only, and r may be smaller than min(threads, n) (below), so a body must not let
// its result depend on the range boundaries: the kernels write one result per work item and combine them in item
// order afterwards.
//   - n <= 0: nothing runs. threads <= 1 or n == 1: body(ctx, 0, n) on the calling thread, no synchronisation.
//   - Called from inside a body, or from inside an active OpenMP parallel region of the loaded runtime:
//     body(ctx, 0, n) inline on that thread.
//   - Backend "openmp" (current_backend()): one GOMP_parallel(fn, data, min(threads, n), 0) of the loaded runtime; the
//     team it actually gets (omp_get_num_threads(), fewer under OMP_THREAD_LIMIT or OMP_DYNAMIC) is r, and team
//     member t runs range t. Regions called from several threads at once run at once, each on its own team.
//   - Backend "pool": r = min(threads, n); the calling thread runs range 0 and pool worker t (created on first need,
//     then kept) range t. Regions called from several threads at once run one after the other. If the system refuses
//     a new thread, the caller runs the ranges that have no worker after its own.
//   - fork(): a child forked while no region runs uses the pool (the parent's OpenMP team does not exist in the child
//     and libgomp cannot be used there safely), and gets a fresh pool at its first region, so it keeps its thread
//     count (the parent's workers do not exist in the child either). A fork during a region is not supported. A
//     process that loads the extension only after it was forked (from a parent where torch had run parallel ops)
//     cannot be told from a parent: there the runtime hangs in its first region with more than one thread, fusedopt's
//     as torch's own, unless it runs on one thread (torch.set_num_threads(1), as DataLoader workers do) or on the pool.
void parallel_for(int64_t n, int threads, RangeBody body, void* ctx) noexcept;

// The backend the next parallel region of this process runs on: "openmp" when an OpenMP runtime was loaded when the
// extension was (found once, then), this is the process that found it (not a forked child), and the preference is not
// "pool"; else "pool".
const char* current_backend() noexcept;

// The preference: true (the default) runs regions on a loaded OpenMP runtime when there is one; false always on the
// pool. Takes effect at the next region. dispatch.cpp sets it from FUSEDOPT_THREADS_BACKEND at load.
void set_prefer_openmp(bool prefer) noexcept;

// Path of the OpenMP runtime regions run on when current_backend() is "openmp" ("" when none was found).
const char* openmp_runtime_path() noexcept;

// Threads that ran the last parallel region this process started (1 when it ran inline): for tests.
int last_region_team() noexcept;

// Threads this machine runs at once (std::thread::hardware_concurrency(), at least 1).
int hardware_threads() noexcept;

}  // namespace cpu
}  // namespace fusedopt
