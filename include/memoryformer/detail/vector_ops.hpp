// SPDX-License-Identifier: MIT
// One vector of floats per instruction set, and the operations the kernels share on it, so that a kernel written
// once over VectorOps<I> runs the same arithmetic, in the same order, on AVX-512 (16 lanes) and AVX2 (8 lanes):
// the lookup lanes (gather_kernels.hpp), the hashing's lane-parallel stage and its exponential (hash_kernels.hpp,
// fast_exp.hpp).
#pragma once

#include <cstdint>

#include "../types.hpp"
#include "simd.hpp"

namespace memoryformer::detail {

/// Defined for the instruction sets this translation unit is compiled for (never for Isa::Scalar).
template <Isa I>
struct VectorOps;

#if defined(MEMORYFORMER_HAVE_AVX512) || defined(MEMORYFORMER_HAVE_AVX2)
MEMORYFORMER_SIMD_WARNINGS_BEGIN

#if defined(MEMORYFORMER_HAVE_AVX512)
template <>
struct VectorOps<Isa::Avx512> {
  using V = __m512;
  using VI = __m512i;
  static constexpr Index n = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float s) { return _mm512_set1_ps(s); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V fmsub(V a, V b, V c) { return _mm512_fmsub_ps(a, b, c); }
  /// minps/maxps semantics: the second operand when either is NaN.
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V abs(V a) { return _mm512_abs_ps(a); }
  /// Whether a ≤ b in every lane (false for a lane holding a NaN).
  static bool all_less_equal(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_LE_OQ) == 0xFFFF; }
  /// Per lane: a < b ? if_less : otherwise (false for a NaN lane).
  static V select_if_less(V a, V b, V if_less, V otherwise) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), otherwise, if_less);
  }
  /// +1, −1 or 0 by the sign of z (0 for ±0 and NaN).
  static V sign(V z) {
    const V one = set1(1.0f);
    return sub(_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(z, zero(), _CMP_GT_OQ), one),
               _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(z, zero(), _CMP_LT_OQ), one));
  }
  static VI zero_int() { return _mm512_setzero_si512(); }
  /// code | bit in the lanes where z ≥ 0 (−0.0 included, NaN not).
  static VI or_if_nonnegative(VI code, V z, int bit) {
    return _mm512_mask_or_epi32(code, _mm512_cmp_ps_mask(z, zero(), _CMP_GE_OQ), code, _mm512_set1_epi32(bit));
  }
  static void store_int(std::int32_t* p, VI v) { _mm512_storeu_si512(p, v); }
  static VI as_int(V v) { return _mm512_castps_si512(v); }
  static VI add_int(VI a, VI b) { return _mm512_add_epi32(a, b); }
  template <int Bits>
  static VI shift_left(VI a) {
    return _mm512_slli_epi32(a, Bits);
  }
  static V as_float(VI v) { return _mm512_castsi512_ps(v); }
  /// n bfloat16 values widened exactly (a bfloat16 is the upper half of a float).
  static V load_bf16(const std::uint16_t* p) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
  }
  /// Σ of the lanes: the halves added pairwise down to one lane.
  static float lane_sum(V v) {
    const __m256 h =
        _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
  }
};
#endif

#if defined(MEMORYFORMER_HAVE_AVX2)
template <>
struct VectorOps<Isa::Avx2> {
  using V = __m256;
  using VI = __m256i;
  static constexpr Index n = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float s) { return _mm256_set1_ps(s); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V fmsub(V a, V b, V c) { return _mm256_fmsub_ps(a, b, c); }
  static V min(V a, V b) { return _mm256_min_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V abs(V a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  static bool all_less_equal(V a, V b) { return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_LE_OQ)) == 0xFF; }
  /// Per lane: a < b ? if_less : otherwise (false for a NaN lane).
  static V select_if_less(V a, V b, V if_less, V otherwise) {
    return _mm256_blendv_ps(otherwise, if_less, _mm256_cmp_ps(a, b, _CMP_LT_OQ));
  }
  static V sign(V z) {
    const V one = set1(1.0f);
    return sub(_mm256_and_ps(_mm256_cmp_ps(z, zero(), _CMP_GT_OQ), one),
               _mm256_and_ps(_mm256_cmp_ps(z, zero(), _CMP_LT_OQ), one));
  }
  static VI zero_int() { return _mm256_setzero_si256(); }
  static VI or_if_nonnegative(VI code, V z, int bit) {
    const VI nonnegative = _mm256_castps_si256(_mm256_cmp_ps(z, zero(), _CMP_GE_OQ));
    return _mm256_or_si256(code, _mm256_and_si256(nonnegative, _mm256_set1_epi32(bit)));
  }
  static void store_int(std::int32_t* p, VI v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
  static VI as_int(V v) { return _mm256_castps_si256(v); }
  static VI add_int(VI a, VI b) { return _mm256_add_epi32(a, b); }
  template <int Bits>
  static VI shift_left(VI a) {
    return _mm256_slli_epi32(a, Bits);
  }
  static V as_float(VI v) { return _mm256_castsi256_ps(v); }
  /// n bfloat16 values widened exactly (a bfloat16 is the upper half of a float).
  static V load_bf16(const std::uint16_t* p) {
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
  }
  /// Σ of the lanes: the halves added pairwise down to one lane.
  static float lane_sum(V v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
  }
};
#endif

MEMORYFORMER_SIMD_WARNINGS_END
#endif

}  // namespace memoryformer::detail
