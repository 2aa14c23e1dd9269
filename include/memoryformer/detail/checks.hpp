// SPDX-License-Identifier: MIT
// The argument checks every public entry point uses: each throws one of error.hpp's exception types with a message
// naming the function, the argument, what it is and what was expected.
#pragma once

#include <cmath>
#include <initializer_list>
#include <sstream>
#include <string>
#include <string_view>

#include <Eigen/Core>

#include "../error.hpp"

namespace memoryformer::detail {

/// Formats "(a, b, c)".
inline std::string shape_string(std::initializer_list<Eigen::Index> dims) {
  std::ostringstream os;
  os << '(';
  bool first = true;
  for (auto d : dims) {
    if (!first) os << ", ";
    os << d;
    first = false;
  }
  os << ')';
  return os.str();
}

/// Throws ShapeError "<where>: <what> is (r, c), expected <expected_text>".
[[noreturn]] inline void throw_shape(std::string_view where, std::string_view what, Eigen::Index rows, Eigen::Index cols,
                                     std::string_view expected_text) {
  std::ostringstream os;
  os << where << ": " << what << " is " << shape_string({rows, cols}) << ", expected " << expected_text;
  throw ShapeError(os.str());
}

/// Throws ShapeError "<where>: <what> is (r, c), expected <expected>" unless rows/cols match.
/// A negative expected value means "any".
inline void check_shape(std::string_view where, std::string_view what, Eigen::Index rows, Eigen::Index cols,
                        Eigen::Index expected_rows, Eigen::Index expected_cols, std::string_view expected_text = {}) {
  if ((expected_rows < 0 || rows == expected_rows) && (expected_cols < 0 || cols == expected_cols)) return;
  std::ostringstream os;
  os << where << ": " << what << " is " << shape_string({rows, cols}) << ", expected ";
  if (!expected_text.empty()) {
    os << expected_text;
  } else {
    os << '(' << (expected_rows < 0 ? std::string("N") : std::to_string(expected_rows)) << ", "
       << (expected_cols < 0 ? std::string("any") : std::to_string(expected_cols)) << ')';
  }
  throw ShapeError(os.str());
}

/// Throws ConfigError("<where>: <message>") when cond is false.
inline void check_config(bool cond, std::string_view where, const std::string& message) {
  if (!cond) throw ConfigError(std::string(where) + ": " + message);
}

/// Throws ConfigError("<where>: <what> = <n> is not a <type>") unless `value` is one of `members`: an enum's
/// value made from an integer (static_cast) that names none of its members.
template <class Enum>
void check_enum(std::string_view where, std::string_view what, Enum value, std::initializer_list<Enum> members,
                std::string_view type) {
  for (const Enum member : members)
    if (value == member) return;
  throw ConfigError(std::string(where) + ": " + std::string(what) + " = " +
                    std::to_string(static_cast<long long>(value)) + " is not a " + std::string(type));
}

/// True when every value is finite: s − s is 0 for finite s and NaN otherwise; 64 independent lanes let the
/// compiler vectorise the scan without reassociating anything, as four independent sums on AVX-512 (one sum is
/// bound by the add latency).
template <class Scalar>
bool all_finite(const Scalar* v, Eigen::Index count) {
  constexpr Eigen::Index lanes = 64;
  Scalar acc[lanes] = {};
  Eigen::Index i = 0;
  for (; i + lanes <= count; i += lanes)
    for (Eigen::Index j = 0; j < lanes; ++j) acc[j] += v[i + j] - v[i + j];
  for (; i < count; ++i) acc[0] += v[i] - v[i];
  Scalar total = 0;
  for (Eigen::Index j = 0; j < lanes; ++j) total += acc[j];
  return total == Scalar(0);
}

/// True when every coefficient of a small Eigen block (a tile, a few rows) is finite: one vectorised sum of x − x,
/// which is 0 for finite x and NaN otherwise; all_finite's 64 lanes cost more than that to reduce.
template <class Derived>
bool all_finite_block(const Eigen::DenseBase<Derived>& x) {
  return (x.derived().array() - x.derived().array()).sum() == typename Derived::Scalar(0);
}

/// Throws NonFiniteError naming the first NaN/Inf element of a row-major buffer.
template <class Scalar>
void check_finite(std::string_view where, std::string_view what, const Scalar* data, Eigen::Index rows,
                  Eigen::Index cols) {
  // The vectorised scan first; the element-wise search that names the culprit runs only when it fails.
  const Eigen::Index n = rows * cols;
  if (all_finite(data, n)) return;
  for (Eigen::Index i = 0; i < n; ++i) {
    if (!std::isfinite(data[i])) {
      std::ostringstream os;
      os << where << ": " << what << " has a non-finite value " << data[i] << " at (" << i / cols << ", "
         << i % cols << ")";
      throw NonFiniteError(os.str());
    }
  }
}

}  // namespace memoryformer::detail
