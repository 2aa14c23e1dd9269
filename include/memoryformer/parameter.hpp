// SPDX-License-Identifier: MIT
// ParameterView: how a layer exposes one parameter tensor and its gradient to optimisers, clipping and checkpoints.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "detail/streaming_stores.hpp"
#include "types.hpp"

namespace memoryformer {

/// What a parameter is; optimisers decide weight decay and learning-rate groups from it.
enum class ParameterKind {
  Table,      ///< Memory Layer bucket tables [K, 2^τ, d_out]: sparse gradients (only hit rows are non-zero)
  Dense,      ///< dense weight matrices (Linear, LM head)
  Embedding,  ///< token embedding [vocab, d]: sparse gradients like tables
  Bias,       ///< biases: no weight decay
  Norm,       ///< RMSNorm / LayerNorm scales and shifts: no weight decay
};

/// True for kinds that get weight decay in the paper's recipe (not biases and norms).
inline bool decays(ParameterKind kind) { return kind == ParameterKind::Table || kind == ParameterKind::Dense || kind == ParameterKind::Embedding; }

/**
 * A view of one parameter tensor of a layer and of its gradient buffer (same size). The layer owns the memory;
 * a view stays valid while the layer lives and is neither resized nor moved (a moved layer's views point into the
 * moved-from object: take new ones).
 */
template <class Scalar>
struct ParameterView {
  std::string name;            ///< dotted path, e.g. "blocks.0.q.tables"
  std::vector<Index> shape;    ///< row-major shape
  std::span<Scalar> value;     ///< the parameter
  std::span<Scalar> grad;      ///< its gradient, accumulated by backward until zero_grad()
  ParameterKind kind = ParameterKind::Dense;
  /// For sparse kinds (Table, Embedding): length of one row, and a flag per row set by backward when the row
  /// received a gradient since the last zero_grad(). nullptr means "treat every row as touched".
  Index row_size = 0;
  /// Writable so that an optimiser step that consumes and zeroes the gradient (AdamW::step_fused) can clear the
  /// flags too, leaving the state zero_grad() leaves.
  std::vector<std::uint8_t>* touched_rows = nullptr;
  /// With touched_rows: the ids of exactly the flagged rows, each once, in the order backward first flagged them
  /// (a deterministic order), so that optimisers, clipping and zero_grad() visit the touched rows without scanning
  /// the flags. nullptr: the flags are scanned instead.
  std::vector<Index>* touched_list = nullptr;
  /// True when this is one rank's part of a parameter split across the ranks of a table-parallel run (the other
  /// parts live on the other ranks, see TableSharding); false when every rank holds the whole parameter.
  bool sharded = false;
  /// Optional: called by an optimiser as values_written(values_owner, begin, end) after it wrote value[begin, end),
  /// so that the owner keeps a copy derived from the values current (a Memory Layer's packed tables) without a pass
  /// of its own. Ranges are disjoint and may come from several threads at once; a call may leave non-temporal stores
  /// unordered, so every thread that made calls runs fence_values_written() before the values' copy is read (the
  /// library's optimisers do). nullptr: nothing to report. (A plain function and pointer: views stay aggregates.)
  void (*values_written)(void* owner, std::size_t begin, std::size_t end) = nullptr;
  void* values_owner = nullptr;  ///< the first argument of values_written
};

/// Orders the stores that this thread's ParameterView::values_written calls made (they may be non-temporal) before
/// any later load or store; run it on each calling thread before another thread reads the copies they keep current.
inline void fence_values_written() { detail::store_fence_if_streamed(); }

}  // namespace memoryformer
