// SPDX-License-Identifier: MIT
// Decode attention of a few query rows against a key block read in place (design §6.4): the cached keys and
// values are read straight from the KV cache, float or bfloat16 (widened in registers), once per query row, with
// no packed or widened copy. A tile product pays off when many query rows reuse each key; one new token per
// sequence reads each key once, so the fold is bound by the cache's bytes, and the copy would double them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../types.hpp"
#include "simd.hpp"
#include "vector_ops.hpp"

namespace memoryformer::detail {

/// Query rows per work item up to which decode folds rows in place (fold_row_in_place) rather than by tile products:
/// each row reads the block's keys and values once more.
inline constexpr Index attention_decode_in_place_rows = 4;

#if defined(MEMORYFORMER_HAVE_AVX512) || defined(MEMORYFORMER_HAVE_AVX2)
MEMORYFORMER_SIMD_WARNINGS_BEGIN

/// O::n cached values from p (float, or bfloat16 bits widened exactly: a bfloat16 is the upper half of a float).
template <Isa I, class E>
inline typename VectorOps<I>::V load_cached(const E* p) {
  using O = VectorOps<I>;
  if constexpr (std::is_same_v<E, float>) {
    return O::load(p);
  } else {
#if defined(MEMORYFORMER_HAVE_AVX512)
    if constexpr (I == Isa::Avx512)
      return _mm512_castsi512_ps(
          _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
    else
#endif
      return _mm256_castsi256_ps(
          _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
  }
}

/// Σ of the lanes of v, in a fixed order per ISA (halves added pairwise).
template <Isa I>
inline float lane_sum(typename VectorOps<I>::V v) {
  __m256 h;
#if defined(MEMORYFORMER_HAVE_AVX512)
  if constexpr (I == Isa::Avx512)
    h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  else
#endif
    h = v;
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

/// scores[j] = q · K_j for the `count` keys from `keys` (row j at keys + j·stride), dh = NV·O::n columns. Four keys
/// at a time, so the four chains of FMAs overlap.
template <Isa I, int NV, class E>
inline void decode_scores(float* scores, const float* q, const E* keys, Index stride, Index count) {
  using O = VectorOps<I>;
  typename O::V qv[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) qv[v] = O::load(q + v * O::n);
  Index j = 0;
  for (; j + 4 <= count; j += 4) {
    typename O::V a[4];
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      const E* key = keys + (j + r) * stride;
      a[r] = O::mul(qv[0], load_cached<I>(key));
#pragma GCC unroll 8
      for (int v = 1; v < NV; ++v) a[r] = O::fmadd(qv[v], load_cached<I>(key + v * O::n), a[r]);
    }
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) scores[j + r] = lane_sum<I>(a[r]);
  }
  for (; j < count; ++j) {
    const E* key = keys + j * stride;
    auto a = O::mul(qv[0], load_cached<I>(key));
#pragma GCC unroll 8
    for (int v = 1; v < NV; ++v) a = O::fmadd(qv[v], load_cached<I>(key + v * O::n), a);
    scores[j] = lane_sum<I>(a);
  }
}

/// acc[0, NV·O::n) ← acc·alpha + Σ_j p[j]·V_j over the `count` values from `values` (row j at values + j·stride).
template <Isa I, int NV, class E>
inline void decode_accumulate(float* acc, float alpha, const float* p, const E* values, Index stride, Index count) {
  using O = VectorOps<I>;
  typename O::V a[NV];
  const auto va = O::set1(alpha);
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) a[v] = O::mul(O::load(acc + v * O::n), va);
  for (Index j = 0; j < count; ++j) {
    const auto pj = O::set1(p[j]);
    const E* value = values + j * stride;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) a[v] = O::fmadd(pj, load_cached<I>(value + v * O::n), a[v]);
  }
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) O::store(acc + v * O::n, a[v]);
}

/// Runs f.template operator()<NV>(column offset) over the dh columns in pieces of at most 4 vectors (4 AVX-512
/// vectors are one head of 64), NV a compile-time count.
template <Isa I, class F>
inline void for_vector_pieces(Index dh, F&& f) {
  constexpr Index w = VectorOps<I>::n;
  for (Index c = 0; c < dh; c += 4 * w) {
    switch (std::min<Index>(4, (dh - c) / w)) {
      case 1: f.template operator()<1>(c); break;
      case 2: f.template operator()<2>(c); break;
      case 3: f.template operator()<3>(c); break;
      default: f.template operator()<4>(c); break;
    }
  }
}

/**
 * @brief Folds `count` cached keys into one query row's online softmax (m, l, acc), reading the keys and values in
 *        place: s_j = q·K_j, m' = max(m, scale·max_j s_j), p_j = exp(scale·s_j − m') (exp_row(p, s, n, m')),
 *        l ← l·e^(m − m') + Σ_j p_j, acc ← acc·e^(m − m') + Σ_j p_j V_j, m ← m'.
 * @param q       [dh] the query row
 * @param keys    first key of the block; key j at keys + j·key_stride (float, or bfloat16 bits as std::uint16_t)
 * @param values  first value; value j at values + j·value_stride
 * @param scores  scratch of ≥ 2·count floats
 * For a vector ISA and dh a multiple of its width (attention_vector_path); the result does not depend on the
 * element type beyond the values it holds (widening is exact).
 */
template <Isa I, class E, class ExpRow>
void fold_row_in_place(float& m, float& l, float* acc, const float* q, const E* keys, Index key_stride,
                       const E* values, Index value_stride, Index count, Index dh, float scale, float* scores,
                       ExpRow&& exp_row) {
  static_assert(I != Isa::Scalar, "the scalar path folds through attend_key_range");
  if (count <= 0) return;
  // Scores piece by piece of the head's columns: the first piece writes, the others add.
  float* partial = scores + count;  // [count] the next piece's products (scores has ≥ 2·count floats)
  bool first = true;
  for_vector_pieces<I>(dh, [&]<int NV>(Index c) {
    decode_scores<I, NV>(first ? scores : partial, q + c, keys + c, key_stride, count);
    if (!first)
      for (Index j = 0; j < count; ++j) scores[j] += partial[j];
    first = false;
  });
  float best = scores[0];
  for (Index j = 1; j < count; ++j) best = std::max(best, scores[j]);
  const float m_new = std::max(m, best * scale);
  exp_row(scores, scores, count, m_new);
  float sum = 0;
  for (Index j = 0; j < count; ++j) sum += scores[j];
  // One std::exp per row and block, on every path.
  const float alpha = m == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp(m - m_new);
  l = l * alpha + sum;
  m = m_new;
  for_vector_pieces<I>(dh, [&]<int NV>(Index c) {
    decode_accumulate<I, NV>(acc + c, alpha, scores, values + c, value_stride, count);
  });
}

MEMORYFORMER_SIMD_WARNINGS_END
#endif

}  // namespace memoryformer::detail
