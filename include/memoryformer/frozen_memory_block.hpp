// SPDX-License-Identifier: MIT
// FrozenMemoryBlock: an inference-only MemoryBlock (design §2, forward only) — ML1 → LayerNorm → [GeLU] → ML2 with both
// Memory Layers frozen to packed float32, bfloat16 or float16 tables (FrozenMemoryLayer).
#pragma once

#include "detail/checked_size.hpp"
#include "error.hpp"
#include "frozen_memory_layer.hpp"
#include "hash.hpp"
#include "memory_block.hpp"
#include "nn/gelu.hpp"
#include "nn/layer_norm.hpp"
#include "table_storage.hpp"
#include "types.hpp"

namespace memoryformer {

/// Buffers of FrozenMemoryBlock::forward, owned by the caller so that forward stays const and thread-safe; they are
/// reused (no allocation) once the row count is stable.
struct FrozenMemoryBlockScratch {
  HashResult<float> hash1;       // [N, K] hash of x
  Matrix<float> hidden;          // [N, H] ML1 output
  LayerNormCache<float> norm;    // per-row statistics of the LayerNorm
  Matrix<float> normed;          // [N, H] LayerNorm (then GeLU, in place) output
  HashResult<float> hash2;       // [N, H/τ2] hash of ML2's input
};

/**
 * @brief A read-only copy of a trained MemoryBlock<float> for inference: its LayerNorm as is, ML1 and ML2 as
 * FrozenMemoryLayer over tables converted once to `storage`. With StorageType::F32 forward gives the same bits as
 * MemoryBlock::forward; with BF16/F16 it differs only by the rounding of the stored table values.
 */
class FrozenMemoryBlock {
 public:
  using Scratch = FrozenMemoryBlockScratch;

  /**
   * @param layout which table copies each layer keeps (Both: prefill and decode each use their layout)
   * @throws ConfigError (a table value that is not finite or does not fit float16)
   */
  FrozenMemoryBlock(const MemoryBlock<float>& block, StorageType storage, FrozenLayout layout = FrozenLayout::Both)
      : config_(block.config()),
        ml1_(block.ml1(), storage, layout),
        norm_(block.norm()),
        ml2_(block.ml2(), storage, layout) {}

  const MemoryBlockConfig& config() const { return config_; }
  const FrozenMemoryLayer& ml1() const { return ml1_; }
  const LayerNorm<float>& norm() const { return norm_; }
  const FrozenMemoryLayer& ml2() const { return ml2_; }
  StorageType storage() const { return ml1_.storage(); }
  /// Bytes of packed table storage held by both layers.
  std::size_t table_bytes() const { return ml1_.table_bytes() + ml2_.table_bytes(); }

  /**
   * @param y [N, d] output
   * @param x [N, d] input
   * @throws ShapeError, NonFiniteError; ConfigError when memory cannot hold the buffers of its rows
   */
  void forward(MatrixRef<float> y, ConstMatrixRef<float> x, Scratch& s) const {
    constexpr const char* where = "FrozenMemoryBlock::forward";
    if (x.cols() != config_.d) detail::throw_shape(where, "x", x.rows(), x.cols(), "(N, " + std::to_string(config_.d) + ")");
    detail::check_shape(where, "y", y.rows(), y.cols(), x.rows(), config_.d);
    const Index n = x.rows(), h = config_.hidden();
    detail::allocating_activations(where, n, h, 1, sizeof(float), [&] {
      detail::resize_buffer(s.hidden, n, h);
      detail::resize_buffer(s.normed, n, h);
    });
    ml1_.forward(s.hidden, x, s.hash1);
    norm_.forward(s.normed, s.hidden, s.norm);
    if (config_.gelu) gelu_forward(s.normed, s.normed);  // element-wise: in place gives the training bits
    ml2_.forward(y, s.normed, s.hash2);
  }

 private:
  MemoryBlockConfig config_;
  FrozenMemoryLayer ml1_;   // d → H
  LayerNorm<float> norm_;   // over H
  FrozenMemoryLayer ml2_;   // H → d
};

}  // namespace memoryformer
