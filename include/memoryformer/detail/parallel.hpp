// SPDX-License-Identifier: MIT
// The two ways the kernels split work between threads — contiguous ranges, one per thread, or items handed out one at
// a time to whichever thread is free — both such that each item is computed entirely by one thread, in the same
// way, so the bits do not depend on the thread count or on which thread took what (no float atomics).
#pragma once

#include <algorithm>
#include <atomic>

#include "../types.hpp"

#if defined(MEMORYFORMER_USE_OPENMP)
#include <omp.h>
#endif

namespace memoryformer::detail {

/// The thread count the splits below use at most (1 without OpenMP or inside a parallel region).
inline Index available_threads() {
#if defined(MEMORYFORMER_USE_OPENMP)
  if (!omp_in_parallel()) return std::max(1, omp_get_max_threads());
#endif
  return 1;
}

/// Runs f(begin, end) over contiguous ranges of [0, rows), one per thread, with at least `min_rows_per_thread`
/// rows per thread (1 without OpenMP or inside a parallel region).
template <class F>
void parallel_rows(Index rows, Index min_rows_per_thread, F&& f) {
#if defined(MEMORYFORMER_USE_OPENMP)
  const Index threads = std::min(available_threads(), std::max<Index>(1, rows / min_rows_per_thread));
  if (threads > 1) {
#pragma omp parallel num_threads(int(threads))
    {
      const Index t = omp_get_thread_num(), nt = omp_get_num_threads();
      const Index begin = rows * t / nt, end = rows * (t + 1) / nt;
      if (begin < end) f(begin, end);
    }
    return;
  }
#else
  (void)min_rows_per_thread;
#endif
  if (rows > 0) f(Index(0), rows);
}

/// Items [0, count) handed out one at a time in increasing order, to whichever thread asks first.
class WorkQueue {
 public:
  explicit WorkQueue(Index count) : count_(count) {}
  /// The next unclaimed item, or −1 once every item is claimed.
  Index claim() {
    const Index item = next_.fetch_add(1, std::memory_order_relaxed);
    return item < count_ ? item : Index(-1);
  }

 private:
  std::atomic<Index> next_{0};
  Index count_;
};

/// Runs work(queue) on every thread (at most `count` of them), where queue hands out the items [0, count): a thread
/// slowed by a busy neighbour (two vCPUs share a host) takes fewer items instead of holding the others up, which a
/// fixed split cannot do. Use it where items are few and long (column blocks, tables); parallel_rows elsewhere.
template <class Work>
void parallel_claims(Index count, Work&& work) {
  WorkQueue queue(count);
#if defined(MEMORYFORMER_USE_OPENMP)
  const Index threads = std::min(available_threads(), count);
  if (threads > 1) {
#pragma omp parallel num_threads(int(threads))
    work(queue);
    return;
  }
#endif
  if (count > 0) work(queue);
}

/// Like parallel_rows, but [0, rows) is cut into pieces of about `piece_rows` rows (at least one piece) that the
/// threads claim one at a time (parallel_claims): f(begin, end) per piece.
template <class F>
void parallel_row_pieces(Index rows, Index piece_rows, F&& f) {
  const Index pieces = std::max<Index>(1, rows / piece_rows);
  parallel_claims(pieces, [&](WorkQueue& queue) {
    for (Index p = queue.claim(); p >= 0; p = queue.claim()) {
      const Index begin = rows * p / pieces, end = rows * (p + 1) / pieces;
      if (begin < end) f(begin, end);
    }
  });
}

}  // namespace memoryformer::detail
