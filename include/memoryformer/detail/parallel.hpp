// SPDX-License-Identifier: MIT
// The ways the kernels split work between threads — contiguous ranges, one per thread, or items handed out one at
// a time to whichever thread is free (from one queue, or from one share per thread for streaming passes) — all such
// that each item is computed entirely by one thread, in the same way, so the bits do not depend on the thread count
// or on which thread took what (no float atomics).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <exception>
#include <memory>
#include <mutex>

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

/// Catches what a thread of a parallel region throws, to be rethrown on the calling thread once the region ends: an
/// exception that left an OpenMP region would terminate the program (a std::bad_alloc of a kernel's scratch, say).
/// When several threads throw, one of their exceptions is rethrown.
class RegionExceptions {
 public:
  template <class F>
  void run(F&& f) noexcept {
    try {
      f();
    } catch (...) {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (!first_) first_ = std::current_exception();
    }
  }
  void rethrow() const {
    if (first_) std::rethrow_exception(first_);
  }

 private:
  std::mutex mutex_;
  std::exception_ptr first_;
};

/// Runs f(begin, end) over contiguous ranges of [0, rows), one per thread, with at least `min_rows_per_thread`
/// rows per thread (1 without OpenMP or inside a parallel region).
template <class F>
void parallel_rows(Index rows, Index min_rows_per_thread, F&& f) {
#if defined(MEMORYFORMER_USE_OPENMP)
  const Index threads = std::min(available_threads(), std::max<Index>(1, rows / min_rows_per_thread));
  if (threads > 1) {
    RegionExceptions exceptions;
#pragma omp parallel num_threads(int(threads))
    {
      const Index t = omp_get_thread_num(), nt = omp_get_num_threads();
      const Index begin = rows * t / nt, end = rows * (t + 1) / nt;
      if (begin < end) exceptions.run([&] { f(begin, end); });
    }
    exceptions.rethrow();
    return;
  }
#else
  (void)min_rows_per_thread;
#endif
  if (rows > 0) f(Index(0), rows);
}

/// Runs work(t, nt) on nt = min(available threads, max_threads) threads (at least one), t = 0 … nt − 1: for schedules
/// that hand work out themselves.
template <class Work>
void parallel_threads(Index max_threads, Work&& work) {
#if defined(MEMORYFORMER_USE_OPENMP)
  const Index threads = std::min(available_threads(), max_threads);
  if (threads > 1) {
    RegionExceptions exceptions;
#pragma omp parallel num_threads(int(threads))
    exceptions.run([&] { work(Index(omp_get_thread_num()), Index(omp_get_num_threads())); });
    exceptions.rethrow();
    return;
  }
#else
  (void)max_threads;
#endif
  work(Index(0), Index(1));
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
  if (count <= 0) return;
  WorkQueue queue(count);
  parallel_threads(count, [&](Index, Index) { work(queue); });
}

/// Items [0, count) cut into one contiguous share per thread. A thread claims its own share's items in increasing
/// order, then helps with the others' (in increasing order too), so each thread reads memory as one stream where
/// items follow each other in memory, and a slowed thread still hands its work to the others.
class StreamQueue {
 public:
  StreamQueue(Index count, Index threads) : count_(count), threads_(std::max<Index>(1, threads)),
                                            next_(new std::atomic<Index>[std::size_t(threads_)]) {
    for (Index t = 0; t < threads_; ++t) next_[std::size_t(t)].store(share_begin(t), std::memory_order_relaxed);
  }
  /// The number of shares (threads the queue was made for).
  Index threads() const { return threads_; }
  /// A thread's view of the queue: claim() gives the next item for thread `t`, or −1 once every item is claimed.
  class Claims {
   public:
    Claims(StreamQueue& queue, Index t) : queue_(queue), thread_(t), share_(t) {}
    /// The thread these claims are made for, t in [0, threads): an index for per-thread buffers.
    Index thread() const { return thread_; }
    Index claim() {
      for (Index tried = 0; tried < queue_.threads_; ++tried) {
        const Index item = queue_.next_[std::size_t(share_)].fetch_add(1, std::memory_order_relaxed);
        if (item < queue_.share_begin(share_ + 1)) return item;
        share_ = (share_ + 1) % queue_.threads_;  // this share is used up: help with the next one
      }
      return -1;
    }

   private:
    StreamQueue& queue_;
    Index thread_;
    Index share_;  // the share claimed from: the thread's own, then the ones after it
  };

 private:
  Index share_begin(Index t) const { return count_ * t / threads_; }
  Index count_, threads_;
  std::unique_ptr<std::atomic<Index>[]> next_;  // [threads], the next item of each share (may pass its end)
};

/// parallel_claims for passes whose items lie one after the other in memory: work(claims) on every thread, where
/// claims.claim() hands out the items of a StreamQueue (own share first).
template <class Work>
void parallel_streams(Index count, Work&& work) {
  if (count <= 0) return;
  StreamQueue queue(count, std::min(available_threads(), count));
  parallel_streams(queue, work);
}

/// parallel_streams over a queue made beforehand, for a caller that allocates everything before its first write:
/// work(claims) on up to queue.threads() threads.
template <class Work>
void parallel_streams(StreamQueue& queue, Work&& work) {
  parallel_threads(queue.threads(), [&](Index t, Index) {
    StreamQueue::Claims claims(queue, t);
    work(claims);
  });
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
