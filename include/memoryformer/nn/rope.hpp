// SPDX-License-Identifier: MIT
// Rotary position embedding, GPT-NeoX rotate-half on the first rotary_dims of each head, with position offsets for
// incremental decoding (design §7.3).
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <limits>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "../detail/checked_size.hpp"
#include "../detail/checks.hpp"
#include "../detail/row_parallel.hpp"
#include "../error.hpp"
#include "../types.hpp"

namespace memoryformer {

/**
 * @brief Rotary position embedding (RoPE) in the GPT-NeoX "rotate-half" layout, applied per head.
 *
 * The d features of a row are split contiguously into `heads` heads of head_dim = d/heads. In each head, the first
 * R = rotary_dims features are rotated and the rest pass through. With half = R/2, inv_freq_i = base^(−2i/R) and
 * angle_i = pos·inv_freq_i, for i < half:
 *   out[i]        = r[i]·cos(angle_i) − r[i+half]·sin(angle_i)
 *   out[i + half] = r[i+half]·cos(angle_i) + r[i]·sin(angle_i)
 * i.e. pairs (i, i+half) are rotated by angle_i (cos/sin repeated over both halves, as GPT-NeoX does). The
 * backward pass is the inverse rotation (by −angle_i). No parameters.
 * Angles are computed in double and rounded to Scalar once, and kept: the object caches the cos/sin table of the
 * positions it has seen (grown geometrically, up to max_cached_positions), so training steps and decoding reuse it
 * instead of recomputing it per call. A grown table replaces the kept one while every call holds the table it
 * reads, so forward and backward may run on one object from several threads at once.
 * @tparam Scalar float or double.
 */
template <std::floating_point Scalar>
class Rotary {
 public:
  /**
   * @param d            features per row (all heads), > 0
   * @param heads        number of heads, > 0, dividing d
   * @param rotary_dims  rotated features at the start of each head: even, 0 ≤ rotary_dims ≤ d/heads
   * @param base         frequency base (10000 in GPT-NeoX), > 0
   * @throws ConfigError naming the offending value.
   */
  Rotary(Index d, Index heads, Index rotary_dims, double base = 10000.0)
      : d_(d), heads_(heads), rotary_dims_(rotary_dims), base_(base) {
    constexpr const char* where = "Rotary";
    detail::check_config(d > 0, where, "d = " + std::to_string(d) + " must be positive");
    detail::check_config(heads > 0, where, "heads = " + std::to_string(heads) + " must be positive");
    detail::check_config(d % heads == 0, where,
                         "d = " + std::to_string(d) + " is not divisible by heads = " + std::to_string(heads));
    head_dim_ = d / heads;
    detail::check_config(rotary_dims >= 0 && rotary_dims <= head_dim_, where,
                         "rotary_dims = " + std::to_string(rotary_dims) + " must be in [0, head_dim = " +
                             std::to_string(head_dim_) + "]");
    detail::check_config(rotary_dims % 2 == 0, where,
                         "rotary_dims = " + std::to_string(rotary_dims) + " must be even (rotate-half pairs i, i + R/2)");
    detail::check_config(base > 0.0 && std::isfinite(base), where, "base = " + std::to_string(base) + " must be positive");
    const Index half = rotary_dims / 2;
    inv_freq_.resize(size_t(half));
    for (Index i = 0; i < half; ++i) inv_freq_[size_t(i)] = std::pow(base, -2.0 * double(i) / double(rotary_dims));
  }

  Index d() const { return d_; }
  Index heads() const { return heads_; }
  Index head_dim() const { return head_dim_; }
  Index rotary_dims() const { return rotary_dims_; }
  double base() const { return base_; }

  /**
   * @brief Rotates a batch of sequences: row b·seq + t (batch-major) is at position position_offset + t.
   * @param y                [batch·seq, d] output; may be x itself
   * @param x                [batch·seq, d] input (Q or K before attention)
   * @param batch, seq       sequences and tokens per sequence, ≥ 1
   * @param position_offset  position of the first token of every sequence (e.g. the KV-cache length), ≥ 0
   * @throws ShapeError on a shape mismatch; ConfigError on a bad batch, seq or offset, or when memory cannot hold
   *         the angles of positions past the cached ones.
   */
  void forward(MatrixRef<Scalar> y, ConstMatrixRef<Scalar> x, Index batch, Index seq, Index position_offset = 0) const {
    apply_sequences("Rotary::forward", "x", "y", y, x, batch, seq, position_offset, Scalar(1));
  }

  /**
   * @brief dx = inverse rotation of dy, for the layout and positions of forward(y, x, batch, seq, position_offset).
   * @param dx  [batch·seq, d] gradient of the input; may be dy itself
   * @param dy  [batch·seq, d] gradient of the output
   * @throws as forward.
   */
  void backward(MatrixRef<Scalar> dx, ConstMatrixRef<Scalar> dy, Index batch, Index seq, Index position_offset = 0) const {
    apply_sequences("Rotary::backward", "dy", "dx", dx, dy, batch, seq, position_offset, Scalar(-1));
  }

  /**
   * @brief Rotates row n of x by position positions[n] (arbitrary positions, e.g. sequences of different lengths).
   * @param y          [rows, d] output; may be x itself
   * @param x          [rows, d] input
   * @param positions  one position ≥ 0 per row
   * @throws ShapeError on a shape mismatch; ConfigError on a negative position.
   */
  void forward(MatrixRef<Scalar> y, ConstMatrixRef<Scalar> x, std::span<const Index> positions) const {
    apply_positions("Rotary::forward", "x", "y", y, x, positions, Scalar(1));
  }

  /// @brief Inverse of forward(y, x, positions): dx = rotation of dy by −angle. dx may be dy itself.
  void backward(MatrixRef<Scalar> dx, ConstMatrixRef<Scalar> dy, std::span<const Index> positions) const {
    apply_positions("Rotary::backward", "dy", "dx", dx, dy, positions, Scalar(-1));
  }

 private:
  void check_io(const char* where, const char* in_name, const char* out_name, const MatrixRef<Scalar>& out,
                const ConstMatrixRef<Scalar>& in, Index rows, const std::string& expected_rows_text) const {
    detail::check_shape(where, in_name, in.rows(), in.cols(), rows, d_,
                        expected_rows_text + " = (" + std::to_string(rows) + ", " + std::to_string(d_) + ")");
    detail::check_shape(where, out_name, out.rows(), out.cols(), rows, d_);
  }

  /// One rotated pair: (a, b) → (a·c − b·s, b·c + a·s).
  static void rotate_pair(Scalar a, Scalar b, Scalar c, Scalar s, Scalar& ra, Scalar& rb) {
    ra = a * c - b * s;
    rb = b * c + a * s;
  }

  // cos_row/sin_row hold cos(angle_i), sign·sin(angle_i) for i < half.
  void rotate_row(Scalar* out, const Scalar* in, const Scalar* cos_row, const Scalar* sin_row) const {
    constexpr Index piece = 8;
    const Index half = rotary_dims_ / 2;
    for (Index h = 0; h < heads_; ++h) {
      const Scalar* a = in + h * head_dim_;
      const Scalar* b = a + half;
      Scalar* out_a = out + h * head_dim_;
      Scalar* out_b = out_a + half;
      // A piece's inputs are copied to locals and both halves computed there before either is stored: out may be
      // in, and with loads and stores on possibly overlapping memory the compiler could not vectorise the piece.
      Index i0 = 0;
      for (; i0 + piece <= half; i0 += piece) {
        Scalar va[piece], vb[piece], vc[piece], vs[piece];
        std::copy_n(a + i0, piece, va);
        std::copy_n(b + i0, piece, vb);
        std::copy_n(cos_row + i0, piece, vc);
        std::copy_n(sin_row + i0, piece, vs);
        Scalar rotated_a[piece], rotated_b[piece];
        for (Index i = 0; i < piece; ++i) rotate_pair(va[i], vb[i], vc[i], vs[i], rotated_a[i], rotated_b[i]);
        std::copy_n(rotated_a, piece, out_a + i0);
        std::copy_n(rotated_b, piece, out_b + i0);
      }
      for (; i0 < half; ++i0) {
        Scalar ra, rb;  // both computed before either store: out may be in
        rotate_pair(a[i0], b[i0], cos_row[i0], sin_row[i0], ra, rb);
        out_a[i0] = ra;
        out_b[i0] = rb;
      }
      if (out != in) std::copy(a + rotary_dims_, a + head_dim_, out_a + rotary_dims_);
    }
  }

  /// Positions past this are rotated from angles computed per call rather than grow the cache.
  static constexpr Index max_cached_positions = Index(1) << 16;

  /// cos, sin and −sin (the backward's sign) of positions [0, positions), [positions, rotary_dims/2] each; never
  /// changed once kept.
  struct AngleTable {
    Index positions = 0;
    std::vector<Scalar> cos, sin, neg_sin;
  };

  /// The kept table behind a mutex. A copy shares the (immutable) table and has a mutex of its own.
  class AngleCache {
   public:
    AngleCache() = default;
    AngleCache(const AngleCache& other) : table_(other.get()) {}
    AngleCache& operator=(const AngleCache& other) {
      auto table = other.get();
      const std::lock_guard<std::mutex> lock(mutex_);
      table_ = std::move(table);
      return *this;
    }
    std::shared_ptr<const AngleTable> get() const {
      const std::lock_guard<std::mutex> lock(mutex_);
      return table_;
    }
    /// The kept table if it covers [0, end), else grow(kept or nullptr), which is kept instead.
    template <class Grow>
    std::shared_ptr<const AngleTable> covering(Index end, Grow&& grow) {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (!table_ || table_->positions < end) table_ = grow(table_.get());
      return table_;
    }

   private:
    mutable std::mutex mutex_;
    std::shared_ptr<const AngleTable> table_;
  };

  /// A table that covers positions [0, end), end ≤ max_cached_positions. The caller holds it while it reads the
  /// rows, so a thread that grows the cache meanwhile does not free them.
  std::shared_ptr<const AngleTable> angles(Index end) const {
    return angles_.covering(end, [&](const AngleTable* old) {
      const Index half = rotary_dims_ / 2, kept = old ? old->positions : 0;
      const Index grown = std::min(max_cached_positions, std::max({end, 2 * kept, Index(64)}));
      auto table = std::make_shared<AngleTable>();
      table->positions = grown;
      for (std::vector<Scalar>* v : {&table->cos, &table->sin, &table->neg_sin}) v->resize(size_t(grown * half));
      if (old != nullptr) {
        std::copy(old->cos.begin(), old->cos.end(), table->cos.begin());
        std::copy(old->sin.begin(), old->sin.end(), table->sin.begin());
        std::copy(old->neg_sin.begin(), old->neg_sin.end(), table->neg_sin.begin());
      }
      for (Index t = kept; t < grown; ++t) {
        fill_angles(t, Scalar(1), table->cos.data() + t * half, table->sin.data() + t * half);
        for (Index i = 0; i < half; ++i) table->neg_sin[size_t(t * half + i)] = -table->sin[size_t(t * half + i)];
      }
      return std::shared_ptr<const AngleTable>(std::move(table));
    });
  }

  void fill_angles(Index pos, Scalar sign, Scalar* cos_row, Scalar* sin_row) const {
    for (size_t i = 0; i < inv_freq_.size(); ++i) {
      const double angle = double(pos) * inv_freq_[i];
      cos_row[i] = Scalar(std::cos(angle));
      sin_row[i] = sign * Scalar(std::sin(angle));
    }
  }

  void apply_sequences(const char* where, const char* in_name, const char* out_name, MatrixRef<Scalar> out,
                       ConstMatrixRef<Scalar> in, Index batch, Index seq, Index offset, Scalar sign) const {
    detail::check_config(batch >= 1, where, "batch = " + std::to_string(batch) + " must be ≥ 1");
    detail::check_config(seq >= 1, where, "seq = " + std::to_string(seq) + " must be ≥ 1");
    detail::check_config(offset >= 0, where, "position_offset = " + std::to_string(offset) + " must be ≥ 0");
    (void)detail::checked_add(where, "position_offset + seq", offset, seq, std::numeric_limits<Index>::max());
    const Index rows = detail::checked_mul(where, "batch·seq", batch, seq);
    check_io(where, in_name, out_name, out, in, rows,
             "(batch·seq, d) with batch = " + std::to_string(batch) + ", seq = " + std::to_string(seq));
    // One table of angles per position, shared by every sequence of the batch and every head: the cached one, or
    // (positions past the cache's limit) one computed for this call.
    const Index half = rotary_dims_ / 2;
    const Scalar* cos_table = nullptr;
    const Scalar* sin_table = nullptr;
    std::vector<Scalar> cos_local, sin_local;
    std::shared_ptr<const AngleTable> table;  // held until the rows are rotated
    if (offset <= max_cached_positions - seq) {
      table = angles(offset + seq);
      cos_table = table->cos.data() + offset * half;
      sin_table = (sign > Scalar(0) ? table->sin : table->neg_sin).data() + offset * half;
    } else {
      // seq·half fits: the rows of x are batch·seq, each of d ≥ 2·half values.
      detail::allocating(where,
                         "the cos and sin tables of the seq = " + std::to_string(seq) +
                             " positions past the cached angles ([" + std::to_string(seq) + ", " +
                             std::to_string(half) + "] each)",
                         Index(2) * seq * half * Index(sizeof(Scalar)), [&] {
                           cos_local.resize(size_t(seq * half));
                           sin_local.resize(size_t(seq * half));
                         });
      for (Index t = 0; t < seq; ++t)
        fill_angles(offset + t, sign, cos_local.data() + t * half, sin_local.data() + t * half);
      cos_table = cos_local.data();
      sin_table = sin_local.data();
    }
    // Row n is position n mod seq of its sequence. Rows are independent: any split over threads gives the same bits.
    detail::parallel_rows(rows, detail::min_rows_per_thread(d_), [&](Index n0, Index n1) {
      for (Index n = n0; n < n1; ++n) {
        const Index t = n % seq;
        rotate_row(out.row(n).data(), in.row(n).data(), cos_table + t * half, sin_table + t * half);
      }
    });
  }

  void apply_positions(const char* where, const char* in_name, const char* out_name, MatrixRef<Scalar> out,
                       ConstMatrixRef<Scalar> in, std::span<const Index> positions, Scalar sign) const {
    const Index rows = Index(positions.size());
    check_io(where, in_name, out_name, out, in, rows, "(positions.size(), d)");
    for (Index n = 0; n < rows; ++n)
      detail::check_config(positions[size_t(n)] >= 0, where,
                           "positions[" + std::to_string(n) + "] = " + std::to_string(positions[size_t(n)]) +
                               " must be ≥ 0");
    Index last = 0;  // the largest position (not + 1, which could overflow)
    for (Index pos : positions) last = std::max(last, pos);
    if (last < max_cached_positions) {
      const auto table = angles(last + 1);
      const Index half = rotary_dims_ / 2;
      const Scalar* cos_table = table->cos.data();
      const Scalar* sin_table = (sign > Scalar(0) ? table->sin : table->neg_sin).data();
      detail::parallel_rows(rows, detail::min_rows_per_thread(d_), [&](Index n0, Index n1) {
        for (Index n = n0; n < n1; ++n) {
          const Index pos = positions[size_t(n)];
          rotate_row(out.row(n).data(), in.row(n).data(), cos_table + pos * half, sin_table + pos * half);
        }
      });
      return;
    }
    std::vector<Scalar> cos_row(inv_freq_.size()), sin_row(inv_freq_.size());
    for (Index n = 0; n < rows; ++n) {
      fill_angles(positions[size_t(n)], sign, cos_row.data(), sin_row.data());
      rotate_row(out.row(n).data(), in.row(n).data(), cos_row.data(), sin_row.data());
    }
  }

  Index d_;
  Index heads_;
  Index head_dim_ = 0;
  Index rotary_dims_;
  double base_;
  std::vector<double> inv_freq_;  // [rotary_dims/2] base^(−2i/R)
  mutable AngleCache angles_;  // the angles of the positions seen so far
};

}  // namespace memoryformer
