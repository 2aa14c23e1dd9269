// SPDX-License-Identifier: MIT
// 2^t for t ≤ 0 in float, without a libm call: the scores of spec §1.4 need exp(−2|z|/t) = 2^(−2·log2(e)·|z|/t)
// per input element, which is the hot path of hashing. Table-driven, because on the CPUs we target the multiply
// pipes are what limits hashing, and this form needs seven multiply-pipe instructions per value where the
// Cody-Waite exp it replaced needed eleven (hashing alone went 11.2 → 13.9 GB/s on Zen 4):
//   t = n + f with n a multiple of 1/16 (rounded by the 1.5·2^19 trick, which also leaves round(16t) in the
//   low mantissa bits) and |f| ≤ 1/32;  2^t = 2^floor(n) · T[16n mod 16] · 2^f,  T[i] = 2^(i/16),
//   2^f = 1 + q with q a degree-3 polynomial (truncation ≤ 1e-8 relative on |f| ≤ 1/32).
// Max relative error ≤ 2^-22 (≈ 2 ulp; measured 0.96·2^-23) for t in [-126, 0], tested in hash_isa_test. The
// scalar, AVX2 and AVX-512 versions are the same arithmetic in the same order, so they agree bit for bit.
#pragma once

#include <array>
#include <bit>
#include <cmath>
#include <cstdint>

#include "simd.hpp"

namespace memoryformer::detail {

namespace exp2_constants {
inline constexpr float round_magic = 0x1.8p19f;  // t + 1.5·2^19 has ulp 1/16: rounds t to the table's grid
inline constexpr double log2e = 1.44269504088896340736;
inline constexpr float c1 = float(0.69314718055994530942);          // ln 2
inline constexpr float c2 = float(0.24022650695910071233);          // ln²2 / 2
inline constexpr float c3 = float(0.05550410866482157995);          // ln³2 / 6
/// T[i] = 2^(i/16), correctly rounded to float.
inline constexpr std::array<float, 16> table = {
    float(0x1.0000000000000p+0), float(0x1.0b5586cf9890fp+0), float(0x1.172b83c7d517bp+0),
    float(0x1.2387a6e756238p+0), float(0x1.306fe0a31b715p+0), float(0x1.3dea64c123422p+0),
    float(0x1.4bfdad5362a27p+0), float(0x1.5ab07dd485429p+0), float(0x1.6a09e667f3bcdp+0),
    float(0x1.7a11473eb0187p+0), float(0x1.8ace5422aa0dbp+0), float(0x1.9c49182a3f090p+0),
    float(0x1.ae89f995ad3adp+0), float(0x1.c199bdd85529cp+0), float(0x1.d5818dcfba487p+0),
    float(0x1.ea4afa2a490dap+0)};
}  // namespace exp2_constants

/// a·b + c, fused where the target has FMA; without it std::fma would be a slow libm emulation.
inline float madd(float a, float b, float c) {
#if defined(__FMA__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// The argument t = a·factor is never rounded on its own: y and f come from fused multiply-adds on a and factor.
// Written as a product and a separate add, the compiler may or may not contract them into one FMA (GCC does by
// default, and intrinsics are no exception), so the paths would disagree in the last bits; with explicit FMAs
// there is nothing left to contract and every path rounds the same way.

/// 2^(a·factor) for a·factor in [−126, 0] (ExpArgument clamps a so; outside, the result is meaningless).
inline float fast_exp2_of_product(float a, float factor) {
  using namespace exp2_constants;
  const float y = madd(a, factor, round_magic);
  const float n = y - round_magic;  // exact: a multiple of 1/16
  const float f = madd(a, factor, -n);  // |f| ≤ 1/32 (plus half an ulp of 1/32)
  // y and round_magic share their exponent, so the difference of their bit patterns is round(16·a·factor)
  // (subtracted unsigned: a NaN's bits must not make it a signed overflow).
  const auto m = std::int32_t(std::bit_cast<std::uint32_t>(y) - std::bit_cast<std::uint32_t>(round_magic));
  const float q = madd(madd(c3, f, c2), f, c1) * f;
  const float tf = table[std::size_t(m & 15)];
  const std::uint32_t scale_bits = std::uint32_t((m >> 4) + 127) << 23;  // 2^floor(n): m >> 4 floors (C++20)
  return madd(tf, q, tf) * std::bit_cast<float>(scale_bits);
}

#if defined(MEMORYFORMER_HAVE_AVX512)
MEMORYFORMER_SIMD_WARNINGS_BEGIN
inline __m512 fast_exp2_of_product(__m512 a, __m512 factor) {
  using namespace exp2_constants;
  const __m512 y = _mm512_fmadd_ps(a, factor, _mm512_set1_ps(round_magic));
  const __m512 n = _mm512_sub_ps(y, _mm512_set1_ps(round_magic));
  const __m512 f = _mm512_fmsub_ps(a, factor, n);
  __m512 q = _mm512_fmadd_ps(_mm512_set1_ps(c3), f, _mm512_set1_ps(c2));
  q = _mm512_mul_ps(_mm512_fmadd_ps(q, f, _mm512_set1_ps(c1)), f);
  // vpermps reads the low 4 bits of each index lane: exactly round(16t) mod 16, straight from y's bits.
  const __m512 tf = _mm512_permutexvar_ps(_mm512_castps_si512(y), _mm512_loadu_ps(table.data()));
  // vscalefps multiplies by 2^floor(n): the same exact product as the scalar version's exponent bits.
  return _mm512_scalef_ps(_mm512_fmadd_ps(tf, q, tf), n);
}
MEMORYFORMER_SIMD_WARNINGS_END
#endif

#if defined(MEMORYFORMER_HAVE_AVX2)
inline __m256 fast_exp2_of_product(__m256 a, __m256 factor) {
  using namespace exp2_constants;
  const __m256 y = _mm256_fmadd_ps(a, factor, _mm256_set1_ps(round_magic));
  const __m256 n = _mm256_sub_ps(y, _mm256_set1_ps(round_magic));
  const __m256 f = _mm256_fmsub_ps(a, factor, n);
  __m256 q = _mm256_fmadd_ps(_mm256_set1_ps(c3), f, _mm256_set1_ps(c2));
  q = _mm256_mul_ps(_mm256_fmadd_ps(q, f, _mm256_set1_ps(c1)), f);
  const __m256i m = _mm256_sub_epi32(_mm256_castps_si256(y), _mm256_castps_si256(_mm256_set1_ps(round_magic)));
  // 16-entry lookup from two 8-entry permutes (each reads the low 3 bits), chosen by bit 3 moved to the sign.
  const __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(table.data()), m);
  const __m256 hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(table.data() + 8), m);
  const __m256 tf = _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(m, 28)));
  const __m256i scale_bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_srai_epi32(m, 4), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(_mm256_fmadd_ps(tf, q, tf), _mm256_castsi256_ps(scale_bits));
}
#endif

/// The factor that turns exp(neg_scale·a) into 2^(factor·a), rounded once to Scalar: every ISA path uses this
/// same value, so they agree bit for bit.
template <class Scalar>
inline Scalar exp2_factor(Scalar neg_scale) {
  return Scalar(double(neg_scale) * exp2_constants::log2e);
}

}  // namespace memoryformer::detail
