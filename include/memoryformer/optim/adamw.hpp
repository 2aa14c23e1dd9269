// SPDX-License-Identifier: MIT
// AdamW with decoupled weight decay, per-kind learning-rate groups and a lazy row-sparse mode for bucket tables and
// embeddings; the optimiser of the training recipe (spec §3: β = (0.9, 0.95), eps 1e-8, weight decay 0.1).
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "../detail/checks.hpp"
#include "../error.hpp"
#include "../parameter.hpp"
#include "../types.hpp"

namespace memoryformer {

/// Learning-rate multipliers per ParameterKind ("lr groups"): a parameter's rate is lr · multiplier(kind).
struct LrMultipliers {
  double table = 1.0;
  double dense = 1.0;
  double embedding = 1.0;
  double bias = 1.0;
  double norm = 1.0;

  /// The multiplier of `kind`.
  double operator()(ParameterKind kind) const {
    switch (kind) {
      case ParameterKind::Table: return table;
      case ParameterKind::Dense: return dense;
      case ParameterKind::Embedding: return embedding;
      case ParameterKind::Bias: return bias;
      case ParameterKind::Norm: return norm;
    }
    return 1.0;
  }
};

/// How AdamW updates the sparse kinds (Table, Embedding). Other kinds are always updated densely.
enum class SparseUpdate {
  /// Every row, every step: exactly torch.optim.AdamW. Rows without gradient still move (their moments decay,
  /// their momentum keeps pushing, weight decay shrinks them).
  Dense,
  /// Only rows whose touched_rows flag is set; see AdamW for the exact rule.
  RowSparse,
};

/// Hyper-parameters of AdamW. The defaults are the paper's recipe (spec §3).
struct AdamWOptions {
  double beta1 = 0.9;           ///< first-moment decay, in [0, 1)
  double beta2 = 0.95;          ///< second-moment decay, in [0, 1)
  double eps = 1e-8;            ///< added to sqrt(v̂), > 0
  double weight_decay = 0.1;    ///< decoupled decay, applied only where decays(kind) (not biases or norms)
  LrMultipliers lr_multipliers; ///< per-kind rate multipliers, all 1 by default
  SparseUpdate sparse_update = SparseUpdate::Dense;
};

/// A named view of one buffer of optimiser state, for checkpoints. Shape is row-major.
template <std::floating_point Scalar>
struct OptimizerStateTensor {
  std::string name;
  std::vector<Index> shape;
  std::span<Scalar> values;
};

namespace detail::adamw {

inline std::size_t checked_parameter_size(std::string_view where, const std::string& name,
                                          const std::vector<Index>& shape, std::size_t value_size,
                                          std::size_t grad_size) {
  Index n = 1;
  for (Index d : shape) {
    if (d < 0 || __builtin_mul_overflow(n, d, &n)) {
      n = -1;
      break;
    }
  }
  if (n < 0 || std::size_t(n) != value_size || grad_size != value_size)
    throw ShapeError(std::string(where) + ": parameter '" + name + "' has " + std::to_string(value_size) +
                     " values and " + std::to_string(grad_size) + " gradients, its shape needs " +
                     (n < 0 ? std::string("an invalid count") : std::to_string(n)));
  return value_size;
}

inline bool is_sparse_kind(ParameterKind kind) {
  return kind == ParameterKind::Table || kind == ParameterKind::Embedding;
}

}  // namespace detail::adamw

/**
 * @brief AdamW (Loshchilov & Hutter) over a list of ParameterViews, with the paper's defaults.
 *
 * For every element θ with gradient g, at count t (see below), with η = lr · lr_multipliers(kind) and
 * λ = weight_decay if decays(kind) else 0 (biases and norms are not decayed):
 *
 *     m ← β1·m + (1 − β1)·g
 *     v ← β2·v + (1 − β2)·g²
 *     m̂ = m / (1 − β1^t),  v̂ = v / (1 − β2^t)
 *     θ ← θ − η·(λ·θ + m̂ / (sqrt(v̂) + eps))
 *
 * which is torch.optim.AdamW's update (decoupled decay η·λ·θ; the same rounding aside). Arithmetic is in double,
 * moments are stored as Scalar.
 *
 * **Counts.** A global count t, incremented by every step(), is used by every parameter except the sparse kinds
 * (Table, Embedding) under SparseUpdate::RowSparse. There, each row r has its own count t_r:
 *   - a row is *touched* in a step if `(*touched_rows)[r] != 0` (touched_rows == nullptr: every row is touched);
 *   - a touched row does t_r ← t_r + 1 and then the update above with t = t_r, on every element of the row
 *     (also elements whose gradient is 0);
 *   - an untouched row is left bit-identical: value, m, v and t_r. Its moments do not decay and no weight decay
 *     applies while it is untouched ("lazy" moments).
 * So a row evolves exactly as dense AdamW run only on the steps in which it was touched. This differs from
 * torch.optim.SparseAdam and TF's LazyAdam, which also skip untouched rows but bias-correct with the global step
 * count; with per-row counts a row's first update is a full-size Adam step however late it comes, which suits
 * bucket tables whose rows are hit rarely.
 *
 * Counts are stored as Scalar so that they export as checkpoint tensors with the moments. In float they are exact up
 * to 2^24 = 16,777,216 steps and then stop increasing, which changes nothing: for β ≤ 1 − 1e-5, β^(2^24) is below
 * double precision, so both bias corrections are exactly 1 from there on.
 *
 * The optimiser reads gradients and touched-row flags and never clears them: call step() after backward and before
 * the layers' zero_grad(), which clears both. Updates are sequential and
 * deterministic. The views must stay valid (and their sizes unchanged) for the optimiser's lifetime.
 *
 * @tparam Scalar float or double (the parameters' type).
 */
template <std::floating_point Scalar>
class AdamW {
 public:
  /**
   * @brief Allocates zero moments for `params` (the count starts at 0).
   * @throws ConfigError for β outside [0, 1), eps ≤ 0, negative weight decay or multiplier, non-finite values,
   *         duplicate parameter names, or (RowSparse) a sparse-kind parameter whose row_size does not divide its size;
   *         ShapeError when a parameter's value/grad sizes disagree with its shape.
   */
  explicit AdamW(std::vector<ParameterView<Scalar>> params, AdamWOptions options = {})
      : params_(std::move(params)), options_(options) {
    constexpr std::string_view where = "AdamW";
    auto finite_nonneg = [](double x) { return std::isfinite(x) && x >= 0.0; };
    detail::check_config(finite_nonneg(options_.beta1) && options_.beta1 < 1.0, where,
                         "beta1 = " + std::to_string(options_.beta1) + " is outside [0, 1)");
    detail::check_config(finite_nonneg(options_.beta2) && options_.beta2 < 1.0, where,
                         "beta2 = " + std::to_string(options_.beta2) + " is outside [0, 1)");
    detail::check_config(std::isfinite(options_.eps) && options_.eps > 0.0, where,
                         "eps = " + std::to_string(options_.eps) + " must be positive");
    detail::check_config(finite_nonneg(options_.weight_decay), where,
                         "weight_decay = " + std::to_string(options_.weight_decay) + " must be ≥ 0");
    for (ParameterKind k : {ParameterKind::Table, ParameterKind::Dense, ParameterKind::Embedding,
                            ParameterKind::Bias, ParameterKind::Norm})
      detail::check_config(finite_nonneg(options_.lr_multipliers(k)), where,
                           "a learning-rate multiplier is " + std::to_string(options_.lr_multipliers(k)) +
                               ", must be ≥ 0");
    state_.reserve(params_.size());
    for (std::size_t i = 0; i < params_.size(); ++i) {
      const auto& p = params_[i];
      for (std::size_t j = 0; j < i; ++j)
        detail::check_config(params_[j].name != p.name, where, "two parameters are named '" + p.name + "'");
      const std::size_t n = detail::adamw::checked_parameter_size(where, p.name, p.shape, p.value.size(), p.grad.size());
      ParamState s;
      s.m.assign(n, Scalar(0));
      s.v.assign(n, Scalar(0));
      if (row_sparse(p)) {
        detail::check_config(p.row_size > 0 && n % std::size_t(p.row_size) == 0, where,
                             "parameter '" + p.name + "' has row_size " + std::to_string(p.row_size) +
                                 ", which does not divide its " + std::to_string(n) + " values");
        s.row_steps.assign(n / std::size_t(p.row_size), Scalar(0));
      }
      state_.push_back(std::move(s));
    }
  }

  /**
   * @brief One update of every parameter from its current gradient, with base learning rate `lr`.
   * @throws ConfigError for a negative or non-finite lr; ShapeError when a touched_rows vector (RowSparse) does not
   *         have one flag per row. Both are checked before any parameter changes.
   */
  void step(double lr) {
    detail::check_config(std::isfinite(lr) && lr >= 0.0, "AdamW::step", "lr = " + std::to_string(lr) + " must be ≥ 0");
    for (const auto& p : params_) {
      if (row_sparse(p) && p.touched_rows != nullptr && p.touched_rows->size() != p.value.size() / std::size_t(p.row_size))
        throw ShapeError("AdamW::step: parameter '" + p.name + "' has " + std::to_string(p.touched_rows->size()) +
                         " touched-row flags, expected " + std::to_string(p.value.size() / std::size_t(p.row_size)) +
                         " (one per row of " + std::to_string(p.row_size) + ")");
    }
    step_[0] += Scalar(1);
    const double t = double(step_[0]);
    for (std::size_t i = 0; i < params_.size(); ++i) {
      const auto& p = params_[i];
      auto& s = state_[i];
      const double eta = lr * options_.lr_multipliers(p.kind);
      const double lambda = decays(p.kind) ? options_.weight_decay : 0.0;
      if (!row_sparse(p)) {
        update_range(p, s, 0, p.value.size(), t, eta, lambda);
        continue;
      }
      const std::size_t row = std::size_t(p.row_size);
      const std::size_t rows = s.row_steps.size();
      for (std::size_t r = 0; r < rows; ++r) {
        if (p.touched_rows != nullptr && (*p.touched_rows)[r] == 0) continue;
        s.row_steps[r] += Scalar(1);
        update_range(p, s, r * row, (r + 1) * row, double(s.row_steps[r]), eta, lambda);
      }
    }
  }

  /// Number of step() calls since construction, reset() or the loaded state (the global count t).
  std::uint64_t steps() const { return std::uint64_t(step_[0]); }

  /// Back to the freshly constructed state: zero moments and counts.
  void reset() {
    step_[0] = Scalar(0);
    for (auto& s : state_) {
      std::fill(s.m.begin(), s.m.end(), Scalar(0));
      std::fill(s.v.begin(), s.v.end(), Scalar(0));
      std::fill(s.row_steps.begin(), s.row_steps.end(), Scalar(0));
    }
  }

  const AdamWOptions& options() const { return options_; }
  const std::vector<ParameterView<Scalar>>& parameters() const { return params_; }

  /**
   * @brief Writable views of the whole state, for checkpoints, named
   *   "<prefix>step" [1]                       the global count t,
   *   "<prefix>m.<param>", "<prefix>v.<param>"  moments, with the parameter's shape,
   *   "<prefix>row_step.<param>" [rows]        per-row counts (RowSparse sparse-kind parameters only).
   * The spans stay valid for the optimiser's lifetime. To save:
   * `for (auto& s : opt.state_tensors()) ckpt.add_tensor(s.name, s.shape, s.values);`
   */
  std::vector<OptimizerStateTensor<Scalar>> state_tensors(std::string_view prefix = "adamw.") {
    const std::string pre(prefix);
    std::vector<OptimizerStateTensor<Scalar>> out;
    out.push_back({pre + "step", {1}, std::span<Scalar>(step_)});
    for (std::size_t i = 0; i < params_.size(); ++i) {
      const auto& p = params_[i];
      auto& s = state_[i];
      out.push_back({pre + "m." + p.name, p.shape, std::span<Scalar>(s.m)});
      out.push_back({pre + "v." + p.name, p.shape, std::span<Scalar>(s.v)});
      if (row_sparse(p))
        out.push_back({pre + "row_step." + p.name, {Index(s.row_steps.size())}, std::span<Scalar>(s.row_steps)});
    }
    return out;
  }

  /**
   * @brief Loads the state from `fill(const std::string& name, const std::vector<Index>& shape, std::span<Scalar> out)`,
   *        called once per tensor of state_tensors(prefix), which must fill `out` or throw. With a Checkpoint:
   *        `opt.load_state([&](const auto& name, const auto& shape, auto out) { ckpt.copy_tensor(name, shape, out); });`
   * Then checks that counts are non-negative integers with every row count ≤ the global count, and second moments
   * are not negative.
   * @throws FormatError for invalid loaded values, or whatever `fill` throws; on any exception the optimiser is
   *         reset() (a half-loaded state is never kept).
   */
  template <class Fill>
  void load_state(Fill&& fill, std::string_view prefix = "adamw.") {
    try {
      for (auto& t : state_tensors(prefix)) fill(std::as_const(t.name), std::as_const(t.shape), t.values);
      auto is_count = [](Scalar c) { return std::isfinite(c) && c >= Scalar(0) && c == std::floor(c); };
      if (!is_count(step_[0]))
        throw FormatError("AdamW::load_state: step count " + std::to_string(double(step_[0])) +
                          " is not a non-negative integer");
      for (std::size_t i = 0; i < params_.size(); ++i) {
        const auto& s = state_[i];
        for (Scalar c : s.row_steps)
          if (!is_count(c) || c > step_[0])
            throw FormatError("AdamW::load_state: parameter '" + params_[i].name + "' has a row count " +
                              std::to_string(double(c)) + ", expected an integer in [0, " +
                              std::to_string(double(step_[0])) + "]");
        for (Scalar v : s.v)
          if (v < Scalar(0))
            throw FormatError("AdamW::load_state: parameter '" + params_[i].name + "' has a negative second moment");
      }
    } catch (...) {
      reset();
      throw;
    }
  }

 private:
  struct ParamState {
    std::vector<Scalar> m;          // [size of the parameter], first moments
    std::vector<Scalar> v;          // [size of the parameter], second moments
    std::vector<Scalar> row_steps;  // [rows], RowSparse sparse kinds only
  };

  bool row_sparse(const ParameterView<Scalar>& p) const {
    return options_.sparse_update == SparseUpdate::RowSparse && detail::adamw::is_sparse_kind(p.kind);
  }

  void update_range(const ParameterView<Scalar>& p, ParamState& s, std::size_t begin, std::size_t end, double t,
                    double eta, double lambda) const {
    const double b1 = options_.beta1, b2 = options_.beta2, eps = options_.eps;
    // Bias corrections once per range: per parameter, or per row in RowSparse mode.
    const double bc1 = 1.0 - std::pow(b1, t);
    const double bc2 = 1.0 - std::pow(b2, t);
    Scalar* theta = p.value.data();
    const Scalar* grad = p.grad.data();
    for (std::size_t i = begin; i < end; ++i) {
      const double g = double(grad[i]);
      const double m = b1 * double(s.m[i]) + (1.0 - b1) * g;
      const double v = b2 * double(s.v[i]) + (1.0 - b2) * g * g;
      s.m[i] = Scalar(m);
      s.v[i] = Scalar(v);
      const double th = double(theta[i]);
      theta[i] = Scalar(th - eta * (lambda * th + (m / bc1) / (std::sqrt(v / bc2) + eps)));
    }
  }

  std::vector<ParameterView<Scalar>> params_;
  AdamWOptions options_;
  std::vector<Scalar> step_ = std::vector<Scalar>(1, Scalar(0));  // [1], the global count t
  std::vector<ParamState> state_;                                // one per parameter
};

}  // namespace memoryformer
