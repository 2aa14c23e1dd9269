// SPDX-License-Identifier: MIT
// MemoryBlock: the FFN replacement of design §2 — ML1 → LayerNorm → [GeLU] → ML2 — with its backward.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "detail/checks.hpp"
#include "detail/checked_size.hpp"
#include "error.hpp"
#include "distributed/table_sharding.hpp"
#include "memory_layer.hpp"
#include "nn/gelu.hpp"
#include "nn/layer_norm.hpp"
#include "parameter.hpp"
#include "types.hpp"

namespace memoryformer {

/// Settings of a Memory Block over d features.
struct MemoryBlockConfig {
  Index d = 0;                      ///< model width; a multiple of τ
  int tau = 8;                      ///< code length of ML1 (K = d/τ tables)
  int expand_bits = 2;              ///< e: ML1 emits K·(τ+e) features, ML2 reads chunks of τ+e bits (τ+e ≤ 16)
  bool gelu = false;                ///< GeLU after the LayerNorm (the paper found it makes no difference)
  bool extra_table = false;         ///< authors' alternative: ML1 d → 2d, ML2 reads 2K chunks of τ bits
  ScoreKind score = ScoreKind::L1;  ///< score of both memory layers
  double temperature = 1.0;         ///< t of the paper score
  bool bias = true;                 ///< biases in ML1 and ML2
  double layer_norm_eps = 1e-5;

  Index num_tables() const { return tau > 0 ? d / tau : 0; }  ///< K
  /// Width of the hidden layer between ML1 and ML2.
  Index hidden() const { return extra_table ? 2 * d : num_tables() * (tau + expand_bits); }
  /// Code length of ML2.
  int tau2() const { return extra_table ? tau : tau + expand_bits; }

  MemoryLayerConfig ml1() const {
    return {.d_in = d, .d_out = hidden(), .tau = tau, .score = score, .temperature = temperature, .bias = bias};
  }
  MemoryLayerConfig ml2() const {
    return {.d_in = hidden(), .d_out = d, .tau = tau2(), .score = score, .temperature = temperature, .bias = bias};
  }

  /// @throws ConfigError naming the offending value.
  void validate(std::string_view where = "MemoryBlockConfig") const {
    // Range first: tau + expand_bits and the shifts below must not overflow an int.
    detail::check_config(expand_bits >= 0 && expand_bits <= 16, where,
                         "expand_bits = " + std::to_string(expand_bits) + " is outside 0..16");
    detail::check_config(tau >= 1 && tau <= 16, where, "tau = " + std::to_string(tau) + " is outside 1..16");
    detail::check_config(d >= 1 && d <= detail::max_elements, where,
                         "d = " + std::to_string(d) + " is outside 1..2^48");
    detail::check_config(tau2() <= 16, where,
                         "tau + expand_bits = " + std::to_string(tau + expand_bits) + " exceeds 16 (ML2's code length)");
    ml1().validate(where);
    ml2().validate(where);
  }
};

/// What MemoryBlock::forward keeps for backward (buffers are reused across calls of the same size).
template <std::floating_point Scalar>
struct MemoryBlockCache {
  HashResult<Scalar> hash1;         // hash of x: [N, K]
  Matrix<Scalar> hidden;            // [N, H] ML1 output
  LayerNormCache<Scalar> norm;      // per-row statistics of the LayerNorm
  Matrix<Scalar> normed;            // [N, H] LayerNorm output
  Matrix<Scalar> activated;         // [N, H] GeLU output (empty without GeLU)
  HashResult<Scalar> hash2;         // hash of ML2's input: [N, H/τ2]
};

/**
 * @brief u → ML1 → LayerNorm → [GeLU] → ML2 (design §2).
 *
 * forward is const (state goes to the cache); backward overwrites dx and accumulates parameter gradients.
 */
template <std::floating_point Scalar>
class MemoryBlock {
 public:
  using Config = MemoryBlockConfig;
  using Cache = MemoryBlockCache<Scalar>;

  /// With an active `sharding`, ML1 and ML2 keep only this rank's tables (table parallelism, see MemoryLayer).
  /// @throws ConfigError
  MemoryBlock(const MemoryBlockConfig& config, std::uint64_t seed, TableSharding sharding = {})
      : config_((config.validate("MemoryBlock"), config)),
        ml1_(config.ml1(), Rng::stream(seed, 1).next_u64(), sharding),
        norm_(config.hidden(), config.layer_norm_eps),
        ml2_(config.ml2(), Rng::stream(seed, 2).next_u64(), sharding) {}

  const MemoryBlockConfig& config() const { return config_; }
  MemoryLayer<Scalar>& ml1() { return ml1_; }
  const MemoryLayer<Scalar>& ml1() const { return ml1_; }
  LayerNorm<Scalar>& norm() { return norm_; }
  const LayerNorm<Scalar>& norm() const { return norm_; }
  MemoryLayer<Scalar>& ml2() { return ml2_; }
  const MemoryLayer<Scalar>& ml2() const { return ml2_; }

  /**
   * @param y [N, d] output
   * @param x [N, d] input
   * @throws ShapeError, NonFiniteError; ConfigError when memory cannot hold the buffers of x's rows
   */
  void forward(MatrixRef<Scalar> y, ConstMatrixRef<Scalar> x, Cache& cache) const {
    if (x.cols() != config_.d)
      detail::throw_shape("MemoryBlock::forward", "x", x.rows(), x.cols(), "(N, " + std::to_string(config_.d) + ")");
    detail::check_shape("MemoryBlock::forward", "y", y.rows(), y.cols(), x.rows(), config_.d);
    const Index n = x.rows(), h = config_.hidden();
    // Invalid until the end: a forward that throws midway leaves a cache that backward refuses.
    cache.hash1.invalidate();
    cache.hash2.invalidate();
    try {
      detail::allocating_activations("MemoryBlock::forward", n, h, 1, sizeof(Scalar),
                                     [&] { forward_layers(y, x, cache, n, h); });
    } catch (...) {
      cache.hash1.invalidate();
      cache.hash2.invalidate();
      throw;
    }
  }

 private:
  void forward_layers(MatrixRef<Scalar> y, ConstMatrixRef<Scalar> x, Cache& cache, Index n, Index h) const {
    detail::resize_buffer(cache.hidden, n, h);
    detail::resize_buffer(cache.normed, n, h);
    ml1_.forward(cache.hidden, x, cache.hash1);
    norm_.forward(cache.normed, cache.hidden, cache.norm);
    if (config_.gelu) {
      detail::resize_buffer(cache.activated, n, h);
      gelu_forward(cache.activated, cache.normed);
      ml2_.forward(y, cache.activated, cache.hash2);
    } else {
      cache.activated.resize(0, 0);
      ml2_.forward(y, cache.normed, cache.hash2);
    }
  }

 public:
  /**
   * @param dx [N, d] overwritten
   * @param x  [N, d] the input given to forward
   * @param dy [N, d]
   * @throws StateError (backward before forward), ShapeError, NonFiniteError; ConfigError when memory cannot hold
   *         the buffers of x's rows
   */
  void backward(MatrixRef<Scalar> dx, ConstMatrixRef<Scalar> x, ConstMatrixRef<Scalar> dy, const Cache& cache) {
    if (cache.hash1.empty() || cache.hash2.empty()) throw StateError("MemoryBlock::backward: the cache is empty; call forward first");
    const Index n = x.rows(), h = config_.hidden();
    detail::check_shape("MemoryBlock::backward", "x", x.rows(), x.cols(), cache.hidden.rows(), config_.d);
    detail::allocating_activations("MemoryBlock::backward", n, h, 1, sizeof(Scalar), [&] {
      detail::resize_buffer(dh_, n, h);
      const Matrix<Scalar>& ml2_input = config_.gelu ? cache.activated : cache.normed;
      ml2_.backward(dh_, ml2_input, dy, cache.hash2);
      if (config_.gelu) gelu_backward(dh_, cache.normed, dh_);
      norm_.backward(dh_, cache.hidden, dh_, cache.norm);
      ml1_.backward(dx, x, dh_, cache.hash1);
    });
  }

  /// Reports to ML1 and ML2 that any table row may have changed (MemoryLayer::tables_changed: they keep packed copies
  /// current from now on, and every later write to their tables must be reported again).
  void tables_changed() {
    ml1_.tables_changed();
    ml2_.tables_changed();
  }

  /// Re-packs the copy of ML1 or ML2 where it was released (MemoryLayer::keep_tables_packed).
  void keep_tables_packed() {
    ml1_.keep_tables_packed();
    ml2_.keep_tables_packed();
  }

  void zero_grad() {
    ml1_.zero_grad();
    norm_.zero_grad();
    ml2_.zero_grad();
  }

  /// "<prefix>.ml1.tables", "<prefix>.ml1.bias", "<prefix>.norm.gamma", "<prefix>.norm.beta", "<prefix>.ml2.…".
  std::vector<ParameterView<Scalar>> parameters(const std::string& prefix = {}) {
    const std::string dot = prefix.empty() ? std::string() : prefix + ".";
    auto views = ml1_.parameters(dot + "ml1");
    for (auto& v : norm_.parameters(dot + "norm")) views.push_back(std::move(v));
    for (auto& v : ml2_.parameters(dot + "ml2")) views.push_back(std::move(v));
    return views;
  }

  /// Values held here (only this rank's tables under table parallelism).
  Index num_parameters() const { return ml1_.num_parameters() + 2 * config_.hidden() + ml2_.num_parameters(); }

 private:
  MemoryBlockConfig config_;
  MemoryLayer<Scalar> ml1_;  // d → H
  LayerNorm<Scalar> norm_;   // over H
  MemoryLayer<Scalar> ml2_;  // H → d
  Matrix<Scalar> dh_;        // [N, H] scratch of backward
};

}  // namespace memoryformer
