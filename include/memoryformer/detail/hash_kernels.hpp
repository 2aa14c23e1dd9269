// SPDX-License-Identifier: MIT
// Sign-bit LSH kernels (design §1.2 and §1.4): bucket codes, scores, and the score gradient, for one τ each.
// Two stages per block of chunks: (1) e_i = exp(−c·|z_i|) = 2^(−c·log2(e)·|z_i|) for every element, vectorised
// per ISA (the only costly part); (2) per chunk, with τ a compile-time constant so the loop unrolls: code bits,
// Σ|z| and Π(1 + e_i).
// Stage 2 is chunk_codes_and_scores, or its lane-parallel copy over VectorOps<I> in the same operation order
// (TransposedBlock: AVX-512 for every τ, AVX2 for τ = 8), and stage 1 is bit-identical across paths, so
// codes and scores are identical on every path.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../types.hpp"
#include "fast_exp.hpp"
#include "prefetch.hpp"
#include "register_transpose.hpp"
#include "simd.hpp"
#include "vector_ops.hpp"

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

#if defined(MEMORYFORMER_HAVE_AVX512) || defined(MEMORYFORMER_HAVE_AVX2)
/// ExpArgument::exp_of_abs on a vector, given |z| and the broadcast factor and max_abs: the clamp min(|z|,
/// max_abs) keeps a NaN (minps returns its second operand when either is NaN, so |z| goes second; vrangeps would
/// clamp in one instruction, but it drops the NaN).
template <Isa I>
MEMORYFORMER_ALWAYS_INLINE typename VectorOps<I>::V exp_of_abs_vector(typename VectorOps<I>::V abs_z,
                                                                  typename VectorOps<I>::V factor,
                                                                  typename VectorOps<I>::V max_abs) {
  return fast_exp2_of_product<I>(VectorOps<I>::min(max_abs, abs_z), factor);
}
#endif

/// e[i] = exp(neg_scale · |z[i]|) for i < count, on the chosen ISA.
template <Isa isa, class Scalar>
inline void exp_of_abs(Scalar* e, const Scalar* z, Index count, const ExpArgument<Scalar>& arg) {
#if defined(MEMORYFORMER_HAVE_AVX512) || defined(MEMORYFORMER_HAVE_AVX2)
  if constexpr (isa != Isa::Scalar && std::is_same_v<Scalar, float>) {
    using O = VectorOps<isa>;
    const auto factor = O::set1(arg.factor), max_abs = O::set1(arg.max_abs);
    auto run = [&](float* out, const float* in) {
      O::store(out, exp_of_abs_vector<isa>(O::abs(O::load(in)), factor, max_abs));
    };
    Index i = 0;
    for (; i + O::n <= count; i += O::n) run(e + i, z + i);
    if (i < count) {  // the tail through a zero-padded vector: the same arithmetic as the full vectors
      alignas(64) float in[O::n] = {}, out[O::n];
      std::copy(z + i, z + count, in);
      run(out, in);
      std::copy(out, out + (count - i), e + i);
    }
    return;
  }
#endif
  for (Index i = 0; i < count; ++i) e[i] = arg.exp_of_abs(z[i]);
}

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

#if defined(MEMORYFORMER_HAVE_AVX512) || defined(MEMORYFORMER_HAVE_AVX2)
MEMORYFORMER_SIMD_WARNINGS_BEGIN
#endif

/// The lane-parallel stage 2: blocks of VectorOps<I>::n chunks, transposed so that vector j holds element j of
/// every chunk of the block. Stage 2 then runs lane-parallel in exactly the scalar order (abs_sum = 0 + |z_0| +
/// |z_1| + …, denominator grown by fused_grow from 1, one IEEE division), so codes and scores are bit-identical to
/// the scalar stage given the same exponentials, and the backward uses the scalar formulas in the scalar order.
/// TransposedBlock<I, Tau> says whether (I, τ) has it and how its blocks are transposed: AVX-512 for every τ from 1
/// to 16 (16 chunks per block; powers of two by permutes, the others by masked loads and stores around a 16×16
/// register transpose), AVX2 for τ = 8 (8 chunks; other τ run the scalar stage there).
template <Isa I, int Tau>
struct TransposedBlock {
  static constexpr bool available = false;
};

/// Whether hashing Scalar values with τ on I has the lane-parallel stage.
template <Isa I, int Tau, class Scalar>
inline constexpr bool has_transposed_stage =
    I != Isa::Scalar && std::is_same_v<Scalar, float> && TransposedBlock<I, Tau>::available;

#if defined(MEMORYFORMER_HAVE_AVX512)
/// in[0..T): 16·T consecutive elements; out[j] = the 16 elements ≡ j (mod T), in order.
template <int T>
MEMORYFORMER_ALWAYS_INLINE void deinterleave16(const __m512* in, __m512* out) {
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
MEMORYFORMER_ALWAYS_INLINE void interleave16(const __m512* in, __m512* out) {
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

// τ = 8, the paper's setting, transposes differently: two-source permutes (vpermt2ps) are slow cross-lane operations
// on Zen 4, and the 24 of deinterleave16<8> were a large share of the hashing time. A 4×4 transpose inside each 128-bit
// lane (unpack instructions, cheap on every AVX-512 core) followed by one 128-bit-lane shuffle per vector does the
// same work with 8 cross-lane operations instead of 24. It leaves the 16 chunks in the lane order below, which the
// codes and scores undo with one permute each as they are stored.

/// Lane l of the τ = 8 transposed vectors holds chunk chunk_of_lane8[l].
inline __m512i chunk_of_lane8() { return _mm512_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15); }
/// Its inverse: chunk c is in lane lane_of_chunk8[c].
inline __m512i lane_of_chunk8() { return _mm512_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15); }

/// in[0..8): 16 chunks of 8 consecutive elements (in[i] holds chunks 2i and 2i + 1, one 128-bit lane per half
/// chunk); out[j] = element j of the 16 chunks, in the lane order chunk_of_lane8.
MEMORYFORMER_ALWAYS_INLINE void deinterleave8(const __m512* in, __m512* out) {
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
MEMORYFORMER_ALWAYS_INLINE void interleave8(const __m512* in, __m512* out) {
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

/// AVX-512: the transposes are τ·log2(τ) two-source permutes per 16 chunks, except for τ = 8 (deinterleave8).
template <int Tau>
  requires(Tau == 1 || Tau == 2 || Tau == 4 || Tau == 8 || Tau == 16)
struct TransposedBlock<Isa::Avx512, Tau> {
  static constexpr bool available = true;
  MEMORYFORMER_ALWAYS_INLINE static void load(const float* z, __m512* zt) {
    __m512 v[Tau];
    for (int i = 0; i < Tau; ++i) v[i] = _mm512_loadu_ps(z + 16 * i);
    if constexpr (Tau == 8)
      deinterleave8(v, zt);
    else
      deinterleave16<Tau>(v, zt);
  }
  MEMORYFORMER_ALWAYS_INLINE static void store(float* z, const __m512* zt) {
    __m512 v[Tau];
    if constexpr (Tau == 8)
      interleave8(zt, v);
    else
      interleave16<Tau>(zt, v);
    for (int i = 0; i < Tau; ++i) _mm512_storeu_ps(z + 16 * i, v[i]);
  }
  /// Per-chunk vectors from lane order to chunk order and back (a permute only for τ = 8).
  static __m512i to_chunk_order(__m512i v) { return Tau == 8 ? _mm512_permutexvar_epi32(lane_of_chunk8(), v) : v; }
  static __m512 to_chunk_order(__m512 v) { return Tau == 8 ? _mm512_permutexvar_ps(lane_of_chunk8(), v) : v; }
  static __m512 to_lane_order(__m512 v) { return Tau == 8 ? _mm512_permutexvar_ps(chunk_of_lane8(), v) : v; }
};

/// AVX-512, τ not a power of two (ML2's τ + e = 10 by default): each chunk's τ elements loaded into a row of a
/// 16×16 matrix (masked loads), transposed in registers (rows j < τ are then element j of the 16 chunks), and back
/// the same way with masked stores. The lanes are in chunk order. The values are only moved, as by the permutes.
template <int Tau>
  requires(Tau >= 3 && Tau <= 16 && (Tau & (Tau - 1)) != 0)
struct TransposedBlock<Isa::Avx512, Tau> {
  static constexpr bool available = true;
  static constexpr __mmask16 chunk_mask = __mmask16((1u << Tau) - 1u);
  MEMORYFORMER_ALWAYS_INLINE static void load(const float* z, __m512* zt) {
    __m512 r[16];
    for (int c = 0; c < 16; ++c) r[c] = _mm512_maskz_loadu_ps(chunk_mask, z + c * Tau);
    transpose16x16(r);
    for (int j = 0; j < Tau; ++j) zt[j] = r[j];
  }
  MEMORYFORMER_ALWAYS_INLINE static void store(float* z, const __m512* zt) {
    __m512 r[16];
    for (int j = 0; j < 16; ++j) r[j] = j < Tau ? zt[j] : _mm512_setzero_ps();
    transpose16x16(r);
    for (int c = 0; c < 16; ++c) _mm512_mask_storeu_ps(z + c * Tau, chunk_mask, r[c]);
  }
  static __m512i to_chunk_order(__m512i v) { return v; }
  static __m512 to_chunk_order(__m512 v) { return v; }
  static __m512 to_lane_order(__m512 v) { return v; }
};
#endif

#if defined(MEMORYFORMER_HAVE_AVX2)
/// AVX2, τ = 8: one chunk per row of an 8×8 transpose; the lanes are in chunk order.
template <>
struct TransposedBlock<Isa::Avx2, 8> {
  static constexpr bool available = true;
  MEMORYFORMER_ALWAYS_INLINE static void load(const float* z, __m256* zt) {
    for (int i = 0; i < 8; ++i) zt[i] = _mm256_loadu_ps(z + 8 * i);
    transpose8x8(zt);
  }
  MEMORYFORMER_ALWAYS_INLINE static void store(float* z, const __m256* zt) {
    __m256 v[8];
    for (int i = 0; i < 8; ++i) v[i] = zt[i];
    transpose8x8(v);
    for (int i = 0; i < 8; ++i) _mm256_storeu_ps(z + 8 * i, v[i]);
  }
  static __m256i to_chunk_order(__m256i v) { return v; }
  static __m256 to_chunk_order(__m256 v) { return v; }
  static __m256 to_lane_order(__m256 v) { return v; }
};
#endif

#if defined(MEMORYFORMER_HAVE_AVX512) || defined(MEMORYFORMER_HAVE_AVX2)
/// Per-chunk quantities of one transposed block: exponentials e_j, Σ|z| (l1) or max|z| (paper: only to make an
/// infinite z show, see chunk_codes_and_scores), 1/Π(1 + e_j), codes — in the scalar order.
template <Isa I, int Tau, bool L1>
struct ChunkStats {
  using O = VectorOps<I>;
  using V = typename O::V;
  V e[Tau];
  V abs_sum;  // Σ|z| for l1, max|z| for paper
  V product;
  typename O::VI code;
  MEMORYFORMER_ALWAYS_INLINE ChunkStats(const V* zt, V factor, V max_abs) {
    const V one = O::set1(1.0f);
    abs_sum = O::zero();
    code = O::zero_int();
    V a[Tau];
    for (int j = 0; j < Tau; ++j) {
      code = O::or_if_nonnegative(code, zt[j], 1 << (Tau - 1 - j));
      a[j] = O::abs(zt[j]);
      abs_sum = L1 ? O::add(abs_sum, a[j]) : O::max(abs_sum, a[j]);
    }
    // Every |z| of a chunk is ≤ abs_sum (a sum or the maximum of non-negative values), so where abs_sum ≤ max_abs in
    // every lane the clamp min(|z|, max_abs) would return |z| itself and is skipped: the same bits, Tau minimums
    // fewer per block. A NaN fails the test and takes the clamped path, which keeps it.
    if (O::all_less_equal(abs_sum, max_abs)) {
      for (int j = 0; j < Tau; ++j) e[j] = fast_exp2_of_product<I>(a[j], factor);
    } else {
      for (int j = 0; j < Tau; ++j) e[j] = exp_of_abs_vector<I>(a[j], factor, max_abs);
    }
    V denominator = one;
    for (int j = 0; j < Tau; ++j) denominator = O::fmadd(denominator, e[j], denominator);  // fused_grow
    product = O::div(one, denominator);
  }
  /// The chunk scores, as chunk_codes_and_scores computes them.
  MEMORYFORMER_ALWAYS_INLINE V scores() const {
    return L1 ? O::mul(abs_sum, product) : O::fmadd(abs_sum, O::zero(), product);
  }
};

/// How far ahead of its reads the hash requests its input (into L1). The input of a prefill-sized call often comes
/// from DRAM (the lookup after the previous hash streamed the tables through the caches). 6 KB was the best distance
/// tried: 2 and 4 KB help less, 8 and 16 KB into L2 do not help, and every second line only is worse than none
/// (see docs/performance-log.md). Steps whose window passes the row's end skip the prefetch instead of checking
/// each line, so that input already in cache costs nothing extra.
inline constexpr Index hash_prefetch_bytes = 6144;

/// Requests the input of chunks [c, c + chunks) hash_prefetch_bytes ahead of z + c·Tau: the input is read once, in
/// order, and more of it in flight than the hardware prefetcher keeps helps when it comes from DRAM. Nothing past the
/// row's end (block_chunks chunks) is requested.
template <int Tau>
inline void prefetch_input_ahead(const float* z, Index c, Index chunks, Index block_chunks) {
  constexpr Index ahead = hash_prefetch_bytes / Index(sizeof(float));
  if ((c + chunks) * Tau + ahead > block_chunks * Tau) return;  // the row ends within reach
  const float* p = z + c * Tau + ahead;
  // A fixed count of lines from p, unrolled (not prefetch_range, whose aligned runtime loop costs more here).
  for (Index i = 0; i < chunks * Tau; i += 16) prefetch_line(p + i);
}

/// Codes and scores of one row's chunks [0, block_chunks) (a multiple of VectorOps<I>::n); contiguous rows come
/// here as one row.
template <Isa I, int Tau, bool L1>
inline void hash_row_transposed(std::int32_t* codes, float* scores, const float* z, Index block_chunks,
                                const ExpArgument<float>& arg) {
  using O = VectorOps<I>;
  using B = TransposedBlock<I, Tau>;
  const auto factor = O::set1(arg.factor), max_abs = O::set1(arg.max_abs);
  auto store = [&](Index c, const ChunkStats<I, Tau, L1>& st) {
    O::store_int(codes + c, B::to_chunk_order(st.code));
    O::store(scores + c, B::to_chunk_order(st.scores()));
  };
  // AVX-512: two blocks per step. One block is a long dependency chain (transpose, exponentials, the product, a
  // division); written side by side, two chains hide each other's latency. Three or four blocks run out of vector
  // registers, and so do two on AVX2's 16 registers, which keep one.
  Index c = 0;
  if constexpr (I == Isa::Avx512) {
    for (; c + 2 * O::n <= block_chunks; c += 2 * O::n) {
      prefetch_input_ahead<Tau>(z, c, 2 * O::n, block_chunks);
      typename O::V first[Tau], second[Tau];
      B::load(z + c * Tau, first);
      B::load(z + (c + O::n) * Tau, second);
      const ChunkStats<I, Tau, L1> first_stats(first, factor, max_abs), second_stats(second, factor, max_abs);
      store(c, first_stats);
      store(c + O::n, second_stats);
    }
  }
  for (; c < block_chunks; c += O::n) {
    prefetch_input_ahead<Tau>(z, c, O::n, block_chunks);
    typename O::V zt[Tau];
    B::load(z + c * Tau, zt);
    store(c, ChunkStats<I, Tau, L1>(zt, factor, max_abs));
  }
}

/// dx of one row's chunks [0, block_chunks), the scalar formulas of hash_backward_rows in the same operation order.
template <Isa I, int Tau, bool L1>
inline void hash_backward_row_transposed(float* dz, const float* z, const float* ds, Index block_chunks,
                                         const ExpArgument<float>& arg) {
  using O = VectorOps<I>;
  using B = TransposedBlock<I, Tau>;
  using V = typename O::V;
  const V factor = O::set1(arg.factor), max_abs = O::set1(arg.max_abs);
  const V one = O::set1(1.0f), two = O::set1(2.0f), two_over_t = O::set1(-arg.neg_scale);
  for (Index c = 0; c < block_chunks; c += O::n) {
    prefetch_input_ahead<Tau>(z, c, O::n, block_chunks);
    V zt[Tau], dzt[Tau];
    B::load(z + c * Tau, zt);
    const ChunkStats<I, Tau, L1> st(zt, factor, max_abs);
    const V dsv = B::to_lane_order(O::load(ds + c));
    for (int j = 0; j < Tau; ++j) {
      const V sign = O::sign(zt[j]);
      const V sigma_neg = O::div(st.e[j], O::add(one, st.e[j]));
      const V ds_dz = L1 ? O::mul(O::mul(sign, st.product), O::add(one, O::mul(O::mul(two, st.abs_sum), sigma_neg)))
                         : O::mul(O::mul(O::mul(st.product, two_over_t), sign), sigma_neg);
      dzt[j] = O::mul(dsv, ds_dz);
    }
    B::store(dz + c * Tau, dzt);
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
  const ExpArgument<Scalar> arg(neg_scale);
  // Contiguous rows are hashed as one long row: the lane-parallel stage then runs without a break (and a tail) per
  // row.
  if (x_stride == tables * Tau) {
    tables *= rows;
    rows = 1;
  }
  for (Index n = 0; n < rows; ++n) {
    const Scalar* z = x + n * x_stride;
    Index first = 0;
    if constexpr (has_transposed_stage<isa, Tau, Scalar>) {
      first = tables / VectorOps<isa>::n * VectorOps<isa>::n;
      if (l1)
        hash_row_transposed<isa, Tau, true>(codes + n * tables, scores + n * tables, z, first, arg);
      else
        hash_row_transposed<isa, Tau, false>(codes + n * tables, scores + n * tables, z, first, arg);
    }
    for (Index c0 = first; c0 < tables; c0 += block_chunks) {
      const Index chunks = std::min(block_chunks, tables - c0);
      exp_of_abs<isa>(e, z + c0 * Tau, chunks * Tau, arg);
      chunk_codes_and_scores<Tau>(codes + n * tables + c0, scores + n * tables + c0, z + c0 * Tau, e, chunks, l1);
    }
  }
}

/// dx = dscore · ∂s/∂z for every element (design §1.6), sign(0) = 0:
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
  // Contiguous rows (input, output and score gradients) are one long row, as in hash_rows: the input requests ahead
  // then run across rows instead of stopping at each row's end.
  if (x_stride == tables * Tau && dx_stride == tables * Tau && dscores_stride == tables) {
    tables *= rows;
    rows = 1;
  }
  for (Index n = 0; n < rows; ++n) {
    const Scalar* z = x + n * x_stride;
    Scalar* dz = dx + n * dx_stride;
    Index first = 0;
    if constexpr (has_transposed_stage<isa, Tau, Scalar>) {
      first = tables / VectorOps<isa>::n * VectorOps<isa>::n;
      if (l1)
        hash_backward_row_transposed<isa, Tau, true>(dz, z, dscores + n * dscores_stride, first, arg);
      else
        hash_backward_row_transposed<isa, Tau, false>(dz, z, dscores + n * dscores_stride, first, arg);
    }
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
