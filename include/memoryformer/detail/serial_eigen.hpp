// SPDX-License-Identifier: MIT
// Keeps Eigen's own matrix products on one thread while the library runs them: Eigen splits a product over its
// thread count with a k-blocking, hence a summation order, that depends on that count, and the library's results must
// have the same bits for any thread count (its own threads take fixed chunks of rows or columns instead).
#pragma once

#include <Eigen/Core>

#if defined(_OPENMP)
#include <mutex>

#include <omp.h>
#endif

namespace memoryformer::detail {

/**
 * While alive (and `active`), Eigen's products run single-threaded. Eigen's thread count is one setting for the
 * whole process, so the scopes of all threads share it: the first scope to open saves it and sets 1, the last one to
 * close restores it, under one mutex. Two user threads in the library at once (a frozen model serving both) thus
 * never see it restored while either is still inside. In a team of more than one thread Eigen is single-threaded
 * already (the test Eigen itself makes) and the scope does nothing; a team of one (a nested region) still needs it.
 */
class SerialEigenScope {
 public:
  explicit SerialEigenScope(bool active = true) {
#if defined(_OPENMP) && !defined(EIGEN_DONT_PARALLELIZE)
    if (!active || omp_get_num_threads() > 1) return;
    Shared& s = shared();
    const std::lock_guard<std::mutex> lock(s.mutex);
    if (s.holders++ == 0) {
      const int threads = Eigen::nbThreads();
      s.saved = threads != 1 ? threads : 0;
      if (s.saved > 0) Eigen::setNbThreads(1);
    }
    held_ = true;
#else
    (void)active;
#endif
  }
  ~SerialEigenScope() {
#if defined(_OPENMP) && !defined(EIGEN_DONT_PARALLELIZE)
    if (!held_) return;
    Shared& s = shared();
    const std::lock_guard<std::mutex> lock(s.mutex);
    if (--s.holders == 0 && s.saved > 0) {
      Eigen::setNbThreads(s.saved);
      s.saved = 0;
    }
#endif
  }
  SerialEigenScope(const SerialEigenScope&) = delete;
  SerialEigenScope& operator=(const SerialEigenScope&) = delete;

 private:
#if defined(_OPENMP) && !defined(EIGEN_DONT_PARALLELIZE)
  struct Shared {
    std::mutex mutex;
    int holders = 0;  // open scopes, over all threads
    int saved = 0;    // Eigen's thread count before the first of them, 0 when it was 1
  };
  static Shared& shared() {
    static Shared s;
    return s;
  }
  bool held_ = false;
#endif
};

}  // namespace memoryformer::detail
