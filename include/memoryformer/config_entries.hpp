// SPDX-License-Identifier: MIT
// ConfigEntries: a model's settings as (key, value) text pairs, as stored in checkpoints, and a reader that parses
// them back with every failure a FormatError naming the key.
#pragma once

#include <charconv>
#include <cstdint>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include "error.hpp"

namespace memoryformer {

/// Config entries of a model checkpoint: (key, value) text pairs, e.g. ("block.tau", "8").
using ConfigEntries = std::vector<std::pair<std::string, std::string>>;

namespace detail::model {

/// Shortest text that parses back to exactly `v` (std::to_chars round-trip guarantee).
inline std::string format_double(double v) {
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof(buf), v);
  return std::string(buf, r.ptr);
}

/// Reads typed values out of config entries; every failure is a FormatError naming the key.
class ConfigReader {
 public:
  ConfigReader(const ConfigEntries& entries, std::string origin) : entries_(entries), origin_(std::move(origin)) {}

  const std::string& text(std::string_view key) const {
    for (const auto& [k, v] : entries_)
      if (k == key) return v;
    throw FormatError(origin_ + ": the checkpoint has no config key '" + std::string(key) +
                      "' (was it written by save_model?)");
  }
  std::int64_t integer(std::string_view key) const {
    const std::string& s = text(key);
    std::int64_t v = 0;
    const auto r = std::from_chars(s.data(), s.data() + s.size(), v);
    if (r.ec != std::errc() || r.ptr != s.data() + s.size()) bad(key, s, "an integer");
    return v;
  }
  /// An integer in [lo, hi]: the caller narrows it (e.g. to int) without truncating a wrapped value.
  std::int64_t integer(std::string_view key, std::int64_t lo, std::int64_t hi) const {
    const std::int64_t v = integer(key);
    if (v < lo || v > hi)
      bad(key, text(key), ("an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]").c_str());
    return v;
  }
  double real(std::string_view key) const {
    const std::string& s = text(key);
    double v = 0;
    const auto r = std::from_chars(s.data(), s.data() + s.size(), v);
    if (r.ec != std::errc() || r.ptr != s.data() + s.size()) bad(key, s, "a number");
    return v;
  }
  bool boolean(std::string_view key) const {
    const std::string& s = text(key);
    if (s == "true") return true;
    if (s == "false") return false;
    bad(key, s, "true or false");
  }

 private:
  [[noreturn]] void bad(std::string_view key, const std::string& value, const char* expected) const {
    throw FormatError(origin_ + ": config key '" + std::string(key) + "' is '" + value + "', expected " + expected);
  }
  const ConfigEntries& entries_;
  std::string origin_;
};

inline const char* bool_text(bool b) { return b ? "true" : "false"; }

}  // namespace detail::model

}  // namespace memoryformer
