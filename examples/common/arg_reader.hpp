// SPDX-License-Identifier: MIT
// Command-line values for the examples: "--flag VALUE" pairs, checked, with one clear message and exit code 2 on
// bad input (the examples' own usage texts stay in each example).
#pragma once

#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <iostream>
#include <limits>
#include <stdexcept>
#include <string>
#include <system_error>

namespace memoryformer_examples {

class ArgReader {
 public:
  ArgReader(int argc, char** argv, std::string program) : argc_(argc), argv_(argv), program_(std::move(program)) {}

  /// Prints "<program>: <message>" and a pointer to --help, then exits with status 2.
  [[noreturn]] void fail(const std::string& message) const {
    std::cerr << program_ << ": " << message << "\n(" << program_ << " --help for the options)\n";
    std::exit(2);
  }

  /// The value after flag argv[i]; advances i.
  std::string value(int& i) const {
    if (i + 1 >= argc_) fail(std::string(argv_[i]) + " needs a value");
    return argv_[++i];
  }

  /// A finite number after flag argv[i] (≥ 0 unless allow_negative); advances i. The whole text must be the number.
  double number(int& i, bool allow_negative) const {
    const std::string flag = argv_[i], s = value(i);
    double v = 0;
    const auto r = std::from_chars(s.data(), s.data() + s.size(), v);
    if (s.empty() || r.ec != std::errc() || r.ptr != s.data() + s.size() || !std::isfinite(v) ||
        (!allow_negative && v < 0))
      fail(flag + (allow_negative ? " expects a finite number" : " expects a finite non-negative number") + ", got '" +
           s + "'");
    return v;
  }

  /// A seed after flag argv[i]: any unsigned 64-bit integer, written as digits; advances i.
  std::uint64_t seed(int& i) const {
    const std::string flag = argv_[i], s = value(i);
    const char* first = s.data();
    const char* last = s.data() + s.size();
    if (!s.empty() && *first == '+') ++first;
    std::uint64_t v = 0;
    const auto r = std::from_chars(first, last, v);
    if (first == last || r.ec != std::errc() || r.ptr != last)
      fail(flag + " expects an integer in [0, " + std::to_string(std::numeric_limits<std::uint64_t>::max()) +
           "] written as digits, got '" + s + "'");
    return v;
  }

  /**
   * An integer in [lo, hi] after flag argv[i]; advances i. Written as digits ("100000000") or, for convenience, in
   * exponent form when that denotes an integer exactly ("1e8"; at most 2^53 so the double holds it exactly).
   * Anything else — a fraction, a value outside [lo, hi], trailing text — is rejected naming the range; nothing
   * is truncated or wrapped.
   */
  long long integer(int& i, long long lo = 0, long long hi = std::numeric_limits<long long>::max()) const {
    const std::string flag = argv_[i], s = value(i);
    auto reject = [&](const std::string& why) -> void {
      fail(flag + " expects an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got '" + s +
           "'" + (why.empty() ? std::string() : " (" + why + ")"));
    };
    const char* first = s.data();
    const char* last = s.data() + s.size();
    if (!s.empty() && *first == '+') ++first;  // from_chars does not take a leading '+'
    long long v = 0;
    const auto r = std::from_chars(first, last, v);
    if (first != last && r.ec == std::errc() && r.ptr == last) {
      if (v < lo || v > hi) reject("out of range");
      return v;
    }
    if (r.ec == std::errc::result_out_of_range) reject("out of range");
    double d = 0;
    const auto rd = std::from_chars(first, last, d);
    if (first == last || rd.ec != std::errc() || rd.ptr != last) reject("not a number");
    constexpr double exact = 9007199254740992.0;  // 2^53
    if (!std::isfinite(d) || std::fabs(d) > exact) reject("out of range");
    if (d != std::floor(d)) reject("not an integer");
    // |d| ≤ 2^53: the conversion is exact and defined.
    v = static_cast<long long>(d);
    if (v < lo || v > hi) reject("out of range");
    return v;
  }

 private:
  int argc_;
  char** argv_;
  std::string program_;
};

}  // namespace memoryformer_examples
