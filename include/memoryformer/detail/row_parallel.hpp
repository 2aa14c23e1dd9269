// SPDX-License-Identifier: MIT
// Row-parallel building blocks of the dense layers (norms, cross-entropy, Linear, residual adds): element-wise work
// split into contiguous row ranges, matrix products and reductions over FIXED row or column chunks, so that each
// value is computed by one thread in an order that does not depend on the thread count.
#pragma once

#include <algorithm>
#include <string_view>

#include "../types.hpp"
#include "checked_size.hpp"
#include "parallel.hpp"
#include "serial_eigen.hpp"

namespace memoryformer::detail {

/// Rows of a chunk whose partial sums a reduction combines in chunk order (a constant: the summation order of a
/// reduction over rows must not depend on the thread count).
inline constexpr Index reduction_chunk_rows = 32;

/// Rows of one block of a row-chunked product of `rows` rows (each block is one Eigen product computed by one
/// thread): at least 64 (each block repacks the weight) and at most 16 blocks. A function of the shape only.
inline Index product_chunk_rows(Index rows) { return std::max<Index>(64, (rows + 15) / 16); }

/// Columns of one block of a column-chunked product (weight gradients Xᵀ·dY; each block repacks X): at least 64 and
/// at most 8 blocks. A function of the shape only.
inline Index product_chunk_cols(Index cols) { return std::max<Index>(64, (cols + 7) / 8); }

/// Rows per thread below which element-wise row work stays on one thread (an OpenMP region costs microseconds).
inline Index min_rows_per_thread(Index cols) { return std::max<Index>(1, Index(16384) / std::max<Index>(1, cols)); }

/// Number of chunks of `size` items cut into pieces of `chunk` (the last one shorter).
inline Index chunk_count(Index size, Index chunk) { return (size + chunk - 1) / chunk; }

/**
 * Runs f(chunk, begin, end) for every fixed chunk [c·chunk, min((c+1)·chunk, size)) of [0, size), each chunk on one
 * thread. The chunks do not depend on the thread count, only which thread runs them does.
 */
template <class F>
void parallel_chunks(Index size, Index chunk, F&& f) {
  const Index chunks = chunk_count(size, chunk);
  parallel_rows(chunks, 1, [&](Index cb, Index ce) {
    for (Index c = cb; c < ce; ++c) f(c, c * chunk, std::min(size, (c + 1) * chunk));
  });
}

/// out = a + b, row ranges in parallel; out may be a or b (element-wise).
template <class Scalar>
void parallel_sum(MatrixRef<Scalar> out, ConstMatrixRef<Scalar> a, ConstMatrixRef<Scalar> b) {
  parallel_rows(out.rows(), min_rows_per_thread(out.cols()), [&](Index r0, Index r1) {
    out.middleRows(r0, r1 - r0) = a.middleRows(r0, r1 - r0) + b.middleRows(r0, r1 - r0);
  });
}

/// out = a, row ranges in parallel.
template <class Scalar>
void parallel_copy(MatrixRef<Scalar> out, ConstMatrixRef<Scalar> a) {
  parallel_rows(out.rows(), min_rows_per_thread(out.cols()),
                [&](Index r0, Index r1) { out.middleRows(r0, r1 - r0) = a.middleRows(r0, r1 - r0); });
}

/// out += a, row ranges in parallel.
template <class Scalar>
void parallel_add(MatrixRef<Scalar> out, ConstMatrixRef<Scalar> a) {
  parallel_rows(out.rows(), min_rows_per_thread(out.cols()),
                [&](Index r0, Index r1) { out.middleRows(r0, r1 - r0) += a.middleRows(r0, r1 - r0); });
}

/// out = a + b + c, row ranges in parallel.
template <class Scalar>
void parallel_sum(MatrixRef<Scalar> out, ConstMatrixRef<Scalar> a, ConstMatrixRef<Scalar> b,
                  ConstMatrixRef<Scalar> c) {
  parallel_rows(out.rows(), min_rows_per_thread(out.cols()), [&](Index r0, Index r1) {
    const Index n = r1 - r0;
    out.middleRows(r0, n) = a.middleRows(r0, n) + b.middleRows(r0, n) + c.middleRows(r0, n);
  });
}

/// y = x·W (+ b): one Eigen product per fixed block of product_chunk_rows(N) rows, blocks on the threads.
template <class Scalar>
void chunked_product(MatrixRef<Scalar> y, ConstMatrixRef<Scalar> x, ConstMatrixRef<Scalar> w, const Vector<Scalar>* bias) {
  SerialEigenScope serial;
  parallel_chunks(x.rows(), product_chunk_rows(x.rows()), [&](Index, Index r0, Index r1) {
    auto yb = y.middleRows(r0, r1 - r0);
    yb.noalias() = x.middleRows(r0, r1 - r0) * w;
    if (bias != nullptr) yb.rowwise() += bias->transpose();
  });
}

/// y = x·Wᵀ for W stored [cols(y), cols(x)]: one product per fixed block of rows.
template <class Scalar>
void chunked_product_transposed(MatrixRef<Scalar> y, ConstMatrixRef<Scalar> x, ConstMatrixRef<Scalar> w) {
  SerialEigenScope serial;
  parallel_chunks(x.rows(), product_chunk_rows(x.rows()), [&](Index, Index r0, Index r1) {
    y.middleRows(r0, r1 - r0).noalias() = x.middleRows(r0, r1 - r0) * w.transpose();
  });
}

/// dW += Xᵀ·dY: one product per fixed block of product_chunk_cols(cols) columns of dW (each sums over all rows
/// itself, so no partial results are combined across threads).
template <class Scalar>
void chunked_weight_gradient(MatrixRef<Scalar> dw, ConstMatrixRef<Scalar> x, ConstMatrixRef<Scalar> dy) {
  SerialEigenScope serial;
  parallel_chunks(dy.cols(), product_chunk_cols(dy.cols()), [&](Index, Index c0, Index c1) {
    dw.middleCols(c0, c1 - c0).noalias() += x.transpose() * dy.middleCols(c0, c1 - c0);
  });
}

/**
 * Σ over rows of per-row terms, summed in a fixed order: add_row(r, acc) adds row r's term into acc (a [cols]
 * Eigen::Map<Vector>); rows are summed in order within chunks of reduction_chunk_rows, the chunk sums are then
 * added into `total` in chunk order. `partials` is scratch [chunks, cols] reused across calls; when it cannot be
 * allocated, a ConfigError names `where` and its bytes (nothing is added then).
 */
template <class Scalar, class AddRow>
void chunked_row_sum(std::string_view where, Vector<Scalar>& total, Matrix<Scalar>& partials, Index rows,
                     AddRow&& add_row) {
  const Index cols = total.size(), chunks = chunk_count(rows, reduction_chunk_rows);
  if (chunks == 0) return;
  allocating(where, "the partial sums of its rows", chunks * cols * Index(sizeof(Scalar)),
             [&] { resize_buffer(partials, chunks, cols); });
  const Index min_chunks = std::max<Index>(1, min_rows_per_thread(cols) / reduction_chunk_rows);
  parallel_rows(chunks, min_chunks, [&](Index cb, Index ce) {
    for (Index c = cb; c < ce; ++c) {
      Eigen::Map<Vector<Scalar>> acc(partials.row(c).data(), cols);
      acc.setZero();
      const Index r1 = std::min(rows, (c + 1) * reduction_chunk_rows);
      for (Index r = c * reduction_chunk_rows; r < r1; ++r) add_row(r, acc);
    }
  });
  for (Index c = 0; c < chunks; ++c) total += partials.row(c).transpose();
}

}  // namespace memoryformer::detail
