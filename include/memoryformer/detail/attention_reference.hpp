// SPDX-License-Identifier: MIT
// The straightforward attention (an s × s probability matrix per sequence and head, Eigen products, scalar exp),
// kept as the reference that the tiled kernels of nn/attention.hpp are tested and benchmarked against (design §6);
// it shares nn/attention.hpp's argument checks.
#pragma once

#include <cmath>
#include <concepts>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../error.hpp"
#include "../nn/attention.hpp"
#include "../nn/kv_cache.hpp"
#include "../types.hpp"
#include "checked_size.hpp"
#include "checks.hpp"

namespace memoryformer::detail {

/// What reference_attention_forward keeps: probs [batch·heads·seq, seq], row (b·heads + h)·seq + i holds the softmax
/// weights of query i of sequence b, head h (0 above the diagonal).
template <std::floating_point Scalar>
struct ReferenceAttentionCache {
  Matrix<Scalar> probs;  // [batch·heads·seq, seq]
  Index batch = 0;
  Index seq = 0;
  Index heads = 0;
};

/// Softmax of entries [0, valid) of a score row, in place; entries [valid, cols) become 0 (the causal mask).
template <class Row>
void reference_causal_softmax_row(Row&& row, Index valid) {
  using Scalar = typename std::remove_cvref_t<Row>::Scalar;
  const Scalar m = row.head(valid).maxCoeff();
  Scalar sum = 0;
  for (Index j = 0; j < valid; ++j) {
    const Scalar e = std::exp(row(j) - m);
    row(j) = e;
    sum += e;
  }
  row.head(valid) *= Scalar(1) / sum;
  row.tail(row.size() - valid).setZero();
}

/**
 * @brief Causal multi-head attention over `batch` sequences of `seq` tokens.
 *
 * Rows are batch-major (row b·seq + t is token t of sequence b); the d features are split contiguously into
 * `heads` heads of dh = d/heads. For each (b, h): ctx_h = softmax(Q_h K_hᵀ / sqrt(dh) + causal mask) V_h; heads
 * are concatenated back into d columns. Rotary embedding, if any, is applied to q and k by the caller.
 * @param ctx    [batch·seq, d] output; may share storage with q, k or v
 * @param q,k,v  [batch·seq, d] queries, keys, values
 * @param batch  sequences (≥ 1)
 * @param seq    tokens per sequence (≥ 1)
 * @param heads  number of heads (≥ 1, divides d)
 * @param cache  receives the attention probabilities for reference_attention_backward
 * @throws ShapeError when a shape differs from (batch·seq, d); ConfigError for bad batch/seq/heads.
 */
template <std::floating_point Scalar>
void reference_attention_forward(std::type_identity_t<MatrixRef<Scalar>> ctx, std::type_identity_t<ConstMatrixRef<Scalar>> q,
                       std::type_identity_t<ConstMatrixRef<Scalar>> k, std::type_identity_t<ConstMatrixRef<Scalar>> v,
                       Index batch, Index seq, Index heads, ReferenceAttentionCache<Scalar>& cache) {
  constexpr const char* where = "reference_attention_forward";
  check_config(batch >= 1, where, "batch = " + std::to_string(batch) + " must be ≥ 1");
  check_config(seq >= 1, where, "seq = " + std::to_string(seq) + " must be ≥ 1");
  const Index d = q.cols();
  const Index dh = attention_head_dim(where, d, heads);
  const Index rows = batch * seq;
  const std::string expected = attention_rows_text(batch, seq, d);
  check_shape(where, "q", q.rows(), q.cols(), rows, d, expected);
  check_shape(where, "k", k.rows(), k.cols(), rows, d, expected);
  check_shape(where, "v", v.rows(), v.cols(), rows, d, expected);
  check_shape(where, "ctx", ctx.rows(), ctx.cols(), rows, d, expected);

  const Scalar scale = Scalar(1) / std::sqrt(Scalar(dh));
  resize_buffer(cache.probs, batch * heads * seq, seq);
  cache.batch = batch;
  cache.seq = seq;
  cache.heads = heads;
  Matrix<Scalar> head_ctx(seq, dh);  // [seq, dh]
  for (Index b = 0; b < batch; ++b)
    for (Index h = 0; h < heads; ++h) {
      const auto Q = q.block(b * seq, h * dh, seq, dh);
      const auto K = k.block(b * seq, h * dh, seq, dh);
      const auto V = v.block(b * seq, h * dh, seq, dh);
      auto P = cache.probs.middleRows((b * heads + h) * seq, seq);  // [seq, seq]
      P.noalias() = (Q * K.transpose()) * scale;
      for (Index i = 0; i < seq; ++i) reference_causal_softmax_row(P.row(i), i + 1);
      // P is lower triangular: the triangular product skips the masked half.
      head_ctx.noalias() = P.template triangularView<Eigen::Lower>() * V;
      // Written only after this (b, h) block of q, k, v was read, so ctx may alias them.
      ctx.block(b * seq, h * dh, seq, dh) = head_ctx;
    }
}

/**
 * @brief Gradients of reference_attention_forward: dq, dk, dv (all overwritten) from dctx.
 *
 * With P the probabilities of one (b, h): dV = Pᵀ dC, dP = dC Vᵀ, dS = P ⊙ (dP − rowsum(P ⊙ dP)),
 * dQ = dS K / sqrt(dh), dK = dSᵀ Q / sqrt(dh).
 * @param dq,dk,dv  [batch·seq, d] outputs; pairwise distinct storage, each may alias the inputs
 * @param q,k,v     the inputs given to reference_attention_forward
 * @param dctx      [batch·seq, d] gradient of ctx
 * @param cache     filled by reference_attention_forward on these inputs
 * @throws ShapeError on a shape mismatch; StateError when the cache does not match; ValueError when two
 *         of dq, dk, dv overlap.
 */
template <std::floating_point Scalar>
void reference_attention_backward(std::type_identity_t<MatrixRef<Scalar>> dq, std::type_identity_t<MatrixRef<Scalar>> dk,
                        std::type_identity_t<MatrixRef<Scalar>> dv, std::type_identity_t<ConstMatrixRef<Scalar>> q,
                        std::type_identity_t<ConstMatrixRef<Scalar>> k, std::type_identity_t<ConstMatrixRef<Scalar>> v,
                        std::type_identity_t<ConstMatrixRef<Scalar>> dctx, const ReferenceAttentionCache<Scalar>& cache) {
  constexpr const char* where = "reference_attention_backward";
  const Index batch = cache.batch, seq = cache.seq, heads = cache.heads;
  if (batch < 1 || seq < 1 || heads < 1 || cache.probs.rows() != batch * heads * seq || cache.probs.cols() != seq)
    throw StateError(std::string(where) + ": the cache was not filled by reference_attention_forward");
  const Index d = q.cols();
  const Index dh = attention_head_dim(where, d, heads);
  const Index rows = batch * seq;
  const std::string expected = attention_rows_text(batch, seq, d) + " (from the cache)";
  check_shape(where, "q", q.rows(), q.cols(), rows, d, expected);
  check_shape(where, "k", k.rows(), k.cols(), rows, d, expected);
  check_shape(where, "v", v.rows(), v.cols(), rows, d, expected);
  check_shape(where, "dctx", dctx.rows(), dctx.cols(), rows, d, expected);
  check_shape(where, "dq", dq.rows(), dq.cols(), rows, d, expected);
  check_shape(where, "dk", dk.rows(), dk.cols(), rows, d, expected);
  check_shape(where, "dv", dv.rows(), dv.cols(), rows, d, expected);
  if (attention_views_overlap(dq, dk) || attention_views_overlap(dq, dv) ||
      attention_views_overlap(dk, dv))
    throw ValueError(std::string(where) + ": dq, dk and dv must not overlap");

  const Scalar scale = Scalar(1) / std::sqrt(Scalar(dh));
  Matrix<Scalar> dP(seq, seq), dS(seq, seq);                  // [seq, seq]
  Matrix<Scalar> dQh(seq, dh), dKh(seq, dh), dVh(seq, dh);    // [seq, dh]
  Vector<Scalar> row_dot(seq);                                // [seq]
  for (Index b = 0; b < batch; ++b)
    for (Index h = 0; h < heads; ++h) {
      const auto Q = q.block(b * seq, h * dh, seq, dh);
      const auto K = k.block(b * seq, h * dh, seq, dh);
      const auto V = v.block(b * seq, h * dh, seq, dh);
      const auto dC = dctx.block(b * seq, h * dh, seq, dh);
      const auto P = cache.probs.middleRows((b * heads + h) * seq, seq);
      dVh.noalias() = P.template triangularView<Eigen::Lower>().transpose() * dC;
      dP.noalias() = dC * V.transpose();
      // The masked entries of P are 0, so they get dS = 0 whatever dP holds there.
      row_dot = P.cwiseProduct(dP).rowwise().sum();
      dS = (P.array() * (dP.array().colwise() - row_dot.array())).matrix();
      dQh.noalias() = dS.template triangularView<Eigen::Lower>() * K;
      dKh.noalias() = dS.template triangularView<Eigen::Lower>().transpose() * Q;
      // All three gradients of this (b, h) are computed before any is written: outputs may alias the inputs.
      dq.block(b * seq, h * dh, seq, dh) = dQh * scale;
      dk.block(b * seq, h * dh, seq, dh) = dKh * scale;
      dv.block(b * seq, h * dh, seq, dh) = dVh;
    }
}

/**
 * @brief One incremental decoding step: appends t new tokens per sequence to `cache` and attends from them.
 *
 * New token i of sequence b sits at position L0 + i (L0 = cache.length() before the call) and attends over the
 * cached positions 0 … L0 + i, per head, exactly as attention_forward does on the whole sequence. Rotate q_new and
 * k_new by the caller's Rotary at position_offset = cache.length() BEFORE this call.
 * @param ctx_new  [batch·t, d] output (batch-major: row b·t + i is new token i of sequence b); may alias the inputs
 * @param q_new    [batch·t, d] queries of the new tokens
 * @param k_new    [batch·t, d] keys of the new tokens (appended to the cache)
 * @param v_new    [batch·t, d] values of the new tokens (appended to the cache)
 * @param cache    KV cache with batch sequences and d features; its length grows by t
 * @param heads    number of heads (≥ 1, divides d)
 * @throws ShapeError on a shape mismatch; ConfigError on bad heads; CapacityError when the cache would exceed
 *         max_seq (nothing is appended then).
 */
template <std::floating_point Scalar>
void reference_attention_decode(std::type_identity_t<MatrixRef<Scalar>> ctx_new,
                      std::type_identity_t<ConstMatrixRef<Scalar>> q_new,
                      std::type_identity_t<ConstMatrixRef<Scalar>> k_new,
                      std::type_identity_t<ConstMatrixRef<Scalar>> v_new, KVCache<Scalar>& cache, Index heads) {
  constexpr const char* where = "reference_attention_decode";
  const Index d = cache.d();
  const Index dh = attention_head_dim(where, d, heads);
  const Index t = cache.new_tokens(where, "q_new", q_new.rows(), q_new.cols());
  const Index rows = q_new.rows();
  const std::string expected = "(batch·t, d) = (" + std::to_string(rows) + ", " + std::to_string(d) +
                               ") with batch = " + std::to_string(cache.batch()) + ", t = " + std::to_string(t);
  check_shape(where, "k_new", k_new.rows(), k_new.cols(), rows, d, expected);
  check_shape(where, "v_new", v_new.rows(), v_new.cols(), rows, d, expected);
  check_shape(where, "ctx_new", ctx_new.rows(), ctx_new.cols(), rows, d, expected);

  const Index first = cache.length();
  cache.append(k_new, v_new);  // throws CapacityError before changing anything
  const Index length = cache.length();
  const Scalar scale = Scalar(1) / std::sqrt(Scalar(dh));
  Matrix<Scalar> S(t, length);       // [t, length]
  Matrix<Scalar> head_ctx(t, dh);    // [t, dh]
  for (Index b = 0; b < cache.batch(); ++b) {
    const auto keys = cache.keys(b);
    const auto values = cache.values(b);
    for (Index h = 0; h < heads; ++h) {
      const auto Q = q_new.block(b * t, h * dh, t, dh);
      S.noalias() = (Q * keys.middleCols(h * dh, dh).transpose()) * scale;
      for (Index i = 0; i < t; ++i) reference_causal_softmax_row(S.row(i), first + i + 1);
      head_ctx.noalias() = S * values.middleCols(h * dh, dh);
      ctx_new.block(b * t, h * dh, t, dh) = head_ctx;
    }
  }
}

}  // namespace memoryformer::detail
