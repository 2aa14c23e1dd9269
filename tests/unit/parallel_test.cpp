// SPDX-License-Identifier: MIT
// Tests of the work splits in detail/parallel.hpp: parallel_rows (contiguous ranges), parallel_claims (items handed
// out one at a time), parallel_streams (items handed out from one share per thread), parallel_row_pieces (pieces
// of rows handed out one at a time) and parallel_threads (one call per thread, for schedules of their own). Each must
// cover every item exactly once for any thread count; the kernels' bitwise thread-count tests
// (LookupIsa.ThreadCountDoesNotChangeBits) rest on that. And SerialEigenScope, which keeps Eigen's products on one
// thread while any thread is inside the library.
#include <algorithm>
#include <atomic>
#include <new>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include <memoryformer/detail/parallel.hpp>
#include <memoryformer/detail/serial_eigen.hpp>

#include "support/thread_setting.hpp"

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

using memoryformer::testing_support::ThreadSetting;

/// Runs split(count, work) for several counts and thread settings, where work claims items from the queue it is given
/// until −1: every item must be claimed exactly once, by no more workers than items or threads (at least one when
/// there are items); with `increasing`, each thread's claims must increase.
template <class Split>
void expect_every_item_claimed_once(Split&& split, bool increasing) {
  ThreadSetting setting;
  for (int threads : thread_settings()) {
    setting.set(threads);
    for (mf::Index count : {0, 1, 2, 3, 17, 1000}) {
      std::vector<std::atomic<int>> claims(static_cast<size_t>(count));
      std::atomic<int> workers{0};
      split(count, [&](auto& queue) {
        ++workers;
        mf::Index previous = -1;
        for (mf::Index item = queue.claim(); item >= 0; item = queue.claim()) {
          if (increasing) {
            EXPECT_GT(item, previous) << "one thread's claims must increase";
          }
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
  expect_every_item_claimed_once([](mf::Index count, auto&& work) { detail::parallel_claims(count, work); }, true);
}

TEST(StreamQueue, EachThreadTakesItsOwnShareInOrderThenHelpsWithTheNext) {
  detail::StreamQueue queue(7, 3);  // shares [0, 2), [2, 4), [4, 7)
  detail::StreamQueue::Claims first(queue, 0), last(queue, 2);
  EXPECT_EQ(last.claim(), 4);
  EXPECT_EQ(first.claim(), 0);
  EXPECT_EQ(first.claim(), 1);
  EXPECT_EQ(first.claim(), 2);  // its share is used up: it helps with share 1
  EXPECT_EQ(last.claim(), 5);
  EXPECT_EQ(last.claim(), 6);
  EXPECT_EQ(last.claim(), 3);  // share 2 used up; share 0 too; share 1 has item 3 left
  EXPECT_EQ(last.thread(), 2);  // still the thread it was made for, though it has claimed from share 1
  EXPECT_EQ(first.thread(), 0);
  EXPECT_EQ(first.claim(), -1);
  EXPECT_EQ(last.claim(), -1);
  EXPECT_EQ(last.claim(), -1);
  detail::StreamQueue empty(0, 2);
  detail::StreamQueue::Claims none(empty, 1);
  EXPECT_EQ(none.claim(), -1);
}

TEST(ParallelStreams, EveryItemIsClaimedExactlyOnceForAnyThreadCount) {
  // A thread's claims are not increasing: the last share's thread helps with the first share.
  expect_every_item_claimed_once([](mf::Index count, auto&& work) { detail::parallel_streams(count, work); }, false);
}

TEST(ParallelStreams, EachThreadsClaimsNameADistinctThreadBelowTheThreadCount) {
  ThreadSetting setting;
  for (int threads : thread_settings()) {
    setting.set(threads);
    const mf::Index count = 9;
    const mf::Index workers = std::min<mf::Index>(count, detail::available_threads());
    std::vector<std::atomic<int>> seen(static_cast<size_t>(count));
    detail::parallel_streams(count, [&](detail::StreamQueue::Claims& claims) {
      ASSERT_GE(claims.thread(), 0);
      ASSERT_LT(claims.thread(), workers);
      ++seen[static_cast<size_t>(claims.thread())];  // thread-indexed buffers need one user per index
      while (claims.claim() >= 0) {
      }
    });
    for (const auto& s : seen) EXPECT_LE(s.load(), 1) << threads << " threads";
  }
}

TEST(ParallelRows, RangesCoverEveryRowOnceWithTheMinimumPerThread) {
  ThreadSetting setting;
  for (int threads : thread_settings()) {
    setting.set(threads);
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
}

// A thread that throws inside a region (a failed scratch allocation, say) must not terminate the program: the
// exception reaches the caller once the other threads are done, for every split and thread count.
TEST(ParallelRegions, AnExceptionOnAnyThreadReachesTheCaller) {
  ThreadSetting setting;
  for (int threads : thread_settings()) {
    setting.set(threads);
    for (int thrower = 0; thrower < threads; ++thrower) {
      std::atomic<int> finished{0};
      EXPECT_THROW(detail::parallel_threads(threads,
                                            [&](mf::Index t, mf::Index) {
                                              if (t == thrower) throw std::bad_alloc();
                                              ++finished;
                                            }),
                   std::bad_alloc)
          << threads << " threads, thrower " << thrower;
      EXPECT_EQ(finished.load(), threads - 1) << "the other threads run to their end";
      EXPECT_THROW(detail::parallel_rows(300, 1,
                                         [&](mf::Index begin, mf::Index end) {
                                           if (begin <= 150 && 150 < end) throw std::runtime_error("row 150");
                                         }),
                   std::runtime_error)
          << threads << " threads";
      EXPECT_THROW(detail::parallel_claims(40,
                                           [&](detail::WorkQueue& queue) {
                                             for (mf::Index i = queue.claim(); i >= 0; i = queue.claim())
                                               if (i == 17) throw std::bad_alloc();
                                           }),
                   std::bad_alloc)
          << threads << " threads";
    }
  }
}

TEST(ParallelThreads, RunsOncePerThreadUpToTheLimit) {
  ThreadSetting setting;
  for (int threads : thread_settings()) {
    setting.set(threads);
    for (mf::Index limit : {1, 2, 3, 8}) {
      const mf::Index expected = std::min<mf::Index>(limit, threads);
      std::vector<std::atomic<int>> runs(static_cast<size_t>(expected));
      std::atomic<int> calls{0};
      detail::parallel_threads(limit, [&](mf::Index t, mf::Index nt) {
        EXPECT_EQ(nt, expected);
        ASSERT_GE(t, 0);
        ASSERT_LT(t, expected);
        ++runs[static_cast<size_t>(t)];
        ++calls;
      });
      EXPECT_EQ(calls.load(), expected) << threads << " threads, limit " << limit;
      for (mf::Index t = 0; t < expected; ++t) EXPECT_EQ(runs[static_cast<size_t>(t)].load(), 1) << "thread " << t;
    }
  }
}

TEST(ParallelRowPieces, PiecesCoverEveryRowOnceAndDoNotDependOnTheThreadCount) {
  ThreadSetting setting;
  for (mf::Index rows : {0, 1, 127, 128, 300, 2048}) {
    std::vector<std::vector<std::pair<mf::Index, mf::Index>>> pieces_per_setting;
    for (int threads : thread_settings()) {
      setting.set(threads);
      std::vector<std::atomic<int>> hits(static_cast<size_t>(rows));
      std::vector<std::pair<mf::Index, mf::Index>> pieces;
      std::atomic_flag lock = ATOMIC_FLAG_INIT;
      detail::parallel_row_pieces(rows, 128, [&](mf::Index begin, mf::Index end) {
        EXPECT_LT(begin, end);
        for (mf::Index r = begin; r < end; ++r) ++hits[static_cast<size_t>(r)];
        while (lock.test_and_set()) {
        }
        pieces.emplace_back(begin, end);
        lock.clear();
      });
      for (mf::Index r = 0; r < rows; ++r) EXPECT_EQ(hits[static_cast<size_t>(r)].load(), 1) << "row " << r;
      std::sort(pieces.begin(), pieces.end());
      // At least one piece, and pieces of at least 128 rows when there are that many.
      EXPECT_EQ(pieces.size(), size_t(std::max<mf::Index>(1, rows / 128)) - (rows == 0 ? 1 : 0));
      pieces_per_setting.push_back(pieces);
    }
    for (size_t i = 1; i < pieces_per_setting.size(); ++i)
      EXPECT_EQ(pieces_per_setting[i], pieces_per_setting[0]) << rows << " rows, thread setting " << i;
  }
}

#if defined(MEMORYFORMER_USE_OPENMP) && !defined(EIGEN_DONT_PARALLELIZE)
TEST(SerialEigenScope, KeepsEigenSerialUntilTheLastScopeOfAnyThreadCloses) {
  // Two threads in the library at once: A opens, B opens, A closes while B is still inside. Eigen must stay at one
  // thread until B closes too, then get its setting back. (Restoring on A's close would let B's products be split by
  // Eigen, whose summation order depends on the thread count.) The steps are sequenced, not raced.
  const int before = Eigen::nbThreads();
  Eigen::setNbThreads(3);
  std::atomic<int> stage{0};
  const auto wait_for = [&](int s) {
    while (stage.load() < s) std::this_thread::yield();
  };
  int inside_b_after_a_left = 0;
  std::thread a([&] {
    {
      const detail::SerialEigenScope scope;
      stage = 1;
      wait_for(2);
    }
    stage = 3;
  });
  std::thread b([&] {
    wait_for(1);
    {
      const detail::SerialEigenScope scope;
      stage = 2;
      wait_for(3);
      inside_b_after_a_left = Eigen::nbThreads();
    }
  });
  a.join();
  b.join();
  EXPECT_EQ(inside_b_after_a_left, 1);
  EXPECT_EQ(Eigen::nbThreads(), 3);
  {
    const detail::SerialEigenScope inactive(false);
    EXPECT_EQ(Eigen::nbThreads(), 3);
    const detail::SerialEigenScope nested;
    EXPECT_EQ(Eigen::nbThreads(), 1);
  }
  EXPECT_EQ(Eigen::nbThreads(), 3);
  Eigen::setNbThreads(before);
}
#endif
