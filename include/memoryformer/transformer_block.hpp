// SPDX-License-Identifier: MIT
// TransformerBlock: the dense Pythia-style block MemoryFormer is compared with — LayerNorm, Q/K/V/O projections
// d→d, rotary causal attention, FFN d→4d→d with GeLU — with backward and KV-cache decoding (design §3.2).
#pragma once

#include <cmath>
#include <concepts>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "detail/checks.hpp"
#include "detail/checked_size.hpp"
#include "detail/row_parallel.hpp"
#include "error.hpp"
#include "nn/attention.hpp"
#include "nn/gelu.hpp"
#include "nn/kv_cache.hpp"
#include "storage_type.hpp"
#include "nn/layer_norm.hpp"
#include "nn/linear.hpp"
#include "nn/rope.hpp"
#include "parameter.hpp"
#include "random.hpp"
#include "types.hpp"

namespace memoryformer {

/// Settings of a dense (Pythia / GPT-NeoX style) Transformer block over d features.
struct TransformerBlockConfig {
  Index d = 0;                     ///< model width; a multiple of heads
  Index heads = 1;                 ///< attention heads; head_dim = d/heads
  Index rotary_dims = -1;          ///< rotated dims per head (even, ≤ head_dim); −1: 25 % of head_dim rounded down to even
  double rotary_base = 10000.0;    ///< rotary frequency base
  Index ffn_hidden = 0;            ///< FFN hidden width; 0: 4·d
  bool bias = true;                ///< biases in Q, K, V, O and both FFN layers
  bool parallel_residual = false;  ///< Pythia's y = x + attn(LN1 x) + mlp(LN2 x); else h = x + attn(LN1 x), y = h + mlp(LN2 h)
  double norm_eps = 1e-5;          ///< eps of both LayerNorms (added to the variance)
  double init_std = 0.02;          ///< standard deviation of every weight matrix (biases start at 0)

  /// d/heads (0 when heads is not positive).
  Index head_dim() const { return heads > 0 ? d / heads : 0; }
  /// rotary_dims with −1 resolved to Pythia's rotary_pct = 0.25: floor(head_dim/4), rounded down to even.
  Index resolved_rotary_dims() const { return rotary_dims == -1 ? (head_dim() / 4) / 2 * 2 : rotary_dims; }
  /// ffn_hidden with 0 resolved to 4·d.
  Index hidden() const { return ffn_hidden == 0 ? 4 * d : ffn_hidden; }

  /**
   * @brief Checks every value.
   * @param where  prefix of the error message (the caller's name)
   * @throws ConfigError naming the offending value.
   */
  void validate(std::string_view where = "TransformerBlockConfig") const {
    detail::check_config(d > 0, where, "d = " + std::to_string(d) + " must be positive");
    detail::check_config(heads > 0, where, "heads = " + std::to_string(heads) + " must be positive");
    detail::check_config(d % heads == 0, where,
                         "d = " + std::to_string(d) + " is not divisible by heads = " + std::to_string(heads));
    const Index r = resolved_rotary_dims();
    detail::check_config(rotary_dims >= -1, where,
                         "rotary_dims = " + std::to_string(rotary_dims) + " must be ≥ 0 (or −1 for 25 % of head_dim)");
    detail::check_config(r % 2 == 0, where,
                         "rotary_dims = " + std::to_string(r) + " must be even (rotate-half pairs i, i + R/2)");
    detail::check_config(r <= head_dim(), where,
                         "rotary_dims = " + std::to_string(r) + " exceeds head_dim = d/heads = " +
                             std::to_string(head_dim()));
    detail::check_config(rotary_base > 0.0 && std::isfinite(rotary_base), where,
                         "rotary_base = " + std::to_string(rotary_base) + " must be positive and finite");
    detail::check_config(ffn_hidden >= 0, where,
                         "ffn_hidden = " + std::to_string(ffn_hidden) + " must be ≥ 0 (0 for 4·d)");
    detail::check_config(norm_eps > 0.0 && std::isfinite(norm_eps), where,
                         "norm_eps = " + std::to_string(norm_eps) + " must be positive and finite");
    detail::check_config(init_std >= 0.0 && std::isfinite(init_std), where,
                         "init_std = " + std::to_string(init_std) + " must be ≥ 0 and finite");
  }
};

/// What TransformerBlock::forward keeps for backward (buffers are resized, so reuse across calls allocates nothing
/// once the sizes are stable). N = batch·seq, F = the FFN hidden width.
template <std::floating_point Scalar>
struct TransformerBlockCache {
  Index batch = 0;               // sequences of the forward call (0: forward has not run)
  Index seq = 0;                 // tokens per sequence
  LayerNormCache<Scalar> ln1;    // per-row statistics of LN1(x)
  Matrix<Scalar> a;              // [N, d] LN1(x), input of Q, K, V
  Matrix<Scalar> q;              // [N, d] queries after rotary
  Matrix<Scalar> k;              // [N, d] keys after rotary
  Matrix<Scalar> v;              // [N, d] values
  AttentionCache<Scalar> attn;   // attention output and log-sum-exp per row (O(seq·d), no seq² term)
  Matrix<Scalar> ctx;            // [N, d] concatenated heads, input of O
  Matrix<Scalar> h;              // [N, d] x + O(ctx): the residual stream after attention
  LayerNormCache<Scalar> ln2;    // per-row statistics of LN2(h) (sequential) or LN2(x) (parallel)
  Matrix<Scalar> m;              // [N, d] LN2 output, input of the FFN
  Matrix<Scalar> up;             // [N, F] FFN pre-activation
  Matrix<Scalar> act;            // [N, F] GeLU(up), input of the down projection
};

/**
 * @brief Dense pre-LN Transformer block (Pythia / GPT-NeoX), the baseline of design §3.2:
 *
 *   a = LN1(x); q, k, v = a·W_q + b_q, a·W_k + b_k, a·W_v + b_v; rotary on the first R dims of each head of q, k;
 *   ctx = causal softmax(q kᵀ / sqrt(d/H)) v per sequence and head; attn = ctx·W_o + b_o;
 *   sequential: h = x + attn, y = h + W_down·GeLU(W_up·LN2(h))  (biases omitted)
 *   parallel:   y = x + attn + W_down·GeLU(W_up·LN2(x))          (Pythia's use_parallel_residual)
 *
 * Same interface as MemoryFormerBlock, so either can be the block of a language model. forward is const (state
 * goes to the caller's cache); backward overwrites dx and accumulates parameter gradients until zero_grad().
 * @tparam Scalar float or double.
 */
template <std::floating_point Scalar>
class TransformerBlock {
 public:
  using Config = TransformerBlockConfig;
  using Cache = TransformerBlockCache<Scalar>;

  /**
   * @brief Builds the block; every weight matrix is drawn from its own Rng stream of `seed`, biases start at 0,
   *        LayerNorms at γ = 1, β = 0.
   * @throws ConfigError naming the offending value.
   */
  TransformerBlock(const Config& config, std::uint64_t seed)
      : config_((config.validate("TransformerBlock"), config)),
        ln1_(config.d, config.norm_eps),
        q_(config.d, config.d, config.bias, Rng::stream(seed, 1).next_u64(), config.init_std),
        k_(config.d, config.d, config.bias, Rng::stream(seed, 2).next_u64(), config.init_std),
        v_(config.d, config.d, config.bias, Rng::stream(seed, 3).next_u64(), config.init_std),
        o_(config.d, config.d, config.bias, Rng::stream(seed, 4).next_u64(), config.init_std),
        rotary_(config.d, config.heads, config.resolved_rotary_dims(), config.rotary_base),
        ln2_(config.d, config.norm_eps),
        up_(config.d, config.hidden(), config.bias, Rng::stream(seed, 5).next_u64(), config.init_std),
        down_(config.hidden(), config.d, config.bias, Rng::stream(seed, 6).next_u64(), config.init_std) {}

  /// The validated configuration (rotary_dims and ffn_hidden as given; see resolved_rotary_dims(), hidden()).
  const Config& config() const { return config_; }
  /// Model width.
  Index d() const { return config_.d; }

  /// LayerNorm before attention.
  LayerNorm<Scalar>& ln1() { return ln1_; }
  const LayerNorm<Scalar>& ln1() const { return ln1_; }
  /// Query projection d → d.
  Linear<Scalar>& q() { return q_; }
  const Linear<Scalar>& q() const { return q_; }
  /// Key projection d → d.
  Linear<Scalar>& k() { return k_; }
  const Linear<Scalar>& k() const { return k_; }
  /// Value projection d → d.
  Linear<Scalar>& v() { return v_; }
  const Linear<Scalar>& v() const { return v_; }
  /// Output projection d → d after attention.
  Linear<Scalar>& o() { return o_; }
  const Linear<Scalar>& o() const { return o_; }
  /// Rotary embedding of q and k (no parameters).
  const Rotary<Scalar>& rotary() const { return rotary_; }
  /// LayerNorm before the FFN.
  LayerNorm<Scalar>& ln2() { return ln2_; }
  const LayerNorm<Scalar>& ln2() const { return ln2_; }
  /// FFN up projection d → F.
  Linear<Scalar>& up() { return up_; }
  const Linear<Scalar>& up() const { return up_; }
  /// FFN down projection F → d.
  Linear<Scalar>& down() { return down_; }
  const Linear<Scalar>& down() const { return down_; }

  /**
   * @brief y = block(x) for `batch` sequences of `seq` tokens; tokens attend only within their own sequence.
   * @param y      [batch·seq, d] output; may be x itself
   * @param x      [batch·seq, d] input, batch-major (row b·seq + t is token t of sequence b)
   * @param batch  sequences, ≥ 1
   * @param seq    tokens per sequence, ≥ 1 (rotary positions 0 … seq−1)
   * @param cache  receives what backward needs; its buffers are reused
   * @throws ConfigError for batch or seq < 1 or when memory cannot hold the buffers of x's rows; ShapeError when x or
   *         y is not (batch·seq, d); NonFiniteError when attention's scores or outputs are not finite (a NaN or ±Inf
   *         in x reaches them).
   */
  void forward(MatrixRef<Scalar> y, ConstMatrixRef<Scalar> x, Index batch, Index seq, Cache& cache) const {
    constexpr const char* where = "TransformerBlock::forward";
    check_rows(where, y, x, batch, seq);
    const Index n = batch * seq, d = config_.d, f = config_.hidden();
    // Invalidate first: if a step below throws, backward refuses the half-written cache.
    cache.batch = cache.seq = 0;
    detail::allocating_activations(where, n, d, 1, sizeof(Scalar), [&] {
      detail::resize_buffer(cache.a, n, d);
      detail::resize_buffer(cache.q, n, d);
      detail::resize_buffer(cache.k, n, d);
      detail::resize_buffer(cache.v, n, d);
      detail::resize_buffer(cache.ctx, n, d);
      detail::resize_buffer(cache.h, n, d);
      detail::resize_buffer(cache.m, n, d);
      detail::resize_buffer(cache.up, n, f);
      detail::resize_buffer(cache.act, n, f);

      ln1_.forward(cache.a, x, cache.ln1);
      // Each rotation right after its product, while the product's rows are still in the core's cache.
      q_.forward(cache.q, cache.a);
      rotary_.forward(cache.q, cache.q, batch, seq, 0);
      k_.forward(cache.k, cache.a);
      rotary_.forward(cache.k, cache.k, batch, seq, 0);
      v_.forward(cache.v, cache.a);
      attention_forward<Scalar>(cache.ctx, cache.q, cache.k, cache.v, batch, seq, config_.heads, cache.attn);
      o_.forward(cache.h, cache.ctx);
      // Every read of x happens before y is written, so y may be x.
      if (config_.parallel_residual) ln2_.forward(cache.m, x, cache.ln2);
      detail::parallel_add<Scalar>(cache.h, x);
      if (!config_.parallel_residual) ln2_.forward(cache.m, cache.h, cache.ln2);
      up_.forward(cache.up, cache.m);
      gelu_forward(cache.act, cache.up);
      down_.forward(y, cache.act);
      detail::parallel_add<Scalar>(y, cache.h);
      cache.batch = batch;
      cache.seq = seq;
    });
  }

  /**
   * @brief dx (overwritten) and every parameter gradient (accumulated) from dy.
   * @param dx     [batch·seq, d] gradient of the input; may be x or dy itself
   * @param x      [batch·seq, d] the input given to forward
   * @param dy     [batch·seq, d] gradient of the output
   * @param cache  filled by forward on this x
   * @throws StateError when forward has not filled the cache; ShapeError on a shape mismatch; ConfigError when memory
   *         cannot hold the buffers of x's rows.
   */
  void backward(MatrixRef<Scalar> dx, ConstMatrixRef<Scalar> x, ConstMatrixRef<Scalar> dy, const Cache& cache) {
    constexpr const char* where = "TransformerBlock::backward";
    const Index n = cache.batch * cache.seq, d = config_.d, f = config_.hidden();
    if (cache.batch < 1 || cache.seq < 1 || cache.a.rows() != n || cache.up.cols() != f)
      throw StateError(std::string(where) + ": the cache was not filled by forward; call forward first");
    const std::string expected = detail::attention_rows_text(cache.batch, cache.seq, d) + " (from the cache)";
    detail::check_shape(where, "x", x.rows(), x.cols(), n, d, expected);
    detail::check_shape(where, "dy", dy.rows(), dy.cols(), n, d, expected);
    detail::check_shape(where, "dx", dx.rows(), dx.cols(), n, d, expected);
    detail::allocating_activations(where, n, d, 1, sizeof(Scalar), [&] {
      detail::resize_buffer(df_, n, f);
      detail::resize_buffer(dm_, n, d);
      detail::resize_buffer(dh_, n, d);
      detail::resize_buffer(dq_, n, d);
      detail::resize_buffer(dk_, n, d);
      detail::resize_buffer(dv_, n, d);
      detail::resize_buffer(da_, n, d);

      // FFN branch, from dy down to the gradient of LN2's input.
      down_.backward(df_, cache.act, dy);
      gelu_backward(df_, cache.up, df_);
      up_.backward(dm_, cache.m, df_);
      // dres is the gradient of the residual stream after attention: dy itself in the parallel form (no copy), dy plus
      // the FFN branch (in dh_) in the sequential form.
      if (config_.parallel_residual) {
        ln2_.backward(dm_, x, dm_, cache.ln2);  // dm_ now holds the FFN branch's dx contribution
      } else {
        ln2_.backward(dm_, cache.h, dm_, cache.ln2);
        detail::parallel_sum<Scalar>(dh_, dy, dm_);
      }
      const ConstMatrixRef<Scalar> dres = config_.parallel_residual ? dy : ConstMatrixRef<Scalar>(dh_);

      // Attention branch, from dres down to dL/da.
      o_.backward(da_, cache.ctx, dres);  // da_ temporarily holds dctx
      attention_backward<Scalar>(dq_, dk_, dv_, cache.q, cache.k, cache.v, da_, cache.attn);
      // Linear::backward overwrites its dx, so the three input gradients are summed through scratch buffers. Each
      // rotation runs right before the product that reads its result.
      rotary_.backward(dq_, dq_, cache.batch, cache.seq, 0);
      q_.backward(da_, cache.a, dq_);
      rotary_.backward(dk_, dk_, cache.batch, cache.seq, 0);
      k_.backward(dq_, cache.a, dk_);
      detail::parallel_add<Scalar>(da_, dq_);
      v_.backward(dq_, cache.a, dv_);
      detail::parallel_add<Scalar>(da_, dq_);
      ln1_.backward(da_, x, da_, cache.ln1);

      // dx last: it may share storage with x, which LN1's backward still reads, or with dy (= dres in the parallel
      // form), which the element-wise sum reads at the index it writes.
      if (config_.parallel_residual)
        detail::parallel_sum<Scalar>(dx, dres, da_, dm_);
      else
        detail::parallel_sum<Scalar>(dx, dh_, da_);
    });
  }

  /**
   * @brief A KV cache sized for this block: `batch` sequences of at most `max_seq` tokens, d features, stored as
   *        `storage` (BF16 for Scalar = float only: half the bytes per token, see KVCache).
   * @throws ConfigError for a non-positive size or a storage the cache does not support.
   */
  KVCache<Scalar> make_kv_cache(Index batch, Index max_seq, StorageType storage = StorageType::F32) const {
    return KVCache<Scalar>(batch, max_seq, config_.d, storage);
  }

  /**
   * @brief Incremental decoding: runs the next t tokens of every sequence, at positions kv.length() … +t−1, appends
   *        their rotated keys and values to kv and writes their outputs (the rows forward gives on the whole
   *        sequence, up to rounding).
   * @param y_new  [batch·t, d] output, batch-major (row b·t + i is new token i of sequence b); may be x_new itself
   * @param x_new  [batch·t, d] inputs of the new tokens
   * @param kv     cache from make_kv_cache (or any KVCache with d features); its length grows by t
   * @throws ShapeError when x_new is not (kv.batch()·t, d) or y_new differs, or kv has the wrong width;
   *         CapacityError when kv.length() + t would exceed kv.max_seq(); NonFiniteError when attention's scores or
   *         outputs are not finite (a NaN or ±Inf in x_new reaches them); ConfigError when memory cannot hold the
   *         buffers of its rows. kv is unchanged when it throws.
   */
  void forward_decode(MatrixRef<Scalar> y_new, ConstMatrixRef<Scalar> x_new, KVCache<Scalar>& kv) const {
    constexpr const char* where = "TransformerBlock::forward_decode";
    const Index d = config_.d, f = config_.hidden();
    kv.check_features(where, d);
    const Index t = kv.new_tokens(where, "x_new", x_new.rows(), x_new.cols());
    const Index rows = x_new.rows();
    detail::check_shape(where, "y_new", y_new.rows(), y_new.cols(), rows, d);
    if (kv.length() + t > kv.max_seq())
      throw CapacityError(std::string(where) + ": decoding " + std::to_string(t) + " token(s) per sequence after " +
                          std::to_string(kv.length()) + " cached would make " + std::to_string(kv.length() + t) +
                          " > max_seq = " + std::to_string(kv.max_seq()));
    const Index position = kv.length();
    detail::decode_step(where, rows, d, 1, std::span<KVCache<Scalar>>(&kv, 1), [&] {
      // Decoding is const (the cache is the only state), so its few small buffers are local to the call.
      LayerNormCache<Scalar> norm_stats;
      Matrix<Scalar> a(rows, d), q(rows, d), k(rows, d), v(rows, d), h(rows, d);  // [batch·t, d]
      Matrix<Scalar> hidden(rows, f);                                              // [batch·t, F]
      ln1_.forward(a, x_new, norm_stats);
      q_.forward(q, a);
      k_.forward(k, a);
      v_.forward(v, a);
      rotary_.forward(q, q, kv.batch(), t, position);
      rotary_.forward(k, k, kv.batch(), t, position);
      attention_decode<Scalar>(q, q, k, v, kv, config_.heads);  // the context overwrites q
      o_.forward(h, q);
      if (config_.parallel_residual) ln2_.forward(a, x_new, norm_stats);
      detail::parallel_add<Scalar>(h, x_new);
      if (!config_.parallel_residual) ln2_.forward(a, h, norm_stats);
      up_.forward(hidden, a);
      gelu_forward(hidden, hidden);
      down_.forward(y_new, hidden);
      detail::parallel_add<Scalar>(y_new, h);
    });
  }

  /// Sets every parameter gradient to zero.
  void zero_grad() {
    ln1_.zero_grad();
    q_.zero_grad();
    k_.zero_grad();
    v_.zero_grad();
    o_.zero_grad();
    ln2_.zero_grad();
    up_.zero_grad();
    down_.zero_grad();
  }

  /**
   * @brief Views of every parameter, in this order: "<prefix>.ln1.gamma", "<prefix>.ln1.beta", "<prefix>.q.weight",
   *        "<prefix>.q.bias", then k, v, o, "<prefix>.ln2.…", "<prefix>.up.…", "<prefix>.down.…" (no ".bias"
   *        entries when config().bias is false).
   * @param prefix dotted path of this block without a trailing dot; empty gives "ln1.gamma", ...
   */
  std::vector<ParameterView<Scalar>> parameters(const std::string& prefix = {}) {
    const std::string dot = prefix.empty() ? std::string() : prefix + ".";
    std::vector<ParameterView<Scalar>> views;
    const auto add = [&views](std::vector<ParameterView<Scalar>>&& more) {
      for (auto& view : more) views.push_back(std::move(view));
    };
    add(ln1_.parameters(dot + "ln1"));
    add(q_.parameters(dot + "q"));
    add(k_.parameters(dot + "k"));
    add(v_.parameters(dot + "v"));
    add(o_.parameters(dot + "o"));
    add(ln2_.parameters(dot + "ln2"));
    add(up_.parameters(dot + "up"));
    add(down_.parameters(dot + "down"));
    return views;
  }

  /// Scalars in all parameters: 4·(d² + d) + 2·d·F + F + d (biases included when config().bias) + 4·d (LayerNorms).
  Index num_parameters() const {
    const Index d = config_.d, f = config_.hidden(), b = config_.bias ? 1 : 0;
    return 4 * (d * d + b * d) + (d * f + b * f) + (f * d + b * d) + 4 * d;
  }

 private:
  void check_rows(const char* where, const MatrixRef<Scalar>& y, const ConstMatrixRef<Scalar>& x, Index batch,
                  Index seq) const {
    detail::check_config(batch >= 1, where, "batch = " + std::to_string(batch) + " must be ≥ 1");
    detail::check_config(seq >= 1, where, "seq = " + std::to_string(seq) + " must be ≥ 1");
    detail::checked_mul(where, "batch × seq", batch, seq);
    const std::string expected = detail::attention_rows_text(batch, seq, config_.d);
    detail::check_shape(where, "x", x.rows(), x.cols(), batch * seq, config_.d, expected);
    detail::check_shape(where, "y", y.rows(), y.cols(), batch * seq, config_.d, expected);
  }

  Config config_;
  LayerNorm<Scalar> ln1_;  // over d
  Linear<Scalar> q_;       // d → d
  Linear<Scalar> k_;       // d → d
  Linear<Scalar> v_;       // d → d
  Linear<Scalar> o_;       // d → d
  Rotary<Scalar> rotary_;  // first R dims of each head of q and k
  LayerNorm<Scalar> ln2_;  // over d
  Linear<Scalar> up_;      // d → F
  Linear<Scalar> down_;    // F → d
  // Scratch of backward, resized per call (N = batch·seq).
  Matrix<Scalar> df_;  // [N, F] gradient of act, then of up
  Matrix<Scalar> dm_;  // [N, d] gradient of m, then the FFN branch's share of dx (parallel) or of dh (sequential)
  Matrix<Scalar> dh_;  // [N, d] gradient of the residual stream after attention (sequential form only)
  Matrix<Scalar> dq_;  // [N, d] gradient of q (then scratch for the K/V input gradients)
  Matrix<Scalar> dk_;  // [N, d] gradient of k
  Matrix<Scalar> dv_;  // [N, d] gradient of v
  Matrix<Scalar> da_;  // [N, d] gradient of ctx, then of a, then the attention branch's share of dx
};

}  // namespace memoryformer
