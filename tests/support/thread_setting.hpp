// SPDX-License-Identifier: MIT
// Test support: sets OpenMP's thread count inside one test and restores the previous count when the test ends, so
// the thread-count determinism tests cannot leak their setting into the tests after them.
#pragma once

#if defined(MEMORYFORMER_USE_OPENMP)
#include <omp.h>
#endif

namespace memoryformer::testing_support {

/// Sets OpenMP's thread count for a test and restores the one before when the test ends (no-op without OpenMP).
class ThreadSetting {
 public:
#if defined(MEMORYFORMER_USE_OPENMP)
  ThreadSetting() : saved_(omp_get_max_threads()) {}
  ~ThreadSetting() { omp_set_num_threads(saved_); }
  ThreadSetting(const ThreadSetting&) = delete;
  ThreadSetting& operator=(const ThreadSetting&) = delete;
  void set(int threads) { omp_set_num_threads(threads); }

 private:
  int saved_;
#else
  void set(int) {}
#endif
};

}  // namespace memoryformer::testing_support
