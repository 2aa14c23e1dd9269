// SPDX-License-Identifier: MIT
// Bucket-table storage of a Memory Layer (design §1.3): K tables of 2^τ rows × width values in one 64-byte-aligned
// block, row r of table k at global row k·2^τ + r; and a hit counter for bucket-usage analysis (paper Figure 4).
#pragma once

#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "detail/aligned_buffer.hpp"
#include "detail/checks.hpp"
#include "detail/checked_size.hpp"
#include "error.hpp"
#include "types.hpp"

namespace memoryformer {

/// K × 2^τ × width values, row-major and contiguous: [K, 2^τ, width].
template <class Scalar>
class BucketTable {
 public:
  BucketTable() = default;

  /// @throws ConfigError for τ outside 1..16, non-positive counts, or tables that cannot be allocated.
  BucketTable(Index tables, int tau, Index width) : tables_(tables), tau_(tau), width_(width) {
    detail::check_config(tables > 0, "BucketTable", "tables = " + std::to_string(tables) + " must be > 0");
    detail::check_config(tau >= 1 && tau <= 16, "BucketTable", "tau = " + std::to_string(tau) + " is outside 1..16");
    detail::check_config(width > 0, "BucketTable", "width = " + std::to_string(width) + " must be > 0");
    // Checked before allocating: a wrapped product would allocate a tiny block that size() then overstates.
    const Index count =
        detail::checked_product("BucketTable", "tables × 2^tau × width", {tables, rows_per_table(), width});
    detail::allocating("BucketTable",
                       "tables × 2^tau × width = " + std::to_string(tables) + " × " +
                           std::to_string(rows_per_table()) + " × " + std::to_string(width) + " values",
                       count * Index(sizeof(Scalar)), [&] { values_.resize(size_t(count)); });
  }

  Index num_tables() const { return tables_; }             ///< K
  int tau() const { return tau_; }                         ///< code length
  Index rows_per_table() const { return Index(1) << tau_; }  ///< 2^τ
  Index num_rows() const { return tables_ * rows_per_table(); }
  Index width() const { return width_; }                    ///< values per row (d_out)
  Index size() const { return Index(values_.size()); }

  /// Row `code` of table `k` (no bounds check: the hot path; codes come from the hasher and are in range).
  Scalar* row(Index k, Index code) { return values_.data() + (k * rows_per_table() + code) * width_; }
  const Scalar* row(Index k, Index code) const { return values_.data() + (k * rows_per_table() + code) * width_; }

  /// Checked access for user code. @throws IndexError
  Eigen::Map<const Eigen::Matrix<Scalar, 1, Eigen::Dynamic>> row_checked(Index k, Index code) const {
    if (k < 0 || k >= tables_ || code < 0 || code >= rows_per_table())
      throw IndexError("BucketTable::row_checked: (table " + std::to_string(k) + ", row " +
                       std::to_string(code) + ") is outside (" + std::to_string(tables_) + ", " +
                       std::to_string(rows_per_table()) + ")");
    return {row(k, code), width_};
  }

  Scalar* data() { return values_.data(); }
  const Scalar* data() const { return values_.data(); }
  std::span<Scalar> values() { return values_.span(); }
  std::span<const Scalar> values() const { return values_.span(); }
  /// All rows as a [K·2^τ, width] matrix view.
  MatrixMap<Scalar> as_matrix() { return {values_.data(), num_rows(), width_}; }
  ConstMatrixMap<Scalar> as_matrix() const { return {values_.data(), num_rows(), width_}; }
  void set_zero() { values_.set_zero(); }

 private:
  Index tables_ = 0;
  int tau_ = 0;
  Index width_ = 0;
  detail::AlignedBuffer<Scalar> values_;  // [K, 2^τ, width]
};

/// Counts how often each bucket of each table is selected (paper Figure 4: bucket usage).
class BucketHitCounter {
 public:
  /// @throws ConfigError for τ outside 1..16, tables < 1 or a table count too large to hold.
  BucketHitCounter(Index tables, int tau) : tables_(tables), tau_(tau) {
    // Checked before the shift and the allocation: τ = 64 or −1 would be an undefined shift, τ = 40 terabytes.
    detail::check_config(tables > 0 && tau >= 1 && tau <= 16, "BucketHitCounter",
                         "tables = " + std::to_string(tables) + ", tau = " + std::to_string(tau) +
                             " (need tables ≥ 1 and tau in 1..16)");
    counts_.assign(size_t(detail::checked_shift("BucketHitCounter", "tables × 2^tau", tables, tau)), 0);
  }

  /// Adds the codes of a [N, K] code array (e.g. HashResult::codes).
  void record(std::span<const std::int32_t> codes) {
    if (Index(codes.size()) % tables_ != 0)
      throw ShapeError("BucketHitCounter::record: " + std::to_string(codes.size()) +
                       " codes is not a multiple of K = " + std::to_string(tables_));
    const Index rows = Index(codes.size()) / tables_;
    for (Index n = 0; n < rows; ++n)
      for (Index k = 0; k < tables_; ++k) {
        const std::int32_t c = codes[size_t(n * tables_ + k)];
        if (c < 0 || c >= (std::int32_t(1) << tau_))
          throw IndexError("BucketHitCounter::record: code " + std::to_string(c) + " is outside [0, 2^" +
                           std::to_string(tau_) + ")");
        ++counts_[size_t((k << tau_) + c)];
      }
  }

  /// Hit counts of table k: 2^τ values.
  /// @throws IndexError unless 0 ≤ k < K.
  std::span<const std::uint64_t> counts(Index k) const {
    if (k < 0 || k >= tables_)
      throw IndexError("BucketHitCounter::counts: table " + std::to_string(k) + " is outside [0, " +
                       std::to_string(tables_) + ")");
    return std::span<const std::uint64_t>(counts_).subspan(size_t(k << tau_), size_t(Index(1) << tau_));
  }
  Index num_tables() const { return tables_; }
  int tau() const { return tau_; }
  void reset() { std::fill(counts_.begin(), counts_.end(), 0); }

 private:
  Index tables_;
  int tau_;
  std::vector<std::uint64_t> counts_;  // [K, 2^τ]
};

}  // namespace memoryformer
