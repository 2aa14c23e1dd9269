// SPDX-License-Identifier: MIT
// Test support: lists the reference-vector files ($MEMORYFORMER_VECTORS or the project's tests/vectors) and
// compares tensors with a report of the worst element.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include <memoryformer/io/text_tensor.hpp>

namespace memoryformer::testing_support {

inline std::string vectors_dir() {
  if (const char* env = std::getenv("MEMORYFORMER_VECTORS"); env != nullptr && *env != '\0') return env;
#ifdef MEMORYFORMER_DEFAULT_VECTORS_DIR
  return MEMORYFORMER_DEFAULT_VECTORS_DIR;
#else
  return "tests/vectors";
#endif
}

/// Every regular file in the vectors directory, sorted (a missing directory gives an empty list, and the
/// DirectoryIsNotEmpty test then fails).
inline std::vector<std::string> vector_files() {
  std::vector<std::string> files;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(vectors_dir(), ec))
    if (entry.is_regular_file()) files.push_back(entry.path().string());
  std::sort(files.begin(), files.end());
  return files;
}

/// A gtest-safe name from a path: the file stem with non-alphanumerics replaced by '_'.
inline std::string test_name_of(const std::string& path) {
  std::string stem = std::filesystem::path(path).stem().string();
  for (auto& c : stem)
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  return stem;
}

/// Checks |actual − expected| ≤ atol + rtol·|expected| element-wise, with atol = rtol·max|expected| so that
/// near-zero entries of a tensor are judged on the tensor's scale. Reports the worst element.
template <class Actual>
::testing::AssertionResult tensors_close(const std::string& name, const Actual* actual, const TextTensor& expected,
                                         double rtol) {
  double scale = 0;
  for (double v : expected.values) scale = std::max(scale, std::abs(v));
  const double atol = rtol * std::max(scale, 1e-30);
  double worst_excess = 0, worst_abs = 0, worst_rel = 0;
  Index worst = -1, failures = 0;
  for (Index i = 0; i < expected.size(); ++i) {
    const double e = expected.values[size_t(i)], a = double(actual[i]);
    const double err = std::abs(a - e);
    const double allowed = atol + rtol * std::abs(e);
    if (!(err <= allowed)) {
      ++failures;
      if (worst < 0 || err - allowed > worst_excess) {
        worst_excess = err - allowed;
        worst = i;
        worst_abs = err;
        worst_rel = err / std::max(std::abs(e), 1e-300);
      }
    }
  }
  if (failures == 0) return ::testing::AssertionSuccess();
  std::ostringstream os;
  os << name << ": " << failures << " of " << expected.size() << " values differ beyond rtol " << rtol
     << "; worst at flat index " << worst << ": got " << double(actual[worst]) << ", expected "
     << expected.values[size_t(worst)] << " (abs diff " << worst_abs << ", rel " << worst_rel << ")";
  return ::testing::AssertionFailure() << os.str();
}

}  // namespace memoryformer::testing_support
