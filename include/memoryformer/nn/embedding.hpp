// SPDX-License-Identifier: MIT
// Token embedding table [vocab, d]: row lookup forward, deterministic scatter-add backward with touched-row flags
// (design §3, "token embedding" of the whole model).
#pragma once

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "../detail/checked_size.hpp"
#include "../detail/checks.hpp"
#include "../detail/row_parallel.hpp"
#include "../error.hpp"
#include "../parameter.hpp"
#include "../random.hpp"
#include "../types.hpp"

namespace memoryformer {

/**
 * @brief Embedding table: y[n] = W[tokens[n]].
 *
 * The gradient is sparse: backward adds dy rows into the rows of dW that were looked up, in token order (so the
 * result does not depend on anything but the inputs), and flags those rows in touched_rows(). Rows not flagged
 * are zero in dW. Initialisation: W ~ N(0, init_std²).
 * @tparam Scalar float or double.
 */
template <std::floating_point Scalar>
class Embedding {
 public:
  /**
   * @param vocab     number of rows (token ids 0 … vocab−1), > 0
   * @param d         embedding width, > 0
   * @param rng       generator consumed for W (vocab·d normals, row-major order)
   * @param init_std  standard deviation of W, ≥ 0
   * @throws ConfigError for non-positive sizes or a negative init_std.
   */
  Embedding(Index vocab, Index d, Rng& rng, double init_std = 0.02) { init(vocab, d, rng, init_std); }

  /// @brief As above, with a fresh Rng(seed).
  Embedding(Index vocab, Index d, std::uint64_t seed, double init_std = 0.02) {
    Rng rng(seed);
    init(vocab, d, rng, init_std);
  }

  Index vocab() const { return weight_.rows(); }
  Index d() const { return weight_.cols(); }
  /// W [vocab, d].
  Matrix<Scalar>& weight() { return weight_; }
  const Matrix<Scalar>& weight() const { return weight_; }
  /// dL/dW [vocab, d], accumulated by backward.
  const Matrix<Scalar>& dweight() const { return dweight_; }
  /// One flag per row of W: 1 when the row received gradient since the last zero_grad().
  const std::vector<std::uint8_t>& touched_rows() const { return touched_; }
  /// The flagged rows' ids, each once, in the order backward first flagged them.
  const std::vector<Index>& touched_list() const { return touched_list_; }

  /**
   * @brief y[n] = W[tokens[n]].
   * @param y       [tokens.size(), d] output
   * @param tokens  token ids in [0, vocab)
   * @throws ShapeError when y's shape is wrong; ValueError naming the position and value of a bad id.
   */
  void forward(MatrixRef<Scalar> y, std::span<const std::int32_t> tokens) const {
    constexpr const char* where = "Embedding::forward";
    const Index n = Index(tokens.size());
    detail::check_shape(where, "y", y.rows(), y.cols(), n, d(),
                        "(tokens.size(), d) = (" + std::to_string(n) + ", " + std::to_string(d()) + ")");
    check_tokens(where, tokens);
    detail::parallel_rows(n, detail::min_rows_per_thread(d()), [&](Index i0, Index i1) {
      for (Index i = i0; i < i1; ++i) y.row(i) = weight_.row(tokens[size_t(i)]);
    });
  }

  /**
   * @brief dW[tokens[n]] += dy[n] for n in order, and flags those rows as touched.
   * @param tokens  the ids given to forward
   * @param dy      [tokens.size(), d] gradient of the output
   * @throws ShapeError when dy's shape is wrong; ValueError for a bad id; ConfigError when the list of touched rows
   *         cannot be allocated (nothing is accumulated then).
   */
  void backward(std::span<const std::int32_t> tokens, ConstMatrixRef<Scalar> dy) {
    constexpr const char* where = "Embedding::backward";
    const Index n = Index(tokens.size());
    detail::check_shape(where, "dy", dy.rows(), dy.cols(), n, d(),
                        "(tokens.size(), d) = (" + std::to_string(n) + ", " + std::to_string(d()) + ")");
    check_tokens(where, tokens);
    // Room for every id in the list first, so that the appends below cannot throw after dW has changed.
    detail::allocating(where, "the list of touched rows", vocab() * Index(sizeof(Index)),
                       [&] { touched_list_.reserve(size_t(vocab())); });
    // Each thread owns a range of ids and adds their rows of dy in token order: every row of dW gets the same sum,
    // in the same order, for any thread count. Splitting by id costs each thread one scan of the ids.
    const Index ids_per_thread = std::max<Index>(1, vocab() * detail::min_rows_per_thread(d()) / std::max<Index>(n, 1));
    detail::parallel_rows(vocab(), ids_per_thread, [&](Index id0, Index id1) {
      for (Index i = 0; i < n; ++i) {
        const Index t = tokens[size_t(i)];
        if (t >= id0 && t < id1) dweight_.row(t) += dy.row(i);
      }
    });
    for (Index i = 0; i < n; ++i) {
      const auto t = tokens[size_t(i)];
      if (touched_[size_t(t)] == 0) {
        touched_[size_t(t)] = 1;
        touched_list_.push_back(Index(t));
      }
    }
  }

  /// Zeroes dW (only the listed rows: the others are zero already) and clears the touched flags and list.
  void zero_grad() {
    for (Index r : touched_list_) {
      dweight_.row(r).setZero();
      touched_[size_t(r)] = 0;
    }
    touched_list_.clear();
  }

  /**
   * @brief View of W as "<prefix>.weight", kind Embedding, row_size d, with the touched-row flags.
   * @param prefix dotted path of this layer without a trailing dot; empty gives "weight".
   */
  std::vector<ParameterView<Scalar>> parameters(const std::string& prefix = {}) {
    const std::string dot = prefix.empty() ? std::string() : prefix + ".";
    return {{dot + "weight", {vocab(), d()}, std::span<Scalar>(weight_.data(), size_t(weight_.size())),
             std::span<Scalar>(dweight_.data(), size_t(dweight_.size())), ParameterKind::Embedding, d(), &touched_,
             &touched_list_}};
  }

 private:
  void init(Index vocab, Index d, Rng& rng, double init_std) {
    detail::check_config(vocab > 0, "Embedding", "vocab = " + std::to_string(vocab) + " must be positive");
    detail::check_config(d > 0, "Embedding", "d = " + std::to_string(d) + " must be positive");
    detail::check_config(std::isfinite(init_std) && init_std >= 0.0, "Embedding",
                         "init_std = " + std::to_string(init_std) + " must be finite and ≥ 0");
    weight_.resize(vocab, d);
    rng.fill_normal(std::span<Scalar>(weight_.data(), size_t(weight_.size())), 0.0, init_std);
    dweight_ = Matrix<Scalar>::Zero(vocab, d);
    touched_.assign(size_t(vocab), 0);
    touched_list_.clear();
  }

  void check_tokens(const char* where, std::span<const std::int32_t> tokens) const {
    for (size_t i = 0; i < tokens.size(); ++i)
      if (tokens[i] < 0 || Index(tokens[i]) >= vocab())
        throw ValueError(std::string(where) + ": tokens[" + std::to_string(i) + "] = " +
                         std::to_string(tokens[i]) + " is outside [0, vocab = " + std::to_string(vocab()) +
                         ")");
  }

  Matrix<Scalar> weight_;              // [vocab, d]
  Matrix<Scalar> dweight_;             // [vocab, d]
  std::vector<std::uint8_t> touched_;  // [vocab]
  std::vector<Index> touched_list_;    // [rows flagged in touched_], first-flagged order
};

}  // namespace memoryformer
