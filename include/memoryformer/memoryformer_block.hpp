// SPDX-License-Identifier: MIT
// MemoryFormerBlock: design §3 as the authors' code builds it — RMSNorm → one shared hash → Q, K, V Memory Layers →
// causal multi-head attention with partial rotary → (no output projection) → residual → RMSNorm → MemoryBlock →
// residual — with its hand-written backward and incremental (KV-cache) decoding.
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "detail/checks.hpp"
#include "detail/checked_size.hpp"
#include "detail/row_parallel.hpp"
#include "detail/sorted_contributions.hpp"
#include "error.hpp"
#include "hash.hpp"
#include "distributed/table_sharding.hpp"
#include "memory_block.hpp"
#include "memory_layer.hpp"
#include "nn/attention.hpp"
#include "nn/block_norm.hpp"
#include "nn/kv_cache.hpp"
#include "storage_type.hpp"
#include "nn/layer_norm.hpp"
#include "nn/linear.hpp"
#include "nn/rms_norm.hpp"
#include "nn/rope.hpp"
#include "parameter.hpp"
#include "types.hpp"

namespace memoryformer {

/// Settings of a MemoryFormer block.
struct MemoryFormerBlockConfig {
  Index d = 0;                      ///< model width; a multiple of heads and of τ
  Index heads = 1;                  ///< attention heads; d is split contiguously into heads of d/heads
  Index rotary_dims = -1;           ///< rotary dims per head; −1 → rotary_pct 0.25 of the head, rounded down to even
  double rotary_base = 10000.0;
  int tau = 8;                      ///< code length of the Q/K/V hash and of ML1
  int expand_bits = 2;              ///< e of the Memory Block
  bool gelu = false;                ///< GeLU inside the Memory Block
  bool extra_table = false;         ///< the Memory Block's "extra_table" variant
  ScoreKind score = ScoreKind::L1;
  double temperature = 1.0;
  bool bias = true;                 ///< biases of every memory layer
  bool output_projection = false;   ///< add a dense W_O after attention (the authors' block has none)
  NormKind norm = NormKind::RMS;
  double rms_eps = 1e-8;
  double layer_norm_eps = 1e-5;
  double table_init_std = 0.02;     ///< Memory Block tables
  double qkv_init_std = -1.0;       ///< Q/K/V tables; −1 → sqrt(2/(5d)) as the authors' code

  Index head_dim() const { return heads > 0 ? d / heads : 0; }
  Index resolved_rotary_dims() const {
    if (rotary_dims >= 0) return rotary_dims;
    return (head_dim() / 4) / 2 * 2;
  }
  MemoryBlockConfig memory_block() const {
    return {.d = d, .tau = tau, .expand_bits = expand_bits, .gelu = gelu, .extra_table = extra_table, .score = score,
            .temperature = temperature, .bias = bias, .layer_norm_eps = layer_norm_eps};
  }
  MemoryLayerConfig qkv() const {
    return {.d_in = d, .d_out = d, .tau = tau, .score = score, .temperature = temperature, .bias = bias,
            .table_init_std = qkv_init_std >= 0 ? qkv_init_std : std::sqrt(2.0 / (5.0 * double(d)))};
  }

  /// @throws ConfigError naming the offending value.
  void validate(std::string_view where = "MemoryFormerBlockConfig") const {
    detail::check_config(d > 0, where, "d = " + std::to_string(d) + " must be > 0");
    detail::check_config(std::isfinite(table_init_std) && table_init_std >= 0, where,
                         "table_init_std = " + std::to_string(table_init_std) + " must be finite and >= 0");
    detail::check_config(std::isfinite(qkv_init_std) && (qkv_init_std >= 0 || qkv_init_std == -1.0), where,
                         "qkv_init_std = " + std::to_string(qkv_init_std) + " must be finite and >= 0 (or -1)");
    detail::check_config(heads >= 1 && d % heads == 0, where,
                         "d = " + std::to_string(d) + " is not divisible by heads = " + std::to_string(heads));
    const Index r = resolved_rotary_dims();
    detail::check_config(r % 2 == 0 && r <= head_dim(), where,
                         "rotary_dims = " + std::to_string(r) + " must be even and <= head_dim = " +
                             std::to_string(head_dim()));
    qkv().validate(where);
    memory_block().validate(where);
  }
};

/// What MemoryFormerBlock::forward keeps for backward; buffers are reused across calls of the same size.
template <std::floating_point Scalar>
struct MemoryFormerBlockCache {
  Index batch = 0, seq = 0;
  BlockNormCache<Scalar> norm1, norm2;  // per-row statistics of norm1(x), norm2(h)
  Matrix<Scalar> a;                 // [B·S, d] norm1(x)
  HashResult<Scalar> hash;          // [B·S, K] shared by Q, K, V
  Matrix<Scalar> q, k, v;           // [B·S, d] (q, k after rotary)
  AttentionCache<Scalar> attention; // attention output and log-sum-exp per row
  Matrix<Scalar> ctx;               // [B·S, d] attention output (before W_O)
  Matrix<Scalar> h;                 // [B·S, d] x + attention
  Matrix<Scalar> b;                 // [B·S, d] norm2(h)
  MemoryBlockCache<Scalar> memory;  // the Memory Block's own cache
};

namespace detail {

/// The checks of a decode step into kv by a block of width d, for the training block and its frozen copy alike: kv's
/// width, x_new [batch·t, d], y_new of x_new's shape and room for t more tokens; returns t.
template <class Cache>
Index block_decode_tokens(const char* where, Index d, const auto& y_new, const auto& x_new, const Cache& kv) {
  kv.check_features(where, d);
  const Index t = kv.new_tokens(where, "x_new", x_new.rows(), x_new.cols());
  check_shape(where, "y_new", y_new.rows(), y_new.cols(), x_new.rows(), d);
  if (kv.length() + t > kv.max_seq())
    throw CapacityError(std::string(where) + ": " + std::to_string(kv.length()) + " cached + " + std::to_string(t) +
                        " new tokens exceed max_seq = " + std::to_string(kv.max_seq()));
  return t;
}

/// The attention inputs of a MemoryFormer block (design §3.1), for the training block and its frozen copy alike:
/// a = norm1(x); one hash of a; q, k, v = its lookups in the Q, K, V tables, q and k rotated at positions
/// offset … offset + seq − 1 of each of the batch sequences, each right after its product while the product's rows
/// are still in the core's cache. `buffers` (the block's cache or the frozen block's scratch) receives them, and its
/// ctx, h and b get x's shape for the rest of the block.
template <class Norm, class Hasher, class Layer, class Rope, class Buffers>
void block_attention_input(const Norm& norm1, const Hasher& hasher, const Layer& q, const Layer& k, const Layer& v,
                           const Rope& rotary, const auto& x, Index batch, Index seq, Index offset, Buffers& buffers) {
  const Index n = x.rows(), d = x.cols();
  for (auto* m : {&buffers.a, &buffers.q, &buffers.k, &buffers.v, &buffers.ctx, &buffers.h, &buffers.b})
    resize_buffer(*m, n, d);
  norm1.forward(buffers.a, x, buffers.norm1);
  hasher.hash(buffers.hash, buffers.a);
  q.forward_hashed(buffers.q, buffers.hash);
  rotary.forward(buffers.q, buffers.q, batch, seq, offset);
  k.forward_hashed(buffers.k, buffers.hash);
  rotary.forward(buffers.k, buffers.k, batch, seq, offset);
  v.forward_hashed(buffers.v, buffers.hash);
}

/// The rest of a MemoryFormer block after attention (design §3.1), for the training block and its frozen copy alike:
/// h = x + [W_O] ctx (output: W_O, empty without it), y = h + MB(norm2(h)), from buffers.ctx into buffers.h,
/// buffers.b and y.
template <class Output, class Norm, class Memory, class Buffers, class Y, class X>
void block_residual_and_memory(const std::optional<Output>& output, const Norm& norm2, const Memory& memory, Y&& y,
                               const X& x, Buffers& buffers) {
  using Scalar = typename std::decay_t<decltype(buffers.h)>::Scalar;
  if (output) {
    output->forward(buffers.h, buffers.ctx);
    parallel_add<Scalar>(buffers.h, x);
  } else {
    parallel_sum<Scalar>(buffers.h, x, buffers.ctx);
  }
  norm2.forward(buffers.b, buffers.h, buffers.norm2);
  memory.forward(y, buffers.b, buffers.memory);
  parallel_add<Scalar>(y, buffers.h);
}

}  // namespace detail

/**
 * @brief One MemoryFormer block (design §3). Inputs are [batch·seq, d] matrices, rows batch-major (row b·seq + t is
 * token t of sequence b). forward is const; backward overwrites dx and accumulates parameter gradients.
 */
template <std::floating_point Scalar>
class MemoryFormerBlock {
 public:
  using Config = MemoryFormerBlockConfig;
  using Cache = MemoryFormerBlockCache<Scalar>;

  /// With an active `sharding`, every Memory Layer keeps only this rank's tables (table parallelism, see
  /// MemoryLayer); forward, backward and forward_decode are then collective.
  /// @throws ConfigError
  MemoryFormerBlock(const Config& config, std::uint64_t seed, TableSharding sharding = {})
      : config_((config.validate("MemoryFormerBlock"), config)),
        norm1_(config.norm, config.d, config.rms_eps, config.layer_norm_eps),
        hasher_(config.qkv().hash_config()),
        q_(config.qkv(), Rng::stream(seed, 1).next_u64(), sharding),
        k_(config.qkv(), Rng::stream(seed, 2).next_u64(), sharding),
        v_(config.qkv(), Rng::stream(seed, 3).next_u64(), sharding),
        rotary_(config.d, config.heads, config.resolved_rotary_dims(), config.rotary_base),
        norm2_(config.norm, config.d, config.rms_eps, config.layer_norm_eps),
        memory_(config.memory_block(), Rng::stream(seed, 4).next_u64(), sharding) {
    if (config_.output_projection) output_.emplace(config.d, config.d, config.bias, Rng::stream(seed, 5).next_u64());
  }

  const Config& config() const { return config_; }
  Index d() const { return config_.d; }
  MemoryLayer<Scalar>& q() { return q_; }
  MemoryLayer<Scalar>& k() { return k_; }
  MemoryLayer<Scalar>& v() { return v_; }
  MemoryBlock<Scalar>& memory_block() { return memory_; }
  const MemoryLayer<Scalar>& q() const { return q_; }
  const MemoryLayer<Scalar>& k() const { return k_; }
  const MemoryLayer<Scalar>& v() const { return v_; }
  const MemoryBlock<Scalar>& memory_block() const { return memory_; }
  /// The hash of norm1(x) that Q, K and V share (their hash settings are equal: config().qkv()).
  const SignHasher<Scalar>& hasher() const { return hasher_; }
  const Rotary<Scalar>& rotary() const { return rotary_; }
  BlockNorm<Scalar>& norm1() { return norm1_; }
  const BlockNorm<Scalar>& norm1() const { return norm1_; }
  BlockNorm<Scalar>& norm2() { return norm2_; }
  const BlockNorm<Scalar>& norm2() const { return norm2_; }
  Linear<Scalar>* output_projection() { return output_ ? &*output_ : nullptr; }
  const Linear<Scalar>* output_projection() const { return output_ ? &*output_ : nullptr; }

  /**
   * @param y [batch·seq, d] output
   * @param x [batch·seq, d] input
   * @throws ShapeError, NonFiniteError, ConfigError (batch or seq < 1, or memory cannot hold the buffers of x's rows)
   */
  void forward(MatrixRef<Scalar> y, ConstMatrixRef<Scalar> x, Index batch, Index seq, Cache& c) const {
    check_rows("MemoryFormerBlock::forward", x, batch, seq);
    detail::check_shape("MemoryFormerBlock::forward", "y", y.rows(), y.cols(), x.rows(), config_.d);
    c.batch = c.seq = 0;  // invalid until the end: a forward that throws leaves a cache backward refuses
    detail::allocating_activations("MemoryFormerBlock::forward", x.rows(), config_.d, 1, sizeof(Scalar), [&] {
      detail::block_attention_input(norm1_, hasher_, q_, k_, v_, rotary_, x, batch, seq, 0, c);
      attention_forward<Scalar>(c.ctx, c.q, c.k, c.v, batch, seq, config_.heads, c.attention);
      detail::block_residual_and_memory(output_, norm2_, memory_, y, x, c);
      c.batch = batch;
      c.seq = seq;
    });
  }

  /**
   * @param dx [batch·seq, d] overwritten
   * @param x  [batch·seq, d] the input given to forward
   * @param dy [batch·seq, d]
   * @throws StateError (backward before forward), ShapeError, NonFiniteError; ConfigError when memory cannot hold
   *         the buffers of x's rows
   */
  void backward(MatrixRef<Scalar> dx, ConstMatrixRef<Scalar> x, ConstMatrixRef<Scalar> dy, const Cache& c) {
    constexpr const char* where = "MemoryFormerBlock::backward";
    if (c.batch == 0) throw StateError(std::string(where) + ": the cache is empty; call forward first");
    detail::check_shape(where, "x", x.rows(), x.cols(), c.batch * c.seq, config_.d);
    detail::check_shape(where, "dy", dy.rows(), dy.cols(), x.rows(), config_.d);
    detail::check_shape(where, "dx", dx.rows(), dx.cols(), x.rows(), config_.d);
    const Index n = x.rows(), d = config_.d;
    detail::allocating_activations(where, n, d, 1, sizeof(Scalar), [&] {
      for (Matrix<Scalar>* m : {&dh_, &tmp_, &dq_, &dk_, &dv_, &da_}) detail::resize_buffer(*m, n, d);
      // y = h + MB(norm2(h))
      memory_.backward(tmp_, c.b, dy, c.memory);
      norm2_.backward(dh_, c.h, tmp_, c.norm2);
      detail::parallel_add<Scalar>(dh_, dy);
      // h = x + [W_O] ctx: without W_O, dctx is dh itself (no copy).
      if (output_) output_->backward(tmp_, c.ctx, dh_);
      const Matrix<Scalar>& dctx = output_ ? tmp_ : dh_;
      attention_backward<Scalar>(dq_, dk_, dv_, c.q, c.k, c.v, dctx, c.attention);
      // One hash feeds Q, K and V: its pairs are sorted by table row once for the three (design §1.6), and their score
      // gradients add up before one pass through the hasher. Each rotation runs right before the lookup that reads its
      // result, which then finds it in the core's cache.
      detail::zeroed_buffer(dscores_, c.hash.rows, c.hash.tables);
      qkv_sort_.current = false;
      rotary_.backward(dq_, dq_, c.batch, c.seq, 0);
      q_.backward_lookup(dscores_, dq_, c.hash, best_isa(), &qkv_sort_);
      rotary_.backward(dk_, dk_, c.batch, c.seq, 0);
      k_.backward_lookup(dscores_, dk_, c.hash, best_isa(), &qkv_sort_);
      v_.backward_lookup(dscores_, dv_, c.hash, best_isa(), &qkv_sort_);
      hasher_.backward(da_, c.a, c.hash, dscores_);
      norm1_.backward(dx, x, da_, c.norm1);
      detail::parallel_add<Scalar>(dx, dh_);
    });
  }

  /// A KV cache sized for this block, stored as `storage` (BF16 for Scalar = float only, see KVCache).
  KVCache<Scalar> make_kv_cache(Index batch, Index max_seq, StorageType storage = StorageType::F32) const {
    return KVCache<Scalar>(batch, max_seq, config_.d, storage);
  }

  /**
   * @brief Incremental decoding: x_new [batch·t, d] are the next t tokens of each sequence, at positions
   * kv.length() …; appends their keys and values to kv and writes their outputs — the same values forward gives
   * at those positions on the whole sequence.
   * @throws ShapeError; CapacityError past the cache's max_seq; NonFiniteError for a NaN or ±Inf in x_new (or a
   *         value that reaches the hash or attention so); ConfigError when memory cannot hold the buffers of its rows.
   *         kv is unchanged when it throws.
   */
  void forward_decode(MatrixRef<Scalar> y_new, ConstMatrixRef<Scalar> x_new, KVCache<Scalar>& kv) const {
    constexpr const char* where = "MemoryFormerBlock::forward_decode";
    const Index t = detail::block_decode_tokens(where, config_.d, y_new, x_new, kv);
    detail::decode_step(where, x_new.rows(), config_.d, 1, std::span<KVCache<Scalar>>(&kv, 1), [&] {
      Cache c;  // decoding keeps no state for backward
      detail::block_attention_input(norm1_, hasher_, q_, k_, v_, rotary_, x_new, kv.batch(), t, kv.length(), c);
      attention_decode<Scalar>(c.ctx, c.q, c.k, c.v, kv, config_.heads);
      detail::block_residual_and_memory(output_, norm2_, memory_, y_new, x_new, c);
    });
  }

  /// Reports to every Memory Layer that any table row may have changed (see MemoryLayer::tables_changed).
  void tables_changed() {
    q_.tables_changed();
    k_.tables_changed();
    v_.tables_changed();
    memory_.tables_changed();
  }

  /// Re-packs each Memory Layer's copy where it was released (MemoryLayer::keep_tables_packed).
  void keep_tables_packed() {
    q_.keep_tables_packed();
    k_.keep_tables_packed();
    v_.keep_tables_packed();
    memory_.keep_tables_packed();
  }

  void zero_grad() {
    norm1_.zero_grad();
    q_.zero_grad();
    k_.zero_grad();
    v_.zero_grad();
    if (output_) output_->zero_grad();
    norm2_.zero_grad();
    memory_.zero_grad();
  }

  /// "<prefix>.norm1.scale", "<prefix>.q.tables", … "<prefix>.memory.ml2.bias".
  std::vector<ParameterView<Scalar>> parameters(const std::string& prefix = {}) {
    const std::string dot = prefix.empty() ? std::string() : prefix + ".";
    std::vector<ParameterView<Scalar>> views;
    auto add = [&](std::vector<ParameterView<Scalar>> more) {
      for (auto& v : more) views.push_back(std::move(v));
    };
    add(norm1_.parameters(dot + "norm1"));
    add(q_.parameters(dot + "q"));
    add(k_.parameters(dot + "k"));
    add(v_.parameters(dot + "v"));
    if (output_) add(output_->parameters(dot + "o"));
    add(norm2_.parameters(dot + "norm2"));
    add(memory_.parameters(dot + "memory"));
    return views;
  }

  Index num_parameters() const {
    Index total = norm1_.num_parameters() + norm2_.num_parameters() + q_.num_parameters() + k_.num_parameters() +
                  v_.num_parameters() + memory_.num_parameters();
    if (output_) total += config_.d * config_.d + (config_.bias ? config_.d : 0);
    return total;
  }

 private:
  void check_rows(const char* where, ConstMatrixRef<Scalar> x, Index batch, Index seq) const {
    detail::check_config(batch >= 1 && seq >= 1, where,
                         "batch = " + std::to_string(batch) + " and seq = " + std::to_string(seq) + " must be >= 1");
    detail::checked_mul(where, "batch × seq", batch, seq);
    if (x.rows() != batch * seq || x.cols() != config_.d)
      detail::throw_shape(where, "x", x.rows(), x.cols(),
                          "(batch·seq, d) = (" + std::to_string(batch * seq) + ", " + std::to_string(config_.d) + ")");
  }

  Config config_;
  BlockNorm<Scalar> norm1_;               // [d]
  SignHasher<Scalar> hasher_;             // the hash Q, K and V share
  MemoryLayer<Scalar> q_, k_, v_;         // d → d each, reading hasher_'s codes
  Rotary<Scalar> rotary_;
  std::optional<Linear<Scalar>> output_;  // W_O [d, d], only with output_projection
  BlockNorm<Scalar> norm2_;               // [d]
  MemoryBlock<Scalar> memory_;            // the FFN replacement
  // Scratch of backward, [B·S, d] each except dscores_ [B·S, K]: kept to avoid reallocating every step.
  Matrix<Scalar> dh_, tmp_, dq_, dk_, dv_, da_, dscores_;
  detail::SortedContributionsBuffer qkv_sort_;  // the hash's pairs sorted by row, shared by Q, K and V's backward
};

}  // namespace memoryformer
