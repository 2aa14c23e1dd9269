// SPDX-License-Identifier: MIT
// Dense layer y = x W + b with its backward pass: the baseline the Memory Layer replaces (design §1, §3 "dense baseline").
#pragma once

#include <concepts>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "../detail/checks.hpp"
#include "../detail/column_sums.hpp"
#include "../detail/row_parallel.hpp"
#include "../error.hpp"
#include "../parameter.hpp"
#include "../random.hpp"
#include "../types.hpp"

namespace memoryformer {

namespace detail {

/// True when the memory spanned by two row-major views overlaps (used to refuse outputs aliasing inputs where
/// the kernel would read what it already wrote).
template <class A, class B>
bool linear_views_overlap(const A& a, const B& b) {
  if (a.size() == 0 || b.size() == 0) return false;
  const auto* a0 = reinterpret_cast<const unsigned char*>(a.data());
  const auto* b0 = reinterpret_cast<const unsigned char*>(b.data());
  const auto* a1 = reinterpret_cast<const unsigned char*>(a.data() + (a.rows() - 1) * a.outerStride() + a.cols());
  const auto* b1 = reinterpret_cast<const unsigned char*>(b.data() + (b.rows() - 1) * b.outerStride() + b.cols());
  return a0 < b1 && b0 < a1;
}

}  // namespace detail

/**
 * @brief Fully-connected layer y = x W + b over rows of x (one row per token).
 * @tparam Scalar float or double.
 *
 * W is stored [d_in, d_out] (so a forward is row-major GEMMs x·W); the bias is optional.
 * Threads (OpenMP): forward and dx run one product per fixed block of rows, dW one per fixed block of columns, so
 * results have the same bits for any thread count (Eigen's own product threads are not used).
 * Initialisation: W ~ N(0, init_std²) from the given Rng, b = 0.
 */
template <std::floating_point Scalar>
class Linear {
 public:
  /**
   * @brief Builds the layer and draws W from `rng`.
   * @param d_in      input features (> 0)
   * @param d_out     output features (> 0)
   * @param bias      whether y gets a bias b [d_out]
   * @param rng       generator consumed for W (d_in·d_out normals, row-major order)
   * @param init_std  standard deviation of W (≥ 0)
   * @throws ConfigError for non-positive sizes or a negative init_std.
   */
  Linear(Index d_in, Index d_out, bool bias, Rng& rng, double init_std = 0.02) { init(d_in, d_out, bias, rng, init_std); }

  /// @brief As above, with a fresh Rng(seed).
  Linear(Index d_in, Index d_out, bool bias, std::uint64_t seed, double init_std = 0.02) {
    Rng rng(seed);
    init(d_in, d_out, bias, rng, init_std);
  }

  Index d_in() const { return weight_.rows(); }
  Index d_out() const { return weight_.cols(); }
  bool has_bias() const { return has_bias_; }

  /// W [d_in, d_out].
  Matrix<Scalar>& weight() { return weight_; }
  const Matrix<Scalar>& weight() const { return weight_; }
  /// b [d_out] (empty when the layer has no bias).
  Vector<Scalar>& bias() { return bias_; }
  const Vector<Scalar>& bias() const { return bias_; }
  /// dL/dW [d_in, d_out], accumulated by backward.
  const Matrix<Scalar>& dweight() const { return dweight_; }
  /// dL/db [d_out] (empty without bias), accumulated by backward.
  const Vector<Scalar>& dbias() const { return dbias_; }

  /**
   * @brief y = x W + b.
   * @param y  [N, d_out] output, written; must not overlap x
   * @param x  [N, d_in] input
   * @throws ShapeError when the shapes disagree; ValueError when y overlaps x.
   */
  void forward(MatrixRef<Scalar> y, ConstMatrixRef<Scalar> x) const {
    constexpr const char* where = "Linear::forward";
    detail::check_shape(where, "x", x.rows(), x.cols(), -1, d_in(), expected_text("(N, d_in)", -1, d_in()));
    detail::check_shape(where, "y", y.rows(), y.cols(), x.rows(), d_out(), expected_text("(N, d_out)", x.rows(), d_out()));
    if (detail::linear_views_overlap(y, x)) throw ValueError(std::string(where) + ": y overlaps x");
    // One product per fixed block of rows, blocks on the threads: the same bits for any thread count.
    detail::chunked_product<Scalar>(y, x, weight_, has_bias_ ? &bias_ : nullptr);
  }

  /**
   * @brief dx = dy Wᵀ (overwritten); dW += xᵀ dy and db += Σ_rows dy (accumulated until zero_grad()).
   * @param dx  [N, d_in] gradient of the input, written; may overlap x but not dy
   * @param x   [N, d_in] the input given to forward
   * @param dy  [N, d_out] gradient of the output
   * @throws ShapeError when the shapes disagree; ValueError when dx overlaps dy.
   */
  void backward(MatrixRef<Scalar> dx, ConstMatrixRef<Scalar> x, ConstMatrixRef<Scalar> dy) {
    constexpr const char* where = "Linear::backward";
    detail::check_shape(where, "x", x.rows(), x.cols(), -1, d_in(), expected_text("(N, d_in)", -1, d_in()));
    detail::check_shape(where, "dy", dy.rows(), dy.cols(), x.rows(), d_out(), expected_text("(N, d_out)", x.rows(), d_out()));
    detail::check_shape(where, "dx", dx.rows(), dx.cols(), x.rows(), d_in(), expected_text("(N, d_in)", x.rows(), d_in()));
    if (detail::linear_views_overlap(dx, dy)) throw ValueError(std::string(where) + ": dx overlaps dy");
    // Parameter gradients first: they read x, and dx is allowed to overwrite x.
    // dW by fixed column blocks (each sums over every row itself), dx by fixed row blocks: no partial sums combined
    // across threads, so the same bits for any thread count.
    detail::chunked_weight_gradient<Scalar>(dweight_, x, dy);
    if (has_bias_) dbias_.noalias() += detail::column_sums<Scalar>(dy);
    detail::chunked_product_transposed<Scalar>(dx, dy, weight_);
  }

  /// Sets dweight and dbias to zero.
  void zero_grad() {
    dweight_.setZero();
    dbias_.setZero();
  }

  /**
   * @brief Views of W ("<prefix>.weight", kind Dense) and b ("<prefix>.bias", kind Bias, if present).
   * @param prefix dotted path of this layer without a trailing dot; empty gives "weight" / "bias".
   */
  std::vector<ParameterView<Scalar>> parameters(const std::string& prefix = {}) {
    std::vector<ParameterView<Scalar>> out;
    const std::string dot = prefix.empty() ? std::string() : prefix + ".";
    out.push_back({dot + "weight", {d_in(), d_out()}, std::span<Scalar>(weight_.data(), size_t(weight_.size())),
                   std::span<Scalar>(dweight_.data(), size_t(dweight_.size())), ParameterKind::Dense, 0, nullptr});
    if (has_bias_)
      out.push_back({dot + "bias", {d_out()}, std::span<Scalar>(bias_.data(), size_t(bias_.size())),
                     std::span<Scalar>(dbias_.data(), size_t(dbias_.size())), ParameterKind::Bias, 0, nullptr});
    return out;
  }

 private:
  void init(Index d_in, Index d_out, bool bias, Rng& rng, double init_std) {
    detail::check_config(d_in > 0, "Linear", "d_in = " + std::to_string(d_in) + " must be positive");
    detail::check_config(d_out > 0, "Linear", "d_out = " + std::to_string(d_out) + " must be positive");
    detail::check_config(std::isfinite(init_std) && init_std >= 0.0, "Linear",
                         "init_std = " + std::to_string(init_std) + " must be finite and ≥ 0");
    has_bias_ = bias;
    weight_.resize(d_in, d_out);
    rng.fill_normal(std::span<Scalar>(weight_.data(), size_t(weight_.size())), 0.0, init_std);
    dweight_ = Matrix<Scalar>::Zero(d_in, d_out);
    bias_ = Vector<Scalar>::Zero(bias ? d_out : 0);
    dbias_ = Vector<Scalar>::Zero(bias ? d_out : 0);
  }

  static std::string expected_text(const char* symbolic, Index rows, Index cols) {
    return std::string(symbolic) + " = (" + (rows < 0 ? std::string("N") : std::to_string(rows)) + ", " +
           std::to_string(cols) + ")";
  }

  bool has_bias_ = false;
  Matrix<Scalar> weight_;   // [d_in, d_out]
  Vector<Scalar> bias_;     // [d_out], or [0] without bias
  Matrix<Scalar> dweight_;  // [d_in, d_out]
  Vector<Scalar> dbias_;    // [d_out], or [0] without bias
};

}  // namespace memoryformer
