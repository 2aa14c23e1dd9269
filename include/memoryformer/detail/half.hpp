// SPDX-License-Identifier: MIT
// 16-bit table storage (design §10.2: tables stored narrower than they are computed): float ↔ bfloat16 and
// float ↔ IEEE binary16, round to nearest even, in portable C++ so that every build decodes identically.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>

namespace memoryformer::detail {

/// float → bfloat16 bits, round to nearest even; NaN stays a (quiet) NaN, ±Inf stays ±Inf.
inline std::uint16_t float_to_bf16(float f) {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return std::uint16_t((u >> 16) | 0x40u);
  const std::uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return std::uint16_t((u + rounding) >> 16);
}

/// bfloat16 bits → float (exact: a bfloat16 is the upper half of a float).
inline float bf16_to_float(std::uint16_t h) { return std::bit_cast<float>(std::uint32_t(h) << 16); }

/// The upper 16 bits of a bfloat16 pair word whose lower 16 bits are `low` (another column's bfloat16): the
/// kernels read the whole word as the float of this column, without masking `low` away, which saves one vector
/// operation per 16 values in the gather loop.
/// The floats with these low bits form the bfloat16 grid shifted by less than one step, so the nearest of them is,
/// like plain rounding, within half a step: |decoded − v| ≤ 2^-8·|v| (plus ≤ 2^-133 for v = ±0, which becomes a
/// subnormal of the low bits). v must be finite (the packer checks); the result is always a finite float.
inline std::uint16_t bf16_high_half(float v, std::uint16_t low) {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(v);
  const std::uint32_t sign = bits & 0x80000000u;
  const std::uint32_t truncated = (bits & 0x7fffffffu) >> 16;
  std::uint32_t best = truncated;
  double best_error = std::numeric_limits<double>::infinity();
  for (const std::uint32_t high : {truncated - 1u, truncated, truncated + 1u}) {
    if (high > 0x7f7fu) continue;  // exponent all ones (Inf/NaN), or truncated − 1 wrapped below zero
    const double error = std::abs(double(std::bit_cast<float>(sign | (high << 16) | low)) - double(v));
    if (error < best_error) {
      best_error = error;
      best = high;
    }
  }
  return std::uint16_t((sign | (best << 16)) >> 16);
}

/// float → binary16 bits, round to nearest even, overflow to ±Inf, gradual underflow to subnormals.
inline std::uint16_t float_to_f16(float f) {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  const std::uint32_t sign = (u >> 16) & 0x8000u;
  const std::uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return std::uint16_t(sign | 0x7e00u);              // NaN
  if (abs >= 0x477ff000u) return std::uint16_t(sign | 0x7c00u);             // ≥ 65520 rounds to Inf
  if (abs < 0x38800000u) {                                                  // below 2^-14: subnormal or zero
    // value = abs_float; subnormal half = round(value / 2^-24)
    const float a = std::bit_cast<float>(abs);
    const float scaled = a * 16777216.0f;  // exact: multiply by 2^24
    const auto r = static_cast<std::uint32_t>(std::nearbyint(scaled));
    return std::uint16_t(sign | r);  // r ≤ 1024; 1024 is the smallest normal, encoded the same way
  }
  // Normal: rebias the exponent (127 → 15) and round the 23-bit mantissa to 10 bits, nearest even.
  const std::uint32_t rebased = abs - ((127u - 15u) << 23);
  const std::uint32_t rounding = 0xfffu + ((rebased >> 13) & 1u);
  return std::uint16_t(sign | ((rebased + rounding) >> 13));
}

/// binary16 bits → float (exact).
inline float f16_to_float(std::uint16_t h) {
  const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
  const std::uint32_t exponent = (h >> 10) & 0x1fu;
  const std::uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {
    const float v = float(mantissa) * (1.0f / 16777216.0f);  // mantissa · 2^-24, exact
    return sign ? -v : v;
  }
  if (exponent == 31) return std::bit_cast<float>(sign | 0x7f800000u | (mantissa << 13));
  return std::bit_cast<float>(sign | ((exponent + 127u - 15u) << 23) | (mantissa << 13));
}

}  // namespace memoryformer::detail
