// SPDX-License-Identifier: MIT
// LanguageModel: token embedding → N blocks (MemoryFormer or the dense baseline) → final RMSNorm → dense LM head,
// causal next-token cross-entropy with the full backward pass, KV-cache decoding, and the config as text entries
// (saving and loading models: io/model_checkpoint.hpp); design §3.2 and §8.
#pragma once

#include <algorithm>
#include <charconv>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <filesystem>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include "detail/checks.hpp"
#include "config_entries.hpp"
#include "detail/checked_size.hpp"
#include "detail/serial_eigen.hpp"
#include "dtype.hpp"
#include "error.hpp"
#include "memoryformer_block.hpp"
#include "nn/cross_entropy.hpp"
#include "nn/embedding.hpp"
#include "nn/kv_cache.hpp"
#include "storage_type.hpp"
#include "nn/linear.hpp"
#include "nn/rms_norm.hpp"
#include "parameter.hpp"
#include "random.hpp"
#include "distributed/table_sharding.hpp"
#include "transformer_block.hpp"
#include "types.hpp"

namespace memoryformer {


/**
 * @brief How a block type is named and (de)serialised in a model checkpoint. Specialised for MemoryFormerBlock and
 *        TransformerBlock; specialise it for your own block to use it in LanguageModel checkpoints.
 *
 * Only the settings that determine the architecture and the forward computation are written (shapes, norms,
 * rotary, score, eps values); initialisation settings are not, so loading into a model built with another init is
 * allowed.
 */
template <class Block>
struct BlockTraits;

/// MemoryFormerBlock: kind "memoryformer".
template <std::floating_point Scalar>
struct BlockTraits<MemoryFormerBlock<Scalar>> {
  static constexpr std::string_view kind = "memoryformer";
  static void write(ConfigEntries& out, const MemoryFormerBlockConfig& c) {
    using detail::model::bool_text;
    using detail::model::format_double;
    out.emplace_back("block.d", std::to_string(c.d));
    out.emplace_back("block.heads", std::to_string(c.heads));
    out.emplace_back("block.rotary_dims", std::to_string(c.resolved_rotary_dims()));
    out.emplace_back("block.rotary_base", format_double(c.rotary_base));
    out.emplace_back("block.tau", std::to_string(c.tau));
    out.emplace_back("block.expand_bits", std::to_string(c.expand_bits));
    out.emplace_back("block.gelu", bool_text(c.gelu));
    out.emplace_back("block.extra_table", bool_text(c.extra_table));
    out.emplace_back("block.score", std::string(score_kind_name(c.score)));
    out.emplace_back("block.temperature", format_double(c.temperature));
    out.emplace_back("block.bias", bool_text(c.bias));
    out.emplace_back("block.output_projection", bool_text(c.output_projection));
    out.emplace_back("block.norm", c.norm == NormKind::RMS ? "rms" : "layer");
    out.emplace_back("block.rms_eps", format_double(c.rms_eps));
    out.emplace_back("block.layer_norm_eps", format_double(c.layer_norm_eps));
  }
  static MemoryFormerBlockConfig read(const detail::model::ConfigReader& r) {
    MemoryFormerBlockConfig c;
    c.d = Index(r.integer("block.d"));
    c.heads = Index(r.integer("block.heads"));
    c.rotary_dims = Index(r.integer("block.rotary_dims"));
    c.rotary_base = r.real("block.rotary_base");
    c.tau = int(r.integer("block.tau", 1, 16));
    c.expand_bits = int(r.integer("block.expand_bits", 0, 16));
    c.gelu = r.boolean("block.gelu");
    c.extra_table = r.boolean("block.extra_table");
    try {
      c.score = parse_score_kind(r.text("block.score"));
    } catch (const ConfigError& e) {
      throw FormatError(std::string("config key 'block.score': ") + e.what());
    }
    c.temperature = r.real("block.temperature");
    c.bias = r.boolean("block.bias");
    c.output_projection = r.boolean("block.output_projection");
    const std::string& norm = r.text("block.norm");
    if (norm != "rms" && norm != "layer")
      throw FormatError("config key 'block.norm' is '" + norm + "', expected 'rms' or 'layer'");
    c.norm = norm == "rms" ? NormKind::RMS : NormKind::Layer;
    c.rms_eps = r.real("block.rms_eps");
    c.layer_norm_eps = r.real("block.layer_norm_eps");
    return c;
  }
};

/// TransformerBlock (the dense baseline): kind "transformer".
template <std::floating_point Scalar>
struct BlockTraits<TransformerBlock<Scalar>> {
  static constexpr std::string_view kind = "transformer";
  static void write(ConfigEntries& out, const TransformerBlockConfig& c) {
    using detail::model::bool_text;
    using detail::model::format_double;
    out.emplace_back("block.d", std::to_string(c.d));
    out.emplace_back("block.heads", std::to_string(c.heads));
    out.emplace_back("block.rotary_dims", std::to_string(c.resolved_rotary_dims()));
    out.emplace_back("block.rotary_base", format_double(c.rotary_base));
    out.emplace_back("block.ffn_hidden", std::to_string(c.hidden()));
    out.emplace_back("block.bias", bool_text(c.bias));
    out.emplace_back("block.parallel_residual", bool_text(c.parallel_residual));
    out.emplace_back("block.norm_eps", format_double(c.norm_eps));
  }
  static TransformerBlockConfig read(const detail::model::ConfigReader& r) {
    TransformerBlockConfig c;
    c.d = Index(r.integer("block.d"));
    c.heads = Index(r.integer("block.heads"));
    c.rotary_dims = Index(r.integer("block.rotary_dims"));
    c.rotary_base = r.real("block.rotary_base");
    c.ffn_hidden = Index(r.integer("block.ffn_hidden"));
    c.bias = r.boolean("block.bias");
    c.parallel_residual = r.boolean("block.parallel_residual");
    c.norm_eps = r.real("block.norm_eps");
    return c;
  }
};

/// Settings of a LanguageModel: vocabulary, depth, the block config shared by every block, and initialisation.
template <class BlockConfig>
struct LanguageModelConfig {
  Index vocab = 256;                ///< token ids 0 … vocab−1 (256: byte-level)
  Index layers = 4;                 ///< number of blocks, ≥ 1
  BlockConfig block{};              ///< config of every block (block.d is the model width)
  double final_norm_eps = 1e-8;     ///< eps of the final RMSNorm, added to the RMS as in the blocks (design §7.1)
  double embedding_init_std = 0.02; ///< token embedding ~ N(0, std²)
  double head_init_std = 0.02;      ///< LM head weight ~ N(0, std²)
  bool head_bias = false;           ///< add a bias to the LM head

  /// @throws ConfigError naming the offending value (including the block config's own checks).
  void validate(std::string_view where = "LanguageModelConfig") const {
    detail::check_config(vocab >= 1, where, "vocab = " + std::to_string(vocab) + " must be ≥ 1");
    detail::check_config(layers >= 1, where, "layers = " + std::to_string(layers) + " must be ≥ 1");
    detail::check_config(std::isfinite(final_norm_eps) && final_norm_eps >= 0.0, where,
                         "final_norm_eps = " + std::to_string(final_norm_eps) + " must be finite and ≥ 0");
    detail::check_config(std::isfinite(embedding_init_std) && std::isfinite(head_init_std) &&
                             embedding_init_std >= 0.0 && head_init_std >= 0.0,
                         where,
                         "init standard deviations (embedding " + std::to_string(embedding_init_std) + ", head " +
                             std::to_string(head_init_std) + ") must be finite and ≥ 0");
    detail::checked_mul(where, "vocab × d", vocab, block.d);
    block.validate(where);
  }
};

/**
 * @brief What LanguageModel::forward keeps for backward. Buffers are reused across calls of the same size.
 * N = batch·seq rows, batch-major (row b·seq + t is position t of sequence b).
 */
template <class BlockCache, std::floating_point Scalar>
struct LanguageModelCache {
  Index batch = 0;                      // sequences of the last forward (0: none yet)
  Index seq = 0;                        // tokens per sequence
  std::vector<std::int32_t> tokens;     // [N] inputs
  std::vector<std::int32_t> targets;    // [N] next tokens (forward_loss only; empty after forward)
  std::vector<Matrix<Scalar>> x;        // layers + 1 of [N, d]: x[0] embeddings, x[i+1] output of block i
  std::vector<BlockCache> blocks;       // one per block
  RMSNormCache<Scalar> norm;            // final RMSNorm statistics
  Matrix<Scalar> normed;                // [N, d] final RMSNorm output
  Matrix<Scalar> logits;                // [N, vocab]
  CrossEntropyCache<Scalar> loss;       // per-row log-sum-exp (forward_loss only)
};

/**
 * @brief A decoder-only language model (design §3.2, §8): token embedding → `layers` blocks → final RMSNorm →
 *        untied dense LM head, trained with causal next-token cross-entropy.
 *
 * `Block` is MemoryFormerBlock (the paper's model) or TransformerBlock (the dense baseline of the same width, depth
 * and heads); any class template with the same interface works (Config, Cache, forward, backward, make_kv_cache,
 * forward_decode, zero_grad, parameters, num_parameters) once BlockTraits is specialised for it.
 *
 * forward is const (everything backward needs goes to the caller's cache); backward accumulates every parameter
 * gradient until zero_grad(). Parameter names: "embedding.weight", "blocks.<i>.<block parameter>",
 * "final_norm.scale", "head.weight" (and "head.bias" with head_bias).
 *
 * **Threads.** With OpenMP (MEMORYFORMER_USE_OPENMP) the Memory Layer kernels, the norms, the residual adds, the LM
 * head and the cross-entropy run on omp_get_max_threads() threads, partitioning rows (products and reductions over
 * rows in fixed chunks) so that results are bitwise identical for any thread count. Eigen's own threaded products
 * are not (see set_deterministic_threads), so by default forward/backward run them single-threaded.
 *
 * **Inference.** FrozenLanguageModel (frozen_model.hpp) is a read-only copy of a MemoryFormerLM<float> whose tables
 * are packed to float32, bfloat16 or float16, with the same forward and forward_decode.
 *
 * @tparam Block  the block class template, instantiated as Block<Scalar>
 * @tparam Scalar float or double
 */
template <template <std::floating_point> class Block, std::floating_point Scalar = float>
class LanguageModel {
 public:
  using BlockType = Block<Scalar>;
  using BlockConfig = typename BlockType::Config;
  using Config = LanguageModelConfig<BlockConfig>;
  using Cache = LanguageModelCache<typename BlockType::Cache, Scalar>;
  using ScalarType = Scalar;

  /// KV caches of every block for incremental decoding (see make_decode_state).
  struct DecodeState {
    std::vector<KVCache<Scalar>> kv;  // one per block
    /// Tokens decoded so far per sequence.
    Index length() const { return kv.empty() ? 0 : kv.front().length(); }
    Index batch() const { return kv.empty() ? 0 : kv.front().batch(); }
    Index max_seq() const { return kv.empty() ? 0 : kv.front().max_seq(); }
    /// Forgets every decoded token (the storage is kept).
    void clear() {
      for (auto& c : kv) c.clear();
    }
  };

  /**
   * @brief Builds the model; the embedding, every block and the head draw from their own Rng streams of `seed`.
   *        With an active `sharding` (MemoryFormer models only), every Memory Layer keeps only this rank's tables
   *        and forward, backward and forward_decode are collective (table parallelism, design §11.3); the other
   *        parameters are whole on every rank.
   * @throws ConfigError naming the offending value.
   */
  LanguageModel(const Config& config, std::uint64_t seed, TableSharding sharding = {})
      : config_((config.validate("LanguageModel"), config)),
        embedding_(config.vocab, config.block.d, Rng::stream(seed, 0).next_u64(), config.embedding_init_std),
        final_norm_(config.block.d, config.final_norm_eps),
        head_(config.block.d, config.vocab, config.head_bias, Rng::stream(seed, 1).next_u64(), config.head_init_std) {
    blocks_.reserve(std::size_t(config.layers));
    for (Index i = 0; i < config.layers; ++i) {
      const std::uint64_t block_seed = Rng::stream(seed, 100 + std::uint64_t(i)).next_u64();
      if constexpr (std::is_constructible_v<BlockType, const BlockConfig&, std::uint64_t, TableSharding>) {
        blocks_.emplace_back(config.block, block_seed, sharding);
      } else {
        detail::check_config(!sharding.active(), "LanguageModel",
                             "table parallelism needs Memory Layers; the " + std::string(kind()) + " model has none");
        blocks_.emplace_back(config.block, block_seed);
      }
    }
  }

  // Parameter views point into the members: moving or copying would leave views (and optimisers) dangling.
  LanguageModel(const LanguageModel&) = delete;
  LanguageModel& operator=(const LanguageModel&) = delete;

  const Config& config() const { return config_; }
  Index vocab() const { return config_.vocab; }
  Index d() const { return config_.block.d; }
  Index layers() const { return config_.layers; }
  /// "memoryformer" or "transformer" (BlockTraits<BlockType>::kind).
  static constexpr std::string_view kind() { return BlockTraits<BlockType>::kind; }

  Embedding<Scalar>& embedding() { return embedding_; }
  const Embedding<Scalar>& embedding() const { return embedding_; }
  BlockType& block(Index i) { return blocks_.at(std::size_t(i)); }
  const BlockType& block(Index i) const { return blocks_.at(std::size_t(i)); }
  RMSNorm<Scalar>& final_norm() { return final_norm_; }
  const RMSNorm<Scalar>& final_norm() const { return final_norm_; }
  Linear<Scalar>& head() { return head_; }
  const Linear<Scalar>& head() const { return head_; }

  /**
   * @brief With OpenMP: true (default) runs Eigen's products single-threaded during forward/backward, so results do
   *        not depend on the thread count; false lets Eigen use its threads in the products the library does not
   *        split itself (attention; Linear and the LM head always run on the library's fixed row/column blocks), and
   *        results then differ between thread counts by float rounding. No effect without OpenMP.
   */
  void set_deterministic_threads(bool on) { deterministic_threads_ = on; }
  bool deterministic_threads() const { return deterministic_threads_; }

  /**
   * @brief Logits of every position: cache.logits [batch·seq, vocab], row b·seq + t scoring the token after
   *        position t of sequence b (causal: it sees positions 0 … t of its own sequence only).
   * @param tokens  batch·seq ids in [0, vocab), batch-major
   * @return a reference to cache.logits
   * @throws ConfigError for batch or seq < 1, or when memory cannot hold the buffers of batch·seq positions;
   *         ShapeError when tokens.size() ≠ batch·seq; ValueError for an id outside [0, vocab).
   */
  const Matrix<Scalar>& forward(std::span<const std::int32_t> tokens, Index batch, Index seq, Cache& cache) const {
    constexpr const char* where = "LanguageModel::forward";
    check_sizes(where, "tokens", tokens.size(), batch, seq);
    cache.batch = cache.seq = 0;  // a forward that throws leaves a cache backward refuses
    return detail::allocating_activations(
        where, batch * seq, config_.block.d, config_.layers, sizeof(Scalar),
        [&]() -> const Matrix<Scalar>& { return forward_layers(tokens, batch, seq, cache); });
  }

  /**
   * @brief forward, then the mean cross-entropy of predicting targets[r] from row r of the logits.
   * @param tokens   batch·seq input ids
   * @param targets  batch·seq ids: the token that follows each input position (for text: the inputs shifted by one)
   * @return the mean loss in nats per token
   * @throws as forward; ShapeError / ValueError for targets of the wrong count or outside [0, vocab).
   */
  Scalar forward_loss(std::span<const std::int32_t> tokens, std::span<const std::int32_t> targets, Index batch,
                      Index seq, Cache& cache) const {
    check_sizes("LanguageModel::forward_loss", "targets", targets.size(), batch, seq);
    detail::check_targets("LanguageModel::forward_loss", batch * seq, config_.vocab, targets);
    forward(tokens, batch, seq, cache);
    const Scalar loss = cross_entropy_forward<Scalar>(cache.logits, targets, cache.loss);
    cache.targets.assign(targets.begin(), targets.end());
    return loss;
  }

  /**
   * @brief Backward of forward_loss: accumulates dL/dθ · dloss into every parameter gradient (L the mean loss).
   * @throws StateError unless `cache` was filled by forward_loss; ConfigError for a non-finite dloss and
   *         NonFiniteError for non-finite logit gradients, both before any gradient changes. When a block throws
   *         later (also ConfigError when memory cannot hold its gradient buffers), every gradient is cleared
   *         (zero_grad) before the exception propagates.
   */
  void backward(const Cache& cache, Scalar dloss = Scalar(1)) {
    constexpr const char* where = "LanguageModel::backward";
    const Index n = cache.batch * cache.seq;
    if (cache.batch < 1 || Index(cache.targets.size()) != n || cache.logits.rows() != n ||
        cache.x.size() != blocks_.size() + 1)
      throw StateError(std::string(where) + ": the cache was not filled by forward_loss; call forward_loss first");
    detail::check_config(std::isfinite(double(dloss)), where, "dloss = " + std::to_string(double(dloss)) + " is not finite");
    const detail::SerialEigenScope serial(deterministic_threads_);
    detail::allocating_activations(where, n, config_.block.d, config_.layers, sizeof(Scalar),
                                   [&] { detail::resize_buffer(dlogits_, n, config_.vocab); });
    cross_entropy_backward<Scalar>(dlogits_, cache.logits, cache.targets, cache.loss, dloss);
    // Checked before any gradient is touched, so that a non-finite loss gradient leaves every gradient as it was.
    detail::check_finite(where, "dlogits", dlogits_.data(), dlogits_.rows(), dlogits_.cols());
    try {
      detail::allocating_activations(where, n, config_.block.d, config_.layers, sizeof(Scalar),
                                     [&] { backward_layers(cache); });
    } catch (...) {
      // A later layer refused its input after the head and final norm had accumulated theirs: clear every
      // gradient rather than leave a partial (possibly non-finite) sum behind.
      zero_grad();
      throw;
    }
  }

 private:
  /// forward's work once its sizes are checked (forward names a failed allocation).
  const Matrix<Scalar>& forward_layers(std::span<const std::int32_t> tokens, Index batch, Index seq, Cache& cache) const {
    const detail::SerialEigenScope serial(deterministic_threads_);
    const Index n = batch * seq, d = config_.block.d;
    cache.tokens.assign(tokens.begin(), tokens.end());
    cache.targets.clear();
    cache.x.resize(std::size_t(config_.layers) + 1);
    cache.blocks.resize(std::size_t(config_.layers));
    for (auto& m : cache.x) detail::resize_buffer(m, n, d);
    embedding_.forward(cache.x[0], tokens);
    for (std::size_t i = 0; i < blocks_.size(); ++i)
      blocks_[i].forward(cache.x[i + 1], cache.x[i], batch, seq, cache.blocks[i]);
    detail::resize_buffer(cache.normed, n, d);
    final_norm_.forward(cache.normed, cache.x.back(), cache.norm);
    detail::resize_buffer(cache.logits, n, config_.vocab);
    head_.forward(cache.logits, cache.normed);
    cache.batch = batch;
    cache.seq = seq;
    return cache.logits;
  }

  void backward_layers(const Cache& cache) {
    const Index n = cache.batch * cache.seq, d = config_.block.d;
    detail::resize_buffer(dx_, n, d);
    detail::resize_buffer(dy_, n, d);
    head_.backward(dx_, cache.normed, dlogits_);
    final_norm_.backward(dy_, cache.x.back(), dx_, cache.norm);
    // dy_ holds the gradient of block i's output; its backward writes the gradient of its input into dx_.
    for (std::size_t i = blocks_.size(); i-- > 0;) {
      blocks_[i].backward(dx_, cache.x[i], dy_, cache.blocks[i]);
      std::swap(dx_, dy_);
    }
    embedding_.backward(cache.tokens, dy_);
  }

 public:

  /**
   * @brief Reports that any table may have changed: every Memory Layer re-packs the copy of its tables that prefill
   *        reads (MemoryLayer::tables_changed), and keeps it from now on. A promise: every later write to the tables
   *        is reported before the next forward (a load by another call; the library's optimisers report their
   *        updates through the parameter views, ParameterView::values_written), or the copy is released by
   *        writable access (parameters(), a layer's tables()). No effect on models without Memory Layers.
   */
  void tables_changed() {
    for (auto& b : blocks_)
      if constexpr (requires { b.tables_changed(); }) b.tables_changed();
  }

  /**
   * @brief For a training loop whose optimiser reports its writes through the parameter views (AdamW, SGD; see
   *        ParameterView::values_written), which keeps current copies current: re-packs only the copies that were
   *        released since (by parameters(), e.g. when a checkpoint was saved). No effect without Memory Layers.
   */
  void keep_tables_packed() {
    for (auto& b : blocks_)
      if constexpr (requires { b.keep_tables_packed(); }) b.keep_tables_packed();
  }

  /// Clears every parameter gradient (and the touched-row flags of tables and the embedding).
  void zero_grad() {
    embedding_.zero_grad();
    for (auto& b : blocks_) b.zero_grad();
    final_norm_.zero_grad();
    head_.zero_grad();
  }

  /// Views of every parameter, in the order embedding, blocks 0 … layers−1, final norm, head.
  std::vector<ParameterView<Scalar>> parameters() {
    auto views = embedding_.parameters("embedding");
    for (std::size_t i = 0; i < blocks_.size(); ++i)
      for (auto& v : blocks_[i].parameters("blocks." + std::to_string(i))) views.push_back(std::move(v));
    for (auto& v : final_norm_.parameters("final_norm")) views.push_back(std::move(v));
    for (auto& v : head_.parameters("head")) views.push_back(std::move(v));
    return views;
  }

  /// Scalars in all parameters.
  Index num_parameters() const {
    Index total = config_.vocab * d() + d() + d() * config_.vocab + (config_.head_bias ? config_.vocab : 0);
    for (const auto& b : blocks_) total += b.num_parameters();
    return total;
  }

  /// Scalars in bucket tables (parameters of kind Table): 0 for the dense baseline.
  Index num_table_parameters() {
    Index total = 0;
    for (const auto& p : parameters())
      if (p.kind == ParameterKind::Table) total += Index(p.value.size());
    return total;
  }

  /**
   * @brief Empty KV caches for decoding `batch` sequences of up to `max_seq` tokens, keys and values stored as
   *        `storage` (BF16 for Scalar = float only: half the bytes per cached token, see KVCache).
   * @throws ConfigError for batch or max_seq < 1, or a storage the cache does not support.
   */
  DecodeState make_decode_state(Index batch, Index max_seq, StorageType storage = StorageType::F32) const {
    DecodeState s;
    s.kv.reserve(blocks_.size());
    for (const auto& b : blocks_) s.kv.push_back(b.make_kv_cache(batch, max_seq, storage));
    return s;
  }

  /**
   * @brief Incremental decoding: the next t tokens of every sequence (positions state.length() … +t−1) →
   *        logits_new [batch·t, vocab], the rows forward gives at those positions on the whole sequence (up to
   *        rounding). Appends to every block's KV cache.
   * @param tokens_new  batch·t ids, batch-major (id b·t + i is new token i of sequence b)
   * @throws ShapeError when tokens_new.size() is not a positive multiple of state.batch() or logits_new is not
   *         (batch·t, vocab); CapacityError past max_seq; ValueError for an id outside [0, vocab); NonFiniteError
   *         when a block's input, attention scores or outputs are not finite; ConfigError when memory cannot hold the
   *         buffers of its rows. The state is unchanged when it throws.
   */
  void forward_decode(MatrixRef<Scalar> logits_new, std::span<const std::int32_t> tokens_new,
                      DecodeState& state) const {
    constexpr const char* where = "LanguageModel::forward_decode";
    if (state.kv.size() != blocks_.size())
      throw StateError(std::string(where) + ": the decode state has " + std::to_string(state.kv.size()) +
                       " caches, the model has " + std::to_string(blocks_.size()) + " blocks; use make_decode_state");
    detail::check_caches_match(where, state.kv);
    const Index rows = Index(tokens_new.size());
    if (rows == 0 || rows % state.batch() != 0)
      throw ShapeError(std::string(where) + ": tokens_new has " + std::to_string(rows) +
                       " ids, expected a positive multiple of batch = " + std::to_string(state.batch()));
    const Index t = rows / state.batch();
    detail::check_shape(where, "logits_new", logits_new.rows(), logits_new.cols(), rows, config_.vocab);
    if (state.length() + t > state.max_seq())
      throw CapacityError(std::string(where) + ": " + std::to_string(state.length()) + " decoded + " +
                          std::to_string(t) + " new tokens exceed max_seq = " + std::to_string(state.max_seq()));
    const detail::SerialEigenScope serial(deterministic_threads_);
    detail::decode_step(where, rows, d(), Index(blocks_.size()), std::span<KVCache<Scalar>>(state.kv), [&] {
      Matrix<Scalar> a(rows, d()), b(rows, d());  // [batch·t, d]
      embedding_.forward(a, tokens_new);
      for (std::size_t i = 0; i < blocks_.size(); ++i) {
        blocks_[i].forward_decode(b, a, state.kv[i]);
        std::swap(a, b);
      }
      RMSNormCache<Scalar> stats;
      final_norm_.forward(b, a, stats);
      head_.forward(logits_new, b);
    });
  }

  /// The config as checkpoint entries: "model.kind", "model.scalar", "model.vocab", "model.layers",
  /// "model.final_norm_eps", "model.head_bias" and the block's "block.*" keys (BlockTraits::write).
  ConfigEntries config_entries() const {
    ConfigEntries out;
    out.emplace_back("model.kind", std::string(kind()));
    out.emplace_back("model.scalar", dtype_name(dtype_of<Scalar>()));
    out.emplace_back("model.vocab", std::to_string(config_.vocab));
    out.emplace_back("model.layers", std::to_string(config_.layers));
    out.emplace_back("model.final_norm_eps", detail::model::format_double(config_.final_norm_eps));
    out.emplace_back("model.head_bias", detail::model::bool_text(config_.head_bias));
    BlockTraits<BlockType>::write(out, config_.block);
    return out;
  }

  /**
   * @brief The model config stored in checkpoint entries (as written by config_entries), e.g. to build a model for
   *        a checkpoint whose sizes are not known in advance. Initialisation settings get their defaults.
   * @throws FormatError naming a missing or malformed key, or a checkpoint of another kind of model;
   *         ConfigError when the values do not form a valid config.
   */
  static Config config_from_entries(const ConfigEntries& entries, const std::string& origin = "checkpoint") {
    detail::model::ConfigReader r(entries, origin);
    if (r.text("model.kind") != kind())
      throw FormatError(origin + ": the checkpoint holds a '" + r.text("model.kind") + "' model, expected '" +
                        std::string(kind()) + "'");
    Config c;
    c.vocab = Index(r.integer("model.vocab"));
    c.layers = Index(r.integer("model.layers"));
    c.final_norm_eps = r.real("model.final_norm_eps");
    c.head_bias = r.boolean("model.head_bias");
    c.block = BlockTraits<BlockType>::read(r);
    c.validate("LanguageModel::config_from_entries");
    return c;
  }

 private:
  static void check_sizes(const char* where, const char* what, std::size_t size, Index batch, Index seq) {
    detail::check_config(batch >= 1 && seq >= 1, where,
                         "batch = " + std::to_string(batch) + " and seq = " + std::to_string(seq) + " must be ≥ 1");
    detail::checked_mul(where, "batch × seq", batch, seq);
    if (size != std::size_t(batch * seq))
      throw ShapeError(std::string(where) + ": " + what + " has " + std::to_string(size) +
                       " ids, expected batch·seq = " + std::to_string(batch) + "·" + std::to_string(seq) + " = " +
                       std::to_string(batch * seq));
  }

  Config config_;
  Embedding<Scalar> embedding_;     // [vocab, d]
  std::vector<BlockType> blocks_;   // layers blocks of width d
  RMSNorm<Scalar> final_norm_;      // [d]
  Linear<Scalar> head_;             // W [d, vocab] (+ b [vocab])
  bool deterministic_threads_ = true;
  // Scratch of backward, reused across calls.
  Matrix<Scalar> dlogits_;          // [N, vocab]
  Matrix<Scalar> dx_, dy_;          // [N, d] gradients flowing down through the blocks
};

/// The paper's model: LanguageModel of MemoryFormer blocks.
template <std::floating_point Scalar = float>
using MemoryFormerLM = LanguageModel<MemoryFormerBlock, Scalar>;

/// The dense baseline of the same width, depth and heads: LanguageModel of Transformer blocks.
template <std::floating_point Scalar = float>
using TransformerLM = LanguageModel<TransformerBlock, Scalar>;

}  // namespace memoryformer
