// SPDX-License-Identifier: MIT
// Global gradient-norm clipping over all parameters (spec §3: gradient clip 1.0).
#pragma once

#include <cmath>
#include <concepts>
#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

#include "../detail/checks.hpp"
#include "../error.hpp"
#include "../parameter.hpp"

namespace memoryformer {

namespace detail::clip {

/// Calls f(begin, end) for every element range of p's gradient that may be non-zero: the whole gradient, or only the
/// touched rows when the view carries touched-row flags (untouched rows are zero by the ParameterView contract, so
/// skipping them changes neither the norm nor the clipped gradient).
template <class Scalar, class F>
void for_each_live_range(const ParameterView<Scalar>& p, std::string_view where, F&& f) {
  const std::size_t n = p.grad.size();
  if (p.touched_rows == nullptr || p.row_size <= 0) {
    f(std::size_t(0), n);
    return;
  }
  const std::size_t row = std::size_t(p.row_size);
  if (n % row != 0 || p.touched_rows->size() != n / row)
    throw ShapeError(std::string(where) + ": parameter '" + p.name + "' has " + std::to_string(n) +
                     " gradient values, row_size " + std::to_string(row) + " and " +
                     std::to_string(p.touched_rows->size()) + " touched-row flags");
  for (std::size_t r = 0; r < n / row; ++r)
    if ((*p.touched_rows)[r] != 0) f(r * row, (r + 1) * row);
}

}  // namespace detail::clip

/**
 * @brief The L2 norm of all gradients together, sqrt(Σ_params Σ_i g_i²), accumulated in double in a fixed order
 *        (parameters in list order, elements in memory order), so the result is deterministic.
 * @throws ShapeError if a view's touched-row flags do not match its gradient size and row_size.
 */
template <std::floating_point Scalar>
double global_grad_norm(const std::vector<ParameterView<Scalar>>& params) {
  double sum = 0.0;
  for (const auto& p : params)
    detail::clip::for_each_live_range(p, "global_grad_norm", [&](std::size_t b, std::size_t e) {
      for (std::size_t i = b; i < e; ++i) {
        const double g = double(p.grad[i]);
        sum += g * g;
      }
    });
  return std::sqrt(sum);
}

/**
 * @brief Scales all gradients by max_norm / norm when their global norm exceeds max_norm (exactly, without the
 *        1e-6 that torch.nn.utils.clip_grad_norm_ adds to the norm); otherwise leaves them unchanged.
 * @return the norm before clipping. When it is not finite (a NaN/Inf gradient) the gradients are left unchanged,
 *         so the caller can detect it and skip the step.
 * @throws ConfigError unless max_norm is finite and positive; ShapeError as global_grad_norm.
 */
template <std::floating_point Scalar>
double clip_grad_norm(const std::vector<ParameterView<Scalar>>& params, double max_norm) {
  detail::check_config(std::isfinite(max_norm) && max_norm > 0.0, "clip_grad_norm",
                       "max_norm = " + std::to_string(max_norm) + " must be positive");
  const double norm = global_grad_norm(params);
  if (!std::isfinite(norm) || norm <= max_norm) return norm;
  const double scale = max_norm / norm;
  for (const auto& p : params)
    detail::clip::for_each_live_range(p, "clip_grad_norm", [&](std::size_t b, std::size_t e) {
      for (std::size_t i = b; i < e; ++i) p.grad[i] = Scalar(double(p.grad[i]) * scale);
    });
  return norm;
}

}  // namespace memoryformer
