// SPDX-License-Identifier: MIT
// Tests of the work splits in detail/parallel.hpp: parallel_rows (contiguous ranges), parallel_claims (items handed
// out one at a time) and parallel_team (one region with barriers). Both must cover every item exactly once for any thread count; the kernels' bitwise
// thread-count tests (LookupIsa.ThreadCountDoesNotChangeBits) rest on that.
#include <algorithm>
#include <atomic>
#include <vector>

#include <gtest/gtest.h>

#include <memoryformer/detail/parallel.hpp>

#if defined(MEMORYFORMER_USE_OPENMP)
#include <omp.h>
#endif

namespace mf = memoryformer;
namespace detail = memoryformer::detail;

namespace {

/// The thread settings to try: 1, 2 and 3 with OpenMP (3 on a 2-core machine oversubscribes, which is allowed),
/// else just the one thread there is.
std::vector<int> thread_settings() {
#if defined(MEMORYFORMER_USE_OPENMP)
  return {1, 2, 3};
#else
  return {1};
#endif
}

void set_threads(int threads) {
#if defined(MEMORYFORMER_USE_OPENMP)
  omp_set_num_threads(threads);
#else
  (void)threads;
#endif
}

}  // namespace

TEST(WorkQueue, HandsOutEveryItemOnceInIncreasingOrderThenMinusOne) {
  detail::WorkQueue queue(3);
  EXPECT_EQ(queue.claim(), 0);
  EXPECT_EQ(queue.claim(), 1);
  EXPECT_EQ(queue.claim(), 2);
  EXPECT_EQ(queue.claim(), -1);
  EXPECT_EQ(queue.claim(), -1);
  detail::WorkQueue empty(0);
  EXPECT_EQ(empty.claim(), -1);
}

TEST(ParallelClaims, EveryItemIsClaimedExactlyOnceForAnyThreadCount) {
#if defined(MEMORYFORMER_USE_OPENMP)
  const int saved = omp_get_max_threads();
#endif
  for (int threads : thread_settings()) {
    set_threads(threads);
    for (mf::Index count : {0, 1, 2, 17, 1000}) {
      std::vector<std::atomic<int>> claims(static_cast<size_t>(count));
      std::atomic<int> workers{0};
      detail::parallel_claims(count, [&](detail::WorkQueue& queue) {
        ++workers;
        mf::Index previous = -1;
        for (mf::Index item = queue.claim(); item >= 0; item = queue.claim()) {
          EXPECT_GT(item, previous) << "one thread's claims must increase";
          previous = item;
          ++claims[static_cast<size_t>(item)];
        }
      });
      for (mf::Index i = 0; i < count; ++i)
        EXPECT_EQ(claims[static_cast<size_t>(i)].load(), 1) << "item " << i << " of " << count << ", " << threads
                                                            << " threads";
      // No more workers than items (an empty range runs none), and at most the thread setting.
      EXPECT_LE(workers.load(), std::max<int>(0, int(std::min<mf::Index>(count, threads))));
      if (count > 0) {
        EXPECT_GE(workers.load(), 1);
      }
    }
  }
#if defined(MEMORYFORMER_USE_OPENMP)
  omp_set_num_threads(saved);
#endif
}

TEST(ParallelRows, RangesCoverEveryRowOnceWithTheMinimumPerThread) {
#if defined(MEMORYFORMER_USE_OPENMP)
  const int saved = omp_get_max_threads();
#endif
  for (int threads : thread_settings()) {
    set_threads(threads);
    for (mf::Index rows : {0, 1, 5, 64, 1001}) {
      std::vector<std::atomic<int>> hits(static_cast<size_t>(rows));
      detail::parallel_rows(rows, 4, [&](mf::Index begin, mf::Index end) {
        EXPECT_LT(begin, end);
        // Ranges are at least 4 rows unless the whole range is shorter.
        EXPECT_GE(end - begin, std::min<mf::Index>(rows, 4));
        for (mf::Index r = begin; r < end; ++r) ++hits[static_cast<size_t>(r)];
      });
      for (mf::Index r = 0; r < rows; ++r)
        EXPECT_EQ(hits[static_cast<size_t>(r)].load(), 1) << "row " << r << " of " << rows;
    }
  }
#if defined(MEMORYFORMER_USE_OPENMP)
  omp_set_num_threads(saved);
#endif
}

TEST(ParallelTeam, ThreadNumbersSplitTheRowsAndTheBarrierWaitsForEveryThread) {
#if defined(MEMORYFORMER_USE_OPENMP)
  const int saved = omp_get_max_threads();
#endif
  for (int threads : thread_settings()) {
    set_threads(threads);
    constexpr mf::Index rows = 1001;
    std::vector<std::atomic<int>> hits(rows);
    std::atomic<int> arrived{0}, team_size{0};
    std::atomic<bool> early{false};
    detail::parallel_team(threads, [&](const detail::Team& team) {
      if (team.thread == 0) team_size = int(team.threads);
      const mf::Index begin = rows * team.thread / team.threads, end = rows * (team.thread + 1) / team.threads;
      for (mf::Index r = begin; r < end; ++r) ++hits[static_cast<size_t>(r)];
      // Every thread is slowed differently before arriving; none may pass the barrier before all have arrived.
      volatile double spin = 0;
      for (mf::Index i = 0; i < 200000 * (team.threads - team.thread); ++i) spin = spin + 1.0;
      ++arrived;
      team.barrier();
      if (arrived.load() != int(team.threads)) early = true;
    });
    EXPECT_EQ(team_size.load(), threads);
    EXPECT_EQ(arrived.load(), threads);
    EXPECT_FALSE(early.load()) << threads << " threads: a thread passed the barrier before all had arrived";
    for (mf::Index r = 0; r < rows; ++r) EXPECT_EQ(hits[static_cast<size_t>(r)].load(), 1) << "row " << r;
  }
#if defined(MEMORYFORMER_USE_OPENMP)
  omp_set_num_threads(saved);
#endif
}
