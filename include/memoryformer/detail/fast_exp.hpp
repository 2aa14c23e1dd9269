// SPDX-License-Identifier: MIT
// 2^t for t ≤ 0 in float, without a libm call: the scores of design §1.4 need exp(−2|z|/t) = 2^(−2·log2(e)·|z|/t)
// per input element, which is the hot path of hashing. Table-driven, because on the targeted CPUs the multiply
// pipes are what limits hashing, and this form needs five multiply-pipe instructions per value where the
// Cody-Waite exp it replaced needed eleven (the measurements are in docs/performance-log.md):
//   t = n + f with n a multiple of 1/32 (rounded by the 1.5·2^18 trick, which also leaves round(32t) in the
//   low mantissa bits) and |f| ≤ 1/64;  2^t = 2^floor(n) · T[32n mod 32] · 2^f,  T[i] = 2^(i/32),
//   2^f = 1 + q with q = f·(c1 + c2·f), minimax on |f| ≤ 1/64 (truncation ≤ 0.45·2^-23 relative).
// 2^floor(n) · T[i] is built exactly with one integer shift and add instead of a multiplication by a power of two
// (vscalefps, a multiply-pipe instruction on Zen 4): see scaled_table_bits.
// 32 entries and degree 2 rather than 16 and degree 3: one multiply fewer for a two-register table lookup
// (vpermt2ps), which pays on AVX-512; the AVX2 exponential needs four permutes and three blends for the lookup, so
// there the trade is a small loss, accepted to keep one arithmetic for every ISA.
// Max relative error ≤ 2^-22 (≈ 2 ulp) for t in [-126, 0], tested in hash_isa_test. The
// scalar, AVX2 and AVX-512 versions are the same arithmetic in the same order, so they agree bit for bit.
#pragma once

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../types.hpp"
#include "simd.hpp"
#include "vector_ops.hpp"

namespace memoryformer::detail {

namespace exp2_constants {
inline constexpr float round_magic = 0x1.8p18f;  // t + 1.5·2^18 has ulp 1/32: rounds t to the table's grid
inline constexpr double log2e = 1.44269504088896340736;
// q(f) = f·(c1 + c2·f) ≈ 2^f − 1, minimax in relative error over |f| ≤ 1/64 (Remez; ln 2 and ln²2/2 perturbed)
inline constexpr float c1 = 0x1.62e586p-1f;
inline constexpr float c2 = 0x1.ebfeaap-3f;
/// T[i] = 2^(i/32), correctly rounded to float.
inline constexpr std::array<float, 32> table = {
    float(0x1.0000000000000p+0), float(0x1.059b0d3158574p+0), float(0x1.0b5586cf9890fp+0),
    float(0x1.11301d0125b51p+0), float(0x1.172b83c7d517bp+0), float(0x1.1d4873168b9aap+0),
    float(0x1.2387a6e756238p+0), float(0x1.29e9df51fdee1p+0), float(0x1.306fe0a31b715p+0),
    float(0x1.371a7373aa9cbp+0), float(0x1.3dea64c123422p+0), float(0x1.44e086061892dp+0),
    float(0x1.4bfdad5362a27p+0), float(0x1.5342b569d4f82p+0), float(0x1.5ab07dd485429p+0),
    float(0x1.6247eb03a5585p+0), float(0x1.6a09e667f3bcdp+0), float(0x1.71f75e8ec5f74p+0),
    float(0x1.7a11473eb0187p+0), float(0x1.82589994cce13p+0), float(0x1.8ace5422aa0dbp+0),
    float(0x1.93737b0cdc5e5p+0), float(0x1.9c49182a3f090p+0), float(0x1.a5503b23e255dp+0),
    float(0x1.ae89f995ad3adp+0), float(0x1.b7f76f2fb5e47p+0), float(0x1.c199bdd85529cp+0),
    float(0x1.cb720dcef9069p+0), float(0x1.d5818dcfba487p+0), float(0x1.dfc97337b9b5fp+0),
    float(0x1.ea4afa2a490dap+0), float(0x1.f50765b6e4540p+0)};

/// The bits of T[i] minus i·2^18, so that adding y's bits shifted left by 18 gives the bits of T[i]·2^floor(n):
/// y's bits are those of round_magic (whose set bits all shift out: 0x48C00000 << 18 ≡ 0 mod 2^32) plus
/// m = round(32t) ≤ 0, and m·2^18 = floor(m/32)·2^23 + (m mod 32)·2^18, which is floor(n) added to the exponent
/// field plus the i·2^18 the entry has subtracted. Exact for floor(n) ≥ −126 (a normal result), which ExpArgument's
/// clamp guarantees.
inline constexpr std::array<std::uint32_t, 32> scaled_table_bits = [] {
  std::array<std::uint32_t, 32> bits{};
  for (std::uint32_t i = 0; i < 32; ++i) bits[i] = std::bit_cast<std::uint32_t>(table[i]) - (i << 18);
  return bits;
}();
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
  const float n = y - round_magic;  // exact: a multiple of 1/32
  const float f = madd(a, factor, -n);  // |f| ≤ 1/64 (plus half an ulp of 1/64)
  const float q = madd(c2, f, c1) * f;
  // T[i]·2^floor(n) with i = round(32t) mod 32, the low 5 bits of y (round_magic's are zero); unsigned arithmetic,
  // so a NaN's bits cannot make it a signed overflow.
  const auto y_bits = std::bit_cast<std::uint32_t>(y);
  const float scaled_entry = std::bit_cast<float>(scaled_table_bits[y_bits & 31] + (y_bits << 18));
  return madd(scaled_entry, q, scaled_entry);
}

#if defined(MEMORYFORMER_HAVE_AVX512) || defined(MEMORYFORMER_HAVE_AVX2)
MEMORYFORMER_SIMD_WARNINGS_BEGIN
/// The step of the vector exp2 that differs by instruction set: scaled_table_bits[low 5 bits of y] (as bits).
template <Isa I>
struct Exp2Table;

#if defined(MEMORYFORMER_HAVE_AVX512)
template <>
struct Exp2Table<Isa::Avx512> {
  // vpermt2d reads the low 5 bits of each index lane: exactly round(32t) mod 32, straight from y's bits.
  MEMORYFORMER_ALWAYS_INLINE static __m512i entry(__m512i y_bits) {
    const auto* table = reinterpret_cast<const __m512i*>(exp2_constants::scaled_table_bits.data());
    return _mm512_permutex2var_epi32(_mm512_loadu_si512(table), y_bits, _mm512_loadu_si512(table + 1));
  }
};
#endif

#if defined(MEMORYFORMER_HAVE_AVX2)
template <>
struct Exp2Table<Isa::Avx2> {
  // 32-entry lookup from four 8-entry permutes (each reads the low 3 bits), chosen by bits 3 and 4 moved to the
  // sign (blendv reads only the sign bit).
  MEMORYFORMER_ALWAYS_INLINE static __m256i entry(__m256i y_bits) {
    const float* table = reinterpret_cast<const float*>(exp2_constants::scaled_table_bits.data());
    auto part = [&](int i) { return _mm256_permutevar8x32_ps(_mm256_loadu_ps(table + 8 * i), y_bits); };
    const __m256 bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(y_bits, 28));
    const __m256 low16 = _mm256_blendv_ps(part(0), part(1), bit3), high16 = _mm256_blendv_ps(part(2), part(3), bit3);
    return _mm256_castps_si256(_mm256_blendv_ps(low16, high16, _mm256_castsi256_ps(_mm256_slli_epi32(y_bits, 27))));
  }
};
#endif

/// The vector version of fast_exp2_of_product(float, float): the same operations in the same order.
template <Isa I>
MEMORYFORMER_ALWAYS_INLINE typename VectorOps<I>::V fast_exp2_of_product(typename VectorOps<I>::V a,
                                                                     typename VectorOps<I>::V factor) {
  using O = VectorOps<I>;
  using namespace exp2_constants;
  const auto y = O::fmadd(a, factor, O::set1(round_magic));
  const auto n = O::sub(y, O::set1(round_magic));
  const auto f = O::fmsub(a, factor, n);
  const auto q = O::mul(O::fmadd(O::set1(c2), f, O::set1(c1)), f);
  const auto y_bits = O::as_int(y);
  const auto scaled_entry = O::as_float(O::add_int(Exp2Table<I>::entry(y_bits), O::template shift_left<18>(y_bits)));
  return O::fmadd(scaled_entry, q, scaled_entry);
}
MEMORYFORMER_SIMD_WARNINGS_END
#endif

/// Natural exponents are clamped to [min_natural_exponent, 0] before exp_clamped: e^−87 = 2^(−125.5…) keeps
/// fast_exp2_of_product in its domain [−126, 0], and smaller values are below float's normal range anyway.
inline constexpr float min_natural_exponent = -87.0f;

/// e^a for a in [min_natural_exponent, 0], the argument clamped into that range first (a NaN stays NaN: std::max
/// and std::min return their first argument for it).
inline float exp_clamped(float a) {
  return fast_exp2_of_product(std::min(std::max(a, min_natural_exponent), 0.0f), float(exp2_constants::log2e));
}

#if defined(MEMORYFORMER_HAVE_AVX512) || defined(MEMORYFORMER_HAVE_AVX2)
MEMORYFORMER_SIMD_WARNINGS_BEGIN
/// The vector version of exp_clamped (max(lo, a) and min(zero, ·) return their second operand for a NaN lane).
template <Isa I>
MEMORYFORMER_ALWAYS_INLINE typename VectorOps<I>::V exp_clamped(typename VectorOps<I>::V a) {
  using O = VectorOps<I>;
  return fast_exp2_of_product<I>(O::min(O::zero(), O::max(O::set1(min_natural_exponent), a)),
                                 O::set1(float(exp2_constants::log2e)));
}
MEMORYFORMER_SIMD_WARNINGS_END
#endif

/// p[j] = exp(s[j]·scale − shift) for j < n, with s[j]·scale − shift computed by one fused multiply-add. In place
/// (p == s) is allowed. float: fast_exp.hpp's exp_clamped (the argument a clamped to [−87, 0], then its exp2:
/// (relative error ≤ 2^-22 + (2|a| + 1)·2^-24, the second term from rounding a and log2(e) to float; tested in
/// attention_isa_test), the vector paths bit-identical to the scalar one; double: std::exp.
template <Isa I, class Scalar>
inline void exp_shifted_row(Scalar* p, const Scalar* s, Index n, Scalar scale, Scalar shift) {
  if constexpr (std::is_same_v<Scalar, float>) {
    Index j = 0;
#if defined(MEMORYFORMER_HAVE_AVX512) || defined(MEMORYFORMER_HAVE_AVX2)
    if constexpr (I != Isa::Scalar) {
      using O = VectorOps<I>;
      const auto vscale = O::set1(scale), vshift = O::set1(shift);
      for (; j + O::n <= n; j += O::n)
        O::store(p + j, exp_clamped<I>(O::fmsub(O::load(s + j), vscale, vshift)));
    }
#endif
    for (; j < n; ++j) p[j] = exp_clamped(madd(s[j], scale, -shift));
  } else {
    for (Index j = 0; j < n; ++j) p[j] = std::exp(s[j] * scale - shift);
  }
}

/// The factor that turns exp(neg_scale·a) into 2^(factor·a), rounded once to Scalar: every ISA path uses this
/// same value, so they agree bit for bit.
template <class Scalar>
inline Scalar exp2_factor(Scalar neg_scale) {
  return Scalar(double(neg_scale) * exp2_constants::log2e);
}

}  // namespace memoryformer::detail
