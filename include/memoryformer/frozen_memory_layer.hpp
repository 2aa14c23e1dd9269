// SPDX-License-Identifier: MIT
// FrozenMemoryLayer: an inference-only Memory Layer (design §10.2, forward only) over PackedTables — float32,
// bfloat16 or float16 table storage with float32 activations and accumulation.
#pragma once

#include <string>

#include "detail/checked_size.hpp"
#include "detail/checks.hpp"
#include "detail/lookup_kernels.hpp"
#include "error.hpp"
#include "hash.hpp"
#include "memory_layer.hpp"
#include "table_storage.hpp"
#include "types.hpp"

namespace memoryformer {

/// Which table copies a FrozenMemoryLayer keeps.
enum class FrozenLayout {
  Panels,  ///< prefill layout only (decode still works, from scattered 64-byte chunks)
  Rows,    ///< decode layout only (prefill still works, token by token)
  Both,    ///< both copies (2× the table memory): each call uses the better one
};

/**
 * @brief A read-only copy of a trained MemoryLayer<float> for inference: the same hash and bias, the tables
 * converted once to a storage type (StorageType::BF16 halves the bytes every lookup reads).
 *
 * forward is const and thread-safe (the hash goes to a caller-owned HashResult). Few tokens (decode) run a
 * token-major kernel; many (prefill: from 2^τ/2 tokens with panels only, 0.75·2^τ with both copies) the
 * column-blocked one over panels; the row layout alone always runs token-major.
 * Every path gives the same bits, and with F32 storage they equal MemoryLayer<float>::forward's fast path.
 */
class FrozenMemoryLayer {
 public:
  FrozenMemoryLayer() = default;

  /**
   * @brief Copies `layer`'s hash settings and bias and converts its tables.
   * @param layout       which copies to keep (Panels for prefill, Rows for decode, Both)
   * @param chunk_values panel chunk width (0: default; see PackedTables)
   * @throws ConfigError (see PackedTables), also for a table-parallel layer (it holds only some of its tables) or a
   *         layout that is not a FrozenLayout
   */
  FrozenMemoryLayer(const MemoryLayer<float>& layer, StorageType storage, FrozenLayout layout = FrozenLayout::Panels,
                    Index chunk_values = 0)
      : config_(layer.config()), hasher_(layer.hasher()), bias_(layer.bias()) {
    detail::check_enum("FrozenMemoryLayer", "layout", layout, {FrozenLayout::Panels, FrozenLayout::Rows,
                                                               FrozenLayout::Both}, "FrozenLayout");
    detail::check_config(!layer.sharded(), "FrozenMemoryLayer",
                         "the layer is table-parallel: it holds tables " + std::to_string(layer.owned_tables().begin) +
                             " to " + std::to_string(layer.owned_tables().end - 1) + " of " +
                             std::to_string(layer.num_tables()) + " only");
    if (layout != FrozenLayout::Rows) panels_ = PackedTables(layer.tables(), storage, TableLayout::Panels, chunk_values);
    if (layout != FrozenLayout::Panels) rows_ = PackedTables(layer.tables(), storage, TableLayout::Rows);
  }

  const MemoryLayerConfig& config() const { return config_; }
  const SignHasher<float>& hasher() const { return hasher_; }
  /// The panel copy if kept, else the row copy.
  const PackedTables& tables() const { return panels_.empty() ? rows_ : panels_; }
  const PackedTables& panel_tables() const { return panels_; }  ///< empty unless Panels or Both
  const PackedTables& row_tables() const { return rows_; }      ///< empty unless Rows or Both
  const Vector<float>& bias() const { return bias_; }  // [d_out], empty without bias
  StorageType storage() const { return tables().storage(); }
  Index d_in() const { return config_.d_in; }
  Index d_out() const { return config_.d_out; }
  Index num_tables() const { return config_.num_tables(); }

  /**
   * @brief y = Σ_k s_k · T_k[code_k] + b, hashing x first.
   * @param y     [N, d_out] output (must already have that shape)
   * @param x     [N, d_in] input
   * @param cache receives the codes and scores of x
   * @param isa   kernel path: Isa::Scalar runs the reference loop (decode every stored value)
   * @throws ShapeError, NonFiniteError, ConfigError (isa not compiled in, or memory cannot hold the buffers of its
   *         rows)
   */
  void forward(MatrixRef<float> y, ConstMatrixRef<float> x, HashResult<float>& cache, Isa isa = best_isa()) const {
    detail::check_layer_input<float>("FrozenMemoryLayer::forward", config_, x);
    detail::check_shape("FrozenMemoryLayer::forward", "y", y.rows(), y.cols(), x.rows(), config_.d_out);
    hasher_.hash(cache, x, isa);
    forward_hashed(y, cache, isa);
  }

  /// Allocating convenience form of forward.
  Matrix<float> forward(ConstMatrixRef<float> x, HashResult<float>& cache, Isa isa = best_isa()) const {
    Matrix<float> y = detail::activation_matrix<float>("FrozenMemoryLayer::forward", x.rows(), config_.d_out);
    forward(y, x, cache, isa);
    return y;
  }

  /**
   * @brief The lookup half of forward, from a hash computed elsewhere.
   * @throws StateError (empty hash), ShapeError, ConfigError (isa not compiled in, or memory cannot hold the buffers
   *         of its rows)
   */
  void forward_hashed(MatrixRef<float> y, const HashResult<float>& h, Isa isa = best_isa()) const {
    const char* where = "FrozenMemoryLayer::forward_hashed";
    detail::check_layer_hash(where, config_, h);
    detail::check_shape(where, "y", y.rows(), y.cols(), h.rows, config_.d_out);
    detail::check_isa_compiled(where, isa);
    const bool prefill = h.rows >= detail::rows_prefill_min_tokens(config_.tau);
    const PackedTables& t = panels_.empty() ? rows_ : (rows_.empty() || prefill ? panels_ : rows_);
    detail::allocating_activations(where, h.rows, config_.d_out, 1, sizeof(float), [&] {  // the kernel's plan
      detail::lookup_forward_packed(isa, y.data(), y.outerStride(), t.layout(), t.data(), h.codes.data(),
                                    h.scores.data(), config_.bias ? bias_.data() : nullptr, h.rows);
    });
  }

  /// Bytes of table storage held (both copies with FrozenLayout::Both).
  std::size_t table_bytes() const { return panels_.bytes() + rows_.bytes(); }

 private:
  MemoryLayerConfig config_;
  SignHasher<float> hasher_{HashConfig{}};
  PackedTables panels_;  // [K, 2^τ, d_out] in the panel layout, or empty
  PackedTables rows_;    // [K, 2^τ, d_out] in the row layout, or empty
  Vector<float> bias_;   // [d_out]
};

}  // namespace memoryformer
