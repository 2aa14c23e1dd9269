// SPDX-License-Identifier: MIT
// Mean softmax cross-entropy of logits [rows, V] against integer targets, forward and backward (design §8, the
// LM head's loss).
#pragma once

#include <cmath>
#include <concepts>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "../detail/checked_size.hpp"
#include "../detail/checks.hpp"
#include "../detail/fast_exp.hpp"
#include "../detail/row_parallel.hpp"
#include "../detail/simd.hpp"
#include "../error.hpp"
#include "../types.hpp"

namespace memoryformer {

/// What cross_entropy_forward keeps for cross_entropy_backward: one log-sum-exp per row.
template <std::floating_point Scalar>
struct CrossEntropyCache {
  Vector<Scalar> logsumexp;  // [rows] log Σ_v exp(logits(n, v))
};

namespace detail {

/// Throws ShapeError unless there is one target per row, ValueError naming the first bad (row, value).
inline void check_targets(const char* where, Index rows, Index vocab, std::span<const std::int32_t> targets) {
  if (Index(targets.size()) != rows)
    throw ShapeError(std::string(where) + ": targets has " + std::to_string(targets.size()) +
                     " entries, expected one per row of logits = " + std::to_string(rows));
  for (Index n = 0; n < rows; ++n) {
    const std::int32_t t = targets[size_t(n)];
    if (t < 0 || Index(t) >= vocab)
      throw ValueError(std::string(where) + ": target of row " + std::to_string(n) + " is " +
                       std::to_string(t) + ", outside [0, V = " + std::to_string(vocab) + ")");
  }
}

}  // namespace detail

/**
 * @brief Mean over rows of −log softmax(logits_n)[targets[n]] = mean(logsumexp(logits_n) − logits_n[targets[n]]).
 *
 * The log-sum-exp subtracts the row maximum, so large logits do not overflow; the mean is accumulated in double.
 * @param logits   [rows ≥ 1, V ≥ 1] unnormalised scores
 * @param targets  one class id in [0, V) per row
 * @param cache    receives the per-row log-sum-exp for the backward pass
 * @return the mean loss
 * @throws ShapeError for an empty logits matrix or a targets count ≠ rows; ValueError for a target
 *         outside [0, V) (the message names the row and the value); ConfigError when memory cannot hold the
 *         buffers of its rows.
 */
template <std::floating_point Scalar>
Scalar cross_entropy_forward(std::type_identity_t<ConstMatrixRef<Scalar>> logits, std::span<const std::int32_t> targets,
                             CrossEntropyCache<Scalar>& cache) {
  constexpr const char* where = "cross_entropy_forward";
  if (logits.rows() < 1 || logits.cols() < 1)
    throw ShapeError(std::string(where) + ": logits is " + detail::shape_string({logits.rows(), logits.cols()}) +
                     ", expected (rows ≥ 1, V ≥ 1)");
  detail::check_targets(where, logits.rows(), logits.cols(), targets);
  // Rows on the threads; their losses are summed afterwards in row order, so the mean has the same bits for any
  // thread count.
  std::vector<double> row_loss;
  // The cache last: when it cannot be allocated it is left empty, which backward refuses.
  detail::allocating_activations(where, logits.rows(), 1, 1, sizeof(double), [&] {
    row_loss.resize(size_t(logits.rows()));
    detail::resize_buffer(cache.logsumexp, logits.rows());
  });
  const Index vocab = logits.cols();
  detail::parallel_rows(logits.rows(), detail::min_rows_per_thread(vocab), [&](Index r0, Index r1) {
    std::vector<Scalar> p(static_cast<size_t>(vocab));  // [V] exp(logits_n − m)
    for (Index n = r0; n < r1; ++n) {
      // The library's exponential (vectorised for float, std::exp for double; design §8), summed in column order.
      const Scalar m = logits.row(n).maxCoeff();
      const Scalar* row = logits.data() + n * logits.outerStride();
      detail::exp_shifted_row<best_isa(), Scalar>(p.data(), row, vocab, Scalar(1), m);
      Scalar sum = 0;
      for (Index v = 0; v < vocab; ++v) sum += p[size_t(v)];
      const Scalar lse = m + std::log(sum);
      cache.logsumexp(n) = lse;
      row_loss[size_t(n)] = double(lse) - double(logits(n, targets[size_t(n)]));
    }
  });
  double total = 0.0;
  for (const double l : row_loss) total += l;
  return Scalar(total / double(logits.rows()));
}

/**
 * @brief dlogits = dloss / rows · (softmax(logits) − onehot(targets)), overwritten.
 * @param dlogits  [rows, V] gradient of the logits; may be logits itself
 * @param logits   the logits given to cross_entropy_forward
 * @param targets  the targets given to cross_entropy_forward
 * @param cache    filled by cross_entropy_forward on these logits
 * @param dloss    gradient of the final objective with respect to the mean loss (1 when the loss is the objective)
 * @throws ShapeError / ValueError as forward; StateError when the cache does not match.
 */
template <std::floating_point Scalar>
void cross_entropy_backward(std::type_identity_t<MatrixRef<Scalar>> dlogits,
                            std::type_identity_t<ConstMatrixRef<Scalar>> logits, std::span<const std::int32_t> targets,
                            const CrossEntropyCache<Scalar>& cache, std::type_identity_t<Scalar> dloss = Scalar(1)) {
  constexpr const char* where = "cross_entropy_backward";
  detail::check_targets(where, logits.rows(), logits.cols(), targets);
  detail::check_shape(where, "dlogits", dlogits.rows(), dlogits.cols(), logits.rows(), logits.cols());
  if (cache.logsumexp.size() != logits.rows())
    throw StateError(std::string(where) + ": cache holds " + std::to_string(cache.logsumexp.size()) +
                     " rows, logits has " + std::to_string(logits.rows()) + "; call cross_entropy_forward first");
  const Scalar scale = dloss / Scalar(logits.rows());
  detail::parallel_rows(logits.rows(), detail::min_rows_per_thread(logits.cols()), [&](Index r0, Index r1) {
    for (Index n = r0; n < r1; ++n) {
      const Scalar lse = cache.logsumexp(n);
      // In place when dlogits is logits: each element is read before it is written.
      Scalar* row = dlogits.data() + n * dlogits.outerStride();
      detail::exp_shifted_row<best_isa(), Scalar>(row, logits.data() + n * logits.outerStride(), logits.cols(),
                                                  Scalar(1), lse);
      for (Index v = 0; v < logits.cols(); ++v) row[v] *= scale;
      dlogits(n, targets[size_t(n)]) -= scale;
    }
  });
}

}  // namespace memoryformer
