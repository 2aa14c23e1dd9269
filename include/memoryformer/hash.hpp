// SPDX-License-Identifier: MIT
// SignHasher: the sign-bit LSH of design §1.2 with the scores of §1.4 — x [N, K·τ] → codes [N, K] and scores [N, K] —
// and its backward (dscores → dx). One hash can feed several Memory Layers (Q, K and V share one, design §3).
#pragma once

#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "detail/checked_size.hpp"
#include "detail/checks.hpp"
#include "detail/dispatch.hpp"
#include "detail/hash_kernels.hpp"
#include "detail/parallel.hpp"
#include "detail/simd.hpp"
#include "error.hpp"
#include "score.hpp"
#include "types.hpp"

namespace memoryformer {

/// The hash of a batch: what forward computes once and backward needs again.
template <std::floating_point Scalar>
struct HashResult {
  Index rows = 0;                    ///< N
  Index tables = 0;                  ///< K
  int tau = 0;                       ///< bits per code
  std::vector<std::int32_t> codes;   ///< [N, K] bucket index in [0, 2^τ)
  Matrix<Scalar> scores;             ///< [N, K] weight of the retrieved row

  bool empty() const { return rows == 0 && tables == 0; }
  /// Marks the hash empty (the buffers are kept for reuse): a call that throws midway leaves no stale hash behind.
  void invalidate() { rows = tables = 0; }
  std::int32_t code(Index n, Index k) const { return codes[size_t(n * tables + k)]; }
};

/**
 * @brief Sign-bit locality-sensitive hasher with differentiable scores (design §1.2, §1.4).
 *
 * Chunk k of a row is x[kτ : (k+1)τ]; its code has bit (τ−1−j) set when element j is ≥ 0 (so 0.0 and −0.0 give 1):
 * the first element is the most significant bit, as in the authors' code.
 * @tparam Scalar float (SIMD fast path) or double (reference path, std::exp).
 */
template <std::floating_point Scalar>
class SignHasher {
 public:
  /// @throws ConfigError for τ outside 1..16 or a temperature that is not finite and > 0.
  explicit SignHasher(const HashConfig& config) : config_(config) { config_.validate("SignHasher"); }

  const HashConfig& config() const { return config_; }
  int tau() const { return config_.tau; }

  /**
   * @brief Codes and scores of x [N, K·τ] into `out` (resized; its buffers are reused across calls).
   * @param isa the kernel path; Isa::Scalar and best_isa() are always available.
   * @throws ShapeError if x's width is not a multiple of τ; NonFiniteError if x holds NaN or ±Inf (rejected rather
   *         than propagated: a NaN has no sign bit to hash, so any code chosen for it would be arbitrary);
   *         ConfigError when memory cannot hold the buffers of its rows (`out` is then left empty).
   */
  void hash(HashResult<Scalar>& out, ConstMatrixRef<Scalar> x, Isa isa = best_isa()) const {
    const int tau = config_.tau;
    if (x.cols() % tau != 0 || x.cols() == 0) {
      std::ostringstream os;
      os << "(N, K·τ) with τ = " << tau;
      detail::throw_shape("SignHasher::hash", "x", x.rows(), x.cols(), os.str());
    }
    check_isa(isa);
    const Index rows = x.rows(), tables = x.cols() / tau;
    out.invalidate();  // until its buffers have the new shape
    detail::allocating_activations("SignHasher::hash", rows, tables, 1, sizeof(Scalar) + sizeof(std::int32_t), [&] {
      out.codes.resize(size_t(rows * tables));
      detail::resize_buffer(out.scores, rows, tables);
    });
    out.rows = rows;
    out.tables = tables;
    out.tau = tau;
    const bool l1 = config_.score == ScoreKind::L1;
    const Scalar neg_scale = l1 ? Scalar(-2) : Scalar(-2.0 / config_.temperature);
    detail::dispatch_tau(tau, [&](auto tau_constant) {
      constexpr int Tau = decltype(tau_constant)::value;
      auto run = [&]<Isa I>() {
        detail::parallel_row_pieces(rows, hash_piece_rows, [&](Index begin, Index end) {
          detail::hash_rows<I, Tau>(out.codes.data() + begin * tables, out.scores.data() + begin * tables,
                                    x.data() + begin * x.outerStride(), x.outerStride(), end - begin, tables, l1,
                                    neg_scale);
        });
      };
      if (!detail::dispatch_simd(isa, run)) run.template operator()<Isa::Scalar>();
    });
    // Any NaN/Inf in x reaches a score (through Σ|z| or the product); scanning the scores is K·N, not K·τ·N.
    if (!detail::all_finite(out.scores.data(), out.scores.size())) {
      // Leave no codes of a rejected input behind: a backward on them would run on garbage.
      try {
        report_non_finite(x, out);
      } catch (...) {
        out.invalidate();
        throw;
      }
    }
  }

  /// Convenience: returns a fresh HashResult.
  HashResult<Scalar> hash(ConstMatrixRef<Scalar> x, Isa isa = best_isa()) const {
    HashResult<Scalar> out;
    hash(out, x, isa);
    return out;
  }

  /**
   * @brief dx = dscores · ∂scores/∂x (design §1.6); the codes have no gradient. dx is overwritten.
   * @param dx      [N, K·τ] output
   * @param x       [N, K·τ] the input that was hashed
   * @param h       the hash of x
   * @param dscores [N, K] gradient of the loss with respect to the scores (summed over every layer sharing h)
   */
  void backward(MatrixRef<Scalar> dx, ConstMatrixRef<Scalar> x, const HashResult<Scalar>& h,
                ConstMatrixRef<Scalar> dscores, Isa isa = best_isa()) const {
    check_hash_matches("SignHasher::backward", x, h);
    const Index rows = h.rows, tables = h.tables;
    detail::check_shape("SignHasher::backward", "dscores", dscores.rows(), dscores.cols(), rows, tables);
    detail::check_shape("SignHasher::backward", "dx", dx.rows(), dx.cols(), rows, x.cols());
    check_isa(isa);
    const bool l1 = config_.score == ScoreKind::L1;
    const Scalar neg_scale = l1 ? Scalar(-2) : Scalar(-2.0 / config_.temperature);
    detail::dispatch_tau(config_.tau, [&](auto tau_constant) {
      constexpr int Tau = decltype(tau_constant)::value;
      auto run = [&]<Isa I>() {
        detail::parallel_row_pieces(rows, hash_piece_rows, [&](Index begin, Index end) {
          detail::hash_backward_rows<I, Tau>(dx.data() + begin * dx.outerStride(), dx.outerStride(),
                                             x.data() + begin * x.outerStride(), x.outerStride(),
                                             dscores.data() + begin * dscores.outerStride(), dscores.outerStride(),
                                             end - begin, tables, l1, neg_scale);
        });
      };
      if (!detail::dispatch_simd(isa, run)) run.template operator()<Isa::Scalar>();
    });
  }

  /// Throws StateError if h is empty (backward before forward) and ShapeError if h is not the hash of x's shape.
  void check_hash_matches(const char* where, ConstMatrixRef<Scalar> x, const HashResult<Scalar>& h) const {
    if (h.empty() && x.rows() > 0)
      throw StateError(std::string(where) + ": the hash cache is empty; call forward (or hash) before backward");
    if (h.tau != config_.tau)
      throw ShapeError(std::string(where) + ": the cache was hashed with τ = " + std::to_string(h.tau) +
                       ", this layer has τ = " + std::to_string(config_.tau));
    if (x.rows() == h.rows && x.cols() == h.tables * config_.tau) return;  // the message only for a mismatch
    std::ostringstream os;
    os << "(" << h.rows << ", " << h.tables * config_.tau << ") = the shape hashed by forward (N = " << h.rows
       << ", K = " << h.tables << ", τ = " << config_.tau << ")";
    detail::check_shape(where, "x", x.rows(), x.cols(), h.rows, h.tables * config_.tau, os.str());
  }

 private:
  /// Rows per piece the threads claim one at a time: few enough pieces that claiming costs little next to the
  /// hashing of a piece, enough that a slowed thread takes fewer.
  static constexpr Index hash_piece_rows = 128;

  static void check_isa(Isa isa) { detail::check_isa_compiled("SignHasher", isa); }

  [[noreturn]] static void report_non_finite(ConstMatrixRef<Scalar> x, const HashResult<Scalar>& h) {
    for (Index r = 0; r < x.rows(); ++r)
      for (Index c = 0; c < x.cols(); ++c)
        if (!std::isfinite(x(r, c))) {
          std::ostringstream os;
          os << "SignHasher::hash: x has a non-finite value " << x(r, c) << " at (" << r << ", " << c << ")";
          throw NonFiniteError(os.str());
        }
    for (Index r = 0; r < h.rows; ++r)
      for (Index k = 0; k < h.tables; ++k)
        if (!std::isfinite(h.scores(r, k))) {
          std::ostringstream os;
          os << "SignHasher::hash: the score of row " << r << ", chunk " << k
             << " overflows (the chunk's values are too large for the scalar type)";
          throw NonFiniteError(os.str());
        }
    throw NonFiniteError("SignHasher::hash: non-finite score");
  }

  HashConfig config_;
};

}  // namespace memoryformer
