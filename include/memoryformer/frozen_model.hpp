// SPDX-License-Identifier: MIT
// FrozenLanguageModel: an inference-only copy of a trained MemoryFormer LanguageModel<float> whose Memory Layers read
// packed float32, bfloat16 or float16 tables — logits of whole sequences (prefill) and KV-cache decoding.
#pragma once

#include <concepts>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "detail/checked_size.hpp"
#include "detail/row_parallel.hpp"
#include "error.hpp"
#include "frozen_memory_layer.hpp"
#include "frozen_memoryformer_block.hpp"
#include "model.hpp"
#include "nn/kv_cache.hpp"
#include "nn/rms_norm.hpp"
#include "table_storage.hpp"
#include "types.hpp"

namespace memoryformer {

/**
 * @brief A read-only copy of a trained MemoryFormerLM<float> (LanguageModel<MemoryFormerBlock, float>) for inference
 * (design §10): the embedding, final RMSNorm and LM head as they are, every block as a FrozenMemoryFormerBlock whose
 * Q, K, V, ML1 and ML2 tables are converted once to `storage` (StorageType::BF16 halves the bytes every lookup reads,
 * F16 likewise, F32 keeps them exact).
 *
 * Accuracy against the training model's forward and forward_decode: F32 gives the same bits. BF16 and F16 round the
 * stored table values only (activations and sums stay float32), but a rounded value can flip the sign of a later
 * hash input and so select another table row: most rows differ by the rounding alone, a few by a visible part of
 * the logits' scale. Tested bounds (random-init two-block model, max |Δlogit| per row / max |logit|): BF16 median row
 * ≤ 0.06, worst row ≤ 0.7; F16 median row ≤ 5e-4, worst row ≤ 0.15. A trained model hashes far from the sign
 * boundaries more often: on generate's --smoke model (150 steps, 512 positions of text) BF16 gave median row 3.6e-4,
 * worst 0.06, mean loss within 7e-4 nats; F16 median 4e-5, worst 0.02, loss within 1e-4 nats.
 *
 * It has no backward, parameters or optimiser state: a frozen model cannot be trained (train the LanguageModel,
 * then freeze it again). Only MemoryFormer models have tables to freeze: a dense TransformerLM is refused.
 *
 * **Threads.** As LanguageModel with deterministic threads: every result has the same bits for any OpenMP thread
 * count (Eigen's own products run single-threaded during forward and forward_decode).
 */
class FrozenLanguageModel {
 public:
  /// KV caches of every block and the decoding buffers (reused across calls).
  struct DecodeState {
    std::vector<KVCache<float>> kv;            // one per block
    FrozenMemoryFormerBlockScratch scratch;    // shared by the blocks, one after the other
    Matrix<float> x, y;                        // [batch·t, d] input and output of the current block
    RMSNormCache<float> norm;                  // final RMSNorm statistics
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
   * @brief Freezes `model`: copies the embedding, norms, hashes and head, converts every table to `storage`.
   * @param layout which table copies the Memory Layers keep: Both (default; each call uses the better layout,
   *               2× the table bytes), Panels (prefill) or Rows (decode); see FrozenMemoryLayer
   * @throws ConfigError for a model without Memory Layers (TransformerLM), a table value that is not finite or
   *         does not fit float16, or a storage or layout that is not a member of its enum.
   */
  template <class Model>
    requires std::same_as<typename Model::ScalarType, float>
  explicit FrozenLanguageModel(const Model& model, StorageType storage = StorageType::BF16,
                               FrozenLayout layout = FrozenLayout::Both)
      : vocab_(model.vocab()),
        d_(model.d()),
        embedding_(model.embedding().weight()),
        final_norm_(model.final_norm()),
        head_weight_(model.head().weight()),
        head_bias_(model.head().bias()),
        has_head_bias_(model.head().has_bias()) {
    if constexpr (std::is_same_v<typename Model::BlockType, MemoryFormerBlock<float>>) {
      blocks_.reserve(std::size_t(model.layers()));
      for (Index i = 0; i < model.layers(); ++i) blocks_.emplace_back(model.block(i), storage, layout);
    } else {
      throw ConfigError("FrozenLanguageModel: a '" + std::string(model.kind()) +
                        "' model has dense layers and no Memory Layer tables to freeze; only MemoryFormer models "
                        "(MemoryFormerLM<float>) can be frozen");
    }
  }

  Index vocab() const { return vocab_; }
  Index d() const { return d_; }
  Index layers() const { return Index(blocks_.size()); }
  StorageType storage() const { return blocks_.front().storage(); }
  const FrozenMemoryFormerBlock& block(Index i) const { return blocks_.at(std::size_t(i)); }
  /// Bytes of packed table storage held by every block.
  std::size_t table_bytes() const {
    std::size_t total = 0;
    for (const auto& b : blocks_) total += b.table_bytes();
    return total;
  }

  /**
   * @brief Logits of every position, as LanguageModel::forward: row b·seq + t scores the token after position t of
   *        sequence b.
   * @param logits [batch·seq, vocab] output
   * @param tokens batch·seq ids in [0, vocab), batch-major
   * @throws ConfigError for batch or seq < 1, or when memory cannot hold the buffers of batch·seq positions;
   *         ShapeError for a tokens count ≠ batch·seq or logits of another shape; ValueError for an id outside
   *         [0, vocab).
   */
  void forward(MatrixRef<float> logits, std::span<const std::int32_t> tokens, Index batch, Index seq) const {
    constexpr const char* where = "FrozenLanguageModel::forward";
    const Index rows = checked_rows(where, tokens, batch, seq);
    detail::check_shape(where, "logits", logits.rows(), logits.cols(), rows, vocab_);
    detail::SerialEigenScope serial;
    detail::allocating_activations(where, rows, d_, Index(blocks_.size()), sizeof(float), [&] {
      FrozenMemoryFormerBlockScratch scratch;
      Matrix<float> x(rows, d_), y(rows, d_);  // [batch·seq, d]
      embed(where, x, tokens);
      for (const auto& b : blocks_) {
        b.forward(y, x, batch, seq, scratch);
        x.swap(y);
      }
      RMSNormCache<float> stats;
      head(logits, x, y, stats);
    });
  }

  /// Allocating form of forward: the [batch·seq, vocab] logits.
  Matrix<float> forward(std::span<const std::int32_t> tokens, Index batch, Index seq) const {
    constexpr const char* where = "FrozenLanguageModel::forward";
    const Index rows = checked_rows(where, tokens, batch, seq);  // before allocating
    Matrix<float> logits = detail::allocating_activations(where, rows, vocab_, Index(blocks_.size()), sizeof(float),
                                                          [&] { return Matrix<float>(rows, vocab_); });
    forward(logits, tokens, batch, seq);
    return logits;
  }

  /**
   * @brief Empty KV caches for decoding `batch` sequences of up to `max_seq` tokens, keys and values stored as
   *        `storage` (BF16: half the bytes per cached token, which decode reads for every new token; see KVCache).
   * @throws ConfigError for batch or max_seq < 1, or F16 storage.
   */
  DecodeState make_decode_state(Index batch, Index max_seq, StorageType storage = StorageType::F32) const {
    DecodeState s;
    s.kv.reserve(blocks_.size());
    for (const auto& b : blocks_) s.kv.push_back(b.make_kv_cache(batch, max_seq, storage));
    return s;
  }

  /**
   * @brief Incremental decoding, as LanguageModel::forward_decode: the next t tokens of every sequence →
   *        logits_new [batch·t, vocab]. Appends to every block's KV cache.
   * @param tokens_new batch·t ids, batch-major
   * @throws StateError for a state not made by this model's make_decode_state; ShapeError when tokens_new.size()
   *         is not a positive multiple of state.batch() or logits_new is not (batch·t, vocab); CapacityError
   *         past max_seq; ValueError for an id outside [0, vocab); NonFiniteError when a block's input, attention scores
   *         or outputs are not finite; ConfigError when memory cannot hold the buffers of its rows. The state is
   *         unchanged when it throws.
   */
  void forward_decode(MatrixRef<float> logits_new, std::span<const std::int32_t> tokens_new, DecodeState& state) const {
    constexpr const char* where = "FrozenLanguageModel::forward_decode";
    if (state.kv.size() != blocks_.size() || state.kv.front().d() != d_)
      throw StateError(std::string(where) + ": the decode state has " + std::to_string(state.kv.size()) +
                       " caches, the model has " + std::to_string(blocks_.size()) +
                       " blocks of width " + std::to_string(d_) + "; use make_decode_state");
    detail::check_caches_match(where, state.kv);
    const Index rows = Index(tokens_new.size());
    if (rows == 0 || rows % state.batch() != 0)
      throw ShapeError(std::string(where) + ": tokens_new has " + std::to_string(rows) +
                       " ids, expected a positive multiple of batch = " + std::to_string(state.batch()));
    const Index t = rows / state.batch();
    detail::check_shape(where, "logits_new", logits_new.rows(), logits_new.cols(), rows, vocab_);
    if (state.length() + t > state.max_seq())
      throw CapacityError(std::string(where) + ": " + std::to_string(state.length()) + " decoded + " +
                          std::to_string(t) + " new tokens exceed max_seq = " + std::to_string(state.max_seq()));
    detail::SerialEigenScope serial;
    detail::decode_step(where, rows, d_, Index(blocks_.size()), std::span<KVCache<float>>(state.kv), [&] {
      detail::resize_buffer(state.x, rows, d_);
      detail::resize_buffer(state.y, rows, d_);
      embed(where, state.x, tokens_new);
      for (std::size_t i = 0; i < blocks_.size(); ++i) {
        blocks_[i].forward_decode(state.y, state.x, state.kv[i], state.scratch);
        state.x.swap(state.y);
      }
      head(logits_new, state.x, state.y, state.norm);
    });
  }

 private:
  /// batch·seq, checked for overflow, and the number of tokens against it.
  static Index checked_rows(const char* where, std::span<const std::int32_t> tokens, Index batch, Index seq) {
    detail::check_config(batch >= 1 && seq >= 1, where,
                         "batch = " + std::to_string(batch) + " and seq = " + std::to_string(seq) + " must be ≥ 1");
    const Index rows = detail::checked_mul(where, "batch·seq", batch, seq);
    if (Index(tokens.size()) != rows)
      throw ShapeError(std::string(where) + ": tokens has " + std::to_string(tokens.size()) +
                       " ids, expected batch·seq = " + std::to_string(batch) + "·" + std::to_string(seq) + " = " +
                       std::to_string(rows));
    return rows;
  }

  void embed(const char* where, Matrix<float>& x, std::span<const std::int32_t> tokens) const {
    for (std::size_t i = 0; i < tokens.size(); ++i)
      if (tokens[i] < 0 || Index(tokens[i]) >= vocab_)
        throw ValueError(std::string(where) + ": tokens[" + std::to_string(i) + "] = " +
                         std::to_string(tokens[i]) + " is outside [0, vocab = " + std::to_string(vocab_) +
                         ")");
    for (Index i = 0; i < x.rows(); ++i) x.row(i) = embedding_.row(tokens[std::size_t(i)]);
  }

  // logits = head(final_norm(x)), with `normed` [N, d] as scratch; the same products as Linear::forward.
  void head(MatrixRef<float> logits, const Matrix<float>& x, Matrix<float>& normed, RMSNormCache<float>& stats) const {
    final_norm_.forward(normed, x, stats);
    detail::chunked_product<float>(logits, normed, head_weight_, has_head_bias_ ? &head_bias_ : nullptr);
  }

  Index vocab_ = 0, d_ = 0;
  Matrix<float> embedding_;                      // [vocab, d]
  std::vector<FrozenMemoryFormerBlock> blocks_;  // layers
  RMSNorm<float> final_norm_;                    // [d]
  Matrix<float> head_weight_;                    // [d, vocab]
  Vector<float> head_bias_;                      // [vocab], empty without bias
  bool has_head_bias_ = false;
};

/// FrozenLanguageModel(model, storage, layout): freezes a LanguageModel<Block, float>.
template <class Model>
  requires std::same_as<typename Model::ScalarType, float>
FrozenLanguageModel freeze(const Model& model, StorageType storage = StorageType::BF16,
                           FrozenLayout layout = FrozenLayout::Both) {
  return FrozenLanguageModel(model, storage, layout);
}

}  // namespace memoryformer
