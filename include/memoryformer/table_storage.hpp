// SPDX-License-Identifier: MIT
// PackedTables: read-only Memory Layer tables (design §1.3) stored as float32, bfloat16 or float16 in the panel layout
// the fast lookup kernels read (design §1.5); the compute type stays float32.
#pragma once

#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

#include "bucket_table.hpp"
#include "detail/checks.hpp"
#include "detail/checked_size.hpp"
#include "detail/gather_kernels.hpp"
#include "detail/scratch.hpp"
#include "error.hpp"
#include "storage_type.hpp"
#include "types.hpp"

namespace memoryformer {

/// How PackedTables arranges the values (see PackedTables).
enum class TableLayout {
  Panels,  ///< column panels that stay in L2 while many tokens stream through them: the prefill layout
  Rows,    ///< each table row contiguous: the decode layout (a token reads K whole rows from DRAM)
};

/**
 * @brief K tables of 2^τ rows × width values, converted once to a storage type and laid out for the lookup kernels.
 *
 * Storage: StorageType::F32 (exact copy), BF16 (nearest value of a bfloat16 grid: relative error ≤ 2^-8) or F16
 * (round to nearest even: relative error ≤ 2^-11 for normal values; values beyond ±65504 are rejected). Every
 * kernel decodes a stored value exactly to float and accumulates in float32, so the storage type is the only
 * approximation.
 *
 * Layout (detail::PanelLayout), TableLayout::Panels: the columns are cut into chunks of cv = 32 values (one or two
 * cache lines); chunk (cb, k, r) — columns [cv·cb, cv·cb + cv) of row r of table k — sits at
 * cb·cb_stride + k·table_stride + r·chunk_bytes. So all K tables of one column block form one contiguous panel
 * (2 MB fp32 / 1 MB bf16 for K = 64, τ = 8, read in L2-sized table groups) which the prefill loop keeps in L2 while
 * every token streams through it. TableLayout::Rows: one chunk per row (rows contiguous, padded to a multiple of 64
 * values), which a token-major decode reads as whole rows — a random 64-byte chunk per column block would cost a
 * DRAM round trip each. Either way a table has one spare cache line so that row r of consecutive tables falls in
 * different cache sets, and blocks ≥ 256 KB are 2 MB aligned with transparent huge pages advised. bf16 stores each
 * group of 32 values as 16 words: word j holds value j's bfloat16 (round to nearest even) in its low half, and the
 * whole word, read as a float, is value j+16 (its high half chosen so that this float is nearest to the value,
 * detail::bf16_high_half), so a 64-byte load becomes two vectors of 16 consecutive columns with one shift.
 * Training keeps float32 master tables in MemoryLayer; this is an inference copy (see FrozenMemoryLayer).
 */
class PackedTables {
 public:
  PackedTables() = default;

  /// Converts `tables` to `storage`. @throws ConfigError if a value is not finite or does not fit float16.
  PackedTables(const BucketTable<float>& tables, StorageType storage, TableLayout layout = TableLayout::Panels,
               Index chunk_values = 0)
      : PackedTables(tables.data(), tables.num_tables(), tables.tau(), tables.width(), storage, layout, chunk_values) {}

  /**
   * @brief Converts row-major float tables [tables, 2^τ, width] (contiguous) to `storage`.
   * @param layout       Panels (prefill) or Rows (decode)
   * @param chunk_values Panels only: columns per chunk, 0 for the default (32), else 16, 32 or 64 (bf16: 32, 64)
   * @throws ConfigError for a bad shape or chunk size, a non-finite value, a value beyond the float16 range, or a
   *         storage or layout that is not a member of its enum
   */
  PackedTables(const float* values, Index tables, int tau, Index width, StorageType storage,
               TableLayout layout = TableLayout::Panels, Index chunk_values = 0) {
    const char* where = "PackedTables";
    // Checked first: the layout's byte sizes and the lookups' dispatch read them.
    detail::check_enum(where, "storage", storage, {StorageType::F32, StorageType::F16, StorageType::BF16},
                       "StorageType");
    detail::check_enum(where, "layout", layout, {TableLayout::Panels, TableLayout::Rows}, "TableLayout");
    detail::check_config(tables > 0, where, "tables = " + std::to_string(tables) + " must be > 0");
    detail::check_config(tau >= 1 && tau <= 16, where, "tau = " + std::to_string(tau) + " is outside 1..16");
    detail::check_config(width > 0, where, "width = " + std::to_string(width) + " must be > 0");
    // Checked before the layout's byte arithmetic and the allocation, which would otherwise wrap.
    detail::checked_product(where, "tables × 2^tau × width", {tables, Index(1) << tau, width});
    const bool chunk_ok = chunk_values == 0 || chunk_values == 64 || chunk_values == 32 ||
                          (chunk_values == 16 && storage != StorageType::BF16);
    detail::check_config(chunk_ok, where,
                         "chunk_values = " + std::to_string(chunk_values) +
                             " must be 0 (default), 16, 32 or 64 (bf16: 32 or 64)");
    layout_ = detail::PanelLayout::make(tables, tau, width, storage,
                                        layout == TableLayout::Rows ? detail::row_chunk : chunk_values);
    block_ = detail::TableBlock(size_t(layout_.total_bytes()));
    const Index rows = layout_.rows;
    for (Index i = 0; i < tables * rows * width; ++i) {
      const float v = values[i];
      if (!std::isfinite(v) || (storage == StorageType::F16 && std::abs(v) > 65504.0f)) {
        std::ostringstream os;
        os << where << ": table value " << v << " at (table " << i / (rows * width) << ", row "
           << (i / width) % rows << ", column " << i % width << ") "
           << (std::isfinite(v) ? "does not fit float16 (|v| > 65504)" : "is not finite");
        throw ConfigError(os.str());
      }
    }
    for (Index k = 0; k < tables; ++k)
      for (Index r = 0; r < rows; ++r)
        for (Index cb = 0; cb < layout_.column_blocks; ++cb)
          detail::encode_chunk(block_.data() + layout_.chunk_offset(cb, k, r),
                               values + (k * rows + r) * width + cb * layout_.cv, layout_.block_columns(cb),
                               layout_.cv, storage);
  }

  bool empty() const { return layout_.tables == 0; }
  StorageType storage() const { return layout_.storage; }        ///< F32, BF16 or F16
  /// Panels or Rows.
  TableLayout table_layout() const { return layout_.row_layout ? TableLayout::Rows : TableLayout::Panels; }
  Index num_tables() const { return layout_.tables; }            ///< K
  Index rows_per_table() const { return layout_.rows; }          ///< 2^τ
  int tau() const { return empty() ? 0 : std::countr_zero(std::uint64_t(layout_.rows)); }
  Index width() const { return layout_.width; }                  ///< values per row (d_out)
  /// Bytes held (values, padding to whole chunks, one spare line per table).
  std::size_t bytes() const { return block_.size(); }
  /// Bytes of the values alone: K·2^τ·width·(4 or 2).
  double value_bytes() const { return double(layout_.tables * layout_.rows * layout_.width * layout_.value_bytes); }

  /// Stored value of (table k, row r, column c) decoded to float. @throws IndexError
  float value(Index k, Index r, Index c) const {
    if (k < 0 || k >= layout_.tables || r < 0 || r >= layout_.rows || c < 0 || c >= layout_.width)
      throw IndexError("PackedTables::value: (" + std::to_string(k) + ", " + std::to_string(r) + ", " +
                       std::to_string(c) + ") is outside (" + std::to_string(layout_.tables) + ", " +
                       std::to_string(layout_.rows) + ", " + std::to_string(layout_.width) + ")");
    const Index cb = c / layout_.cv;
    return detail::decode_value(block_.data() + layout_.chunk_offset(cb, k, r), c % layout_.cv, layout_.storage);
  }

  /// All stored values decoded back to a row-major float [K, 2^τ, width] BucketTable.
  BucketTable<float> unpack() const {
    BucketTable<float> out(layout_.tables, tau(), layout_.width);
    for (Index k = 0; k < layout_.tables; ++k)
      for (Index r = 0; r < layout_.rows; ++r)
        for (Index c = 0; c < layout_.width; ++c) out.row(k, r)[c] = value(k, r, c);
    return out;
  }

  /// The layout and bytes the kernels read.
  const detail::PanelLayout& layout() const { return layout_; }
  const std::byte* data() const { return block_.data(); }

 private:
  detail::PanelLayout layout_;
  detail::TableBlock block_;
};

}  // namespace memoryformer
