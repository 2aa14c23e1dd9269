// SPDX-License-Identifier: MIT
// Plain stochastic gradient descent with optional weight decay: the simple reference optimiser for tests
// (the training recipe of design §3 uses AdamW).
#pragma once

#include <cmath>
#include <concepts>
#include <cstddef>
#include <string>
#include <utility>
#include <vector>

#include "../detail/checks.hpp"
#include "../error.hpp"
#include "../parameter.hpp"
#include "../types.hpp"

namespace memoryformer {

/// Hyper-parameters of SGD.
struct SGDOptions {
  double weight_decay = 0.0;  ///< λ ≥ 0, applied only where decays(kind) (not biases or norms)
};

/**
 * @brief θ ← θ − lr·(g + λ·θ) for every element, with λ = weight_decay if decays(kind) else 0.
 *
 * No momentum and no state; every element is updated (sparse kinds too: rows without gradient move only by weight
 * decay). Arithmetic in double. Gradients are read, never cleared.
 * @tparam Scalar float or double.
 */
template <std::floating_point Scalar>
class SGD {
 public:
  /// @throws ConfigError for a negative or non-finite weight decay; ShapeError if a parameter's value and gradient
  ///         sizes differ or disagree with its shape.
  explicit SGD(std::vector<ParameterView<Scalar>> params, SGDOptions options = {})
      : params_(std::move(params)), options_(options) {
    detail::check_config(std::isfinite(options_.weight_decay) && options_.weight_decay >= 0.0, "SGD",
                         "weight_decay = " + std::to_string(options_.weight_decay) + " must be ≥ 0");
    for (const auto& p : params_) {
      Index n = 1;
      bool ok = true;
      for (Index d : p.shape) ok = ok && d >= 0 && !__builtin_mul_overflow(n, d, &n);
      if (!ok || std::size_t(n) != p.value.size() || p.grad.size() != p.value.size())
        throw ShapeError("SGD: parameter '" + p.name + "' has " + std::to_string(p.value.size()) + " values and " +
                         std::to_string(p.grad.size()) + " gradients for shape of " +
                         (ok ? std::to_string(n) : std::string("invalid size")));
    }
  }

  /// One update with learning rate `lr`. @throws ConfigError for a negative or non-finite lr.
  void step(double lr) {
    detail::check_config(std::isfinite(lr) && lr >= 0.0, "SGD::step", "lr = " + std::to_string(lr) + " must be ≥ 0");
    for (const auto& p : params_) {
      const double lambda = decays(p.kind) ? options_.weight_decay : 0.0;
      for (std::size_t i = 0; i < p.value.size(); ++i) {
        const double th = double(p.value[i]);
        p.value[i] = Scalar(th - lr * (double(p.grad[i]) + lambda * th));
      }
      if (p.values_written != nullptr) p.values_written(p.values_owner, 0, p.value.size());
      fence_values_written();
    }
  }

  const SGDOptions& options() const { return options_; }
  const std::vector<ParameterView<Scalar>>& parameters() const { return params_; }

 private:
  std::vector<ParameterView<Scalar>> params_;
  SGDOptions options_;
};

}  // namespace memoryformer
