// SPDX-License-Identifier: MIT
// Square blocks of floats transposed in vector registers: the hashing's lane-parallel stage (hash_kernels.hpp) and the
// attention's packed Kᵀ (attention_kernels.hpp). Values are only moved, so every path gives the scalar bits.
#pragma once

#include "../types.hpp"
#include "simd.hpp"

namespace memoryformer::detail {

#if defined(MEMORYFORMER_HAVE_AVX512) || defined(MEMORYFORMER_HAVE_AVX2)
MEMORYFORMER_SIMD_WARNINGS_BEGIN

#if defined(MEMORYFORMER_HAVE_AVX512)
/// Transposes the 4×4 matrix held in each 128-bit lane of rows a, b, c, d (an involution).
MEMORYFORMER_ALWAYS_INLINE void transpose4_in_lanes(__m512& a, __m512& b, __m512& c, __m512& d) {
  const __m512d t0 = _mm512_castps_pd(_mm512_unpacklo_ps(a, b)), t1 = _mm512_castps_pd(_mm512_unpacklo_ps(c, d));
  const __m512d t2 = _mm512_castps_pd(_mm512_unpackhi_ps(a, b)), t3 = _mm512_castps_pd(_mm512_unpackhi_ps(c, d));
  a = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t1));
  b = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t1));
  c = _mm512_castpd_ps(_mm512_unpacklo_pd(t2, t3));
  d = _mm512_castpd_ps(_mm512_unpackhi_pd(t2, t3));
}

/// Transposes the 16×16 matrix whose rows are r[0..16): 4×4 transposes inside the 128-bit lanes, then column 4L + m
/// gathers 128-bit lane L of r[m], r[4 + m], r[8 + m], r[12 + m].
MEMORYFORMER_ALWAYS_INLINE void transpose16x16(__m512* r) {
  for (int k = 0; k < 16; k += 4) transpose4_in_lanes(r[k], r[k + 1], r[k + 2], r[k + 3]);
  __m512 out[16];
  for (int m = 0; m < 4; ++m) {
    const __m512 even_a = _mm512_shuffle_f32x4(r[m], r[4 + m], 0x88);
    const __m512 odd_a = _mm512_shuffle_f32x4(r[m], r[4 + m], 0xDD);
    const __m512 even_b = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0x88);
    const __m512 odd_b = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0xDD);
    out[m] = _mm512_shuffle_f32x4(even_a, even_b, 0x88);
    out[4 + m] = _mm512_shuffle_f32x4(odd_a, odd_b, 0x88);
    out[8 + m] = _mm512_shuffle_f32x4(even_a, even_b, 0xDD);
    out[12 + m] = _mm512_shuffle_f32x4(odd_a, odd_b, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = out[i];
}
#endif

#if defined(MEMORYFORMER_HAVE_AVX2)
/// Transposes the 8×8 matrix whose rows are r[0..8) (unpacks, in-lane shuffles, 128-bit permutes).
MEMORYFORMER_ALWAYS_INLINE void transpose8x8(__m256* r) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}
#endif

/// dst[c·dst_stride + j] = src[j·src_stride + c] for j, c < n, n = 16 on AVX-512 and 8 on AVX2 (I ≠ Scalar).
template <Isa I>
void transpose_block(float* dst, Index dst_stride, const float* src, Index src_stride) {
#if defined(MEMORYFORMER_HAVE_AVX512)
  if constexpr (I == Isa::Avx512) {
    __m512 r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * src_stride);
    transpose16x16(r);
    for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * dst_stride, r[i]);
    return;
  }
#endif
#if defined(MEMORYFORMER_HAVE_AVX2)
  if constexpr (I == Isa::Avx2) {
    __m256 r[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * src_stride);
    transpose8x8(r);
    for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + i * dst_stride, r[i]);
    return;
  }
#endif
  (void)dst, (void)dst_stride, (void)src, (void)src_stride;
}

MEMORYFORMER_SIMD_WARNINGS_END
#endif

}  // namespace memoryformer::detail
