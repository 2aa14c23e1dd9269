// SPDX-License-Identifier: MIT
// The argument checks of flops.hpp's constexpr formulas (each throws ConfigError naming the function and the value),
// and the power of two they count table rows with.
#pragma once

#include <limits>
#include <sstream>
#include <string_view>

#include "../error.hpp"

namespace memoryformer::detail {

[[noreturn]] inline void throw_flops_config(std::string_view where, std::string_view what, double value,
                                            std::string_view expected) {
  std::ostringstream os;
  os << where << ": " << what << " = " << value << ", expected " << expected;
  throw ConfigError(os.str());
}

// constexpr-friendly checks: the throwing branch is never taken during constant evaluation of valid arguments.
constexpr void require_nonnegative(std::string_view where, std::string_view what, double v) {
  if (!(v >= 0.0) || v == std::numeric_limits<double>::infinity()) throw_flops_config(where, what, v, "a finite value >= 0");
}
constexpr void require_positive(std::string_view where, std::string_view what, double v) {
  if (!(v > 0.0) || v == std::numeric_limits<double>::infinity()) throw_flops_config(where, what, v, "a finite value > 0");
}
constexpr void require_bits(std::string_view where, std::string_view what, int bits, int lo) {
  if (bits < lo || bits > 30) throw_flops_config(where, what, bits, lo == 0 ? "an integer in 0..30" : "an integer in 1..30");
}
constexpr bool is_integral(double v) { return v == static_cast<double>(static_cast<long long>(v)); }
// d must split into whole τ-bit chunks for a layer that is actually built.
constexpr void require_divisible(std::string_view where, double d, int tau) {
  if (!is_integral(d) || static_cast<long long>(d) % tau != 0)
    throw_flops_config(where, "d_in", d, "a whole multiple of tau (d_in = K*tau)");
}
constexpr double pow2(int bits) {
  double r = 1.0;
  for (int i = 0; i < bits; ++i) r *= 2.0;
  return r;
}

}  // namespace memoryformer::detail
