// SPDX-License-Identifier: MIT
// Causal multi-head softmax attention without parameters, ctx = softmax(QKᵀ/sqrt(d/H))V per sequence and head:
// forward, backward and incremental decoding against a KVCache (§6). Tiled with an online softmax
// (FlashAttention-2, detail/attention_kernels.hpp), so neither direction holds an s × s matrix: training memory
// and cache traffic grow with s·d, not s².
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../detail/checked_size.hpp"
#include "../detail/checks.hpp"
#include "../detail/attention_kernels.hpp"
#include "../detail/row_parallel.hpp"
#include "../detail/simd.hpp"
#include "../error.hpp"
#include "../storage_type.hpp"
#include "../types.hpp"
#include "kv_cache.hpp"

namespace memoryformer {

/**
 * @brief What attention_forward keeps for attention_backward: the output and one log-sum-exp per query row and
 * head, so backward recomputes the probabilities tile by tile instead of storing them (§6).
 *
 * out is the forward's output ctx (backward needs D = rowsum(dctx ⊙ ctx) per head, and ctx may have been
 * overwritten by the caller, since it may alias q); lse(b·heads + h, i) = log Σ_{j ≤ i} exp(scale·q_i·k_j) for
 * query i of sequence b, head h. Bytes per layer: sizeof(Scalar)·batch·seq·(d + heads), i.e. linear in seq
 * (at batch 1, seq 4096, d 512, heads 8, float: 4·4096·520 = 8.5 MB), where the s × s probabilities would take
 * sizeof(Scalar)·batch·heads·seq² (537 MB). The calls themselves allocate only transient workspace linear in seq
 * (a head's gradient accumulators per thread in backward, the key blocks' partial states in decode) and O(64²)
 * per thread.
 */
template <std::floating_point Scalar>
struct AttentionCache {
  Matrix<Scalar> out;  // [batch·seq, d] ctx of the forward
  Matrix<Scalar> lse;  // [batch·heads, seq] log-sum-exp of every query row's scaled scores
  Index batch = 0;
  Index seq = 0;
  Index heads = 0;
  /// The bytes held: sizeof(Scalar)·batch·seq·(d + heads).
  std::size_t bytes() const { return sizeof(Scalar) * std::size_t(out.size() + lse.size()); }
};

namespace detail {

/// Throws ConfigError unless heads ≥ 1 divides d; returns the head dimension d/heads.
inline Index attention_head_dim(const char* where, Index d, Index heads) {
  check_config(heads >= 1, where, "heads = " + std::to_string(heads) + " must be ≥ 1");
  check_config(d >= 1 && d % heads == 0, where,
               "d = " + std::to_string(d) + " is not divisible by heads = " + std::to_string(heads));
  return d / heads;
}

/// Throws ConfigError unless batch ≥ 1, seq ≥ 1 and batch·seq fits an Index.
inline void attention_check_sizes(const char* where, Index batch, Index seq) {
  check_config(batch >= 1, where, "batch = " + std::to_string(batch) + " must be ≥ 1");
  check_config(seq >= 1, where, "seq = " + std::to_string(seq) + " must be ≥ 1");
  check_config(seq <= std::numeric_limits<Index>::max() / batch, where,
               "batch·seq = " + std::to_string(batch) + "·" + std::to_string(seq) + " overflows");
}

/// Whether two row-major views of Scalar (inner stride 1) share an element. Views with the same row stride are
/// compared element by element, so that column blocks of one buffer (dq, dk and dv side by side in a [N, 3d]
/// gradient) do not count as overlapping; other views are compared by the address ranges they span.
template <class A, class B>
bool attention_views_overlap(const A& a, const B& b) {
  static_assert(sizeof(typename A::Scalar) == sizeof(typename B::Scalar));
  constexpr std::uintptr_t bytes = sizeof(typename A::Scalar);
  if (a.rows() == 0 || a.cols() == 0 || b.rows() == 0 || b.cols() == 0) return false;
  const auto begin = [](const auto& m) { return reinterpret_cast<std::uintptr_t>(m.data()); };
  const auto end = [&](const auto& m) {  // unsigned: a caller's stride cannot make it overflow
    const std::uintptr_t last_row = std::uintptr_t(m.rows() - 1) * std::uintptr_t(m.outerStride());
    return begin(m) + bytes * (last_row + std::uintptr_t(m.cols()));
  };
  if (!(begin(a) < end(b) && begin(b) < end(a))) return false;
  const Index stride = a.outerStride();
  const std::uintptr_t gap = begin(a) < begin(b) ? begin(b) - begin(a) : begin(a) - begin(b);
  if (b.outerStride() != stride || a.cols() > stride || b.cols() > stride || gap % bytes != 0) return true;
  // The later view starts `row` rows and `col` columns into the earlier one's grid: its rows cover columns
  // [col, col + later_cols) of grid rows row, row + 1, …, the part past the stride in the grid row after.
  const bool a_first = begin(a) <= begin(b);
  const Index first_rows = a_first ? a.rows() : b.rows(), first_cols = a_first ? a.cols() : b.cols();
  const Index later_cols = a_first ? b.cols() : a.cols();
  const Index offset = Index(gap / bytes), row = offset / stride, col = offset % stride;
  return (row < first_rows && col < first_cols) || (col + later_cols > stride && row + 1 < first_rows);
}

inline std::string attention_rows_text(Index batch, Index seq, Index d) {
  return "(batch·seq, d) = (" + std::to_string(batch * seq) + ", " + std::to_string(d) + ") with batch = " +
         std::to_string(batch) + ", seq = " + std::to_string(seq);
}

/// The message of a NonFiniteError of attention: which row of which sequence and head is not finite, and why.
inline std::string attention_not_finite_text(const char* where, const char* row, Index at, Index sequence, Index head) {
  return std::string(where) + ": the scores or outputs of " + row + " " + std::to_string(at) + " of sequence " +
         std::to_string(sequence) + ", head " + std::to_string(head) +
         " are not finite (an input is not finite, or a product q·k or a sum of values exceeds the type's range)";
}

}  // namespace detail

/**
 * @brief Causal multi-head attention over `batch` sequences of `seq` tokens (§6).
 *
 * Rows are batch-major (row b·seq + t is token t of sequence b); the d features are split contiguously into
 * `heads` heads of dh = d/heads. For each (b, h), with scale = 1/sqrt(dh):
 *   S = scale·Q_h K_hᵀ (causal: j ≤ i),  lse_i = log Σ_{j ≤ i} exp(S_ij),  P = exp(S − lse),  ctx_h = P V_h,
 * computed over 64 × 64 tiles with a running maximum and sum per query row (the online softmax), so P is never
 * stored; heads are concatenated back into d columns. Rotary embedding, if any, is applied to q and k by the caller.
 * Work is split over (sequence, head, query tile) items; the bits do not depend on the thread count.
 * @param ctx    [batch·seq, d] output; may share storage with q, k or v
 * @param q,k,v  [batch·seq, d] queries, keys, values
 * @param batch  sequences (≥ 1)
 * @param seq    tokens per sequence (≥ 1)
 * @param heads  number of heads (≥ 1, divides d)
 * @param cache  receives ctx and the log-sum-exp of every row for attention_backward; q, k and v must not be
 *               views of it (a cache's output fed back in needs another cache)
 * @throws ShapeError when a shape differs from (batch·seq, d); ValueError when q, k or v shares storage with cache;
 *         NonFiniteError when a row's softmax is undefined (a NaN or +∞ score, as from q·k beyond the type's range)
 *         or an output is not finite (ctx is then unchanged, §6.5); ConfigError for bad batch/seq/heads, or when
 *         memory cannot hold the buffers of its rows.
 */
template <std::floating_point Scalar>
void attention_forward(std::type_identity_t<MatrixRef<Scalar>> ctx, std::type_identity_t<ConstMatrixRef<Scalar>> q,
                       std::type_identity_t<ConstMatrixRef<Scalar>> k, std::type_identity_t<ConstMatrixRef<Scalar>> v,
                       Index batch, Index seq, Index heads, AttentionCache<Scalar>& cache) {
  constexpr const char* where = "attention_forward";
  detail::attention_check_sizes(where, batch, seq);
  const Index d = q.cols();
  detail::attention_head_dim(where, d, heads);
  const Index rows = batch * seq;
  const std::string expected = detail::attention_rows_text(batch, seq, d);
  detail::check_shape(where, "q", q.rows(), q.cols(), rows, d, expected);
  detail::check_shape(where, "k", k.rows(), k.cols(), rows, d, expected);
  detail::check_shape(where, "v", v.rows(), v.cols(), rows, d, expected);
  detail::check_shape(where, "ctx", ctx.rows(), ctx.cols(), rows, d, expected);
  detail::checked_mul(where, "batch·seq·d", rows, d);
  // The kernel writes the cache while it reads q, k and v.
  for (const ConstMatrixRef<Scalar>* input : {&q, &k, &v})
    if (detail::attention_views_overlap(*input, cache.out) || detail::attention_views_overlap(*input, cache.lse))
      throw ValueError(std::string(where) +
                       ": q, k and v must not share storage with the cache being filled (such as its own output)");

  cache.batch = cache.seq = cache.heads = 0;  // invalid until filled
  // Eigen's products inside the kernels (double, or head widths off the vector width) run on one thread each: with a
  // single work item the kernel runs outside an OpenMP region, where Eigen would split them by its thread count.
  const detail::SerialEigenScope serial;
  // The kernel writes into the cache, which shares no storage with q, k, v; ctx (which may alias them) is written
  // once every read is done.
  detail::allocating_activations(where, rows, d, 1, sizeof(Scalar), [&] {
    detail::resize_buffer(cache.out, rows, d);  // [batch·seq, d]
    detail::flash_attention_forward<best_isa(), Scalar>(cache.out, cache.lse, q, k, v, batch, seq, heads);
  });
  // A score that is not finite (a NaN or ±Inf input, or a product q·k beyond the type's range) makes its row's
  // log-sum-exp so, and the kernel marks a row whose output is not finite (a value that is not) the same way (§6.5).
  if (!detail::all_finite(cache.lse.data(), cache.lse.size())) {
    const Index at = Index(std::find_if(cache.lse.data(), cache.lse.data() + cache.lse.size(),
                                        [](Scalar x) { return !std::isfinite(x); }) -
                           cache.lse.data());
    throw NonFiniteError(detail::attention_not_finite_text(where, "query", at % seq, at / seq / heads,
                                                           at / seq % heads));
  }
  detail::parallel_copy<Scalar>(ctx, cache.out);
  cache.batch = batch;
  cache.seq = seq;
  cache.heads = heads;
}

/**
 * @brief Gradients of attention_forward: dq, dk, dv (all overwritten) from dctx (§6).
 *
 * The forward mirrored, per (b, h) and 64 × 64 tile, with P recomputed from the cached log-sum-exp:
 *   D_i = Σ_c dctx_ic·ctx_ic,  P = exp(S − lse),  dV = Pᵀ dC,  dP = dC Vᵀ,  dS = P ⊙ (dP − D),
 *   dQ = scale·dS K,  dK = scale·dSᵀ Q
 * (D_i = rowsum(P ⊙ dP)_i, the softmax's Jacobian term, computed from the output instead of the s × s product).
 * Work is split over (sequence, head) items, each accumulating its dQ, dK, dV alone in a fixed order, so the bits
 * do not depend on the thread count.
 * @param dq,dk,dv  [batch·seq, d] outputs; pairwise distinct storage, each may alias the inputs
 * @param q,k,v     the inputs given to attention_forward
 * @param dctx      [batch·seq, d] gradient of ctx
 * @param cache     filled by attention_forward on these inputs
 * @throws ShapeError on a shape mismatch; StateError when the cache does not match; ValueError when two
 *         of dq, dk, dv overlap; ConfigError when memory cannot hold the buffers of its rows.
 */
template <std::floating_point Scalar>
void attention_backward(std::type_identity_t<MatrixRef<Scalar>> dq, std::type_identity_t<MatrixRef<Scalar>> dk,
                        std::type_identity_t<MatrixRef<Scalar>> dv, std::type_identity_t<ConstMatrixRef<Scalar>> q,
                        std::type_identity_t<ConstMatrixRef<Scalar>> k, std::type_identity_t<ConstMatrixRef<Scalar>> v,
                        std::type_identity_t<ConstMatrixRef<Scalar>> dctx, const AttentionCache<Scalar>& cache) {
  constexpr const char* where = "attention_backward";
  const Index batch = cache.batch, seq = cache.seq, heads = cache.heads;
  const std::string not_filled = std::string(where) + ": the cache was not filled by attention_forward";
  if (batch < 1 || seq < 1 || heads < 1) throw StateError(not_filled);
  // The cache's fields are public: its products are checked for overflow like any size from a caller.
  if (cache.out.rows() != detail::checked_mul<StateError>(where, "the cache's batch·seq", batch, seq) ||
      cache.lse.rows() != detail::checked_mul<StateError>(where, "the cache's batch·heads", batch, heads) ||
      cache.lse.cols() != seq)
    throw StateError(not_filled);
  const Index d = q.cols();
  detail::attention_head_dim(where, d, heads);
  const Index rows = batch * seq;
  const std::string expected = detail::attention_rows_text(batch, seq, d) + " (from the cache)";
  detail::check_shape(where, "q", q.rows(), q.cols(), rows, d, expected);
  if (cache.out.cols() != d)
    throw StateError(std::string(where) + ": the cache holds d = " + std::to_string(cache.out.cols()) +
                     " features, q has " + std::to_string(d));
  detail::check_shape(where, "k", k.rows(), k.cols(), rows, d, expected);
  detail::check_shape(where, "v", v.rows(), v.cols(), rows, d, expected);
  detail::check_shape(where, "dctx", dctx.rows(), dctx.cols(), rows, d, expected);
  detail::check_shape(where, "dq", dq.rows(), dq.cols(), rows, d, expected);
  detail::check_shape(where, "dk", dk.rows(), dk.cols(), rows, d, expected);
  detail::check_shape(where, "dv", dv.rows(), dv.cols(), rows, d, expected);
  detail::checked_mul(where, "batch·seq·d", rows, d);
  if (detail::attention_views_overlap(dq, dk) || detail::attention_views_overlap(dq, dv) ||
      detail::attention_views_overlap(dk, dv))
    throw ValueError(std::string(where) + ": dq, dk and dv must not overlap");

  const detail::SerialEigenScope serial;  // as in attention_forward
  detail::allocating_activations(where, rows, d, 1, sizeof(Scalar), [&] {
    detail::flash_attention_backward<best_isa(), Scalar>(dq, dk, dv, q, k, v, dctx, cache.out, cache.lse, batch, seq,
                                                         heads);
  });
}

/**
 * @brief One incremental decoding step: appends t new tokens per sequence to `cache` and attends from them (§6).
 *
 * New token i of sequence b sits at position L0 + i (L0 = cache.length() before the call) and attends over the
 * cached positions 0 … L0 + i, per head, exactly as attention_forward does on the whole sequence. Rotate q_new and
 * k_new by the caller's Rotary at position_offset = cache.length() BEFORE this call. With one query tile (t ≤ 64)
 * the cache is split into fixed blocks of 256 keys whose partial softmax states (m, l, acc) the threads compute
 * and one thread merges in block order: m = max(m_a, m_b), l = l_a·e^(m_a − m) + l_b·e^(m_b − m), acc likewise;
 * the bits do not depend on the thread count.
 * @param ctx_new  [batch·t, d] output (batch-major: row b·t + i is new token i of sequence b); may alias the inputs
 * @param q_new    [batch·t, d] queries of the new tokens
 * @param k_new    [batch·t, d] keys of the new tokens (appended to the cache)
 * @param v_new    [batch·t, d] values of the new tokens (appended to the cache)
 * @param cache    KV cache with batch sequences and d features; its length grows by t. A BF16 cache (KVCache<float>
 *                 with StorageType::BF16) is widened to float inside the kernel (in registers for up to 4 new
 *                 tokens per sequence, else block by block); the arithmetic is float, as with an F32 cache holding
 *                 the same bfloat16-rounded keys and values.
 * @param heads    number of heads (≥ 1, divides d)
 * @throws ShapeError on a shape mismatch; ConfigError on bad heads; CapacityError when the cache would exceed
 *         max_seq; NonFiniteError as attention_forward, for the first (sequence, new token, head) in that order
 *         (ctx_new is then unchanged); ConfigError when memory cannot hold the buffers of its rows. Nothing is
 *         appended when it throws.
 */
template <std::floating_point Scalar>
void attention_decode(std::type_identity_t<MatrixRef<Scalar>> ctx_new,
                      std::type_identity_t<ConstMatrixRef<Scalar>> q_new,
                      std::type_identity_t<ConstMatrixRef<Scalar>> k_new,
                      std::type_identity_t<ConstMatrixRef<Scalar>> v_new, KVCache<Scalar>& cache, Index heads) {
  constexpr const char* where = "attention_decode";
  const Index d = cache.d();
  detail::attention_head_dim(where, d, heads);
  const Index t = cache.new_tokens(where, "q_new", q_new.rows(), q_new.cols());
  const Index rows = q_new.rows();
  const std::string expected = "(batch·t, d) = (" + std::to_string(rows) + ", " + std::to_string(d) +
                               ") with batch = " + std::to_string(cache.batch()) + ", t = " + std::to_string(t);
  detail::check_shape(where, "k_new", k_new.rows(), k_new.cols(), rows, d, expected);
  detail::check_shape(where, "v_new", v_new.rows(), v_new.cols(), rows, d, expected);
  detail::check_shape(where, "ctx_new", ctx_new.rows(), ctx_new.cols(), rows, d, expected);

  const Index first = cache.length();
  const detail::SerialEigenScope serial;  // as in attention_forward
  detail::decode_step(where, rows, d, 1, std::span<KVCache<Scalar>>(&cache, 1), [&] {
    cache.append(k_new, v_new);  // throws CapacityError before changing anything
    // All reads of q_new happen before ctx_new is written (the kernel's last pass writes), so they may alias.
    const auto fault = [&] {
      if constexpr (std::is_same_v<Scalar, float>) {
        if (cache.storage() == StorageType::BF16)
          return detail::flash_attention_decode_bf16<best_isa()>(
              ctx_new, q_new, cache.batch(), t, first, cache.length(), heads,
              [&](Index b) { return cache.keys_bf16(b); }, [&](Index b) { return cache.values_bf16(b); });
      }
      return detail::flash_attention_decode<best_isa(), Scalar>(
          ctx_new, q_new, cache.batch(), t, first, cache.length(), heads, [&](Index b) { return cache.keys(b); },
          [&](Index b) { return cache.values(b); });
    }();
    // decode_step takes the appended tokens back out of the cache.
    if (fault) throw NonFiniteError(detail::attention_not_finite_text(where, "new token", fault->token, fault->sequence,
                                                                      fault->head));
  });
}

}  // namespace memoryformer
