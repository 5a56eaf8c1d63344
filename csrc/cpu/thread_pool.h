// The CPU kernels' own thread pool: persistent worker threads that run static contiguous ranges of [0, n), so the
// compiled core links no OpenMP runtime beside the one torch's wheel brings. Compiled once, for the baseline ISA; the
// interface is a plain function pointer and a context pointer, so no template crosses the per-ISA namespaces.
#pragma once

#include <stdint.h>

namespace fusedopt {
namespace cpu {

// The work of one range [begin, end) of a region. noexcept is part of the type: a body must not throw, and the
// kernels never do (they validate nothing and allocate nothing; dispatch.cpp checks every argument before). A throw
// would end the process through std::terminate, on the worker thread as on the calling one.
using RangeBody = void (*)(void* ctx, int64_t begin, int64_t end) noexcept;

// Runs body over [0, n) split into r = min(threads, n) contiguous ranges, as OpenMP's schedule(static) without a chunk
// size: with q = n / r and m = n % r, ranges 0 .. m-1 hold q + 1 items and the others q, in order. The split depends on
// n and threads alone. The calling thread runs range 0 and pool worker t (created on first need, then kept) range t;
// the call returns once every range is done, and everything the ranges wrote is visible to the caller.
//   - n <= 0: nothing runs. threads <= 1 or n == 1: body(ctx, 0, n) on the calling thread, no synchronisation.
//   - Called from several threads at once: their regions run one after the other (a second caller waits).
//   - Called from inside a body: body(ctx, 0, n) inline on that thread.
//   - If the system refuses a new thread, the caller runs the ranges that have no worker after its own.
//   - fork(): a child forked while no region runs gets a fresh pool at its first region, so it keeps its thread
//     count (the parent's workers do not exist in the child). A fork during a region is not supported.
void parallel_for(int64_t n, int threads, RangeBody body, void* ctx) noexcept;

// Threads this machine runs at once (std::thread::hardware_concurrency(), at least 1).
int hardware_threads() noexcept;

}  // namespace cpu
}  // namespace fusedopt
