// SPDX-License-Identifier: MIT
// Numerically stable row-wise softmax, forward and backward as free functions (design §6.1, attention probabilities).
#pragma once

#include <cmath>
#include <concepts>

#include "../detail/checks.hpp"
#include "../detail/row_parallel.hpp"
#include "../error.hpp"
#include "../types.hpp"

namespace memoryformer {

/**
 * @brief y_ij = exp(x_ij − max_j x_ij) / Σ_j exp(x_ij − max_j x_ij), for each row i.
 *
 * Subtracting the row maximum keeps exp() ≤ 1, so large logits do not overflow. Entries of −∞ get probability 0;
 * a row whose entries are all −∞ has no defined softmax and comes out NaN.
 * @param y  output, same shape as x; may be x itself
 * @param x  input [rows, cols ≥ 1] (any Eigen dense expression; its Scalar selects the instantiation)
 * @throws ShapeError when x has no columns or y's shape differs.
 */
template <class XDerived>
  requires std::floating_point<typename XDerived::Scalar>
void softmax_forward(MatrixRef<typename XDerived::Scalar> y, const Eigen::MatrixBase<XDerived>& x) {
  using Scalar = typename XDerived::Scalar;
  if (x.cols() < 1)
    throw ShapeError("softmax_forward: x is " + detail::shape_string({x.rows(), x.cols()}) +
                     ", expected at least one column");
  detail::check_shape("softmax_forward", "y", y.rows(), y.cols(), x.rows(), x.cols());
  detail::parallel_rows(x.rows(), detail::min_rows_per_thread(x.cols()), [&](Index r0, Index r1) {
    for (Index i = r0; i < r1; ++i) {
      const Scalar m = x.row(i).maxCoeff();
      Scalar sum = 0;
      for (Index j = 0; j < x.cols(); ++j) {
        const Scalar e = std::exp(x(i, j) - m);
        y(i, j) = e;
        sum += e;
      }
      y.row(i) *= Scalar(1) / sum;
    }
  });
}

/**
 * @brief dx = y ⊙ (dy − ⟨dy, y⟩_row): the softmax Jacobian-vector product, from the softmax OUTPUT y.
 * @param dx  gradient of the softmax input, same shape as y (overwritten); may be y or dy itself
 * @param y   the output of softmax_forward
 * @param dy  gradient of the output, same shape as y
 * @throws ShapeError when the shapes differ.
 */
template <class YDerived, class DyDerived>
  requires std::floating_point<typename YDerived::Scalar> &&
           std::same_as<typename YDerived::Scalar, typename DyDerived::Scalar>
void softmax_backward(MatrixRef<typename YDerived::Scalar> dx, const Eigen::MatrixBase<YDerived>& y,
                      const Eigen::MatrixBase<DyDerived>& dy) {
  using Scalar = typename YDerived::Scalar;
  detail::check_shape("softmax_backward", "dy", dy.rows(), dy.cols(), y.rows(), y.cols());
  detail::check_shape("softmax_backward", "dx", dx.rows(), dx.cols(), y.rows(), y.cols());
  detail::parallel_rows(y.rows(), detail::min_rows_per_thread(y.cols()), [&](Index r0, Index r1) {
    for (Index i = r0; i < r1; ++i) {
      const Scalar dot = y.row(i).dot(dy.row(i));
      for (Index j = 0; j < y.cols(); ++j) dx(i, j) = y(i, j) * (dy(i, j) - dot);
    }
  });
}

}  // namespace memoryformer
