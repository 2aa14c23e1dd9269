// SPDX-License-Identifier: MIT
// Command-line values for the examples: "--flag VALUE" pairs, checked, with one clear message and exit code 2 on
// bad input (the examples' own usage texts stay in each example).
#pragma once

#include <cmath>
#include <cstdlib>
#include <exception>
#include <iostream>
#include <stdexcept>
#include <string>

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

  /// A finite number after flag argv[i] (≥ 0 unless allow_negative); advances i.
  double number(int& i, bool allow_negative) const {
    const std::string flag = argv_[i], s = value(i);
    try {
      std::size_t used = 0;
      const double v = std::stod(s, &used);
      if (used != s.size() || !std::isfinite(v) || (!allow_negative && v < 0)) throw std::invalid_argument(s);
      return v;
    } catch (const std::exception&) {
      fail(flag + (allow_negative ? " expects a number" : " expects a non-negative number") + ", got '" + s + "'");
    }
  }

  /// A non-negative integer after flag argv[i]; advances i.
  long long integer(int& i) const {
    const std::string flag = argv_[i], s = value(i);
    try {
      std::size_t used = 0;
      const long long v = std::stoll(s, &used);
      if (used != s.size() || v < 0) throw std::invalid_argument(s);
      return v;
    } catch (const std::exception&) {
      fail(flag + " expects a non-negative integer, got '" + s + "'");
    }
  }

 private:
  int argc_;
  char** argv_;
  std::string program_;
};

}  // namespace memoryformer_examples
