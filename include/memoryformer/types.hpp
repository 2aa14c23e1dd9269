// SPDX-License-Identifier: MIT
// Index type, row-major matrix/tensor aliases, and views of rank-2/3 tensors as [rows, features] matrices.
#pragma once

#include <concepts>
#include <cstdint>
#include <type_traits>

#include <Eigen/Core>
#include <unsupported/Eigen/CXX11/Tensor>

#include "detail/row_major_tensor.hpp"
#include "error.hpp"

namespace memoryformer {

using Index = Eigen::Index;

/// Every matrix of the library is row-major: a row is one token, so a token's features are contiguous.
template <std::floating_point Scalar>
using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

template <std::floating_point Scalar>
using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

/// A writable view of a row-major matrix (an owned Matrix, a Map of user memory, or a row block of either).
template <std::floating_point Scalar>
using MatrixRef = Eigen::Ref<Matrix<Scalar>>;

/// A read-only view of a row-major matrix.
template <std::floating_point Scalar>
using ConstMatrixRef = Eigen::Ref<const Matrix<Scalar>>;

template <std::floating_point Scalar>
using MatrixMap = Eigen::Map<Matrix<Scalar>>;

template <std::floating_point Scalar>
using ConstMatrixMap = Eigen::Map<const Matrix<Scalar>>;

/// Row-major Eigen tensor, e.g. Tensor<float, 3> for [batch, seq, d].
template <class Scalar, int Rank>
using Tensor = Eigen::Tensor<Scalar, Rank, Eigen::RowMajor, Index>;

template <class Scalar, int Rank>
using TensorMap = Eigen::TensorMap<Eigen::Tensor<Scalar, Rank, Eigen::RowMajor, Index>>;

/// A row-major Tensor or TensorMap of rank 2 or 3 ([N, d] or [batch, seq, d]).
template <class T>
concept RowMajorTensor = detail::is_row_major_tensor<std::remove_cvref_t<T>>::value &&
                         (std::remove_cvref_t<T>::NumDimensions == 2 || std::remove_cvref_t<T>::NumDimensions == 3);

/// Views a rank-2 or rank-3 row-major tensor as a [rows, last dim] matrix, without copying.
template <RowMajorTensor T>
auto as_matrix(T& t) {
  using Plain = std::remove_cvref_t<T>;
  using S = std::remove_const_t<typename Plain::Scalar>;
  constexpr int rank = Plain::NumDimensions;
  const Index cols = t.dimension(rank - 1);
  const Index rows = cols == 0 ? 0 : t.size() / cols;
  if constexpr (std::is_const_v<std::remove_reference_t<T>> || std::is_const_v<typename Plain::Scalar>) {
    return ConstMatrixMap<S>(t.data(), rows, cols);
  } else {
    return MatrixMap<S>(t.data(), rows, cols);
  }
}

}  // namespace memoryformer
