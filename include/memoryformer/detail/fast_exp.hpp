// SPDX-License-Identifier: MIT
// exp(x) for x ≤ 0 in float, without a libm call: the scores of spec §1.4 need exp(−2|z|/t) per input element,
// which is the hot path of hashing. Cephes-style: x = n·ln2 + r, |r| ≤ ln2/2, degree-6 polynomial for e^r, then 2^n
// by exponent arithmetic. Max relative error ≤ 2^-22 (≈ 2 ulp) on [-87, 0], tested in fast_exp_test.
// The scalar, AVX2 and AVX-512 versions are the same arithmetic in the same order, so they agree to ~1 ulp.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>

#include "simd.hpp"

namespace memoryformer::detail {

namespace exp_constants {
inline constexpr float lower = -87.0f;  // e^-87 ≈ 1.6e-38 > FLT_MIN: 2^n stays a normal number
inline constexpr float log2e = 1.44269504088896341f;
inline constexpr float ln2_hi = 0.693359375f;
inline constexpr float ln2_lo = -2.12194440e-4f;
inline constexpr float p0 = 1.9875691500e-4f;
inline constexpr float p1 = 1.3981999507e-3f;
inline constexpr float p2 = 8.3334519073e-3f;
inline constexpr float p3 = 4.1665795894e-2f;
inline constexpr float p4 = 1.6666665459e-1f;
inline constexpr float p5 = 5.0000001201e-1f;
}  // namespace exp_constants

/// a·b + c, fused where the target has FMA; without it std::fma would be a slow libm emulation.
inline float madd(float a, float b, float c) {
#if defined(__FMA__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

/// e^x for x ≤ 0 (x below −87 is clamped: the result is then ≈ 1.6e-38 instead of smaller, which no score notices).
inline float fast_exp_nonpositive(float x) {
  using namespace exp_constants;
  x = x < lower ? lower : x;
  // Round to nearest by the 1.5·2^23 trick: plain arithmetic, no libm call on targets without SSE4.1 rounding.
  constexpr float round_magic = 12582912.0f;
  const float n = (x * log2e + round_magic) - round_magic;
  float r = madd(n, -ln2_hi, x);
  r = madd(n, -ln2_lo, r);
  float p = madd(p0, r, p1);
  p = madd(p, r, p2);
  p = madd(p, r, p3);
  p = madd(p, r, p4);
  p = madd(p, r, p5);
  p = madd(p, r * r, r) + 1.0f;
  const std::uint32_t bits = std::uint32_t(int(n) + 127) << 23;
  return p * std::bit_cast<float>(bits);
}

#if defined(MEMORYFORMER_HAVE_AVX512)
MEMORYFORMER_SIMD_WARNINGS_BEGIN
inline __m512 fast_exp_nonpositive(__m512 x) {
  using namespace exp_constants;
  x = _mm512_max_ps(x, _mm512_set1_ps(lower));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(log2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-ln2_hi), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(-ln2_lo), r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(p0), r, _mm512_set1_ps(p1));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(p2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(p3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(p4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(p5));
  p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  // p·2^n by vscalefps: the same correctly rounded product as building 2^n in the exponent bits and multiplying
  // (so bit-identical to the scalar and AVX2 versions), in three fewer instructions.
  return _mm512_scalef_ps(p, n);
}
MEMORYFORMER_SIMD_WARNINGS_END
#endif

#if defined(MEMORYFORMER_HAVE_AVX2)
inline __m256 fast_exp_nonpositive(__m256 x) {
  using namespace exp_constants;
  x = _mm256_max_ps(x, _mm256_set1_ps(lower));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(log2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-ln2_hi), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(-ln2_lo), r);
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(p0), r, _mm256_set1_ps(p1));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(p2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(p3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(p4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(p5));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

/// e^x for x ≤ 0: the fast float kernel, or std::exp for double (double is the reference/gradient-check type,
/// not the speed path).
template <class Scalar>
inline Scalar exp_nonpositive(Scalar x) {
  if constexpr (std::is_same_v<Scalar, float>) {
    return fast_exp_nonpositive(x);
  } else {
    return std::exp(x);
  }
}

}  // namespace memoryformer::detail
