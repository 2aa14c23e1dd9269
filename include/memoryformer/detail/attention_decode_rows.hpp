// SPDX-License-Identifier: MIT
// Decode attention of a few query rows against a key block read in place (design §6.4): the cached keys and
// values are read straight from the KV cache, float or bfloat16 (widened in registers), once per query row, whole
// rows in order (all heads of a cached token at once), with no packed or widened copy. A tile product pays off when
// many query rows reuse each key; one new token per sequence reads each key once, so the fold is bound by the
// cache's bytes, and a copy would double them.
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

/// New tokens per sequence up to which decode folds them in place (fold_heads_in_place) rather than by tile
/// products: each one reads the cache's keys and values once more.
inline constexpr Index attention_decode_in_place_rows = 4;

#if defined(MEMORYFORMER_HAVE_AVX512) || defined(MEMORYFORMER_HAVE_AVX2)
MEMORYFORMER_SIMD_WARNINGS_BEGIN

/// O::n cached values from p: float, or bfloat16 bits widened exactly (VectorOps::load_bf16).
template <Isa I, class E>
inline typename VectorOps<I>::V load_cached(const E* p) {
  if constexpr (std::is_same_v<E, float>)
    return VectorOps<I>::load(p);
  else
    return VectorOps<I>::load_bf16(p);
}

/// q · k over `vectors` vectors of O::n values: one chain of FMAs, then the lanes summed.
template <Isa I, class E>
inline float dot_cached(const float* q, const E* k, Index vectors) {
  using O = VectorOps<I>;
  auto a = O::mul(O::load(q), load_cached<I>(k));
  for (Index v = 1; v < vectors; ++v) a = O::fmadd(O::load(q + v * O::n), load_cached<I>(k + v * O::n), a);
  return O::lane_sum(a);
}

/**
 * @brief Folds `count` cached tokens into the online softmax of every head of one query row, reading each cached
 *        key and value row once, whole and in order. Per head h: s_j = q_h·K_j,h, m' = max(m_h, scale·max_j s_j),
 *        p_j = exp(scale·s_j − m') (exp_row(p, s, n, m')), l_h ← l_h·e^(m_h − m') + Σ_j p_j,
 *        acc_h ← acc_h·e^(m_h − m') + Σ_j p_j V_j,h, m_h ← m'.
 * @param m, l    [heads] the running maxima and sums
 * @param acc     [heads·dh] the unnormalised outputs (head h at acc + h·dh)
 * @param q       [heads·dh] the query row
 * @param keys    first cached key row; row j at keys + j·key_stride (float, or bfloat16 bits as std::uint16_t)
 * @param values  first cached value row; row j at values + j·value_stride
 * @param scores  scratch of ≥ heads·count floats
 * For a vector ISA and dh a multiple of its width (attention_vector_path); widening is exact, so a bfloat16 cache
 * gives the bits of a float cache holding the same values.
 */
template <Isa I, class E, class ExpRow>
void fold_heads_in_place(float* m, float* l, float* acc, const float* q, const E* keys, Index key_stride,
                         const E* values, Index value_stride, Index count, Index heads, Index dh, float scale,
                         float* scores, ExpRow&& exp_row) {
  static_assert(I != Isa::Scalar, "the scalar path folds through attend_key_range");
  using O = VectorOps<I>;
  if (count <= 0) return;
  const Index vectors = dh / O::n;
  for (Index j = 0; j < count; ++j) {
    const E* key = keys + j * key_stride;
    for (Index h = 0; h < heads; ++h) scores[h * count + j] = dot_cached<I>(q + h * dh, key + h * dh, vectors);
  }
  for (Index h = 0; h < heads; ++h) {
    float* p = scores + h * count;
    float best = p[0];
    for (Index j = 1; j < count; ++j) best = std::max(best, p[j]);
    const float m_new = std::max(m[h], best * scale);
    exp_row(p, p, count, m_new);
    float sum = 0;
    for (Index j = 0; j < count; ++j) sum += p[j];
    // One std::exp per head and block, on every path.
    const float alpha = m[h] == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp(m[h] - m_new);
    l[h] = l[h] * alpha + sum;
    m[h] = m_new;
    const auto va = O::set1(alpha);
    for (Index v = 0; v < vectors; ++v) O::store(acc + h * dh + v * O::n, O::mul(O::load(acc + h * dh + v * O::n), va));
  }
  // acc stays in L1 (heads·dh floats), the value rows stream through once.
  for (Index j = 0; j < count; ++j) {
    const E* value = values + j * value_stride;
    for (Index h = 0; h < heads; ++h) {
      const auto pj = O::set1(scores[h * count + j]);
      float* a = acc + h * dh;
      const E* vh = value + h * dh;
      for (Index v = 0; v < vectors; ++v)
        O::store(a + v * O::n, O::fmadd(pj, load_cached<I>(vh + v * O::n), O::load(a + v * O::n)));
    }
  }
}

MEMORYFORMER_SIMD_WARNINGS_END
#endif

}  // namespace memoryformer::detail
