// SPDX-License-Identifier: MIT
// Sign-bit LSH kernels (spec §1.2 and §1.4): bucket codes, scores, and the score gradient, for one τ each.
// Two stages per block of chunks: (1) e_i = exp(−c·|z_i|) = 2^(−c·log2(e)·|z_i|) for every element, vectorised
// per ISA (the only costly part); (2) per chunk, with τ a compile-time constant so the loop unrolls: code bits,
// Σ|z| and Π(1 + e_i).
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

/// The exponentials' arguments: exp(neg_scale·|z|) = 2^(factor·min(|z|, max_abs)). Clamping |z| keeps factor·|z|
/// ≥ −126, the domain of fast_exp2_of_product; the exponential is then below 2^-125 and only ever appears as 1 + e,
/// where it is lost anyway. A NaN stays NaN; an infinite z gives 2^-125 (the scores see it elsewhere: see
/// chunk_codes_and_scores). double (the reference and gradient-check type) uses std::exp unclamped.
template <class Scalar>
struct ExpArgument {
  Scalar neg_scale;  // −2 (l1) or −2/t (paper)
  Scalar factor;     // neg_scale·log2(e), rounded once: the same value on every ISA path
  Scalar max_abs;    // factor·max_abs ≥ −125·(1 + 2^-23)
  explicit ExpArgument(Scalar neg_scale_)
      : neg_scale(neg_scale_), factor(exp2_factor(neg_scale_)), max_abs(Scalar(125.0 / -double(factor))) {}
  Scalar exp_of_abs(Scalar z) const {
    if constexpr (std::is_same_v<Scalar, float>) {
      return fast_exp2_of_product(std::min(std::abs(z), max_abs), factor);  // std::min keeps a NaN (first argument)
    } else {
      return std::exp(neg_scale * std::abs(z));
    }
  }
};

/// d·(1 + e) as d + d·e, one rounding in float (the AVX-512 path's vfmadd: one instruction per element instead of
/// an add and a multiply, and a shorter dependency chain).
template <class Scalar>
inline Scalar fused_grow(Scalar d, Scalar e) {
  if constexpr (std::is_same_v<Scalar, float>) {
    return madd(d, e, d);
  } else {
    return d * (Scalar(1) + e);
  }
}

MEMORYFORMER_SIMD_WARNINGS_BEGIN
#if defined(MEMORYFORMER_HAVE_AVX512)
/// min(|z|, max_abs), keeping a NaN (minps returns its second operand when either is NaN, so |z| goes second).
/// vrangeps would do it in one instruction, but it drops the NaN.
inline __m512 clamped_abs(__m512 z, __m512 max_abs) { return _mm512_min_ps(max_abs, _mm512_abs_ps(z)); }
#endif
#if defined(MEMORYFORMER_HAVE_AVX2)
inline __m256 clamped_abs(__m256 z, __m256 max_abs) {
  return _mm256_min_ps(max_abs, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), z));
}
#endif

/// e[i] = exp(neg_scale · |z[i]|) for i < count, on the chosen ISA.
template <Isa isa, class Scalar>
inline void exp_of_abs(Scalar* e, const Scalar* z, Index count, const ExpArgument<Scalar>& arg) {
  Index i = 0;
  if constexpr (std::is_same_v<Scalar, float>) {
#if defined(MEMORYFORMER_HAVE_AVX512)
    if constexpr (isa == Isa::Avx512) {
      const __m512 factor = _mm512_set1_ps(arg.factor), max_abs = _mm512_set1_ps(arg.max_abs);
      for (; i + 16 <= count; i += 16) {
        const __m512 a = clamped_abs(_mm512_loadu_ps(z + i), max_abs);
        _mm512_storeu_ps(e + i, fast_exp2_of_product(a, factor));
      }
      if (i < count) {  // masked tail: the same arithmetic as the full vectors
        const __mmask16 m = __mmask16((1u << (count - i)) - 1u);
        const __m512 a = clamped_abs(_mm512_maskz_loadu_ps(m, z + i), max_abs);
        _mm512_mask_storeu_ps(e + i, m, fast_exp2_of_product(a, factor));
      }
      return;
    }
#endif
#if defined(MEMORYFORMER_HAVE_AVX2)
    if constexpr (isa == Isa::Avx2) {
      const __m256 factor = _mm256_set1_ps(arg.factor), max_abs = _mm256_set1_ps(arg.max_abs);
      for (; i + 8 <= count; i += 8) {
        const __m256 a = clamped_abs(_mm256_loadu_ps(z + i), max_abs);
        _mm256_storeu_ps(e + i, fast_exp2_of_product(a, factor));
      }
      if (i < count) {
        alignas(32) static constexpr std::int32_t lane[8] = {0, 1, 2, 3, 4, 5, 6, 7};
        const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(std::int32_t(count - i)),
                                             _mm256_load_si256(reinterpret_cast<const __m256i*>(lane)));
        const __m256 a = clamped_abs(_mm256_maskload_ps(z + i, m), max_abs);
        _mm256_maskstore_ps(e + i, m, fast_exp2_of_product(a, factor));
      }
      return;
    }
#endif
  }
  for (; i < count; ++i) e[i] = arg.exp_of_abs(z[i]);
}
MEMORYFORMER_SIMD_WARNINGS_END

/// Stage 2 for `chunks` chunks of Tau elements: codes (first element = most significant bit, z ≥ 0 → 1, so
/// −0.0 → 1), and scores: l1 → Σ|z|·Π σ(2|z|) ; paper → Π σ(2|z|/t), with σ(v) = 1/(1 + e^−v) = 1/(1 + e_i).
/// A non-finite z must give a non-finite score (SignHasher::hash rejects the input by scanning the scores): NaN
/// travels through e; an infinite z does through Σ|z| for l1, and for paper through max|z|·0 + Π, which is Π
/// exactly when every |z| is finite.
template <int Tau, class Scalar>
inline void chunk_codes_and_scores(std::int32_t* codes, Scalar* scores, const Scalar* z, const Scalar* e, Index chunks,
                                   bool l1) {
  for (Index c = 0; c < chunks; ++c) {
    const Scalar* zc = z + c * Tau;
    const Scalar* ec = e + c * Tau;
    std::int32_t code = 0;
    Scalar abs_sum = 0, abs_max = 0;
    Scalar denominator = 1;  // Π (1 + e_i) ≤ 2^τ: no overflow
    for (int j = 0; j < Tau; ++j) {
      code = (code << 1) | std::int32_t(zc[j] >= Scalar(0));
      abs_sum += std::abs(zc[j]);
      abs_max = std::max(abs_max, std::abs(zc[j]));
      denominator = fused_grow(denominator, ec[j]);
    }
    codes[c] = code;
    const Scalar product = Scalar(1) / denominator;
    scores[c] = l1 ? abs_sum * product : abs_max * Scalar(0) + product;
  }
}

#if defined(MEMORYFORMER_HAVE_AVX512)
MEMORYFORMER_SIMD_WARNINGS_BEGIN
/// AVX-512 path for τ ∈ {1, 2, 4, 8, 16}: 16 chunks at a time, transposed so that vector j holds element j of 16
/// chunks. Stage 2 then runs lane-parallel in exactly the scalar order (abs_sum = 0 + |z_0| + |z_1| + …,
/// denominator grown by fused_grow from 1, one IEEE division), so codes and scores are bit-identical to the scalar
/// stage 2 given the same exponentials; the transposes are τ·log2(τ) two-source permutes per 16 chunks, except for
/// τ = 8 (below).
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

// τ = 8, the paper's setting, transposes differently: two-source permutes (vpermt2ps) cost about 1.2 cycles each on
// Zen 4, and the 24 of deinterleave16<8> were a quarter of the hashing time. A 4×4 transpose inside each 128-bit
// lane (unpack instructions, cheap on every AVX-512 core) followed by one 128-bit-lane shuffle per vector does the
// same work with 8 cross-lane operations instead of 24. It leaves the 16 chunks in the lane order below, which the
// codes and scores undo with one permute each as they are stored.

/// Lane l of the τ = 8 transposed vectors holds chunk chunk_of_lane8[l].
inline __m512i chunk_of_lane8() { return _mm512_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15); }
/// Its inverse: chunk c is in lane lane_of_chunk8[c].
inline __m512i lane_of_chunk8() { return _mm512_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15); }

/// Transposes the 4×4 matrix held in each 128-bit lane of rows a, b, c, d (an involution).
inline void transpose4_in_lanes(__m512& a, __m512& b, __m512& c, __m512& d) {
  const __m512d t0 = _mm512_castps_pd(_mm512_unpacklo_ps(a, b)), t1 = _mm512_castps_pd(_mm512_unpacklo_ps(c, d));
  const __m512d t2 = _mm512_castps_pd(_mm512_unpackhi_ps(a, b)), t3 = _mm512_castps_pd(_mm512_unpackhi_ps(c, d));
  a = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t1));
  b = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t1));
  c = _mm512_castpd_ps(_mm512_unpacklo_pd(t2, t3));
  d = _mm512_castpd_ps(_mm512_unpackhi_pd(t2, t3));
}

/// in[0..8): 16 chunks of 8 consecutive elements (in[i] holds chunks 2i and 2i + 1, one 128-bit lane per half
/// chunk); out[j] = element j of the 16 chunks, in the lane order chunk_of_lane8.
inline void deinterleave8(const __m512* in, __m512* out) {
  __m512 w[8];
  for (int i = 0; i < 8; ++i) w[i] = in[i];
  transpose4_in_lanes(w[0], w[1], w[2], w[3]);  // w[k] lanes: chunks {0,2,4,6} elements k | 4+k, {1,3,5,7} k | 4+k
  transpose4_in_lanes(w[4], w[5], w[6], w[7]);  // the same for chunks 8–15
  for (int k = 0; k < 4; ++k) {
    out[k] = _mm512_shuffle_f32x4(w[k], w[4 + k], 0x88);      // 128-bit lanes 0, 2 of each: element k
    out[4 + k] = _mm512_shuffle_f32x4(w[k], w[4 + k], 0xDD);  // lanes 1, 3 of each: element 4 + k
  }
}

/// Inverse of deinterleave8.
inline void interleave8(const __m512* in, __m512* out) {
  // w[k] = 128-bit lanes (in[k].0, in[4+k].0, in[k].1, in[4+k].1); w[4+k] the same with lanes 2 and 3.
  const __m512i low = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i high = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int k = 0; k < 4; ++k) {
    out[k] = _mm512_permutex2var_ps(in[k], low, in[4 + k]);
    out[4 + k] = _mm512_permutex2var_ps(in[k], high, in[4 + k]);
  }
  transpose4_in_lanes(out[0], out[1], out[2], out[3]);
  transpose4_in_lanes(out[4], out[5], out[6], out[7]);
}

/// Loads 16 chunks of Tau elements and transposes them; lanes in natural chunk order except for τ = 8.
template <int Tau>
inline void load_transposed(const float* z, __m512* zt) {
  __m512 v[Tau];
  for (int i = 0; i < Tau; ++i) v[i] = _mm512_loadu_ps(z + 16 * i);
  if constexpr (Tau == 8)
    deinterleave8(v, zt);
  else
    deinterleave16<Tau>(v, zt);
}

/// Per-chunk quantities of 16 transposed chunks: exponentials e_j, Σ|z| (l1) or max|z| (paper: only to make an
/// infinite z show, see chunk_codes_and_scores), 1/Π(1 + e_j) — in the scalar order.
template <int Tau, bool L1>
struct ChunkStats16 {
  __m512 e[Tau];
  __m512 abs_sum;  // Σ|z| for l1, max|z| for paper
  __m512 product;
  __m512i code;
  ChunkStats16(const __m512* zt, __m512 factor, __m512 max_abs) {
    const __m512 one = _mm512_set1_ps(1.0f);
    abs_sum = _mm512_setzero_ps();
    __m512 denominator = one;
    code = _mm512_setzero_si512();
    for (int j = 0; j < Tau; ++j) {
      const __mmask16 nonnegative = _mm512_cmp_ps_mask(zt[j], _mm512_setzero_ps(), _CMP_GE_OQ);
      code = _mm512_mask_or_epi32(code, nonnegative, code, _mm512_set1_epi32(1 << (Tau - 1 - j)));
      const __m512 a = _mm512_abs_ps(zt[j]);
      abs_sum = L1 ? _mm512_add_ps(abs_sum, a) : _mm512_max_ps(abs_sum, a);
      e[j] = fast_exp2_of_product(_mm512_min_ps(max_abs, a), factor);  // clamped_abs
      denominator = _mm512_fmadd_ps(denominator, e[j], denominator);  // fused_grow
    }
    product = _mm512_div_ps(one, denominator);
  }
  /// The chunk scores, as chunk_codes_and_scores computes them.
  __m512 scores() const {
    return L1 ? _mm512_mul_ps(abs_sum, product) : _mm512_fmadd_ps(abs_sum, _mm512_setzero_ps(), product);
  }
};

/// Codes and scores of one row's chunks [0, chunks16) (a multiple of 16).
template <int Tau, bool L1>
inline void hash_row_transposed(std::int32_t* codes, float* scores, const float* z, Index chunks16,
                                const ExpArgument<float>& arg) {
  const __m512 factor = _mm512_set1_ps(arg.factor), max_abs = _mm512_set1_ps(arg.max_abs);
  for (Index c = 0; c < chunks16; c += 16) {
    __m512 zt[Tau];
    load_transposed<Tau>(z + c * Tau, zt);
    const ChunkStats16<Tau, L1> st(zt, factor, max_abs);
    __m512i code = st.code;
    __m512 score = st.scores();
    if constexpr (Tau == 8) {
      code = _mm512_permutexvar_epi32(lane_of_chunk8(), code);
      score = _mm512_permutexvar_ps(lane_of_chunk8(), score);
    }
    _mm512_storeu_si512(codes + c, code);
    _mm512_storeu_ps(scores + c, score);
  }
}

/// dx of one row's chunks [0, chunks16), the scalar formulas of hash_backward_rows in the same operation order.
template <int Tau, bool L1>
inline void hash_backward_row_transposed(float* dz, const float* z, const float* ds, Index chunks16,
                                         const ExpArgument<float>& arg) {
  const __m512 factor = _mm512_set1_ps(arg.factor), max_abs = _mm512_set1_ps(arg.max_abs);
  const __m512 one = _mm512_set1_ps(1.0f), two = _mm512_set1_ps(2.0f), zero = _mm512_setzero_ps();
  const __m512 two_over_t = _mm512_set1_ps(-arg.neg_scale);
  for (Index c = 0; c < chunks16; c += 16) {
    __m512 zt[Tau], dzt[Tau], out[Tau];
    load_transposed<Tau>(z + c * Tau, zt);
    const ChunkStats16<Tau, L1> st(zt, factor, max_abs);
    __m512 dsv = _mm512_loadu_ps(ds + c);
    if constexpr (Tau == 8) dsv = _mm512_permutexvar_ps(chunk_of_lane8(), dsv);
    for (int j = 0; j < Tau; ++j) {
      const __m512 sign = _mm512_sub_ps(_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(zt[j], zero, _CMP_GT_OQ), one),
                                        _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(zt[j], zero, _CMP_LT_OQ), one));
      const __m512 sigma_neg = _mm512_div_ps(st.e[j], _mm512_add_ps(one, st.e[j]));
      const __m512 ds_dz =
          L1 ? _mm512_mul_ps(_mm512_mul_ps(sign, st.product),
                             _mm512_add_ps(one, _mm512_mul_ps(_mm512_mul_ps(two, st.abs_sum), sigma_neg)))
             : _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(st.product, two_over_t), sign), sigma_neg);
      dzt[j] = _mm512_mul_ps(dsv, ds_dz);
    }
    if constexpr (Tau == 8)
      interleave8(dzt, out);
    else
      interleave16<Tau>(dzt, out);
    for (int i = 0; i < Tau; ++i) _mm512_storeu_ps(dz + c * Tau + 16 * i, out[i]);
  }
}
MEMORYFORMER_SIMD_WARNINGS_END
#endif

#if defined(MEMORYFORMER_HAVE_AVX2)
/// Transposes the 8×8 matrix whose rows are r[0..8) (unpacks, in-lane shuffles, 128-bit permutes).
inline void transpose8x8(__m256* r) {
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

/// AVX2 path for τ = 8 (the paper's): 8 chunks at a time, transposed so that vector j holds element j of 8 chunks,
/// then chunk_codes_and_scores (and the backward's per-chunk formulas) lane-parallel in their exact order, so codes
/// and scores are bit-identical to the scalar stage given the same exponentials, which exp_of_abs computes with the
/// same AVX2 arithmetic. Without it the per-chunk stage is scalar and dominates AVX2 hashing (895 → 400 µs for
/// 2048 × 512 inputs on Zen 4).
template <bool L1>
struct ChunkStats8 {
  __m256 e[8];
  __m256 abs_acc;  // Σ|z| for l1, max|z| for paper (see chunk_codes_and_scores)
  __m256 product;
  __m256i code;
  ChunkStats8(const __m256* zt, __m256 factor, __m256 max_abs) {
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps(), sign_bit = _mm256_set1_ps(-0.0f);
    code = _mm256_setzero_si256();
    abs_acc = zero;
    __m256 denominator = one;
    for (int j = 0; j < 8; ++j) {
      const __m256i nonnegative = _mm256_castps_si256(_mm256_cmp_ps(zt[j], zero, _CMP_GE_OQ));
      code = _mm256_or_si256(code, _mm256_and_si256(nonnegative, _mm256_set1_epi32(1 << (7 - j))));
      const __m256 a = _mm256_andnot_ps(sign_bit, zt[j]);
      abs_acc = L1 ? _mm256_add_ps(abs_acc, a) : _mm256_max_ps(abs_acc, a);
      e[j] = fast_exp2_of_product(_mm256_min_ps(max_abs, a), factor);  // clamped_abs
      denominator = _mm256_fmadd_ps(denominator, e[j], denominator);  // fused_grow
    }
    product = _mm256_div_ps(one, denominator);
  }
  __m256 scores() const {
    return L1 ? _mm256_mul_ps(abs_acc, product) : _mm256_fmadd_ps(abs_acc, _mm256_setzero_ps(), product);
  }
};

/// Loads 8 chunks of 8 elements and transposes them: zt[j] = element j of the 8 chunks.
inline void load_transposed8(const float* z, __m256* zt) {
  for (int i = 0; i < 8; ++i) zt[i] = _mm256_loadu_ps(z + 8 * i);
  transpose8x8(zt);
}

/// Codes and scores of one row's chunks [0, chunks8) (a multiple of 8), τ = 8.
template <bool L1>
inline void hash_row_tau8_avx2(std::int32_t* codes, float* scores, const float* z, Index chunks8,
                               const ExpArgument<float>& arg) {
  const __m256 factor = _mm256_set1_ps(arg.factor), max_abs = _mm256_set1_ps(arg.max_abs);
  for (Index c = 0; c < chunks8; c += 8) {
    __m256 zt[8];
    load_transposed8(z + c * 8, zt);
    const ChunkStats8<L1> st(zt, factor, max_abs);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + c), st.code);
    _mm256_storeu_ps(scores + c, st.scores());
  }
}

/// dx of one row's chunks [0, chunks8), τ = 8: the scalar formulas of hash_backward_rows in the same order.
template <bool L1>
inline void hash_backward_row_tau8_avx2(float* dz, const float* z, const float* ds, Index chunks8,
                                        const ExpArgument<float>& arg) {
  const __m256 factor = _mm256_set1_ps(arg.factor), max_abs = _mm256_set1_ps(arg.max_abs);
  const __m256 one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f), zero = _mm256_setzero_ps();
  const __m256 two_over_t = _mm256_set1_ps(-arg.neg_scale);
  for (Index c = 0; c < chunks8; c += 8) {
    __m256 zt[8], dzt[8];
    load_transposed8(z + c * 8, zt);
    const ChunkStats8<L1> st(zt, factor, max_abs);
    const __m256 dsv = _mm256_loadu_ps(ds + c);
    for (int j = 0; j < 8; ++j) {
      const __m256 sign = _mm256_sub_ps(_mm256_and_ps(_mm256_cmp_ps(zt[j], zero, _CMP_GT_OQ), one),
                                        _mm256_and_ps(_mm256_cmp_ps(zt[j], zero, _CMP_LT_OQ), one));
      const __m256 sigma_neg = _mm256_div_ps(st.e[j], _mm256_add_ps(one, st.e[j]));
      const __m256 ds_dz =
          L1 ? _mm256_mul_ps(_mm256_mul_ps(sign, st.product),
                             _mm256_add_ps(one, _mm256_mul_ps(_mm256_mul_ps(two, st.abs_acc), sigma_neg)))
             : _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(st.product, two_over_t), sign), sigma_neg);
      dzt[j] = _mm256_mul_ps(dsv, ds_dz);
    }
    transpose8x8(dzt);  // back to one chunk per vector
    for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dz + (c + i) * 8, dzt[i]);
  }
}
#endif

/// Codes and scores of `rows` rows of K chunks each. x is [rows, K·Tau] row-major with row stride `x_stride`;
/// codes and scores are [rows, K] contiguous.
template <Isa isa, int Tau, class Scalar>
void hash_rows(std::int32_t* codes, Scalar* scores, const Scalar* x, Index x_stride, Index rows, Index tables, bool l1,
               Scalar neg_scale) {
  // Blocks of ≤ 256 elements keep e[] on the stack and in L1; a block always ends on a chunk boundary.
  constexpr Index block_chunks = std::max<Index>(1, 256 / Tau);
  alignas(64) Scalar e[block_chunks * Tau];
  const ExpArgument<Scalar> arg(neg_scale);
  for (Index n = 0; n < rows; ++n) {
    const Scalar* z = x + n * x_stride;
    Index first = 0;
#if defined(MEMORYFORMER_HAVE_AVX512)
    if constexpr (isa == Isa::Avx512 && std::is_same_v<Scalar, float> && transposed_hash<Tau>) {
      first = tables / 16 * 16;
      if (l1)
        hash_row_transposed<Tau, true>(codes + n * tables, scores + n * tables, z, first, arg);
      else
        hash_row_transposed<Tau, false>(codes + n * tables, scores + n * tables, z, first, arg);
    }
#endif
#if defined(MEMORYFORMER_HAVE_AVX2)
    if constexpr (isa == Isa::Avx2 && std::is_same_v<Scalar, float> && Tau == 8) {
      first = tables / 8 * 8;
      if (l1)
        hash_row_tau8_avx2<true>(codes + n * tables, scores + n * tables, z, first, arg);
      else
        hash_row_tau8_avx2<false>(codes + n * tables, scores + n * tables, z, first, arg);
    }
#endif
    for (Index c0 = first; c0 < tables; c0 += block_chunks) {
      const Index chunks = std::min(block_chunks, tables - c0);
      exp_of_abs<isa>(e, z + c0 * Tau, chunks * Tau, arg);
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
  const ExpArgument<Scalar> arg(neg_scale);
  const Scalar two_over_t = -neg_scale;  // neg_scale = −2/t
  for (Index n = 0; n < rows; ++n) {
    const Scalar* z = x + n * x_stride;
    Scalar* dz = dx + n * dx_stride;
    Index first = 0;
#if defined(MEMORYFORMER_HAVE_AVX512)
    if constexpr (isa == Isa::Avx512 && std::is_same_v<Scalar, float> && transposed_hash<Tau>) {
      first = tables / 16 * 16;
      if (l1)
        hash_backward_row_transposed<Tau, true>(dz, z, dscores + n * dscores_stride, first, arg);
      else
        hash_backward_row_transposed<Tau, false>(dz, z, dscores + n * dscores_stride, first, arg);
    }
#endif
#if defined(MEMORYFORMER_HAVE_AVX2)
    if constexpr (isa == Isa::Avx2 && std::is_same_v<Scalar, float> && Tau == 8) {
      first = tables / 8 * 8;
      if (l1)
        hash_backward_row_tau8_avx2<true>(dz, z, dscores + n * dscores_stride, first, arg);
      else
        hash_backward_row_tau8_avx2<false>(dz, z, dscores + n * dscores_stride, first, arg);
    }
#endif
    for (Index c0 = first; c0 < tables; c0 += block_chunks) {
      const Index chunks = std::min(block_chunks, tables - c0);
      exp_of_abs<isa>(e, z + c0 * Tau, chunks * Tau, arg);
      for (Index c = 0; c < chunks; ++c) {
        const Index base = (c0 + c) * Tau;
        const Scalar* ec = e + c * Tau;
        Scalar abs_sum = 0, denominator = 1;
        for (int j = 0; j < Tau; ++j) {
          abs_sum += std::abs(z[base + j]);
          denominator = fused_grow(denominator, ec[j]);
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
