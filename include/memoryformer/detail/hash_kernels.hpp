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
#include <type_traits>

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

#if defined(MEMORYFORMER_HAVE_AVX512)
MEMORYFORMER_SIMD_WARNINGS_BEGIN
/// AVX-512 path for τ ∈ {1, 2, 4, 8, 16}: 16 chunks at a time, transposed so that vector j holds element j of 16
/// chunks. Stage 2 then runs lane-parallel in exactly the scalar order (abs_sum = 0 + |z_0| + |z_1| + …,
/// denominator = 1·(1 + e_0)·(1 + e_1)·…, one IEEE division), so codes and scores are bit-identical to the scalar
/// stage 2 given the same exponentials; the transposes are τ·log2(τ) two-source permutes per 16 chunks.
template <int Tau>
inline constexpr bool transposed_hash = Tau == 1 || Tau == 2 || Tau == 4 || Tau == 8 || Tau == 16;

/// in[0..T): 16·T consecutive elements; out[j] = the 16 elements ≡ j (mod T), in order.
template <int T>
inline void deinterleave16(const __m512* in, __m512* out) {
  if constexpr (T == 1) {
    out[0] = in[0];
  } else {
    const __m512i even_idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd_idx = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    __m512 even[T / 2], odd[T / 2], re[T / 2], ro[T / 2];
    for (int i = 0; i < T / 2; ++i) {
      even[i] = _mm512_permutex2var_ps(in[2 * i], even_idx, in[2 * i + 1]);
      odd[i] = _mm512_permutex2var_ps(in[2 * i], odd_idx, in[2 * i + 1]);
    }
    deinterleave16<T / 2>(even, re);
    deinterleave16<T / 2>(odd, ro);
    for (int m = 0; m < T / 2; ++m) {
      out[2 * m] = re[m];
      out[2 * m + 1] = ro[m];
    }
  }
}

/// Inverse of deinterleave16: in[j] = element j of 16 chunks → out = 16·T consecutive elements.
template <int T>
inline void interleave16(const __m512* in, __m512* out) {
  if constexpr (T == 1) {
    out[0] = in[0];
  } else {
    const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    __m512 re[T / 2], ro[T / 2], even[T / 2], odd[T / 2];
    for (int m = 0; m < T / 2; ++m) {
      re[m] = in[2 * m];
      ro[m] = in[2 * m + 1];
    }
    interleave16<T / 2>(re, even);
    interleave16<T / 2>(ro, odd);
    for (int i = 0; i < T / 2; ++i) {
      out[2 * i] = _mm512_permutex2var_ps(even[i], lo_idx, odd[i]);
      out[2 * i + 1] = _mm512_permutex2var_ps(even[i], hi_idx, odd[i]);
    }
  }
}

/// Per-chunk quantities of 16 transposed chunks: exponentials e_j, Σ|z|, 1/Π(1 + e_j) — in the scalar order.
template <int Tau>
struct ChunkStats16 {
  __m512 e[Tau];
  __m512 abs_sum;
  __m512 product;
  __m512i code;
  ChunkStats16(const __m512* zt, __m512 neg_scale) {
    const __m512 one = _mm512_set1_ps(1.0f);
    abs_sum = _mm512_setzero_ps();
    __m512 denominator = one;
    code = _mm512_setzero_si512();
    for (int j = 0; j < Tau; ++j) {
      const __mmask16 nonnegative = _mm512_cmp_ps_mask(zt[j], _mm512_setzero_ps(), _CMP_GE_OQ);
      code = _mm512_mask_or_epi32(code, nonnegative, code, _mm512_set1_epi32(1 << (Tau - 1 - j)));
      const __m512 a = _mm512_abs_ps(zt[j]);
      abs_sum = _mm512_add_ps(abs_sum, a);
      e[j] = fast_exp_nonpositive(_mm512_mul_ps(a, neg_scale));
      denominator = _mm512_mul_ps(denominator, _mm512_add_ps(one, e[j]));
    }
    product = _mm512_div_ps(one, denominator);
  }
};

/// Codes and scores of one row's chunks [0, chunks16) (a multiple of 16).
template <int Tau>
inline void hash_row_transposed(std::int32_t* codes, float* scores, const float* z, Index chunks16, bool l1,
                                float neg_scale) {
  const __m512 scale = _mm512_set1_ps(neg_scale);
  for (Index c = 0; c < chunks16; c += 16) {
    __m512 v[Tau], zt[Tau];
    for (int i = 0; i < Tau; ++i) v[i] = _mm512_loadu_ps(z + c * Tau + 16 * i);
    deinterleave16<Tau>(v, zt);
    const ChunkStats16<Tau> st(zt, scale);
    _mm512_storeu_si512(codes + c, st.code);
    _mm512_storeu_ps(scores + c, l1 ? _mm512_mul_ps(st.abs_sum, st.product) : st.product);
  }
}

/// dx of one row's chunks [0, chunks16), the scalar formulas of hash_backward_rows in the same operation order.
template <int Tau>
inline void hash_backward_row_transposed(float* dz, const float* z, const float* ds, Index chunks16, bool l1,
                                         float neg_scale) {
  const __m512 scale = _mm512_set1_ps(neg_scale);
  const __m512 one = _mm512_set1_ps(1.0f), two = _mm512_set1_ps(2.0f), zero = _mm512_setzero_ps();
  const __m512 two_over_t = _mm512_set1_ps(-neg_scale);
  for (Index c = 0; c < chunks16; c += 16) {
    __m512 v[Tau], zt[Tau], out[Tau], dzt[Tau];
    for (int i = 0; i < Tau; ++i) v[i] = _mm512_loadu_ps(z + c * Tau + 16 * i);
    deinterleave16<Tau>(v, zt);
    const ChunkStats16<Tau> st(zt, scale);
    const __m512 dsv = _mm512_loadu_ps(ds + c);
    for (int j = 0; j < Tau; ++j) {
      const __m512 sign = _mm512_sub_ps(_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(zt[j], zero, _CMP_GT_OQ), one),
                                        _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(zt[j], zero, _CMP_LT_OQ), one));
      const __m512 sigma_neg = _mm512_div_ps(st.e[j], _mm512_add_ps(one, st.e[j]));
      const __m512 ds_dz =
          l1 ? _mm512_mul_ps(_mm512_mul_ps(sign, st.product),
                             _mm512_add_ps(one, _mm512_mul_ps(_mm512_mul_ps(two, st.abs_sum), sigma_neg)))
             : _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(st.product, two_over_t), sign), sigma_neg);
      dzt[j] = _mm512_mul_ps(dsv, ds_dz);
    }
    interleave16<Tau>(dzt, out);
    for (int i = 0; i < Tau; ++i) _mm512_storeu_ps(dz + c * Tau + 16 * i, out[i]);
  }
}
MEMORYFORMER_SIMD_WARNINGS_END
#endif

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
    Index first = 0;
#if defined(MEMORYFORMER_HAVE_AVX512)
    if constexpr (isa == Isa::Avx512 && std::is_same_v<Scalar, float> && transposed_hash<Tau>) {
      first = tables / 16 * 16;
      hash_row_transposed<Tau>(codes + n * tables, scores + n * tables, z, first, l1, neg_scale);
    }
#endif
    for (Index c0 = first; c0 < tables; c0 += block_chunks) {
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
    Index first = 0;
#if defined(MEMORYFORMER_HAVE_AVX512)
    if constexpr (isa == Isa::Avx512 && std::is_same_v<Scalar, float> && transposed_hash<Tau>) {
      first = tables / 16 * 16;
      hash_backward_row_transposed<Tau>(dz, z, dscores + n * dscores_stride, first, l1, neg_scale);
    }
#endif
    for (Index c0 = first; c0 < tables; c0 += block_chunks) {
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
