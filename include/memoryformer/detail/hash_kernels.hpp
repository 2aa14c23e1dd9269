// SPDX-License-Identifier: MIT
// Sign-bit LSH kernels (spec §1.2 and §1.4): bucket codes, scores, and the score gradient, for one τ each.
// Two stages per block of chunks: (1) e_i = exp(−c·|z_i|) for every element, vectorised per ISA (the only costly
// part); (2) per chunk, with τ a compile-time constant so the loop unrolls: code bits, Σ|z| and Π(1 + e_i).
// Stage 2 is the same code for every ISA, so codes are identical across paths and scores differ only by the
// few ulp of stage 1.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../types.hpp"
#include "fast_exp.hpp"
#include "simd.hpp"

namespace memoryformer::detail {

MEMORYFORMER_SIMD_WARNINGS_BEGIN

/// e[i] = exp(neg_scale · |z[i]|) for i < count, on the chosen ISA (neg_scale ≤ 0).
template <Isa isa, class Scalar>
inline void exp_of_abs(Scalar* e, const Scalar* z, Index count, Scalar neg_scale) {
  Index i = 0;
  if constexpr (std::is_same_v<Scalar, float>) {
#if defined(MEMORYFORMER_HAVE_AVX512)
    if constexpr (isa == Isa::Avx512) {
      const __m512 scale = _mm512_set1_ps(neg_scale);
      for (; i + 16 <= count; i += 16) {
        const __m512 v = _mm512_abs_ps(_mm512_loadu_ps(z + i));
        _mm512_storeu_ps(e + i, fast_exp_nonpositive(_mm512_mul_ps(v, scale)));
      }
      if (i < count) {  // masked tail: the same arithmetic as the full vectors
        const __mmask16 m = __mmask16((1u << (count - i)) - 1u);
        const __m512 v = _mm512_abs_ps(_mm512_maskz_loadu_ps(m, z + i));
        _mm512_mask_storeu_ps(e + i, m, fast_exp_nonpositive(_mm512_mul_ps(v, scale)));
      }
      return;
    }
#endif
#if defined(MEMORYFORMER_HAVE_AVX2)
    if constexpr (isa == Isa::Avx2) {
      const __m256 scale = _mm256_set1_ps(neg_scale);
      const __m256 sign = _mm256_set1_ps(-0.0f);
      for (; i + 8 <= count; i += 8) {
        const __m256 v = _mm256_andnot_ps(sign, _mm256_loadu_ps(z + i));
        _mm256_storeu_ps(e + i, fast_exp_nonpositive(_mm256_mul_ps(v, scale)));
      }
      if (i < count) {
        alignas(32) static constexpr std::int32_t lane[8] = {0, 1, 2, 3, 4, 5, 6, 7};
        const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(std::int32_t(count - i)),
                                             _mm256_load_si256(reinterpret_cast<const __m256i*>(lane)));
        const __m256 v = _mm256_andnot_ps(sign, _mm256_maskload_ps(z + i, m));
        _mm256_maskstore_ps(e + i, m, fast_exp_nonpositive(_mm256_mul_ps(v, scale)));
      }
      return;
    }
#endif
  }
  for (; i < count; ++i) e[i] = exp_nonpositive<Scalar>(neg_scale * std::abs(z[i]));
}
MEMORYFORMER_SIMD_WARNINGS_END

/// Stage 2 for `chunks` chunks of Tau elements: codes (first element = most significant bit, z ≥ 0 → 1, so −0.0 → 1),
/// and scores: l1 → Σ|z|·Π σ(2|z|) ; paper → Π σ(2|z|/t), with σ(v) = 1/(1 + e^−v) = 1/(1 + e_i).
template <int Tau, class Scalar>
inline void chunk_codes_and_scores(std::int32_t* codes, Scalar* scores, const Scalar* z, const Scalar* e, Index chunks,
                                   bool l1) {
  for (Index c = 0; c < chunks; ++c) {
    const Scalar* zc = z + c * Tau;
    const Scalar* ec = e + c * Tau;
    std::int32_t code = 0;
    Scalar abs_sum = 0;
    Scalar denominator = 1;  // Π (1 + e_i) ≤ 2^τ: no overflow
    for (int j = 0; j < Tau; ++j) {
      code = (code << 1) | std::int32_t(zc[j] >= Scalar(0));
      abs_sum += std::abs(zc[j]);
      denominator *= Scalar(1) + ec[j];
    }
    codes[c] = code;
    const Scalar product = Scalar(1) / denominator;
    scores[c] = l1 ? abs_sum * product : product;
  }
}

/// Codes and scores of `rows` rows of K chunks each. x is [rows, K·Tau] row-major with row stride `x_stride`;
/// codes and scores are [rows, K] contiguous.
template <Isa isa, int Tau, class Scalar>
void hash_rows(std::int32_t* codes, Scalar* scores, const Scalar* x, Index x_stride, Index rows, Index tables, bool l1,
               Scalar neg_scale) {
  // Blocks of ≤ 256 elements keep e[] on the stack and in L1; a block always ends on a chunk boundary.
  constexpr Index block_chunks = std::max<Index>(1, 256 / Tau);
  alignas(64) Scalar e[block_chunks * Tau];
  for (Index n = 0; n < rows; ++n) {
    const Scalar* z = x + n * x_stride;
    for (Index c0 = 0; c0 < tables; c0 += block_chunks) {
      const Index chunks = std::min(block_chunks, tables - c0);
      exp_of_abs<isa>(e, z + c0 * Tau, chunks * Tau, neg_scale);
      chunk_codes_and_scores<Tau>(codes + n * tables + c0, scores + n * tables + c0, z + c0 * Tau, e, chunks, l1);
    }
  }
}

/// dx = dscore · ∂s/∂z for every element (spec §1 Backward), sign(0) = 0:
///   l1:    ∂s/∂z_j = sign(z_j) · P · (1 + 2A·σ(−2|z_j|)),   A = Σ|z|, P = Π σ(2|z|)
///   paper: ∂s/∂z_j = s · (2/t) · sign(z_j) · σ(−2|z_j|/t)
/// σ(−v) = e/(1 + e) with e = exp(−v). dx is overwritten.
template <Isa isa, int Tau, class Scalar>
void hash_backward_rows(Scalar* dx, Index dx_stride, const Scalar* x, Index x_stride, const Scalar* dscores,
                        Index dscores_stride, Index rows, Index tables, bool l1, Scalar neg_scale) {
  constexpr Index block_chunks = std::max<Index>(1, 256 / Tau);
  alignas(64) Scalar e[block_chunks * Tau];
  const Scalar two_over_t = -neg_scale;  // neg_scale = −2/t
  for (Index n = 0; n < rows; ++n) {
    const Scalar* z = x + n * x_stride;
    Scalar* dz = dx + n * dx_stride;
    for (Index c0 = 0; c0 < tables; c0 += block_chunks) {
      const Index chunks = std::min(block_chunks, tables - c0);
      exp_of_abs<isa>(e, z + c0 * Tau, chunks * Tau, neg_scale);
      for (Index c = 0; c < chunks; ++c) {
        const Index base = (c0 + c) * Tau;
        const Scalar* ec = e + c * Tau;
        Scalar abs_sum = 0, denominator = 1;
        for (int j = 0; j < Tau; ++j) {
          abs_sum += std::abs(z[base + j]);
          denominator *= Scalar(1) + ec[j];
        }
        const Scalar product = Scalar(1) / denominator;
        const Scalar ds = dscores[n * dscores_stride + c0 + c];
        for (int j = 0; j < Tau; ++j) {
          const Scalar zj = z[base + j];
          const Scalar sign = Scalar(zj > Scalar(0)) - Scalar(zj < Scalar(0));
          const Scalar sigma_neg = ec[j] / (Scalar(1) + ec[j]);
          const Scalar ds_dz = l1 ? sign * product * (Scalar(1) + Scalar(2) * abs_sum * sigma_neg)
                                  : product * two_over_t * sign * sigma_neg;
          dz[base + j] = ds * ds_dz;
        }
      }
    }
  }
}

}  // namespace memoryformer::detail
