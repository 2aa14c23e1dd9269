// SPDX-License-Identifier: MIT
// MemoryLayer: the hashed replacement of y = xW + b (spec §1; paper Eq. 4–12): y = Σ_k s_k · T_k[code_k] + b,
// with the hand-written backward of spec §1 "Backward".
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "bucket_table.hpp"
#include "detail/checked_size.hpp"
#include "detail/column_sums.hpp"
#include "detail/lookup_kernels.hpp"
#include "detail/scratch.hpp"
#include "error.hpp"
#include "hash.hpp"
#include "parameter.hpp"
#include "random.hpp"
#include "score.hpp"
#include "types.hpp"

namespace memoryformer {

/// Shape and settings of a Memory Layer. d_in = K·τ; K tables of 2^τ rows × d_out.
struct MemoryLayerConfig {
  Index d_in = 0;                   ///< input features, a multiple of τ
  Index d_out = 0;                  ///< output features
  int tau = 8;                      ///< code length (bits per chunk), 1..16
  ScoreKind score = ScoreKind::L1;  ///< row weight formula (l1: authors' code, default)
  double temperature = 1.0;         ///< t of the paper score, > 0
  bool bias = true;                 ///< add a bias (authors' code: yes; paper: no)
  double table_init_std = 0.02;     ///< tables ~ N(0, std²) (authors: 0.02; Q/K/V: sqrt(2/(5d)))
  double bias_init_std = 0.001;     ///< bias ~ N(0, std²)

  Index num_tables() const { return tau > 0 ? d_in / tau : 0; }  ///< K
  Index rows_per_table() const { return Index(1) << tau; }        ///< 2^τ
  HashConfig hash_config() const { return {tau, score, temperature}; }

  /// @throws ConfigError naming the offending value.
  void validate(std::string_view where = "MemoryLayerConfig") const {
    hash_config().validate(where);
    detail::check_config(d_in > 0, where, "d_in = " + std::to_string(d_in) + " must be > 0");
    detail::check_config(d_out > 0, where, "d_out = " + std::to_string(d_out) + " must be > 0");
    detail::check_config(d_in % tau == 0, where,
                         "d_in = " + std::to_string(d_in) + " is not a multiple of tau = " + std::to_string(tau));
    detail::check_config(std::isfinite(table_init_std) && std::isfinite(bias_init_std) && table_init_std >= 0 &&
                             bias_init_std >= 0,
                         where,
                         "init standard deviations (table " + std::to_string(table_init_std) + ", bias " +
                             std::to_string(bias_init_std) + ") must be finite and >= 0");
    detail::checked_product(where, "tables × 2^tau × d_out", {num_tables(), rows_per_table(), d_out});
  }
};

/**
 * @brief A Memory Layer: hashed lookup tables in place of a fully-connected layer.
 *
 * forward is const and writes the hash (codes, scores) into a caller-owned HashResult, so several threads may run
 * forward on one layer at once. backward overwrites dx and accumulates dtables/dbias until zero_grad().
 * @tparam Scalar float or double.
 */
namespace detail {

/// The input shape a layer with `config` expects, for error messages.
inline std::string expected_layer_input(const MemoryLayerConfig& config) {
  std::ostringstream os;
  os << "(N, " << config.d_in << ") = (N, K·τ) with K = " << config.num_tables() << ", τ = " << config.tau;
  return os.str();
}

/// @throws ShapeError naming `where` if x does not have d_in columns.
template <class Scalar>
void check_layer_input(const char* where, const MemoryLayerConfig& config, ConstMatrixRef<Scalar> x) {
  if (x.cols() != config.d_in) throw_shape(where, "x", x.rows(), x.cols(), expected_layer_input(config));
}

/// @throws StateError for an empty hash, ShapeError for one that does not fit a layer with `config`.
template <class Scalar>
void check_layer_hash(const char* where, const MemoryLayerConfig& config, const HashResult<Scalar>& h) {
  if (h.empty()) throw StateError(std::string(where) + ": the hash cache is empty; call forward (or hash) first");
  if (h.tau != config.tau || h.tables != config.num_tables() || Index(h.codes.size()) != h.rows * h.tables ||
      h.scores.rows() != h.rows || h.scores.cols() != h.tables) {
    std::ostringstream os;
    os << where << ": the hash has K = " << h.tables << ", τ = " << h.tau << "; this layer needs K = "
       << config.num_tables() << ", τ = " << config.tau;
    throw ShapeError(os.str());
  }
  // Codes index table rows directly: one outside [0, 2^τ) would read or write another table's rows or past the end.
  // The unsigned maximum catches negative codes too, in one pass the compiler vectorises.
  std::uint32_t max_code = 0;
  for (std::int32_t c : h.codes) max_code = std::max(max_code, std::uint32_t(c));
  if (max_code >= (std::uint32_t(1) << config.tau)) {
    for (std::size_t i = 0; i < h.codes.size(); ++i) {
      const std::int32_t c = h.codes[i];
      if (c < 0 || c >= (std::int32_t(1) << config.tau)) {
        std::ostringstream os;
        os << where << ": the hash has code " << c << " at (row " << Index(i) / h.tables << ", table "
           << Index(i) % h.tables << "), outside [0, 2^" << config.tau << ")";
        throw ShapeError(os.str());
      }
    }
  }
}

}  // namespace detail

template <std::floating_point Scalar>
class MemoryLayer {
 public:
  /// Builds the layer with the authors' initialisation drawn from `seed`. @throws ConfigError
  MemoryLayer(const MemoryLayerConfig& config, std::uint64_t seed)
      : config_((config.validate("MemoryLayer"), config)),
        hasher_(config.hash_config()),
        tables_(config.num_tables(), config.tau, config.d_out),
        dtables_(config.num_tables(), config.tau, config.d_out),
        touched_(size_t(config.num_tables() * config.rows_per_table()), 0) {
    // Rows are read at random: huge pages keep the TLB out of the way (see detail::advise_huge_pages).
    detail::advise_huge_pages(tables_.data(), size_t(tables_.size()) * sizeof(Scalar));
    detail::advise_huge_pages(dtables_.data(), size_t(dtables_.size()) * sizeof(Scalar));
    Rng table_rng = Rng::stream(seed, 0);
    table_rng.fill_normal(tables_.values(), 0.0, config_.table_init_std);
    if (config_.bias) {
      bias_ = Vector<Scalar>::Zero(config_.d_out);
      dbias_ = Vector<Scalar>::Zero(config_.d_out);
      Rng bias_rng = Rng::stream(seed, 1);
      bias_rng.fill_normal(std::span<Scalar>(bias_.data(), size_t(bias_.size())), 0.0, config_.bias_init_std);
    }
  }

  const MemoryLayerConfig& config() const { return config_; }
  const SignHasher<Scalar>& hasher() const { return hasher_; }
  Index d_in() const { return config_.d_in; }
  Index d_out() const { return config_.d_out; }
  Index num_tables() const { return config_.num_tables(); }

  BucketTable<Scalar>& tables() { return tables_; }              // [K, 2^τ, d_out]
  const BucketTable<Scalar>& tables() const { return tables_; }
  const BucketTable<Scalar>& dtables() const { return dtables_; }  // [K, 2^τ, d_out]
  Vector<Scalar>& bias() { return bias_; }                        // [d_out], empty without bias
  const Vector<Scalar>& bias() const { return bias_; }
  const Vector<Scalar>& dbias() const { return dbias_; }          // [d_out]
  /// One flag per table row (K·2^τ): set when backward wrote the row's gradient since zero_grad().
  const std::vector<std::uint8_t>& touched_rows() const { return touched_; }

  /**
   * @brief y = Σ_k s_k · T_k[code_k] + b, hashing x first.
   * @param y     [N, d_out] output (must already have that shape)
   * @param x     [N, d_in] input
   * @param cache receives the codes and scores of x, for backward (and for other layers sharing this hash)
   * @throws ShapeError, NonFiniteError
   */
  void forward(MatrixRef<Scalar> y, ConstMatrixRef<Scalar> x, HashResult<Scalar>& cache, Isa isa = best_isa()) const {
    check_input("MemoryLayer::forward", x);
    check_output("MemoryLayer::forward", y, x.rows());
    hasher_.hash(cache, x, isa);
    forward_hashed(y, cache, isa);
  }

  /// Allocating convenience form of forward.
  Matrix<Scalar> forward(ConstMatrixRef<Scalar> x, HashResult<Scalar>& cache, Isa isa = best_isa()) const {
    check_input("MemoryLayer::forward", x);
    Matrix<Scalar> y(x.rows(), config_.d_out);
    forward(y, x, cache, isa);
    return y;
  }

  /// Rank-2 or rank-3 row-major tensors ([N, d_in] or [batch, seq, d_in]) in, the same rank out.
  template <int Rank>
  Tensor<Scalar, Rank> forward(const Tensor<Scalar, Rank>& x, HashResult<Scalar>& cache) const {
    static_assert(Rank == 2 || Rank == 3, "MemoryLayer::forward takes [N, d] or [batch, seq, d] tensors");
    auto dims = x.dimensions();
    dims[Rank - 1] = config_.d_out;
    Tensor<Scalar, Rank> y(dims);
    forward(as_matrix(y), as_matrix(x), cache);
    return y;
  }

  /**
   * @brief The lookup half of forward, from a hash computed elsewhere (Q, K and V share one hash, spec §3).
   * @param y [N, d_out] output
   * @param h the hash of the input: N rows of K codes with this layer's τ
   */
  void forward_hashed(MatrixRef<Scalar> y, const HashResult<Scalar>& h) const { forward_hashed(y, h, best_isa()); }

  /**
   * @brief forward_hashed on a chosen kernel path: Isa::Scalar runs the reference kernel; a SIMD path (float only)
   * runs the fast kernels — token-major for few tokens, column-blocked with per-thread packed panels for many.
   * Every fast path computes each output as the same fused multiply-add chain bias + s_0·T_0 + … + s_{K−1}·T_{K−1},
   * so results are bitwise identical across SIMD paths, token counts and thread counts, and differ from the
   * reference only by FMA rounding (≤ 2(K+1)·2^-24·(|b| + Σ|s_k·T_k|) per element).
   * @throws ConfigError if `isa` is not compiled in; ShapeError, StateError as forward_hashed
   */
  void forward_hashed(MatrixRef<Scalar> y, const HashResult<Scalar>& h, Isa isa) const {
    check_hash("MemoryLayer::forward_hashed", h);
    check_output("MemoryLayer::forward_hashed", y, h.rows);
    check_isa("MemoryLayer::forward_hashed", isa);
    const Scalar* bias = config_.bias ? bias_.data() : nullptr;
    detail::lookup_forward(isa, y.data(), y.outerStride(), tables_.data(), config_.tau, config_.d_out, h.tables,
                           h.codes.data(), h.scores.data(), bias, h.rows);
  }

  /**
   * @brief Backward through the whole layer: dx overwritten, dtables and dbias accumulated.
   * @param dx    [N, d_in] output
   * @param x     [N, d_in] the input given to forward
   * @param dy    [N, d_out] gradient of the loss with respect to y
   * @param cache the HashResult forward filled
   * @throws StateError if cache is empty (backward before forward); ShapeError; NonFiniteError for NaN/Inf in dy
   */
  void backward(MatrixRef<Scalar> dx, ConstMatrixRef<Scalar> x, ConstMatrixRef<Scalar> dy,
                const HashResult<Scalar>& cache, Isa isa = best_isa()) {
    hasher_.check_hash_matches("MemoryLayer::backward", x, cache);
    dscores_.setZero(cache.rows, cache.tables);
    backward_hashed(dscores_, dy, cache, isa);
    hasher_.backward(dx, x, cache, dscores_, isa);
  }

  /**
   * @brief Backward of the lookup half: accumulates dtables/dbias and ADDS ⟨dy, T_k[code_k]⟩ into dscores, so several
   * layers sharing one hash can sum their score gradients before one SignHasher::backward.
   * @param dscores [N, K] accumulated into
   * @param dy      [N, d_out]
   */
  void backward_hashed(MatrixRef<Scalar> dscores, ConstMatrixRef<Scalar> dy, const HashResult<Scalar>& h) {
    backward_hashed(dscores, dy, h, best_isa());
  }

  /**
   * @brief backward_hashed on a chosen kernel path: Isa::Scalar runs the reference kernels; a SIMD path (float
   * only) counting-sorts the (token, table) pairs by row, accumulates each row's gradient once and takes
   * ⟨dy, T_k[code]⟩ from the same row load (no atomics; bits independent of the thread count; sums in a different
   * order than the reference, so equal to it within float rounding).
   * @throws ConfigError if `isa` is not compiled in; as backward_hashed otherwise
   */
  void backward_hashed(MatrixRef<Scalar> dscores, ConstMatrixRef<Scalar> dy, const HashResult<Scalar>& h, Isa isa) {
    check_hash("MemoryLayer::backward_hashed", h);
    detail::check_shape("MemoryLayer::backward", "dy", dy.rows(), dy.cols(), h.rows, config_.d_out);
    detail::check_shape("MemoryLayer::backward", "dscores", dscores.rows(), dscores.cols(), h.rows, h.tables);
    check_isa("MemoryLayer::backward_hashed", isa);
    // A NaN or ±Inf in dy makes its column sum non-finite, so the element-wise scan (which names the culprit) runs
    // only when a sum is; a finite dy whose sum overflows passes that scan.
    const Vector<Scalar> column_sums = detail::column_sums<Scalar>(dy);
    if (!column_sums.allFinite()) detail::check_finite("MemoryLayer::backward", "dy", dy.data(), dy.rows(), dy.cols());
    if (config_.bias) dbias_ += column_sums;
    detail::lookup_backward(isa, dscores.data(), dscores.outerStride(), dy.data(), dy.outerStride(), tables_.data(),
                            dtables_.data(), touched_.data(), config_.tau, config_.d_out, h.tables, h.codes.data(),
                            h.scores.data(), h.rows);
  }

  /// Clears dtables, dbias and the touched-row flags.
  void zero_grad() {
    dtables_.set_zero();
    if (config_.bias) dbias_.setZero();
    std::fill(touched_.begin(), touched_.end(), std::uint8_t(0));
  }

  /// Parameter views: "<prefix>.tables" [K, 2^τ, d_out] (kind Table, sparse rows) and "<prefix>.bias" [d_out]
  /// (an empty prefix gives "tables" and "bias").
  std::vector<ParameterView<Scalar>> parameters(const std::string& prefix = {}) {
    const std::string dot = prefix.empty() ? std::string() : prefix + ".";
    std::vector<ParameterView<Scalar>> views;
    views.push_back({dot + "tables",
                     {num_tables(), config_.rows_per_table(), config_.d_out},
                     tables_.values(),
                     dtables_.values(),
                     ParameterKind::Table,
                     config_.d_out,
                     &touched_});
    if (config_.bias)
      views.push_back({dot + "bias",
                       {config_.d_out},
                       std::span<Scalar>(bias_.data(), size_t(bias_.size())),
                       std::span<Scalar>(dbias_.data(), size_t(dbias_.size())),
                       ParameterKind::Bias});
    return views;
  }

  /// K·2^τ·d_out (+ d_out with bias).
  Index num_parameters() const { return tables_.size() + (config_.bias ? config_.d_out : 0); }

 private:
  void check_input(const char* where, ConstMatrixRef<Scalar> x) const {
    detail::check_layer_input<Scalar>(where, config_, x);
  }
  static void check_isa(const char* where, Isa isa) { detail::check_isa_compiled(where, isa); }
  void check_output(const char* where, const MatrixRef<Scalar>& y, Index rows) const {
    detail::check_shape(where, "y", y.rows(), y.cols(), rows, config_.d_out);
  }
  void check_hash(const char* where, const HashResult<Scalar>& h) const {
    detail::check_layer_hash(where, config_, h);
  }

  MemoryLayerConfig config_;
  SignHasher<Scalar> hasher_;
  BucketTable<Scalar> tables_;        // [K, 2^τ, d_out]
  BucketTable<Scalar> dtables_;       // [K, 2^τ, d_out]
  Vector<Scalar> bias_;               // [d_out]
  Vector<Scalar> dbias_;              // [d_out]
  std::vector<std::uint8_t> touched_; // [K·2^τ]
  Matrix<Scalar> dscores_;            // [N, K] scratch of backward, reused across calls
};

using MemoryLayerF = MemoryLayer<float>;
using MemoryLayerD = MemoryLayer<double>;

}  // namespace memoryformer
