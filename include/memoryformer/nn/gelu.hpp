// SPDX-License-Identifier: MIT
// Exact (erf-form) GeLU, 0.5·x·(1 + erf(x/√2)), forward and backward as free functions (design §7.4, optional GeLU):
// double through std::erf, float through detail/gelu_kernels.hpp (vectorised; error bound in design §7.4).
#pragma once

#include <cmath>
#include <concepts>
#include <numbers>
#include <type_traits>

#include "../detail/checks.hpp"
#include "../detail/gelu_kernels.hpp"
#include "../detail/row_parallel.hpp"
#include "../detail/simd.hpp"
#include "../error.hpp"
#include "../types.hpp"

namespace memoryformer {

/**
 * @brief y = GeLU(x) = x·Φ(x) = 0.5·x·(1 + erf(x/√2)), element-wise (not the tanh approximation).
 * Rows run on the threads (element-wise: the same bits for any thread count).
 * @param y  output, same shape as x; may be x itself
 * @param x  input [rows, cols] (any Eigen dense expression; its Scalar selects the instantiation)
 * @throws ShapeError when y and x differ in shape.
 */
template <class XDerived>
  requires std::floating_point<typename XDerived::Scalar>
void gelu_forward(MatrixRef<typename XDerived::Scalar> y, const Eigen::MatrixBase<XDerived>& x) {
  using Scalar = typename XDerived::Scalar;
  detail::check_shape("gelu_forward", "y", y.rows(), y.cols(), x.rows(), x.cols());
  if constexpr (std::is_same_v<Scalar, float>) {
    const ConstMatrixRef<float> xr(x);  // x's rows in place when they are contiguous, else a copy
    detail::parallel_rows(xr.rows(), detail::min_rows_per_thread(xr.cols()) / 4 + 1, [&](Index r0, Index r1) {
      for (Index i = r0; i < r1; ++i)
        detail::gelu_forward_row<best_isa()>(y.row(i).data(), xr.row(i).data(), xr.cols());
    });
  } else {
    const Scalar inv_sqrt2 = Scalar(1) / std::numbers::sqrt2_v<Scalar>;
    detail::parallel_rows(x.rows(), detail::min_rows_per_thread(x.cols()) / 4 + 1, [&](Index r0, Index r1) {
      for (Index i = r0; i < r1; ++i)
        for (Index j = 0; j < x.cols(); ++j) {
          const Scalar v = x(i, j);
          y(i, j) = Scalar(0.5) * v * (Scalar(1) + std::erf(v * inv_sqrt2));
        }
    });
  }
}

/**
 * @brief dx = dy · GeLU'(x), with GeLU'(x) = Φ(x) + x·φ(x) = 0.5·(1 + erf(x/√2)) + x·e^(−x²/2)/√(2π).
 * @param dx  gradient of the input, same shape as x (overwritten); may be x or dy itself
 * @param x   the input given to gelu_forward
 * @param dy  gradient of the output, same shape as x
 * @throws ShapeError when the shapes differ.
 */
template <class XDerived, class DyDerived>
  requires std::floating_point<typename XDerived::Scalar> &&
           std::same_as<typename XDerived::Scalar, typename DyDerived::Scalar>
void gelu_backward(MatrixRef<typename XDerived::Scalar> dx, const Eigen::MatrixBase<XDerived>& x,
                   const Eigen::MatrixBase<DyDerived>& dy) {
  using Scalar = typename XDerived::Scalar;
  detail::check_shape("gelu_backward", "dy", dy.rows(), dy.cols(), x.rows(), x.cols());
  detail::check_shape("gelu_backward", "dx", dx.rows(), dx.cols(), x.rows(), x.cols());
  if constexpr (std::is_same_v<Scalar, float>) {
    const ConstMatrixRef<float> xr(x), dyr(dy);  // in place when their rows are contiguous, else copies
    detail::parallel_rows(xr.rows(), detail::min_rows_per_thread(xr.cols()) / 4 + 1, [&](Index r0, Index r1) {
      for (Index i = r0; i < r1; ++i)
        detail::gelu_backward_row<best_isa()>(dx.row(i).data(), xr.row(i).data(), dyr.row(i).data(), xr.cols());
    });
  } else {
    const Scalar inv_sqrt2 = Scalar(1) / std::numbers::sqrt2_v<Scalar>;
    const Scalar inv_sqrt_2pi = inv_sqrt2 * std::numbers::inv_sqrtpi_v<Scalar>;
    detail::parallel_rows(x.rows(), detail::min_rows_per_thread(x.cols()) / 4 + 1, [&](Index r0, Index r1) {
      for (Index i = r0; i < r1; ++i)
        for (Index j = 0; j < x.cols(); ++j) {
          const Scalar v = x(i, j);
          const Scalar cdf = Scalar(0.5) * (Scalar(1) + std::erf(v * inv_sqrt2));
          const Scalar pdf = inv_sqrt_2pi * std::exp(Scalar(-0.5) * v * v);
          dx(i, j) = dy(i, j) * (cdf + v * pdf);
        }
    });
  }
}

}  // namespace memoryformer
