// SPDX-License-Identifier: MIT
// FrozenMemoryFormerBlock: an inference-only MemoryFormerBlock (design §10, forward only) whose Q, K, V and Memory
// Block layers read packed float32, bfloat16 or float16 tables, with prefill and KV-cache decoding.
#pragma once

#include <optional>
#include <span>
#include <stdexcept>
#include <string>

#include "detail/checked_size.hpp"
#include "detail/row_parallel.hpp"
#include "error.hpp"
#include "frozen_memory_block.hpp"
#include "frozen_memory_layer.hpp"
#include "hash.hpp"
#include "memoryformer_block.hpp"
#include "nn/attention.hpp"
#include "nn/block_norm.hpp"
#include "nn/kv_cache.hpp"
#include "nn/linear.hpp"
#include "nn/rope.hpp"
#include "table_storage.hpp"
#include "types.hpp"

namespace memoryformer {

/// Buffers of FrozenMemoryFormerBlock's forward and forward_decode, owned by the caller (forward stays const and
/// thread-safe); reused without allocation once the row count is stable. N = batch·seq (or batch·t when decoding).
struct FrozenMemoryFormerBlockScratch {
  BlockNormCache<float> norm1, norm2;  // per-row statistics
  Matrix<float> a;                     // [N, d] norm1(x)
  HashResult<float> hash;              // [N, K] shared by Q, K, V
  Matrix<float> q, k, v;               // [N, d] (q, k after rotary)
  AttentionCache<float> attention;     // probabilities (forward only)
  Matrix<float> ctx;                   // [N, d] attention output (before W_O)
  Matrix<float> h;                     // [N, d] x + attention
  Matrix<float> b;                     // [N, d] norm2(h)
  FrozenMemoryBlockScratch memory;     // the Memory Block's buffers
};

/**
 * @brief A read-only copy of a trained MemoryFormerBlock<float> for inference (design §10): the norms, the shared
 * hash, rotary and the optional W_O as they are; Q, K, V and the Memory Block's ML1 and ML2 as FrozenMemoryLayer
 * over tables converted once to `storage`.
 *
 * With StorageType::F32 every output has the same bits as MemoryFormerBlock::forward / forward_decode (the packed
 * kernels sum in the training fast path's order); BF16 and F16 differ by the rounding of the stored table values
 * only (activations and sums stay float32). There is no backward: a frozen block cannot be trained.
 */
class FrozenMemoryFormerBlock {
 public:
  using Config = MemoryFormerBlockConfig;
  using Scratch = FrozenMemoryFormerBlockScratch;

  /// @throws ConfigError (a table value that is not finite or does not fit float16)
  FrozenMemoryFormerBlock(const MemoryFormerBlock<float>& block, StorageType storage,
                          FrozenLayout layout = FrozenLayout::Both)
      : config_(block.config()),
        norm1_(block.norm1()),
        hasher_(block.hasher()),
        q_(block.q(), storage, layout),
        k_(block.k(), storage, layout),
        v_(block.v(), storage, layout),
        rotary_(block.rotary()),
        norm2_(block.norm2()),
        memory_(block.memory_block(), storage, layout) {
    if (block.output_projection() != nullptr) output_.emplace(*block.output_projection());
  }

  const Config& config() const { return config_; }
  Index d() const { return config_.d; }
  StorageType storage() const { return q_.storage(); }
  const BlockNorm<float>& norm1() const { return norm1_; }
  const SignHasher<float>& hasher() const { return hasher_; }
  const FrozenMemoryLayer& q() const { return q_; }
  const FrozenMemoryLayer& k() const { return k_; }
  const FrozenMemoryLayer& v() const { return v_; }
  const BlockNorm<float>& norm2() const { return norm2_; }
  const FrozenMemoryBlock& memory_block() const { return memory_; }
  /// Bytes of packed table storage held (Q, K, V, ML1, ML2).
  std::size_t table_bytes() const {
    return q_.table_bytes() + k_.table_bytes() + v_.table_bytes() + memory_.table_bytes();
  }

  /**
   * @brief y = block(x) for `batch` sequences of `seq` tokens (causal within each sequence, positions 0 … seq−1).
   * @param y [batch·seq, d] output
   * @param x [batch·seq, d] input, batch-major
   * @throws ConfigError (batch or seq < 1, or memory cannot hold the buffers of its rows), ShapeError,
   *         NonFiniteError
   */
  void forward(MatrixRef<float> y, ConstMatrixRef<float> x, Index batch, Index seq, Scratch& s) const {
    constexpr const char* where = "FrozenMemoryFormerBlock::forward";
    detail::check_config(batch >= 1 && seq >= 1, where,
                         "batch = " + std::to_string(batch) + " and seq = " + std::to_string(seq) + " must be >= 1");
    const Index rows = detail::checked_mul(where, "batch·seq", batch, seq);
    if (x.rows() != rows || x.cols() != config_.d)
      detail::throw_shape(where, "x", x.rows(), x.cols(),
                          "(batch·seq, d) = (" + std::to_string(rows) + ", " + std::to_string(config_.d) + ")");
    detail::check_shape(where, "y", y.rows(), y.cols(), x.rows(), config_.d);
    detail::allocating_activations(where, rows, config_.d, 1, sizeof(float), [&] {
      detail::block_attention_input(norm1_, hasher_, q_, k_, v_, rotary_, x, batch, seq, 0, s);
      attention_forward<float>(s.ctx, s.q, s.k, s.v, batch, seq, config_.heads, s.attention);
      detail::block_residual_and_memory(output_, norm2_, memory_, y, x, s);
    });
  }

  /// A KV cache sized for this block, keys and values stored as `storage` (F32 or BF16, see KVCache).
  KVCache<float> make_kv_cache(Index batch, Index max_seq, StorageType storage = StorageType::F32) const {
    return KVCache<float>(batch, max_seq, config_.d, storage);
  }

  /**
   * @brief Incremental decoding: x_new [batch·t, d] are the next t tokens of each sequence, at positions
   * kv.length() …; appends their keys and values to kv and writes their outputs (the rows forward gives at those
   * positions on the whole sequence, up to the rounding of attention's sums).
   * @throws ShapeError; CapacityError past the cache's max_seq; NonFiniteError for a NaN or ±Inf in x_new (or a
   *         value that reaches the hash or attention so); ConfigError when memory cannot hold the buffers of its rows.
   *         kv is unchanged when it throws.
   */
  void forward_decode(MatrixRef<float> y_new, ConstMatrixRef<float> x_new, KVCache<float>& kv, Scratch& s) const {
    constexpr const char* where = "FrozenMemoryFormerBlock::forward_decode";
    const Index t = detail::block_decode_tokens(where, config_.d, y_new, x_new, kv);
    detail::decode_step(where, x_new.rows(), config_.d, 1, std::span<KVCache<float>>(&kv, 1), [&] {
      detail::block_attention_input(norm1_, hasher_, q_, k_, v_, rotary_, x_new, kv.batch(), t, kv.length(), s);
      attention_decode<float>(s.ctx, s.q, s.k, s.v, kv, config_.heads);
      detail::block_residual_and_memory(output_, norm2_, memory_, y_new, x_new, s);
    });
  }

 private:
  Config config_;
  BlockNorm<float> norm1_;               // [d]
  SignHasher<float> hasher_;             // the hash Q, K and V share
  FrozenMemoryLayer q_, k_, v_;          // d → d each
  Rotary<float> rotary_;
  std::optional<Linear<float>> output_;  // W_O [d, d], only with output_projection
  BlockNorm<float> norm2_;               // [d]
  FrozenMemoryBlock memory_;             // the FFN replacement
};

}  // namespace memoryformer
