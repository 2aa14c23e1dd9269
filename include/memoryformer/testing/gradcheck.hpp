// SPDX-License-Identifier: MIT
// Finite-difference gradient checker (central differences in double), public so users can check their own layers.
// Coordinates where ±eps changes a bucket code are skipped: the loss is piecewise smooth, and across a bucket
// boundary the difference quotient measures the jump, not the gradient.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "../types.hpp"

namespace memoryformer {

/// Outcome of check_gradient: the mlpack-style relative error ‖g − ĝ‖ / ‖g + ĝ‖ over the checked coordinates.
struct GradCheckResult {
  double relative_error = 0.0;   ///< ‖g − ĝ‖ / ‖g + ĝ‖ (0 when both are 0)
  double max_abs_error = 0.0;    ///< max |g_i − ĝ_i|
  Index worst_index = -1;        ///< coordinate of max_abs_error
  Index checked = 0;             ///< coordinates compared
  Index skipped = 0;             ///< coordinates skipped because ±eps changed a bucket code
};

/// Options for check_gradient.
struct GradCheckOptions {
  double eps = 1e-6;          ///< central-difference step
  Index max_coordinates = 0;  ///< 0: check all; else an evenly strided subset of this many
};

/**
 * @brief Compares `analytic` with central differences of `loss` with respect to `param`.
 * @param param     the parameter (or input) buffer; perturbed in place and restored.
 * @param analytic  the gradient the layer computed, same size as param.
 * @param loss      recomputes the scalar loss (typically Σ dy ⊙ y) from the current buffers.
 * @param codes     optional: returns the bucket codes of every hashed layer as of the most recent loss() call; a
 *                  coordinate whose ±eps perturbation changes them is skipped. Pass {} for smooth functions.
 */
inline GradCheckResult check_gradient(std::span<double> param, std::span<const double> analytic,
                                      const std::function<double()>& loss,
                                      const std::function<std::vector<std::int32_t>()>& codes = {},
                                      GradCheckOptions options = {}) {
  if (param.size() != analytic.size())
    throw ShapeError("check_gradient: param has " + std::to_string(param.size()) + " values, analytic has " +
                     std::to_string(analytic.size()));
  GradCheckResult result;
  const Index n = Index(param.size());
  const Index stride = (options.max_coordinates > 0 && n > options.max_coordinates) ? n / options.max_coordinates : 1;
  std::vector<std::int32_t> base_codes;
  if (codes) {
    (void)loss();  // codes() reports the state of the latest loss() evaluation
    base_codes = codes();
  }
  double diff_sq = 0.0, sum_sq = 0.0;
  for (Index i = 0; i < n; i += stride) {
    const double saved = param[size_t(i)];
    param[size_t(i)] = saved + options.eps;
    const double plus = loss();
    const bool plus_moved = codes && codes() != base_codes;
    param[size_t(i)] = saved - options.eps;
    const double minus = loss();
    const bool minus_moved = codes && codes() != base_codes;
    param[size_t(i)] = saved;
    if (plus_moved || minus_moved) {
      ++result.skipped;
      continue;
    }
    const double numeric = (plus - minus) / (2.0 * options.eps);
    const double a = analytic[size_t(i)];
    diff_sq += (a - numeric) * (a - numeric);
    sum_sq += (a + numeric) * (a + numeric);
    if (std::abs(a - numeric) > result.max_abs_error) {
      result.max_abs_error = std::abs(a - numeric);
      result.worst_index = i;
    }
    ++result.checked;
  }
  result.relative_error = sum_sq == 0.0 ? std::sqrt(diff_sq) : std::sqrt(diff_sq) / std::sqrt(sum_sq);
  return result;
}

}  // namespace memoryformer
