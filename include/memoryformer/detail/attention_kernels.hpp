// SPDX-License-Identifier: MIT
// Tiled causal attention (FlashAttention-2's scheme, §6): the kernels behind nn/attention.hpp.
// A (sequence, head) is cut into query tiles and key tiles of attention_tile rows. Forward keeps, per
// query row, a running maximum m and sum l of the exponentials and an unnormalised output, so no s × s matrix
// exists; backward recomputes the probabilities of one tile at a time from the log-sum-exp the forward kept.
// Tiles wholly above the causal diagonal are never visited; a tile the diagonal crosses is masked in the loop, and
// its products skip, band by band (attention_band), most of its part above the diagonal.
// The products inside a tile: in float on a vector ISA with dh a multiple of the vector width, tile_product, a
// register-blocked kernel (6 rows × 64 columns of accumulators on AVX-512) whose B operand is a tile transposed
// once (Qᵀ of the query tile in forward and decode, which then keep the scores key-major; Kᵀ and Vᵀ of the key tile
// in backward), which beats Eigen's general product at these 64-sized operands because it packs nothing per call;
// otherwise (double, the scalar path, other dh) Eigen's products of the tile blocks. The exponentials go through
// fast_exp.hpp's exponential (float), vectorised per ISA; exp_shifted_row's vector paths are bit-identical to its
// scalar path. Every work item is computed by one thread in a fixed order: the bits do not depend on the thread
// count.
#pragma once

#include <algorithm>
#include <cmath>
#include <compare>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "../types.hpp"
#include "attention_decode_rows.hpp"
#include "checked_size.hpp"
#include "checks.hpp"
#include "fast_exp.hpp"
#include "half.hpp"
#include "parallel.hpp"
#include "register_transpose.hpp"
#include "simd.hpp"
#include "vector_ops.hpp"

namespace memoryformer::detail {

/// Rows of a query tile and keys of a key tile: a 64 × 64 float tile is 16 KiB, so a tile of scores and the Q, K,
/// V tiles of dh = 64 fit in L2 together, and 64 is a multiple of every vector width.
inline constexpr Index attention_tile = 64;

/// Query rows per step in backward: per key tile, the query rows below it are taken this many at a time, so each of
/// the five products of a step reuses the key tile's operand over 256 rows instead of 64.
inline constexpr Index attention_backward_rows = 256;

/// Rows of a band of a tile the causal diagonal crosses: the products of such a tile run band by band, each over the
/// keys (or query rows) its band can see, so about 3/8 of the tile's work above the diagonal is skipped; a multiple
/// of every vector width.
inline constexpr Index attention_band = 16;

/// Keys per block when decode splits the cache between threads (few new tokens against a long cache); fixed, so
/// the merge order, and therefore the bits, do not depend on the thread count.
inline constexpr Index attention_decode_key_block = 256;

/// Whether the tile products of a head of width dh go through tile_product<I> (float, a vector ISA, dh a multiple
/// of the vector width) rather than Eigen's matrix product.
template <Isa I, class Scalar>
constexpr bool attention_vector_path_compiled() {
#if defined(MEMORYFORMER_HAVE_AVX512) || defined(MEMORYFORMER_HAVE_AVX2)
  return I != Isa::Scalar && std::is_same_v<Scalar, float>;
#else
  return false;
#endif
}

template <Isa I, class Scalar>
bool attention_vector_path(Index dh) {
  if constexpr (attention_vector_path_compiled<I, Scalar>()) {
    return dh % VectorOps<I>::n == 0;
  } else {
    (void)dh;
    return false;
  }
}

#if defined(MEMORYFORMER_HAVE_AVX512) || defined(MEMORYFORMER_HAVE_AVX2)
MEMORYFORMER_SIMD_WARNINGS_BEGIN
/// R rows × NV vectors of C (+)= A B over k < K: the NV vectors of row k of B are loaded once and used by all R
/// rows, each row's A(i, k) broadcast, so one inner step is NV loads, R broadcasts and R·NV independent FMAs.
template <Isa I, int R, int NV>
inline void tile_product_block(float* C, Index ldc, const float* A, Index a_row, Index a_col, const float* B,
                               Index ldb, Index K, bool accumulate) {
  using O = VectorOps<I>;
  // Fully unrolled, so that c and b live in registers.
  typename O::V c[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) c[r][v] = accumulate ? O::load(C + r * ldc + v * O::n) : O::zero();
  for (Index k = 0; k < K; ++k) {
    typename O::V b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = O::load(B + k * ldb + v * O::n);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const auto a = O::set1(A[r * a_row + k * a_col]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[r][v] = O::fmadd(a, b[v], c[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) O::store(C + r * ldc + v * O::n, c[r][v]);
}

template <Isa I, int NV>
inline void tile_product_columns(float* C, Index ldc, const float* A, Index a_row, Index a_col, const float* B,
                                 Index ldb, Index M, Index K, bool accumulate) {
  // 6 rows × 4 vectors = 24 accumulators of AVX-512's 32 registers; AVX2 has 16, so 2 rows.
  constexpr int rows = I == Isa::Avx512 ? 6 : 2;
  Index i = 0;
  for (; i + rows <= M; i += rows)
    tile_product_block<I, rows, NV>(C + i * ldc, ldc, A + i * a_row, a_row, a_col, B, ldb, K, accumulate);
  auto tail = [&]<int R>(std::integral_constant<int, R>) {
    tile_product_block<I, R, NV>(C + i * ldc, ldc, A + i * a_row, a_row, a_col, B, ldb, K, accumulate);
  };
  switch (M - i) {
    case 0: break;
    case 1: tail(std::integral_constant<int, 1>{}); break;
    case 2: tail(std::integral_constant<int, 2>{}); break;
    case 3: tail(std::integral_constant<int, 3>{}); break;
    case 4: tail(std::integral_constant<int, 4>{}); break;
    default: tail(std::integral_constant<int, 5>{}); break;
  }
}

/// C [M, N] (+)= A [M, K] · B [K, N] for the tiles of attention: C and B row-major (leading dimensions ldc, ldb),
/// A(i, k) = A[i·a_row + k·a_col], so a transposed tile is A with the strides swapped. N is a multiple of the
/// vector width. Each entry of C is one chain of FMAs in increasing k, whatever the thread count.
template <Isa I>
inline void tile_product(float* C, Index ldc, const float* A, Index a_row, Index a_col, const float* B, Index ldb,
                         Index M, Index N, Index K, bool accumulate) {
  constexpr Index w = VectorOps<I>::n;
  for (Index n0 = 0; n0 < N; n0 += 4 * w) {
    switch (std::min<Index>(4, (N - n0) / w)) {
      case 1: tile_product_columns<I, 1>(C + n0, ldc, A, a_row, a_col, B + n0, ldb, M, K, accumulate); break;
      case 2: tile_product_columns<I, 2>(C + n0, ldc, A, a_row, a_col, B + n0, ldb, M, K, accumulate); break;
      case 3: tile_product_columns<I, 3>(C + n0, ldc, A, a_row, a_col, B + n0, ldb, M, K, accumulate); break;
      default: tile_product_columns<I, 4>(C + n0, ldc, A, a_row, a_col, B + n0, ldb, M, K, accumulate); break;
    }
  }
}
MEMORYFORMER_SIMD_WARNINGS_END
#endif

/// The transpose of rows [0, count) of one head's [·, dh] block K into out [dh, ld] row-major (column j = row j),
/// zero in columns [count, ld): the B operand of a tile product (Qᵀ of a query tile, Kᵀ or Vᵀ of a key tile), read
/// contiguously. On a vector path whole n × n blocks are transposed in registers (transpose_block; the same values,
/// only moved).
template <Isa I, class Scalar, class KBlock>
void pack_transposed_rows(Scalar* out, Index ld, const KBlock& K, Index count) {
  const Index dh = K.cols();
  for (Index c = 0; c < dh; ++c) std::fill(out + c * ld + count, out + (c + 1) * ld, Scalar(0));
  const Scalar* keys = K.data();  // row j at keys + j·K.outerStride()
  const Index stride = K.outerStride();
  Index whole = 0;  // keys [0, whole) done in blocks
#if defined(MEMORYFORMER_HAVE_AVX512) || defined(MEMORYFORMER_HAVE_AVX2)
  if constexpr (attention_vector_path_compiled<I, Scalar>()) {
    constexpr Index n = VectorOps<I>::n;
    if (dh % n == 0) {
      whole = count / n * n;
      for (Index j0 = 0; j0 < whole; j0 += n)
        for (Index c0 = 0; c0 < dh; c0 += n)
          transpose_block<I>(out + c0 * ld + j0, ld, keys + j0 * stride + c0, stride);
    }
  }
#endif
  // 16 keys at a time: 16 rows of K read, then 16 consecutive values written per row of out.
  for (Index j0 = whole; j0 < count; j0 += 16) {
    const Index n = std::min<Index>(16, count - j0);
    for (Index c = 0; c < dh; ++c)
      for (Index j = 0; j < n; ++j) out[c * ld + j0 + j] = keys[(j0 + j) * stride + c];
  }
}

/// Kᵀ of a key tile, [dh, attention_tile] row-major: column j is key k0 + j, columns past `cols` are zero (so a
/// partial tile's products run on whole vectors).
template <Isa I, class Scalar, class KBlock>
void pack_transposed_tile(Scalar* out, const KBlock& K, Index k0, Index cols) {
  pack_transposed_rows<I>(out, attention_tile, K.middleRows(k0, cols), cols);
}

/// Columns of a tile's product rounded up to whole vectors of I.
template <Isa I>
Index attention_padded_cols(Index cols) {
  if constexpr (I == Isa::Scalar) {
    return cols;
  } else {
    constexpr Index w = VectorOps<I>::n;
    return (cols + w - 1) / w * w;
  }
}

/// The running state of softmax rows over key tiles (one per query row of a tile): m the largest scaled score
/// seen, l = Σ exp(score − m), acc = Σ exp(score − m)·v (unnormalised output).
template <class Scalar>
struct OnlineSoftmax {
  Vector<Scalar> m;  // [rows]
  Vector<Scalar> l;  // [rows]
  Matrix<Scalar> acc;  // [rows, dh]
  void reset(Index rows, Index dh) {
    resize_buffer(m, rows);
    resize_buffer(l, rows);
    m.setConstant(-std::numeric_limits<Scalar>::infinity());
    l.setZero();
    zeroed_buffer(acc, rows, dh);
  }
};

/// Per-thread scratch of the forward and decode kernels.
template <class Scalar>
struct AttentionTileScratch {
  Matrix<Scalar> scores = Matrix<Scalar>(attention_tile, attention_tile);  // [tile, tile] S (Sᵀ: vector path), then P
  Matrix<Scalar> qt;  // [dh, tile] Qᵀ of the query rows (vector path)
};

#if defined(MEMORYFORMER_HAVE_AVX512) || defined(MEMORYFORMER_HAVE_AVX2)
MEMORYFORMER_SIMD_WARNINGS_BEGIN
/// The online-softmax step of one key tile on a vector path, with the scores key-major: St [cols, attention_tile]
/// holds St(j, i) = ⟨k_j, q_i⟩, so a vector holds one key's scores for consecutive queries and every reduction over
/// keys is a lane-wise one. Query i (i < rows) sees keys j < valid(i) = clamp(offset + i + 1, 0, cols). Per query
/// with valid(i) > 0: m' = max(m, scale·max_j St(j, i)), P(j, i) = exp(scale·St(j, i) − m') in place (zero for
/// masked keys and for the padding queries past rows), l ← l·exp(m − m') + Σ_j P(j, i) summed in key order,
/// acc ← acc·exp(m − m'), m ← m'; a query whose maximum did not grow is not rescaled (its factor would be exactly 1).
/// A query with valid(i) = 0 keeps its state and gets P = 0.
template <Isa I>
void online_softmax_columns(OnlineSoftmax<float>& state, float* St, Index rows, Index cols, float scale,
                            Index offset) {
  using O = VectorOps<I>;
  constexpr Index n = O::n, ld = attention_tile;
  constexpr float none = -std::numeric_limits<float>::infinity();
  const Index dh = state.acc.cols();
  for (Index i0 = 0; i0 < rows; i0 += n) {
    alignas(64) float valid[n], largest[n], shift[n], sum[n];
    bool masked = false;  // some lane sees fewer than all `cols` keys
    for (Index lane = 0; lane < n; ++lane) {
      const Index i = i0 + lane;
      const Index v = i < rows ? std::clamp<Index>(offset + i + 1, 0, cols) : 0;
      valid[lane] = float(v);
      masked = masked || v < cols;
    }
    const auto vvalid = O::load(valid), vnone = O::set1(none), vzero = O::zero();
    auto vmax = vnone;
    if (masked) {
      for (Index j = 0; j < cols; ++j)
        vmax = O::max(vmax, O::select_if_less(O::set1(float(j)), vvalid, O::load(St + j * ld + i0), vnone));
    } else {
      for (Index j = 0; j < cols; ++j) vmax = O::max(vmax, O::load(St + j * ld + i0));
    }
    O::store(largest, vmax);
    for (Index lane = 0; lane < n; ++lane) {
      const Index i = i0 + lane;
      shift[lane] = i < rows && valid[lane] > 0 ? std::max(state.m(i), largest[lane] * scale) : 0.0f;
    }
    const auto vscale = O::set1(scale), vshift = O::load(shift);
    auto vsum = vzero;
    for (Index j = 0; j < cols; ++j) {
      float* at = St + j * ld + i0;
      auto p = exp_clamped<I>(O::fmsub(O::load(at), vscale, vshift));
      if (masked) p = O::select_if_less(O::set1(float(j)), vvalid, p, vzero);
      O::store(at, p);
      vsum = O::add(vsum, p);
    }
    O::store(sum, vsum);
    for (Index lane = 0; lane < n; ++lane) {
      const Index i = i0 + lane;
      if (i >= rows || valid[lane] == 0) continue;
      const float m_old = state.m(i), m_new = shift[lane];
      if (m_old != none && m_new != m_old) {
        const float alpha = std::exp(m_old - m_new);  // one per query and tile: std::exp on every path
        state.l(i) *= alpha;
        float* acc = state.acc.data() + i * dh;
        const auto va = O::set1(alpha);
        for (Index c = 0; c < dh; c += n) O::store(acc + c, O::mul(va, O::load(acc + c)));
      }
      state.l(i) += sum[lane];
      state.m(i) = m_new;
    }
  }
}

/// attend_key_range on a vector path (float, dh a multiple of the vector width): Qᵀ of the query rows is packed once,
/// then per key tile Sᵀ = K_tile Qᵀ (its B operand, Qᵀ, stays in L1 across the tiles and K needs no packing), the
/// key-major online softmax (online_softmax_columns), and acc += P V with P read as the transpose of Sᵀ.
template <Isa I, class QBlock, class KBlock, class VBlock>
void attend_key_range_columns(OnlineSoftmax<float>& state, AttentionTileScratch<float>& scratch, const QBlock& Q,
                              Index q_position, const KBlock& K, const VBlock& V, Index k_begin, Index k_end,
                              float scale) {
  const Index rows = Q.rows(), dh = Q.cols();
  const Index queries = attention_padded_cols<I>(rows);  // Sᵀ's columns: whole vectors, the padding Qᵀ's zeros
  resize_buffer(scratch.qt, dh, attention_tile);
  pack_transposed_rows<I>(scratch.qt.data(), attention_tile, Q, rows);
  constexpr Index w = VectorOps<I>::n, ld = attention_tile, band = attention_band;
  float* const St = scratch.scores.data();  // [cols, attention_tile]
  for (Index k0 = k_begin; k0 < k_end; k0 += attention_tile) {
    const Index cols = std::min(attention_tile, k_end - k0), offset = q_position - k0;  // query i sees j ≤ i + offset
    const float* keys = K.data() + k0 * K.outerStride();
    const float* values = V.data() + k0 * V.outerStride();
    // Without the diagonal in the tile every query sees every key: one product each. With it, Sᵀ's key bands start
    // at the vector of the first query that sees them, and P V's query bands stop at the last key they see (entries
    // left out are masked, so the softmax never uses them, and P is zero there).
    const bool whole = offset + 1 >= cols;
    for (Index j0 = 0; j0 < cols; j0 += whole ? cols : band) {
      const Index c0 = whole ? 0 : std::clamp<Index>(j0 - offset, 0, queries) / w * w;
      if (c0 < queries)
        tile_product<I>(St + j0 * ld + c0, ld, keys + j0 * K.outerStride(), K.outerStride(), 1,
                        scratch.qt.data() + c0, ld, whole ? cols : std::min(band, cols - j0), queries - c0, dh,
                        false);
    }
    online_softmax_columns<I>(state, St, rows, cols, scale, offset);
    for (Index i0 = 0; i0 < rows; i0 += whole ? rows : band) {
      const Index seen = whole ? cols : std::clamp<Index>(i0 + band + offset, 0, cols);
      if (seen > 0)
        tile_product<I>(state.acc.data() + i0 * dh, dh, St + i0, 1, ld, values, V.outerStride(),
                        whole ? rows : std::min(band, rows - i0), dh, seen, true);
    }
  }
}
MEMORYFORMER_SIMD_WARNINGS_END
#endif

/// Folds keys [k_begin, k_end) of one head into `state` for the query rows Q (query row i at position
/// q_position + i, which attends keys at positions ≤ q_position + i); K and V hold that head's keys and values at
/// positions 0 … (row index). Per key tile: S = Q Kᵀ, m' = max(m, scale·max_j S), P = exp(scale·S − m'),
/// l ← l·exp(m − m') + Σ_j P, acc ← acc·exp(m − m') + P V, m ← m'. Float with dh a multiple of a vector ISA's width
/// goes through attend_key_range_columns; otherwise Eigen's products of the tile blocks.
template <Isa I, class Scalar, class QBlock, class KBlock, class VBlock>
void attend_key_range(OnlineSoftmax<Scalar>& state, AttentionTileScratch<Scalar>& scratch, const QBlock& Q,
                      Index q_position, const KBlock& K, const VBlock& V, Index k_begin, Index k_end, Scalar scale) {
  const Index rows = Q.rows();
  const Index last_position = q_position + rows - 1;
  k_end = std::min(k_end, last_position + 1);  // key tiles wholly above the diagonal are skipped
  if (k_begin >= k_end) return;
#if defined(MEMORYFORMER_HAVE_AVX512) || defined(MEMORYFORMER_HAVE_AVX2)
  if constexpr (attention_vector_path_compiled<I, Scalar>()) {
    if (attention_vector_path<I, Scalar>(Q.cols()))
      return attend_key_range_columns<I>(state, scratch, Q, q_position, K, V, k_begin, k_end, scale);
  }
#endif
  for (Index k0 = k_begin; k0 < k_end; k0 += attention_tile) {
    const Index cols = std::min(attention_tile, k_end - k0);
    auto S = scratch.scores.topLeftCorner(rows, cols);  // [rows, cols], leading dimension attention_tile
    S.noalias() = Q * K.middleRows(k0, cols).transpose();
    // Keys k0 … k0 + valid(i) − 1 are at or before query i's position: the causal mask of this tile, row by row.
    for (Index i = 0; i < rows; ++i) {
      const Index valid = std::clamp<Index>(q_position + i - k0 + 1, 0, cols);
      Scalar* row = S.row(i).data();
      if (valid == 0) {
        S.row(i).setZero();
        continue;
      }
      const Scalar m_new = std::max(state.m(i), S.row(i).head(valid).maxCoeff() * scale);
      exp_shifted_row<I>(row, row, valid, scale, m_new);
      S.row(i).tail(cols - valid).setZero();
      if (state.m(i) != -std::numeric_limits<Scalar>::infinity()) {
        const Scalar alpha = std::exp(state.m(i) - m_new);  // one per row and tile: std::exp on every path
        state.l(i) *= alpha;
        state.acc.row(i) *= alpha;
      }
      state.l(i) += S.row(i).head(valid).sum();
      state.m(i) = m_new;
    }
    state.acc.noalias() += S * V.middleRows(k0, cols);
  }
}

/// Merges `from` into `into` (same rows): the softmax over the union of both key ranges.
template <class Scalar>
void merge_online_softmax(OnlineSoftmax<Scalar>& into, const OnlineSoftmax<Scalar>& from) {
  constexpr Scalar none = -std::numeric_limits<Scalar>::infinity();
  for (Index i = 0; i < into.m.size(); ++i) {
    if (from.m(i) == none) continue;
    if (into.m(i) == none) {
      into.m(i) = from.m(i);
      into.l(i) = from.l(i);
      into.acc.row(i) = from.acc.row(i);
      continue;
    }
    const Scalar m = std::max(into.m(i), from.m(i));
    const Scalar a = std::exp(into.m(i) - m), b = std::exp(from.m(i) - m);
    into.l(i) = into.l(i) * a + from.l(i) * b;
    into.acc.row(i) = into.acc.row(i) * a + from.acc.row(i) * b;
    into.m(i) = m;
  }
}

/// A new token's head whose attention is not finite: new token `token` of sequence `sequence`, head `head`.
struct DecodeSite {
  Index sequence;
  Index token;
  Index head;
  auto operator<=>(const DecodeSite&) const = default;  // (sequence, token, head) order
};

/// The end of a decode: merges each group's `blocks` partial states in block order into its first (group g's at
/// partial[g·blocks …]) and normalises it in place, acc ← acc/l; then, unless some row's log-sum-exp or output is
/// not finite (a score or value that is not, or a sum beyond the type's range), writes every group through
/// write(g, state). Otherwise nothing is written and the result is the least site(g, row) over the groups' first
/// such rows, (sequence, token, head) in order, whichever way the kernel groups its rows. Groups are merged on any
/// thread, each in a fixed order: the bits do not depend on the thread count.
template <class Scalar, class Site, class Write>
[[nodiscard]] std::optional<DecodeSite> finish_decode(std::vector<OnlineSoftmax<Scalar>>& partial, Index groups,
                                                      Index blocks, Site&& site, Write&& write) {
  std::vector<Index> fault(size_t(groups), -1);  // per group, its first row that is not finite
  parallel_claims(groups, [&](WorkQueue& queue) {
    for (Index g = queue.claim(); g >= 0; g = queue.claim()) {
      auto& state = partial[size_t(g * blocks)];
      for (Index block = 1; block < blocks; ++block) merge_online_softmax(state, partial[size_t(g * blocks + block)]);
      bool finite = true;
      for (Index i = 0; i < state.m.size(); ++i) {
        state.acc.row(i) *= Scalar(1) / state.l(i);
        finite = finite && std::isfinite(state.m(i) + std::log(state.l(i)));
      }
      if (finite && all_finite_block(state.acc)) continue;
      for (Index i = 0; i < state.m.size() && fault[size_t(g)] < 0; ++i)
        if (!std::isfinite(state.m(i) + std::log(state.l(i))) || !all_finite_block(state.acc.row(i)))
          fault[size_t(g)] = i;
    }
  });
  std::optional<DecodeSite> first;
  for (Index g = 0; g < groups; ++g)
    if (fault[size_t(g)] >= 0 && (!first || site(g, fault[size_t(g)]) < *first)) first = site(g, fault[size_t(g)]);
  if (first) return first;
  parallel_claims(groups, [&](WorkQueue& queue) {
    for (Index g = queue.claim(); g >= 0; g = queue.claim()) write(g, std::as_const(partial[size_t(g * blocks)]));
  });
  return std::nullopt;
}

/// Causal attention forward over `batch` sequences of `seq` tokens, `heads` heads of dh columns:
/// out [batch·seq, d] = softmax(scale·Q Kᵀ + mask) V per (sequence, head), lse [batch·heads, seq] the log-sum-exp
/// of row (b·heads + h, i): m + log l, or NaN where that row's output is not finite. Work items are (sequence, head,
/// query tile), each computed by one thread.
template <Isa I, class Scalar>
void flash_attention_forward(MatrixRef<Scalar> out, Matrix<Scalar>& lse, const ConstMatrixRef<Scalar>& q,
                             const ConstMatrixRef<Scalar>& k, const ConstMatrixRef<Scalar>& v, Index batch, Index seq,
                             Index heads) {
  const Index dh = q.cols() / heads;
  const Scalar scale = Scalar(1) / std::sqrt(Scalar(dh));
  const Index tiles = (seq + attention_tile - 1) / attention_tile;
  resize_buffer(lse, batch * heads, seq);
  parallel_claims(batch * heads * tiles, [&](WorkQueue& queue) {
    OnlineSoftmax<Scalar> state;
    AttentionTileScratch<Scalar> scratch;
    for (Index item = queue.claim(); item >= 0; item = queue.claim()) {
      // Largest tiles first would balance better, but claims are in increasing order; the diagonal's cost grows
      // with the tile index, so the items are taken from the last tile backwards.
      const Index bh = item / tiles, tile = tiles - 1 - item % tiles;
      const Index b = bh / heads, h = bh % heads;
      const Index q0 = tile * attention_tile, rows = std::min(attention_tile, seq - q0);
      const auto Q = q.block(b * seq + q0, h * dh, rows, dh);   // [rows, dh]
      const auto K = k.block(b * seq, h * dh, seq, dh);         // [seq, dh]
      const auto V = v.block(b * seq, h * dh, seq, dh);         // [seq, dh]
      state.reset(rows, dh);
      attend_key_range<I>(state, scratch, Q, q0, K, V, 0, q0 + rows, scale);
      auto O = out.block(b * seq + q0, h * dh, rows, dh);  // [rows, dh]
      for (Index i = 0; i < rows; ++i) {
        O.row(i) = state.acc.row(i) * (Scalar(1) / state.l(i));
        lse(bh, q0 + i) = state.m(i) + std::log(state.l(i));
      }
      // A row whose output is not finite (a value that is not, or a sum beyond the type's range) is marked by a
      // log-sum-exp that is not finite either, so the caller's one check of lse finds it.
      if (!all_finite_block(O))
        for (Index i = 0; i < rows; ++i)
          if (!all_finite_block(O.row(i))) lse(bh, q0 + i) = std::numeric_limits<Scalar>::quiet_NaN();
    }
  });
}

/// Per-thread scratch of the backward kernel.
template <class Scalar>
struct AttentionBackwardScratch {
  Matrix<Scalar> P, dP;           // [tile, tile]
  Matrix<Scalar> dQ, dK, dV;      // [seq, dh] accumulated over tiles, unscaled dQ and dK
  Vector<Scalar> D;               // [seq] rowsum(dO ⊙ O)
  Matrix<Scalar> kt, vt;          // [dh, tile] Kᵀ and Vᵀ of the key tile (vector path)
};

/// Gradients of flash_attention_forward, FlashAttention-2's backward per (sequence, head): with D = rowsum(dO ⊙ O),
/// for every key tile j and query tile i at or below the diagonal, P = exp(scale·Q_i K_jᵀ − lse_i) (masked),
/// dV_j += Pᵀ dO_i, dP = dO_i V_jᵀ, dS = P ⊙ (dP − D_i), dQ_i += scale·dS K_j, dK_j += scale·dSᵀ Q_i.
/// Work items are (sequence, head): dK, dV and dQ of a head accumulate in one thread, in a fixed order, and are
/// written only after every read of that head's inputs (outputs may alias inputs).
template <Isa I, class Scalar>
void flash_attention_backward(MatrixRef<Scalar> dq, MatrixRef<Scalar> dk, MatrixRef<Scalar> dv,
                              const ConstMatrixRef<Scalar>& q, const ConstMatrixRef<Scalar>& k,
                              const ConstMatrixRef<Scalar>& v, const ConstMatrixRef<Scalar>& dout,
                              const Matrix<Scalar>& out, const Matrix<Scalar>& lse, Index batch, Index seq,
                              Index heads) {
  const Index dh = q.cols() / heads;
  const Scalar scale = Scalar(1) / std::sqrt(Scalar(dh));
  const bool vector_path = attention_vector_path<I, Scalar>(dh);
  // The vector path's tile products (tile_product<I>); never called on the other paths.
  auto product = [](Scalar* C, Index ldc, const Scalar* A, Index a_row, Index a_col, const Scalar* B, Index ldb,
                    Index M, Index N, Index K, bool accumulate) {
#if defined(MEMORYFORMER_HAVE_AVX512) || defined(MEMORYFORMER_HAVE_AVX2)
    if constexpr (attention_vector_path_compiled<I, Scalar>()) {
      tile_product<I>(C, ldc, A, a_row, a_col, B, ldb, M, N, K, accumulate);
      return;
    }
#endif
    (void)C, (void)ldc, (void)A, (void)a_row, (void)a_col, (void)B, (void)ldb, (void)M, (void)N, (void)K,
        (void)accumulate;
  };
  parallel_claims(batch * heads, [&](WorkQueue& queue) {
    AttentionBackwardScratch<Scalar> w;
    resize_buffer(w.P, attention_backward_rows, attention_tile);
    resize_buffer(w.dP, attention_backward_rows, attention_tile);
    if (vector_path) {
      resize_buffer(w.kt, dh, attention_tile);
      resize_buffer(w.vt, dh, attention_tile);
    }
    for (Index bh = queue.claim(); bh >= 0; bh = queue.claim()) {
      const Index b = bh / heads, h = bh % heads;
      const auto Q = q.block(b * seq, h * dh, seq, dh);      // [seq, dh]
      const auto K = k.block(b * seq, h * dh, seq, dh);      // [seq, dh]
      const auto V = v.block(b * seq, h * dh, seq, dh);      // [seq, dh]
      const auto dO = dout.block(b * seq, h * dh, seq, dh);  // [seq, dh]
      const auto O = out.block(b * seq, h * dh, seq, dh);    // [seq, dh]
      resize_buffer(w.D, seq);
      w.D = dO.cwiseProduct(O).rowwise().sum();
      zeroed_buffer(w.dQ, seq, dh);
      zeroed_buffer(w.dK, seq, dh);
      zeroed_buffer(w.dV, seq, dh);
      for (Index k0 = 0; k0 < seq; k0 += attention_tile) {
        const Index cols = std::min(attention_tile, seq - k0);
        const auto Kj = K.middleRows(k0, cols), Vj = V.middleRows(k0, cols);  // [cols, dh]
        auto dKj = w.dK.middleRows(k0, cols), dVj = w.dV.middleRows(k0, cols);  // [cols, dh]
        if (vector_path) {
          pack_transposed_tile<I>(w.kt.data(), K, k0, cols);
          pack_transposed_tile<I>(w.vt.data(), V, k0, cols);
        }
        // Query rows from k0 on: the rows above the key tile have P = 0.
        for (Index q0 = k0; q0 < seq; q0 += attention_backward_rows) {
          const Index rows = std::min(attention_backward_rows, seq - q0);
          const auto Qi = Q.middleRows(q0, rows), dOi = dO.middleRows(q0, rows);  // [rows, dh]
          auto P = w.P.topLeftCorner(rows, cols), dP = w.dP.topLeftCorner(rows, cols);  // [rows, cols]
          // Vector path: where the diagonal crosses the tile (rows [0, split) see fewer than `cols` keys), the
          // products run in bands of attention_band rows, each over the keys it sees, or of attention_band keys,
          // each over the rows that see them; entries left out have P = 0 and are never read.
          const Index offset = q0 - k0;  // row i sees keys j ≤ i + offset
          const Index split = std::clamp<Index>(cols - 1 - offset, 0, rows);
          const Index banded = std::min(rows, (split + attention_band - 1) / attention_band * attention_band);
          const auto row_bands = [&](auto&& f) {  // f(first row, rows, keys they see); bands that see none skipped
            for (Index i0 = 0; i0 < banded; i0 += attention_band) {
              const Index seen = std::min(cols, i0 + attention_band + offset);
              if (seen > 0) f(i0, std::min(attention_band, rows - i0), seen);
            }
            if (banded < rows) f(banded, rows - banded, cols);
          };
          const auto key_bands = [&](auto&& f) {  // f(first key, keys, first row that sees them)
            if (split == 0) return f(Index(0), cols, Index(0));
            for (Index j0 = 0; j0 < cols; j0 += attention_band)
              if (j0 - offset < rows) f(j0, std::min(attention_band, cols - j0), std::max<Index>(0, j0 - offset));
          };
          if (vector_path) {
            row_bands([&](Index i0, Index m, Index seen) {
              product(P.data() + i0 * attention_tile, attention_tile, Qi.data() + i0 * Qi.outerStride(),
                      Qi.outerStride(), 1, w.kt.data(), attention_tile, m, attention_padded_cols<I>(seen), dh, false);
            });
          } else {
            P.noalias() = Qi * Kj.transpose();
          }
          // Raw rows (leading dimension attention_tile): only the tile on the diagonal has masked entries.
          Scalar* const p_data = P.data();
          for (Index i = 0; i < rows; ++i) {
            const Index valid = std::clamp<Index>(q0 + i - k0 + 1, 0, cols);
            Scalar* row = p_data + i * attention_tile;
            exp_shifted_row<I>(row, row, valid, scale, lse(bh, q0 + i));
            std::fill(row + valid, row + cols, Scalar(0));
          }
          if (vector_path) {
            key_bands([&](Index j0, Index n, Index r0) {
              product(dVj.data() + j0 * dh, dh, P.data() + r0 * attention_tile + j0, 1, attention_tile,
                      dOi.data() + r0 * dOi.outerStride(), dOi.outerStride(), n, dh, rows - r0, true);
            });
            row_bands([&](Index i0, Index m, Index seen) {
              product(dP.data() + i0 * attention_tile, attention_tile, dOi.data() + i0 * dOi.outerStride(),
                      dOi.outerStride(), 1, w.vt.data(), attention_tile, m, attention_padded_cols<I>(seen), dh, false);
            });
          } else {
            dVj.noalias() += P.transpose() * dOi;
            dP.noalias() = dOi * Vj.transpose();
          }
          // dS = P ⊙ (dP − D) in place of dP over the keys a row sees, zero past them (where dP may not be computed).
          Scalar* const ds_data = dP.data();
          for (Index i = 0; i < rows; ++i) {
            const Scalar* p_row = p_data + i * attention_tile;
            Scalar* ds_row = ds_data + i * attention_tile;
            const Scalar D_i = w.D(q0 + i);
            const Index valid = std::clamp<Index>(i + offset + 1, 0, cols);
            Index j = 0;
#if defined(MEMORYFORMER_HAVE_AVX512) || defined(MEMORYFORMER_HAVE_AVX2)
            if constexpr (attention_vector_path_compiled<I, Scalar>()) {
              // The same product and difference per entry as the scalar loop: the same bits.
              using O = VectorOps<I>;
              const auto vD = O::set1(D_i);
              for (; j + O::n <= valid; j += O::n)
                O::store(ds_row + j, O::mul(O::load(p_row + j), O::sub(O::load(ds_row + j), vD)));
            }
#endif
            for (; j < valid; ++j) ds_row[j] = p_row[j] * (ds_row[j] - D_i);
            std::fill(ds_row + valid, ds_row + cols, Scalar(0));
          }
          if (vector_path) {
            row_bands([&](Index i0, Index m, Index seen) {
              product(w.dQ.data() + (q0 + i0) * dh, dh, dP.data() + i0 * attention_tile, attention_tile, 1,
                      Kj.data(), Kj.outerStride(), m, dh, seen, true);
            });
            key_bands([&](Index j0, Index n, Index r0) {
              product(dKj.data() + j0 * dh, dh, dP.data() + r0 * attention_tile + j0, 1, attention_tile,
                      Qi.data() + r0 * Qi.outerStride(), Qi.outerStride(), n, dh, rows - r0, true);
            });
          } else {
            w.dQ.middleRows(q0, rows).noalias() += dP * Kj;
            dKj.noalias() += dP.transpose() * Qi;
          }
        }
      }
      dq.block(b * seq, h * dh, seq, dh) = w.dQ * scale;
      dk.block(b * seq, h * dh, seq, dh) = w.dK * scale;
      dv.block(b * seq, h * dh, seq, dh) = w.dV;
    }
  });
}

#if defined(MEMORYFORMER_HAVE_AVX512) || defined(MEMORYFORMER_HAVE_AVX2)
/// Where the cached rows of one sequence are: row p of its keys at keys + p·key_stride, of its values at
/// values + p·value_stride (float, or bfloat16 bits as std::uint16_t).
template <class E>
struct CachedRows {
  const E* keys;
  const E* values;
  Index key_stride;
  Index value_stride;
};

/// Decode of t ≤ attention_decode_in_place_rows new rows per sequence, every head of a row folded at once from the
/// cache rows in place (fold_heads_in_place). Items are (sequence, key block of attention_decode_key_block keys);
/// the blocks' partial states (one per new row and head) are merged in block order, so the bits do not depend on
/// the thread count. rows_of(b) gives sequence b's CachedRows. Returns the first (sequence, new token, head) whose
/// attention is not finite, with nothing written to out (finish_decode), or nothing.
template <Isa I, class RowsOf>
[[nodiscard]] std::optional<DecodeSite> decode_in_place(MatrixRef<float> out, const ConstMatrixRef<float>& q,
                                                        Index batch, Index t, Index first, Index length, Index heads,
                                                        RowsOf&& rows_of) {
  const Index d = q.cols(), dh = d / heads;
  const float scale = 1.0f / std::sqrt(float(dh));
  const Index blocks = (length + attention_decode_key_block - 1) / attention_decode_key_block;
  std::vector<OnlineSoftmax<float>> partial(size_t(batch * blocks));  // row i·heads + h: new row i, head h
  parallel_claims(batch * blocks, [&](WorkQueue& queue) {
    std::vector<float> scores(size_t(heads * attention_decode_key_block));
    const auto exp_row = [&](float* p, const float* s, Index n, float shift) {
      exp_shifted_row<I>(p, s, n, scale, shift);
    };
    for (Index item = queue.claim(); item >= 0; item = queue.claim()) {
      const Index b = item / blocks, block = item % blocks;
      const Index k0 = block * attention_decode_key_block;
      const Index count = std::min(length, k0 + attention_decode_key_block) - k0;
      const auto cache = rows_of(b);
      auto& state = partial[size_t(item)];
      state.reset(t * heads, dh);
      for (Index i = 0; i < t; ++i) {
        // Row i sits at position first + i and sees the block's keys up to it.
        const Index valid = std::clamp<Index>(first + i - k0 + 1, 0, count);
        fold_heads_in_place<I>(state.m.data() + i * heads, state.l.data() + i * heads, state.acc.row(i * heads).data(),
                               q.row(b * t + i).data(), cache.keys + k0 * cache.key_stride, cache.key_stride,
                               cache.values + k0 * cache.value_stride, cache.value_stride, valid, heads, dh, scale,
                               scores.data(), exp_row);
      }
    }
  });
  // All reads of q are done: out may alias it.
  return finish_decode(
      partial, batch, blocks, [&](Index b, Index row) { return DecodeSite{b, row / heads, row % heads}; },
      [&](Index b, const OnlineSoftmax<float>& state) {
        for (Index i = 0; i < t; ++i)
          for (Index h = 0; h < heads; ++h) out.row(b * t + i).segment(h * dh, dh) = state.acc.row(i * heads + h);
      });
}
#endif

/// The work plan of decode outside decode_in_place: items are (sequence, head, query tile, key block). With one
/// query tile the cache is cut into key blocks of attention_decode_key_block keys, otherwise each item takes every
/// key. fold(scratch, state, b, h, q0, rows, k0, k1) folds keys [k0, k1) into the item's own (m, l, acc) with the
/// thread's ItemScratch; the items of a (sequence, head, tile) are then merged in block order and written to out,
/// so the bits do not depend on the thread count. Returns what decode_in_place returns.
template <class Scalar, class ItemScratch, class Fold>
[[nodiscard]] std::optional<DecodeSite> decode_key_blocks(MatrixRef<Scalar> out, Index batch, Index t, Index length,
                                                          Index heads, Index dh, Fold&& fold) {
  const Index tiles = (t + attention_tile - 1) / attention_tile;
  const Index blocks = tiles == 1 ? (length + attention_decode_key_block - 1) / attention_decode_key_block : 1;
  const Index block_keys = tiles == 1 ? attention_decode_key_block : length;
  const Index groups = batch * heads * tiles;
  std::vector<OnlineSoftmax<Scalar>> partial(size_t(groups * blocks));
  parallel_claims(groups * blocks, [&](WorkQueue& queue) {
    ItemScratch scratch;
    for (Index item = queue.claim(); item >= 0; item = queue.claim()) {
      const Index group = item / blocks, block = item % blocks;
      const Index bh = group / tiles, tile = group % tiles;
      const Index q0 = tile * attention_tile, rows = std::min(attention_tile, t - q0);
      const Index k0 = block * block_keys, k1 = std::min(length, k0 + block_keys);
      auto& state = partial[size_t(item)];
      state.reset(rows, dh);
      fold(scratch, state, bh / heads, bh % heads, q0, rows, k0, k1);
    }
  });
  return finish_decode(
      partial, groups, blocks,
      [&](Index group, Index row) {
        const Index bh = group / tiles;
        return DecodeSite{bh / heads, group % tiles * attention_tile + row, bh % heads};
      },
      [&](Index group, const OnlineSoftmax<Scalar>& state) {
        const Index bh = group / tiles, q0 = group % tiles * attention_tile;
        for (Index i = 0; i < state.m.size(); ++i)
          out.row(bh / heads * t + q0 + i).segment(bh % heads * dh, dh) = state.acc.row(i);
      });
}

/// Decode: t new query rows per sequence (row b·t + i at position first + i) against the cached keys and values
/// of `batch` sequences, length `length` each (keys(b) / values(b) give [length, d] views). With few new rows the
/// cache is split into key blocks of attention_decode_key_block keys, each folded by one thread into its own
/// (m, l, acc), then merged in block order; with more than one query tile, items are query tiles as in forward.
/// Returns the first (sequence, new token, head) whose attention is not finite, with nothing written to out, or
/// nothing.
template <Isa I, class Scalar, class Keys, class Values>
[[nodiscard]] std::optional<DecodeSite> flash_attention_decode(MatrixRef<Scalar> out, const ConstMatrixRef<Scalar>& q,
                                                               Index batch, Index t, Index first, Index length,
                                                               Index heads, Keys&& keys, Values&& values) {
  const Index d = q.cols(), dh = d / heads;
#if defined(MEMORYFORMER_HAVE_AVX512) || defined(MEMORYFORMER_HAVE_AVX2)
  if constexpr (attention_vector_path_compiled<I, Scalar>()) {
    if (t <= attention_decode_in_place_rows && attention_vector_path<I, Scalar>(dh))
      return decode_in_place<I>(out, q, batch, t, first, length, heads, [&](Index b) {
        const auto K = keys(b);
        const auto V = values(b);
        return CachedRows<float>{K.data(), V.data(), K.outerStride(), V.outerStride()};
      });
  }
#endif
  const Scalar scale = Scalar(1) / std::sqrt(Scalar(dh));
  return decode_key_blocks<Scalar, AttentionTileScratch<Scalar>>(
      out, batch, t, length, heads, dh,
      [&](AttentionTileScratch<Scalar>& scratch, OnlineSoftmax<Scalar>& state, Index b, Index h, Index q0, Index rows,
          Index k0, Index k1) {
        const auto Q = q.block(b * t + q0, h * dh, rows, dh);  // [rows, dh]
        const auto K = keys(b).middleCols(h * dh, dh);         // [length, dh]
        const auto V = values(b).middleCols(h * dh, dh);       // [length, dh]
        attend_key_range<I>(state, scratch, Q, first + q0, K, V, k0, k1, scale);
      });
}

/// out[j] = the float of bfloat16 bits in[j], j < n: exact (a bfloat16 is the upper half of a float), so every
/// path gives the same bits; the vector paths widen 16 values (AVX-512) or 8 (AVX2) to 32 bits and shift them up.
template <Isa I>
inline void bf16_to_float_row(float* out, const std::uint16_t* in, Index n) {
  Index j = 0;
#if defined(MEMORYFORMER_HAVE_AVX512)
  if constexpr (I == Isa::Avx512) {
    using O = VectorOps<Isa::Avx512>;
    for (; j + O::n <= n; j += O::n) O::store(out + j, O::load_bf16(in + j));
  }
#endif
#if defined(MEMORYFORMER_HAVE_AVX2)
  if constexpr (I != Isa::Scalar) {
    using O = VectorOps<Isa::Avx2>;
    for (; j + O::n <= n; j += O::n) O::store(out + j, O::load_bf16(in + j));
  }
#endif
  for (; j < n; ++j) out[j] = bf16_to_float(in[j]);
}

/// Rows [k0, k0 + count) of the dh columns from `col` of a bfloat16 [rows, d] row-major block, widened into
/// out [count, dh] row-major.
template <Isa I>
inline void widen_bf16_rows(float* out, const std::uint16_t* block, Index d, Index col, Index k0, Index count,
                            Index dh) {
  for (Index r = 0; r < count; ++r) bf16_to_float_row<I>(out + r * dh, block + (k0 + r) * d + col, dh);
}

/// flash_attention_decode against a cache stored as bfloat16: keys_bf16(b) / values_bf16(b) give the [length, d]
/// row-major bits of sequence b. Each work item widens the keys and values of its block (one head's dh columns)
/// into float scratch with bf16_to_float_row and folds them with attend_key_range, positions shifted by the
/// block's first key, so the result is that of the float kernel on the widened cache: float accumulation
/// throughout. Items and the merge order are those of flash_attention_decode; the bits do not depend on the
/// thread count.
template <Isa I, class KeysBf16, class ValuesBf16>
[[nodiscard]] std::optional<DecodeSite> flash_attention_decode_bf16(MatrixRef<float> out,
                                                                    const ConstMatrixRef<float>& q, Index batch,
                                                                    Index t, Index first, Index length, Index heads,
                                                                    KeysBf16&& keys_bf16, ValuesBf16&& values_bf16) {
  const Index d = q.cols(), dh = d / heads;
#if defined(MEMORYFORMER_HAVE_AVX512) || defined(MEMORYFORMER_HAVE_AVX2)
  if constexpr (attention_vector_path_compiled<I, float>()) {
    if (t <= attention_decode_in_place_rows && attention_vector_path<I, float>(dh))
      return decode_in_place<I>(out, q, batch, t, first, length, heads, [&](Index b) {
        return CachedRows<std::uint16_t>{keys_bf16(b), values_bf16(b), d, d};
      });
  }
#endif
  const float scale = 1.0f / std::sqrt(float(dh));
  struct Scratch {
    AttentionTileScratch<float> tile;
    Matrix<float> K, V;  // [count, dh] the widened keys and values of the item's block
  };
  return decode_key_blocks<float, Scratch>(
      out, batch, t, length, heads, dh,
      [&](Scratch& scratch, OnlineSoftmax<float>& state, Index b, Index h, Index q0, Index rows, Index k0, Index k1) {
        const Index count = k1 - k0;
        const auto Q = q.block(b * t + q0, h * dh, rows, dh);  // [rows, dh]
        resize_buffer(scratch.K, count, dh);
        resize_buffer(scratch.V, count, dh);
        widen_bf16_rows<I>(scratch.K.data(), keys_bf16(b), d, h * dh, k0, count, dh);
        widen_bf16_rows<I>(scratch.V.data(), values_bf16(b), d, h * dh, k0, count, dh);
        // Key r of the block is at position k0 + r: the query positions are shifted by −k0 (may be negative, then
        // the query sees none of the block's keys).
        attend_key_range<I>(state, scratch.tile, Q, first + q0 - k0, scratch.K, scratch.V, 0, count, scale);
      });
}

}  // namespace memoryformer::detail
