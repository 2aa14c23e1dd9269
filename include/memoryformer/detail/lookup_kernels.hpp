// SPDX-License-Identifier: MIT
// The table side of a Memory Layer (spec §1.5 and §1 Backward): the weighted gather-sum forward and its backward
// (scores' gradient and the scatter-add into the table gradient). Reference kernels: clear and exact; the
// hashing-independent part of the layer's cost.
#pragma once

#include <cstdint>

#include "../types.hpp"
#include "simd.hpp"

namespace memoryformer::detail {

MEMORYFORMER_SIMD_WARNINGS_BEGIN

template <class Scalar>
using RowMap = Eigen::Map<Eigen::Matrix<Scalar, 1, Eigen::Dynamic>>;
template <class Scalar>
using ConstRowMap = Eigen::Map<const Eigen::Matrix<Scalar, 1, Eigen::Dynamic>>;

/// y[n] = bias + Σ_k scores[n,k] · T[k, codes[n,k]] for n in [begin, end). Token-major: a token's output row stays
/// in L1 while its K table rows stream past it.
template <class Scalar>
void gather_sum(Scalar* y, Index y_stride, const Scalar* tables, int tau, Index width, const std::int32_t* codes,
                const Scalar* scores, Index tables_per_row, const Scalar* bias, Index begin, Index end) {
  const Index rows_per_table = Index(1) << tau;
  for (Index n = begin; n < end; ++n) {
    RowMap<Scalar> out(y + n * y_stride, width);
    if (bias != nullptr) {
      out = ConstRowMap<Scalar>(bias, width);
    } else {
      out.setZero();
    }
    const std::int32_t* c = codes + n * tables_per_row;
    const Scalar* s = scores + n * tables_per_row;
    for (Index k = 0; k < tables_per_row; ++k) {
      out.noalias() += s[k] * ConstRowMap<Scalar>(tables + (k * rows_per_table + c[k]) * width, width);
    }
  }
}

/// dscores[n,k] += ⟨dy[n], T[k, codes[n,k]]⟩ for n in [begin, end).
template <class Scalar>
void score_gradient(Scalar* dscores, Index dscores_stride, const Scalar* dy, Index dy_stride, const Scalar* tables,
                    int tau, Index width, const std::int32_t* codes, Index tables_per_row, Index begin, Index end) {
  const Index rows_per_table = Index(1) << tau;
  for (Index n = begin; n < end; ++n) {
    ConstRowMap<Scalar> g(dy + n * dy_stride, width);
    const std::int32_t* c = codes + n * tables_per_row;
    for (Index k = 0; k < tables_per_row; ++k) {
      dscores[n * dscores_stride + k] += g.dot(ConstRowMap<Scalar>(tables + (k * rows_per_table + c[k]) * width, width));
    }
  }
}

/// dT[k, codes[n,k]] += scores[n,k] · dy[n] for tables k in [k_begin, k_end) and every token n, in token order.
/// Splitting by table (not by token) lets threads write disjoint rows: no atomics, and the same sum order — hence
/// the same bits — for any thread count. touched[k·2^τ + code] is set for every row written.
template <class Scalar>
void scatter_table_gradient(Scalar* dtables, std::uint8_t* touched, const Scalar* dy, Index dy_stride, int tau,
                            Index width, const std::int32_t* codes, const Scalar* scores, Index tables_per_row,
                            Index rows, Index k_begin, Index k_end) {
  const Index rows_per_table = Index(1) << tau;
  for (Index k = k_begin; k < k_end; ++k) {
    for (Index n = 0; n < rows; ++n) {
      const Index row = k * rows_per_table + codes[n * tables_per_row + k];
      RowMap<Scalar>(dtables + row * width, width).noalias() +=
          scores[n * tables_per_row + k] * ConstRowMap<Scalar>(dy + n * dy_stride, width);
      touched[row] = 1;
    }
  }
}

MEMORYFORMER_SIMD_WARNINGS_END

}  // namespace memoryformer::detail
