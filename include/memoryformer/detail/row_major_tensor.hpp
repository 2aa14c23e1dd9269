// SPDX-License-Identifier: MIT
// is_row_major_tensor: the trait behind types.hpp's RowMajorTensor concept (true for a row-major Tensor or a
// TensorMap of one, const or not).
#pragma once

#include <type_traits>

#include <unsupported/Eigen/CXX11/Tensor>

namespace memoryformer::detail {

template <class T>
struct is_row_major_tensor : std::false_type {};
template <class S, int R>
struct is_row_major_tensor<Eigen::Tensor<S, R, Eigen::RowMajor, Eigen::Index>> : std::true_type {};
template <class S, int R>
struct is_row_major_tensor<Eigen::TensorMap<Eigen::Tensor<S, R, Eigen::RowMajor, Eigen::Index>>> : std::true_type {};
template <class S, int R>
struct is_row_major_tensor<Eigen::TensorMap<Eigen::Tensor<const S, R, Eigen::RowMajor, Eigen::Index>>>
    : std::true_type {};

}  // namespace memoryformer::detail
