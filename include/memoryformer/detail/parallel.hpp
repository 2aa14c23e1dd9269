// SPDX-License-Identifier: MIT
// The one way the kernels split work between threads: contiguous ranges, one per thread, so that each item is
// computed entirely by one thread and the bits do not depend on the thread count (no float atomics).
#pragma once

#include <algorithm>

#include "../types.hpp"

#if defined(MEMORYFORMER_USE_OPENMP)
#include <omp.h>
#endif

namespace memoryformer::detail {

/// Runs f(begin, end) over contiguous ranges of [0, rows), one per thread, with at least `min_rows_per_thread`
/// rows per thread (1 without OpenMP or inside a parallel region).
template <class F>
void parallel_rows(Index rows, Index min_rows_per_thread, F&& f) {
#if defined(MEMORYFORMER_USE_OPENMP)
  const int threads = int(std::min<Index>(omp_get_max_threads(), std::max<Index>(1, rows / min_rows_per_thread)));
  if (threads > 1 && !omp_in_parallel()) {
#pragma omp parallel num_threads(threads)
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

/// The thread count parallel_rows would use at most (1 without OpenMP or inside a parallel region).
inline Index available_threads() {
#if defined(MEMORYFORMER_USE_OPENMP)
  if (!omp_in_parallel()) return std::max(1, omp_get_max_threads());
#endif
  return 1;
}

}  // namespace memoryformer::detail
