// SPDX-License-Identifier: MIT
// Column sums of a row-major matrix (the bias gradients: dbias = Σ_n dy[n]).
#pragma once

#include "../types.hpp"

namespace memoryformer::detail {

/// Σ_n m[n, :] as a column vector [cols]. Adds whole rows in order: contiguous and vectorised, where Eigen's
/// colwise().sum() walks each column of a row-major matrix with a stride.
template <class Scalar>
Vector<Scalar> column_sums(ConstMatrixRef<Scalar> m) {
  Vector<Scalar> sums = Vector<Scalar>::Zero(m.cols());
  for (Index n = 0; n < m.rows(); ++n) sums.noalias() += m.row(n).transpose();
  return sums;
}

}  // namespace memoryformer::detail
