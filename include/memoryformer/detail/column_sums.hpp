// SPDX-License-Identifier: MIT
// Column sums of a row-major matrix (the bias gradients: dbias = Σ_n dy[n]).
#pragma once

#include <algorithm>

#include "../types.hpp"
#include "parallel.hpp"

namespace memoryformer::detail {

/// Σ_n m[n, :] as a column vector [cols]. Adds the rows' blocks of 64 columns in row order: contiguous and
/// vectorised, where Eigen's colwise().sum() walks each column of a row-major matrix with a stride.
/// Every column is one chain of additions in row order, from +0, so the bits do not depend on the thread count.
template <class Scalar>
Vector<Scalar> column_sums(ConstMatrixRef<Scalar> m) {
  Vector<Scalar> sums = Vector<Scalar>::Zero(m.cols());
  // Blocks of 64 columns (whole cache lines); a thread is worth starting from about 2^16 values per thread.
  constexpr Index block = 64, min_values_per_thread = Index(1) << 16;
  const Index blocks = (m.cols() + block - 1) / block;
  const Index min_blocks = std::max<Index>(1, min_values_per_thread / std::max<Index>(1, m.rows() * block));
  parallel_rows(blocks, min_blocks, [&](Index b0, Index b1) {
    for (Index b = b0; b < b1; ++b) {
      const Index c0 = b * block, cols = std::min(block, m.cols() - c0);
      if (cols == block) {
        // A whole block's sums in a fixed-size array, which the compiler can keep in registers across the rows; a
        // dynamic segment would be loaded, added and stored row by row.
        Eigen::Array<Scalar, 1, block> acc = Eigen::Array<Scalar, 1, block>::Zero();
        for (Index n = 0; n < m.rows(); ++n) acc += m.row(n).template segment<block>(c0).array();
        sums.template segment<block>(c0) = acc.transpose().matrix();
      } else {
        for (Index n = 0; n < m.rows(); ++n) sums.segment(c0, cols).noalias() += m.row(n).segment(c0, cols).transpose();
      }
    }
  });
  return sums;
}

}  // namespace memoryformer::detail
