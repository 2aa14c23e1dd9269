// SPDX-License-Identifier: MIT
// RMSNorm over the last dimension with the authors' eps placement, y = x / (rms(x) + eps) · g (design §7.1,
// RMSNorm1/2).
#pragma once

#include <cmath>
#include <concepts>
#include <span>
#include <string>
#include <vector>

#include "../detail/checked_size.hpp"
#include "../detail/checks.hpp"
#include "../detail/row_parallel.hpp"
#include "../error.hpp"
#include "../parameter.hpp"
#include "../types.hpp"

namespace memoryformer {

/// What RMSNorm::forward keeps for backward: one statistic per row.
template <std::floating_point Scalar>
struct RMSNormCache {
  Vector<Scalar> rms;  // [rows] sqrt(mean_j x_j²) of each row
};

/**
 * @brief Scale-only RMS normalisation of each row of a [rows, d] matrix.
 *
 * y_j = x_j / (rms(x) + eps) · g_j with rms(x) = sqrt(mean_j x_j²). The eps is ADDED TO THE RMS, as in the
 * authors' code (not inside the square root as in T5/LLaMA); default 1e-8. g starts at 1.
 * @tparam Scalar float or double.
 */
template <std::floating_point Scalar>
class RMSNorm {
 public:
  /**
   * @param d    normalised (last) dimension, > 0
   * @param eps  added to the RMS, ≥ 0 (use > 0 unless rows can never be all zero)
   * @throws ConfigError for d ≤ 0 or eps < 0.
   */
  explicit RMSNorm(Index d, double eps = 1e-8) : eps_(Scalar(eps)) {
    detail::check_config(d > 0, "RMSNorm", "d = " + std::to_string(d) + " must be positive");
    detail::check_config(eps >= 0.0, "RMSNorm", "eps = " + std::to_string(eps) + " must be ≥ 0");
    scale_ = Vector<Scalar>::Ones(d);
    dscale_ = Vector<Scalar>::Zero(d);
  }

  Index d() const { return scale_.size(); }
  Scalar eps() const { return eps_; }
  /// g [d].
  Vector<Scalar>& scale() { return scale_; }
  const Vector<Scalar>& scale() const { return scale_; }
  /// dL/dg [d], accumulated by backward.
  const Vector<Scalar>& dscale() const { return dscale_; }

  /**
   * @brief y = x / (rms(x) + eps) · g, row by row; fills `cache` for backward.
   * @param y      [rows, d] output; may be x itself (in place)
   * @param x      [rows, d] input
   * @param cache  receives the per-row RMS
   * @throws ShapeError when the shapes disagree; ConfigError when memory cannot hold the buffers of its rows.
   */
  void forward(MatrixRef<Scalar> y, ConstMatrixRef<Scalar> x, RMSNormCache<Scalar>& cache) const {
    constexpr const char* where = "RMSNorm::forward";
    detail::check_shape(where, "x", x.rows(), x.cols(), -1, d());
    detail::check_shape(where, "y", y.rows(), y.cols(), x.rows(), d());
    detail::allocating_activations(where, x.rows(), 1, 1, sizeof(Scalar),
                                   [&] { detail::resize_buffer(cache.rms, x.rows()); });
    const Scalar inv_d = Scalar(1) / Scalar(d());
    // Rows are independent: contiguous row ranges on the threads.
    detail::parallel_rows(x.rows(), detail::min_rows_per_thread(d()), [&](Index r0, Index r1) {
      for (Index n = r0; n < r1; ++n) {
        const Scalar rms = std::sqrt(x.row(n).squaredNorm() * inv_d);
        cache.rms(n) = rms;
        const Scalar s = Scalar(1) / (rms + eps_);
        y.row(n) = (x.row(n).array() * s * scale_.transpose().array()).matrix();
      }
    });
  }

  /**
   * @brief dx (overwritten) and dg (accumulated) from dy.
   *
   * With s = 1/(r + eps), r = rms(x): dx = s·(g⊙dy) − s²/(d·r) · ⟨g⊙dy, x⟩ · x. For an all-zero row (r = 0) the
   * second term is 0, its limit as x → 0 (autograd would give 0·∞ = NaN).
   * @param dx     [rows, d] gradient of the input; may be x or dy itself
   * @param x      [rows, d] the input given to forward
   * @param dy     [rows, d] gradient of the output
   * @param cache  filled by forward on this x
   * @throws ShapeError when the shapes disagree; StateError when the cache does not come from forward on x;
   *         ConfigError when memory cannot hold the buffers of its rows.
   */
  void backward(MatrixRef<Scalar> dx, ConstMatrixRef<Scalar> x, ConstMatrixRef<Scalar> dy,
                const RMSNormCache<Scalar>& cache) {
    constexpr const char* where = "RMSNorm::backward";
    detail::check_shape(where, "x", x.rows(), x.cols(), -1, d());
    detail::check_shape(where, "dy", dy.rows(), dy.cols(), x.rows(), d());
    detail::check_shape(where, "dx", dx.rows(), dx.cols(), x.rows(), d());
    if (cache.rms.size() != x.rows())
      throw StateError(std::string(where) + ": cache holds " + std::to_string(cache.rms.size()) + " rows, x has " +
                       std::to_string(x.rows()) + "; call forward on this x first");
    const Scalar inv_d = Scalar(1) / Scalar(d());
    // dg = Σ_rows dy⊙x·s sums rows in fixed chunks (chunk sums added in chunk order): the same bits for any thread
    // count. Each row's dx is written by the thread that summed it, after its dg term read x and dy.
    detail::chunked_row_sum(where, dscale_, partials_, x.rows(), [&](Index n, auto& acc) {
      const Scalar r = cache.rms(n);
      const Scalar s = Scalar(1) / (r + eps_);
      const Scalar dot = (dy.row(n).array() * scale_.transpose().array() * x.row(n).array()).sum();
      acc.array() += dy.row(n).transpose().array() * x.row(n).transpose().array() * s;
      const Scalar c = r > Scalar(0) ? s * s * dot * inv_d / r : Scalar(0);
      // Element-wise from dy_j and x_j only, so dx may share storage with either.
      dx.row(n) = (s * dy.row(n).array() * scale_.transpose().array() - c * x.row(n).array()).matrix();
    });
  }

  /// Sets dscale to zero.
  void zero_grad() { dscale_.setZero(); }

  /**
   * @brief View of g as "<prefix>.scale" (kind Norm: no weight decay).
   * @param prefix dotted path of this layer without a trailing dot; empty gives "scale".
   */
  std::vector<ParameterView<Scalar>> parameters(const std::string& prefix = {}) {
    const std::string dot = prefix.empty() ? std::string() : prefix + ".";
    return {{dot + "scale", {d()}, std::span<Scalar>(scale_.data(), size_t(d())),
             std::span<Scalar>(dscale_.data(), size_t(d())), ParameterKind::Norm, 0, nullptr}};
  }

 private:
  Scalar eps_;
  Vector<Scalar> scale_;   // [d] g
  Vector<Scalar> dscale_;  // [d]
  Matrix<Scalar> partials_;  // [row chunks, d] scratch of backward: per-chunk sums of dg
};

}  // namespace memoryformer
