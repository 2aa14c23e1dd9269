// SPDX-License-Identifier: MIT
// Test support shared by the unit tests: seeded random matrices and tokens, spans over Eigen storage, bitwise
// comparison, and exception-message checks.
#pragma once

#include <cstdint>
#include <cstring>
#include <exception>
#include <span>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include <memoryformer/random.hpp>
#include <memoryformer/types.hpp>

namespace memoryformer::testing_support {

/// A [rows, cols] matrix of N(0, sd²) values from an explicit seed.
template <class Scalar = double>
Matrix<Scalar> random_matrix(Index rows, Index cols, std::uint64_t seed, double sd = 1.0) {
  Rng rng(seed);
  Matrix<Scalar> m(rows, cols);
  rng.fill_normal(std::span<Scalar>(m.data(), size_t(m.size())), 0.0, sd);
  return m;
}

/// n tokens drawn uniformly from [0, vocab) with an explicit seed.
inline std::vector<std::int32_t> random_tokens(Index n, Index vocab, std::uint64_t seed) {
  Rng rng(seed);
  std::vector<std::int32_t> t(static_cast<std::size_t>(n));
  for (auto& v : t) v = std::int32_t(rng.uniform_index(std::uint64_t(vocab)));
  return t;
}

/// Whether a and b have the same shape and the same bits.
template <class Scalar>
bool same_bits(const Matrix<Scalar>& a, const Matrix<Scalar>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(Scalar) * std::size_t(a.size())) == 0;
}

/// The storage of a dense Eigen object (or anything with data() and size()) as a span, for check_gradient.
inline std::span<double> span_of(auto& m) { return std::span<double>(m.data(), size_t(m.size())); }
inline std::span<const double> cspan_of(const auto& m) { return std::span<const double>(m.data(), size_t(m.size())); }

/// The what() of the exception f throws, or "(no exception)".
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no exception)";
}

/// Expects fn to throw an exception whose message contains `needle`.
inline void expect_throw_with(auto&& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "no exception; expected one mentioning '" << needle << "'";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << "message: " << e.what();
  }
}

}  // namespace memoryformer::testing_support
