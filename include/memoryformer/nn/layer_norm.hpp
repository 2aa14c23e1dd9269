// SPDX-License-Identifier: MIT
// Affine LayerNorm over the last dimension, y = (x − μ)/sqrt(var + eps)·γ + β, biased variance (design §7.2; the
// Memory Block's norm, §2).
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

/// What LayerNorm::forward keeps for backward: two statistics per row.
template <std::floating_point Scalar>
struct LayerNormCache {
  Vector<Scalar> mean;  // [rows] μ of each row
  Vector<Scalar> rstd;  // [rows] 1/sqrt(var + eps) of each row (biased variance, divided by d)
};

/**
 * @brief Affine layer normalisation of each row of a [rows, d] matrix (PyTorch nn.LayerNorm semantics).
 *
 * y = (x − μ) / sqrt(var + eps) · γ + β with μ and the biased variance over the row; eps default 1e-5;
 * γ starts at 1 and β at 0.
 * @tparam Scalar float or double.
 */
template <std::floating_point Scalar>
class LayerNorm {
 public:
  /**
   * @param d    normalised (last) dimension, > 0
   * @param eps  added to the variance, > 0
   * @throws ConfigError for d ≤ 0 or eps ≤ 0.
   */
  explicit LayerNorm(Index d, double eps = 1e-5) : eps_(Scalar(eps)) {
    detail::check_config(d > 0, "LayerNorm", "d = " + std::to_string(d) + " must be positive");
    detail::check_config(eps > 0.0, "LayerNorm", "eps = " + std::to_string(eps) + " must be positive");
    gamma_ = Vector<Scalar>::Ones(d);
    beta_ = Vector<Scalar>::Zero(d);
    dgamma_ = Vector<Scalar>::Zero(d);
    dbeta_ = Vector<Scalar>::Zero(d);
  }

  Index d() const { return gamma_.size(); }
  Scalar eps() const { return eps_; }
  /// γ [d].
  Vector<Scalar>& gamma() { return gamma_; }
  const Vector<Scalar>& gamma() const { return gamma_; }
  /// β [d].
  Vector<Scalar>& beta() { return beta_; }
  const Vector<Scalar>& beta() const { return beta_; }
  /// dL/dγ [d], accumulated by backward.
  const Vector<Scalar>& dgamma() const { return dgamma_; }
  /// dL/dβ [d], accumulated by backward.
  const Vector<Scalar>& dbeta() const { return dbeta_; }

  /**
   * @brief y = (x − μ)·rstd·γ + β row by row; fills `cache` with μ and rstd.
   * @param y      [rows, d] output; may be x itself (in place)
   * @param x      [rows, d] input
   * @param cache  receives the per-row statistics
   * @throws ShapeError when the shapes disagree; ConfigError when memory cannot hold the buffers of its rows.
   */
  void forward(MatrixRef<Scalar> y, ConstMatrixRef<Scalar> x, LayerNormCache<Scalar>& cache) const {
    constexpr const char* where = "LayerNorm::forward";
    detail::check_shape(where, "x", x.rows(), x.cols(), -1, d());
    detail::check_shape(where, "y", y.rows(), y.cols(), x.rows(), d());
    detail::allocating_activations(where, x.rows(), 1, 1, sizeof(Scalar), [&] {
      detail::resize_buffer(cache.mean, x.rows());
      detail::resize_buffer(cache.rstd, x.rows());
    });
    const Scalar inv_d = Scalar(1) / Scalar(d());
    // Rows are independent: contiguous row ranges on the threads.
    detail::parallel_rows(x.rows(), detail::min_rows_per_thread(d()), [&](Index r0, Index r1) {
      for (Index n = r0; n < r1; ++n) {
        // Two passes (mean, then squared deviations) rather than E[x²] − μ²: no cancellation for large means.
        const Scalar mu = x.row(n).sum() * inv_d;
        const Scalar var = (x.row(n).array() - mu).square().sum() * inv_d;
        const Scalar rstd = Scalar(1) / std::sqrt(var + eps_);
        cache.mean(n) = mu;
        cache.rstd(n) = rstd;
        y.row(n) = ((x.row(n).array() - mu) * rstd * gamma_.transpose().array() + beta_.transpose().array()).matrix();
      }
    });
  }

  /**
   * @brief dx (overwritten), dγ and dβ (accumulated) from dy.
   *
   * With x̂ = (x − μ)·rstd and g = γ⊙dy: dx = rstd·(g − mean(g) − x̂·mean(g⊙x̂)).
   * @param dx     [rows, d] gradient of the input; may be x or dy itself
   * @param x      [rows, d] the input given to forward
   * @param dy     [rows, d] gradient of the output
   * @param cache  filled by forward on this x
   * @throws ShapeError when the shapes disagree; StateError when the cache does not come from forward on x;
   *         ConfigError when memory cannot hold the buffers of its rows.
   */
  void backward(MatrixRef<Scalar> dx, ConstMatrixRef<Scalar> x, ConstMatrixRef<Scalar> dy,
                const LayerNormCache<Scalar>& cache) {
    constexpr const char* where = "LayerNorm::backward";
    detail::check_shape(where, "x", x.rows(), x.cols(), -1, d());
    detail::check_shape(where, "dy", dy.rows(), dy.cols(), x.rows(), d());
    detail::check_shape(where, "dx", dx.rows(), dx.cols(), x.rows(), d());
    if (cache.mean.size() != x.rows() || cache.rstd.size() != x.rows())
      throw StateError(std::string(where) + ": cache holds " + std::to_string(cache.mean.size()) + " rows, x has " +
                       std::to_string(x.rows()) + "; call forward on this x first");
    const Scalar inv_d = Scalar(1) / Scalar(d());
    const Index dd = d();
    // dγ and dβ sum rows in fixed chunks (chunk sums added in chunk order): the same bits for any thread count. One
    // accumulator [2d] holds both, dγ first. Each row's dx is written by the thread that summed it, after its terms
    // read x and dy.
    detail::resize_buffer(dgamma_beta_, 2 * dd);
    dgamma_beta_.setZero();
    detail::chunked_row_sum(where, dgamma_beta_, partials_, x.rows(), [&](Index n, auto& acc) {
      const Scalar mu = cache.mean(n);
      const Scalar rstd = cache.rstd(n);
      const auto xhat = (x.row(n).array() - mu) * rstd;  // lazy expression, re-read per use
      const auto g = dy.row(n).array() * gamma_.transpose().array();
      const Scalar mean_g = g.sum() * inv_d;
      const Scalar mean_gx = (g * xhat).sum() * inv_d;
      acc.head(dd).array() += (dy.row(n).array() * xhat).transpose();
      acc.tail(dd) += dy.row(n).transpose();
      // Element-wise from x_j and dy_j only, so dx may share storage with either.
      dx.row(n) = (rstd * (g - mean_g - xhat * mean_gx)).matrix();
    });
    dgamma_ += dgamma_beta_.head(dd);
    dbeta_ += dgamma_beta_.tail(dd);
  }

  /// Sets dgamma and dbeta to zero.
  void zero_grad() {
    dgamma_.setZero();
    dbeta_.setZero();
  }

  /**
   * @brief Views of γ ("<prefix>.gamma") and β ("<prefix>.beta"), both kind Norm (no weight decay).
   * @param prefix dotted path of this layer without a trailing dot; empty gives "gamma" / "beta".
   */
  std::vector<ParameterView<Scalar>> parameters(const std::string& prefix = {}) {
    const std::string dot = prefix.empty() ? std::string() : prefix + ".";
    return {{dot + "gamma", {d()}, std::span<Scalar>(gamma_.data(), size_t(d())),
             std::span<Scalar>(dgamma_.data(), size_t(d())), ParameterKind::Norm, 0, nullptr},
            {dot + "beta", {d()}, std::span<Scalar>(beta_.data(), size_t(d())),
             std::span<Scalar>(dbeta_.data(), size_t(d())), ParameterKind::Norm, 0, nullptr}};
  }

 private:
  Scalar eps_;
  Vector<Scalar> gamma_;   // [d]
  Vector<Scalar> beta_;    // [d]
  Vector<Scalar> dgamma_;  // [d]
  Vector<Scalar> dbeta_;   // [d]
  Vector<Scalar> dgamma_beta_;  // [2d] scratch of backward: this call's dγ then dβ
  Matrix<Scalar> partials_;     // [row chunks, 2d] scratch of backward: per-chunk sums of dγ, dβ
};

}  // namespace memoryformer
