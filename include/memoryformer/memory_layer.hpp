// SPDX-License-Identifier: MIT
// MemoryLayer: the hashed replacement of y = xW + b (design §1; paper Eq. 4–12): y = Σ_k s_k · T_k[code_k] + b,
// with the hand-written backward of design §1 "Backward".
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <new>
#include <span>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "bucket_table.hpp"
#include "detail/checks.hpp"
#include "detail/checked_size.hpp"
#include "detail/column_sums.hpp"
#include "detail/lookup_kernels.hpp"
#include "detail/memory_layer_checks.hpp"
#include "detail/scratch.hpp"
#include "detail/sorted_contributions.hpp"
#include "detail/table_parallel_exchange.hpp"
#include "distributed/table_sharding.hpp"
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
 *
 * **Packed copy (float, SIMD builds).** The prefill kernel reads the tables in column panels (the layout of
 * PackedTables with StorageType::F32), not row by row. So that a prefill call does not re-pack the row-major tables
 * into per-thread panels every time, MemoryLayer<float> can keep a copy of tables() in that layout, of
 * ⌈d_out/32⌉ · K · (2^τ·128 + 64) bytes (the tables' own K·2^τ·d_out·4 bytes, plus one cache line per table and
 * column block, plus padding of d_out to a multiple of 32), and prefill calls read it while it is current. Both
 * paths give the same bits, so the copy changes time, never results. The layer cannot see writes made through a
 * reference or view it handed out, so the copy is kept only on request:
 *  - a new layer has no copy (its memory is not spent unless asked for): forward packs per call;
 *  - tables_changed(), table_rows_changed() or touched_table_rows_changed() packs it (all rows when there was no
 *    copy) and makes it current — e.g. once after loading trained tables for inference;
 *  - writable access — the non-const tables() or parameters() — releases the copy, and forward packs per call
 *    again until one of those calls (or keep_tables_packed()) re-packs it;
 *  - calling one of them is a promise: any later write to the tables, through a reference or view obtained before
 *    or after, is reported before the next forward — by another of these calls, or by the "tables" view's
 *    ParameterView::values_written, through which the library's optimisers report their updates. A stale copy
 *    would give wrong outputs silently, so a caller that cannot keep the promise simply never calls them.
 * The "tables" view of parameters() reports writes by itself: the library's optimisers (AdamW, SGD) call its
 * ParameterView::values_written after updating a range, which copies that range into a current copy while it is
 * still in cache. A training loop that keeps such an optimiser's views therefore calls tables_changed() once and
 * then only keep_tables_packed() after each step (it re-packs a copy that a later parameters() released). A loop
 * that writes the tables itself reports those writes with table_rows_changed(), touched_table_rows_changed()
 * (before zero_grad) or tables_changed().
 *
 * **Table parallelism** (design §11.3). Built with a TableSharding, the layer keeps only the tables
 * owned_tables() of this rank, [⌊K·r/R⌋, ⌊K·(r+1)/R⌋), initialised to exactly the values the unsharded layer of the
 * same seed has there. forward_hashed and backward_hashed then take this rank's rows with the hash of all K tables,
 * as before, and exchange with the other ranks: each owner receives the codes and scores of its tables for every
 * rank's rows, sums its tables into partial outputs, and each rank adds the R partials of its rows in rank order,
 * then the bias; backward sends every owner all ranks' output gradients and returns the score gradients. tables(),
 * dtables(), touched_rows() and the "tables" parameter view (marked sharded) then cover the owned tables only; the
 * bias is whole on every rank and its gradient covers this rank's rows (a data-parallel sum completes it).
 * Sharded calls are collective (see Communicator).
 * @tparam Scalar float or double.
 */
template <std::floating_point Scalar>
class MemoryFormerBlock;

template <std::floating_point Scalar>
class MemoryLayer {
 public:
  /**
   * @brief Builds the layer with the authors' initialisation drawn from `seed`; with an active `sharding`, only this
   *        rank's tables (see the class comment).
   * @throws ConfigError, also when the layer has fewer tables than the sharding has ranks
   */
  MemoryLayer(const MemoryLayerConfig& config, std::uint64_t seed, TableSharding sharding = {})
      : config_((config.validate("MemoryLayer"), config)),
        hasher_(config.hash_config()),
        sharding_(sharding),
        owned_(sharding.active() ? memoryformer::owned_tables(config.num_tables(), sharding.communicator->rank(),
                                                sharding.communicator->size(), "MemoryLayer")
                                 : TableRange{0, config.num_tables()}),
        tables_(owned_.size(), config.tau, config.d_out),
        dtables_(owned_.size(), config.tau, config.d_out),
        touched_(size_t(owned_.size() * config.rows_per_table()), 0) {
    // Rows are read at random: huge pages keep the TLB out of the way (see detail::advise_huge_pages).
    detail::advise_huge_pages(tables_.data(), size_t(tables_.size()) * sizeof(Scalar));
    detail::advise_huge_pages(dtables_.data(), size_t(dtables_.size()) * sizeof(Scalar));
    Rng table_rng = Rng::stream(seed, 0);
    skip_normals(table_rng, owned_.begin * config_.rows_per_table() * config_.d_out);
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
  /// The tables this layer holds: all K, or this rank's share under table parallelism.
  TableRange owned_tables() const { return owned_; }
  /// True when built with an active TableSharding.
  bool sharded() const { return sharding_.active(); }

  /// Writable tables [K_own, 2^τ, d_out] (K_own = owned_tables().size(): K unless sharded): releases the packed copy (see the class comment; std::as_const(layer).tables()
  /// reads without releasing it).
  BucketTable<Scalar>& tables() {
    release_packed_tables();
    return tables_;
  }
  const BucketTable<Scalar>& tables() const { return tables_; }
  const BucketTable<Scalar>& dtables() const { return dtables_; }  // [K, 2^τ, d_out]
  Vector<Scalar>& bias() { return bias_; }                        // [d_out], empty without bias
  const Vector<Scalar>& bias() const { return bias_; }
  const Vector<Scalar>& dbias() const { return dbias_; }          // [d_out]
  /// One flag per held table row (K_own·2^τ): set when backward wrote the row's gradient since zero_grad().
  const std::vector<std::uint8_t>& touched_rows() const { return touched_; }
  /// The flagged rows' ids, each once, in the order backward first flagged them: call by call, and within a call in
  /// increasing row order on the sorting float kernels, in the order of first appearance among the pairs otherwise.
  const std::vector<Index>& touched_list() const { return touched_list_; }

  /**
   * @brief y = Σ_k s_k · T_k[code_k] + b, hashing x first.
   * @param y     [N, d_out] output (must already have that shape)
   * @param x     [N, d_in] input
   * @param cache receives the codes and scores of x, for backward (and for other layers sharing this hash)
   * @throws ShapeError, NonFiniteError; ConfigError when memory cannot hold the buffers of x's rows
   */
  void forward(MatrixRef<Scalar> y, ConstMatrixRef<Scalar> x, HashResult<Scalar>& cache, Isa isa = best_isa()) const {
    check_input("MemoryLayer::forward", x);
    check_output("MemoryLayer::forward", y, x.rows());
    hasher_.hash(cache, x, isa);  // both name a buffer they cannot allocate
    forward_hashed(y, cache, isa);
  }

  /// Allocating convenience form of forward.
  Matrix<Scalar> forward(ConstMatrixRef<Scalar> x, HashResult<Scalar>& cache, Isa isa = best_isa()) const {
    check_input("MemoryLayer::forward", x);
    Matrix<Scalar> y = detail::activation_matrix<Scalar>("MemoryLayer::forward", x.rows(), config_.d_out);
    forward(y, x, cache, isa);
    return y;
  }

  /// Rank-2 or rank-3 row-major tensors ([N, d_in] or [batch, seq, d_in]) in, the same rank out.
  template <int Rank>
  Tensor<Scalar, Rank> forward(const Tensor<Scalar, Rank>& x, HashResult<Scalar>& cache) const {
    static_assert(Rank == 2 || Rank == 3, "MemoryLayer::forward takes [N, d] or [batch, seq, d] tensors");
    auto dims = x.dimensions();
    dims[Rank - 1] = config_.d_out;
    const Index rows = x.size() / std::max<Index>(1, x.dimension(Rank - 1));
    Tensor<Scalar, Rank> y = detail::allocating_activations("MemoryLayer::forward", rows, config_.d_out, 1,
                                                            sizeof(Scalar), [&] { return Tensor<Scalar, Rank>(dims); });
    forward(as_matrix(y), as_matrix(x), cache);
    return y;
  }

  /**
   * @brief The lookup half of forward, from a hash computed elsewhere (Q, K and V share one hash, design §3).
   * @param y [N, d_out] output
   * @param h the hash of the input: N rows of K codes with this layer's τ
   */
  void forward_hashed(MatrixRef<Scalar> y, const HashResult<Scalar>& h) const { forward_hashed(y, h, best_isa()); }

  /**
   * @brief forward_hashed on a chosen kernel path: Isa::Scalar runs the reference kernel; a SIMD path (float only)
   * runs the fast kernels — token-major for few tokens, column-blocked for many, over the packed copy when it is
   * current (from 0.75·2^τ tokens, where FrozenMemoryLayer with both copies switches too), else over panels packed
   * per thread and call (from 3·2^τ tokens); in between, from max(256, 2^τ/2) tokens and while y fits 8 MB, in
   * table order (each used row of the row-major tables read once, design §1.5).
   * Every fast path computes each output as the same fused multiply-add chain bias + s_0·T_0 + … + s_{K−1}·T_{K−1},
   * so results are bitwise identical across SIMD paths, token counts and thread counts, and differ from the
   * reference only by FMA rounding (≤ 2(K+1)·2^-24·(|b| + Σ|s_k·T_k|) per element).
   * @throws ConfigError if `isa` is not compiled in or memory cannot hold the buffers of h's rows; ShapeError,
   *         StateError as forward_hashed
   */
  void forward_hashed(MatrixRef<Scalar> y, const HashResult<Scalar>& h, Isa isa) const {
    check_hash("MemoryLayer::forward_hashed", h);
    check_output("MemoryLayer::forward_hashed", y, h.rows);
    check_isa("MemoryLayer::forward_hashed", isa);
    detail::allocating_activations("MemoryLayer::forward_hashed", h.rows, config_.d_out, 1, sizeof(Scalar), [&] {
      if (sharded()) return forward_sharded(y, h, isa);
      lookup(y, h, config_.bias ? bias_.data() : nullptr, isa);
    });
  }

 private:
  /// y = [b +] Σ_k s_k · T_k[code_k] over the tables held here; h has one column per held table.
  void lookup(MatrixRef<Scalar> y, const HashResult<Scalar>& h, const Scalar* bias, Isa isa) const {
    if constexpr (std::is_same_v<Scalar, float>) {
      if (packed_current() && detail::use_fast_kernels<float>(isa) &&
          h.rows >= detail::rows_prefill_min_tokens(config_.tau)) {
        detail::lookup_forward_packed(isa, y.data(), y.outerStride(), packed_layout_, packed_.data(), h.codes.data(),
                                      h.scores.data(), bias, h.rows);
        return;
      }
    }
    detail::lookup_forward(isa, y.data(), y.outerStride(), tables_.data(), config_.tau, config_.d_out, h.tables,
                           h.codes.data(), h.scores.data(), bias, h.rows);
  }

  /// forward_hashed under table parallelism (design §11.3): codes to the owners, partial sums back, then the bias.
  void forward_sharded(MatrixRef<Scalar> y, const HashResult<Scalar>& h, Isa isa) const {
    Communicator& comm = *sharding_.communicator;
    const detail::RankRows rows = detail::gather_rank_rows(comm, h.rows);
    HashResult<Scalar> mine;  // [all ranks' rows, K_own]
    detail::exchange_table_codes(comm, rows, h, mine);
    Matrix<Scalar> partial(rows.total, config_.d_out);  // [all ranks' rows, d_out] Σ over the owned tables
    lookup(partial, mine, nullptr, isa);
    detail::reduce_scatter_rows(comm, rows, partial, y);
    if (config_.bias) y.rowwise() += bias_.transpose();
  }

  /// backward_hashed under table parallelism: every rank's dy to the owners, which accumulate their tables' gradients
  /// and return the score gradients of their tables.
  void backward_sharded(MatrixRef<Scalar> dscores, ConstMatrixRef<Scalar> dy, const HashResult<Scalar>& h, Isa isa) {
    Communicator& comm = *sharding_.communicator;
    const detail::RankRows rows = detail::gather_rank_rows(comm, h.rows);
    HashResult<Scalar> mine;  // [all ranks' rows, K_own]
    detail::exchange_table_codes(comm, rows, h, mine);
    Matrix<Scalar> all_dy;  // [all ranks' rows, d_out]
    detail::all_gather_rows(comm, rows, dy, all_dy);
    Matrix<Scalar> local = Matrix<Scalar>::Zero(rows.total, mine.tables);  // [all ranks' rows, K_own]
    write_table_gradients([&](std::vector<Index>* new_rows) {
      detail::lookup_backward(isa, local.data(), local.outerStride(), all_dy.data(), all_dy.outerStride(),
                              tables_.data(), dtables_.data(), touched_.data(), config_.tau, config_.d_out,
                              mine.tables, mine.codes.data(), mine.scores.data(), mine.rows, nullptr, new_rows);
    });
    detail::return_score_gradients(comm, rows, h.tables, local, dscores);
  }

  /// Advances `rng` past `count` normal draws, so that a shard starts where its tables start in the unsharded layer.
  static void skip_normals(Rng& rng, Index count) {
    std::vector<double> scratch(std::size_t(std::min<Index>(count, Index(1) << 16)));
    for (Index done = 0; done < count;) {
      const Index piece = std::min<Index>(count - done, Index(scratch.size()));
      rng.fill_normal(std::span<double>(scratch.data(), std::size_t(piece)), 0.0, 1.0);
      done += piece;
    }
  }

 public:

  /**
   * @brief Backward through the whole layer: dx overwritten, dtables and dbias accumulated.
   * @param dx    [N, d_in] output
   * @param x     [N, d_in] the input given to forward
   * @param dy    [N, d_out] gradient of the loss with respect to y
   * @param cache the HashResult forward filled
   * @throws StateError if cache is empty (backward before forward); ShapeError; NonFiniteError for NaN/Inf in dy;
   *         ConfigError when memory cannot hold the buffers of its rows
   */
  void backward(MatrixRef<Scalar> dx, ConstMatrixRef<Scalar> x, ConstMatrixRef<Scalar> dy,
                const HashResult<Scalar>& cache, Isa isa = best_isa()) {
    hasher_.check_hash_matches("MemoryLayer::backward", x, cache);
    detail::allocating_activations("MemoryLayer::backward", cache.rows, config_.d_out, 1, sizeof(Scalar), [&] {
      detail::zeroed_buffer(dscores_, cache.rows, cache.tables);
      backward_hashed(dscores_, dy, cache, isa);
      hasher_.backward(dx, x, cache, dscores_, isa);
    });
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
   * @throws ConfigError if `isa` is not compiled in or memory cannot hold the buffers of h's rows (then, unless the
   *         layer is sharded, dtables, dbias, dscores and the touched rows are as they were); as backward_hashed
   *         otherwise
   */
  void backward_hashed(MatrixRef<Scalar> dscores, ConstMatrixRef<Scalar> dy, const HashResult<Scalar>& h, Isa isa) {
    detail::allocating_activations("MemoryLayer::backward_hashed", h.rows, config_.d_out, 1, sizeof(Scalar),
                                   [&] { backward_lookup(dscores, dy, h, isa, nullptr); });
  }

  /// Clears dtables (only the listed rows: the others are zero already), dbias, the touched-row flags and list.
  void zero_grad() {
    const std::span<Scalar> dt = dtables_.values();
    const std::size_t width = std::size_t(config_.d_out);
    for (Index r : touched_list_) {
      std::fill_n(dt.begin() + std::ptrdiff_t(std::size_t(r) * width), width, Scalar(0));
      touched_[std::size_t(r)] = 0;
    }
    touched_list_.clear();
    if (config_.bias) dbias_.setZero();
  }

  /// Parameter views: "<prefix>.tables" [K_own, 2^τ, d_out] (kind Table, sparse rows, sharded under table parallelism) and "<prefix>.bias" [d_out]
  /// (an empty prefix gives "tables" and "bias"). The views can write the tables, so this releases the packed copy
  /// (see the class comment).
  std::vector<ParameterView<Scalar>> parameters(const std::string& prefix = {}) {
    release_packed_tables();
    const std::string dot = prefix.empty() ? std::string() : prefix + ".";
    std::vector<ParameterView<Scalar>> views;
    views.push_back({dot + "tables",
                     {owned_.size(), config_.rows_per_table(), config_.d_out},
                     tables_.values(),
                     dtables_.values(),
                     ParameterKind::Table,
                     config_.d_out,
                     &touched_,
                     &touched_list_,
                     sharded(),
                     &MemoryLayer::report_values_written,
                     this});
    if (config_.bias)
      views.push_back({dot + "bias",
                       {config_.d_out},
                       std::span<Scalar>(bias_.data(), size_t(bias_.size())),
                       std::span<Scalar>(dbias_.data(), size_t(dbias_.size())),
                       ParameterKind::Bias});
    return views;
  }

  /// K_own·2^τ·d_out (+ d_out with bias): the values held here.
  Index num_parameters() const { return tables_.size() + (config_.bias ? config_.d_out : 0); }

  /// Reports that any table row may have changed: re-packs the whole copy (allocating it if released) and makes it
  /// current. Promises that later writes are reported too (see the class comment). No effect for double or
  /// without SIMD kernels.
  void tables_changed() { pack_tables(nullptr); }

  /**
   * @brief Reports that only `rows` changed since the copy was last current: re-packs those rows (flat indices
   * k·2^τ + r), or every row if the copy was released. Promises that later writes are reported too.
   * @throws ShapeError naming the first index outside [0, K·2^τ), before anything changes
   */
  void table_rows_changed(std::span<const Index> rows) {
    const Index count = tables_.num_rows();
    for (const Index r : rows)
      if (r < 0 || r >= count)
        throw ShapeError("MemoryLayer::table_rows_changed: row " + std::to_string(r) + " is outside [0, " +
                         std::to_string(count) + ") (K·2^τ rows)");
    if (!packed_current()) return pack_tables(nullptr);
    if constexpr (keeps_packed_copy())
      detail::pack_listed_rows_f32(packed_.data(), packed_layout_, tables_.data(), rows.data(), Index(rows.size()));
  }

  /// table_rows_changed for the rows flagged in touched_rows(): the rows a row-sparse optimiser step moves. Call it
  /// after that step and before zero_grad(), which clears the flags.
  void touched_table_rows_changed() {
    if (!packed_current()) return pack_tables(nullptr);
    if constexpr (keeps_packed_copy())
      detail::pack_tables_f32(packed_.data(), packed_layout_, tables_.data(), touched_.data());
  }

  /// Packs the whole copy when it is released (as tables_changed()); a current copy is left as it is. For a
  /// training loop whose optimiser reports its writes through the views (see the class comment).
  void keep_tables_packed() {
    if (!packed_current()) pack_tables(nullptr);
  }

  /// True while a current packed copy is kept (never for double or in builds without SIMD kernels).
  bool packed_tables_current() const { return packed_current(); }

  /// Bytes of the packed copy held now: ⌈d_out/32⌉ · K · (2^τ·128 + 64) while it is kept, else 0.
  std::size_t packed_table_bytes() const { return packed_.size(); }

 private:
  // MemoryFormerBlock sorts its shared hash once for the backward of Q, K and V (backward_lookup's `presorted`).
  template <std::floating_point>
  friend class MemoryFormerBlock;

  /// backward_hashed with a sort of h's pairs that several layers reading h share: the first call with
  /// `shared->current` false sorts into it (after h is checked), later ones read it; nullptr: the kernel sorts them
  /// itself. The same bits either way.
  void backward_lookup(MatrixRef<Scalar> dscores, ConstMatrixRef<Scalar> dy, const HashResult<Scalar>& h, Isa isa,
                       detail::SortedContributionsBuffer* shared) {
    check_hash("MemoryLayer::backward_hashed", h);
    detail::check_shape("MemoryLayer::backward", "dy", dy.rows(), dy.cols(), h.rows, config_.d_out);
    detail::check_shape("MemoryLayer::backward", "dscores", dscores.rows(), dscores.cols(), h.rows, h.tables);
    check_isa("MemoryLayer::backward_hashed", isa);
    // A NaN or ±Inf in dy makes its column sum non-finite, so the element-wise scan (which names the culprit) runs
    // only when a sum is; a finite dy whose sum overflows passes that scan.
    const Vector<Scalar> column_sums = detail::column_sums<Scalar>(dy);
    if (!column_sums.allFinite()) detail::check_finite("MemoryLayer::backward", "dy", dy.data(), dy.rows(), dy.cols());
    if (sharded()) {
      backward_sharded(dscores, dy, h, isa);
    } else {
      lookup_gradients(dscores, dy, h, isa, shared);
    }
    // Last, so that a call refused for memory (the lookup allocates all its buffers before it writes) leaves dbias
    // as it was too.
    if (config_.bias) dbias_ += column_sums;
  }

  /// The table and score gradients of backward_lookup on an unsharded layer.
  void lookup_gradients(MatrixRef<Scalar> dscores, ConstMatrixRef<Scalar> dy, const HashResult<Scalar>& h, Isa isa,
                        detail::SortedContributionsBuffer* shared) {
    const detail::SortedContributions* presorted = nullptr;
    if constexpr (std::is_same_v<Scalar, float>) {
      if (shared != nullptr && detail::lookup_backward_sorts<Scalar>(isa, h.rows, h.tables, config_.tau)) {
        if (!shared->current) {
          shared->sort(h.codes.data(), h.scores.data(), h.rows, h.tables, config_.tau);
          shared->current = true;
        }
        presorted = &shared->sorted;
      }
    }
    write_table_gradients([&](std::vector<Index>* new_rows) {
      detail::lookup_backward(isa, dscores.data(), dscores.outerStride(), dy.data(), dy.outerStride(), tables_.data(),
                              dtables_.data(), touched_.data(), config_.tau, config_.d_out, h.tables, h.codes.data(),
                              h.scores.data(), h.rows, presorted, new_rows);
    });
  }

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

  /// Only float layers in builds with SIMD kernels read a packed copy (the reference kernel reads rows).
  static constexpr bool keeps_packed_copy() {
#if defined(MEMORYFORMER_HAVE_SIMD_KERNELS)
    return std::is_same_v<Scalar, float>;
#else
    return false;
#endif
  }
  bool packed_current() const { return packed_.size() != 0; }

  /// Packs the rows flagged in row_flags (nullptr: all rows, allocating the copy first if it was released). The
  /// copy only saves time, so when its memory cannot be had the layer goes on without it (forward packs per call).
  void pack_tables(const std::uint8_t* row_flags) {
    if constexpr (keeps_packed_copy()) {
      if (!packed_current()) {
        row_flags = nullptr;
        packed_layout_ = detail::PanelLayout::make(owned_.size(), config_.tau, config_.d_out, StorageType::F32);
        try {
          packed_ = detail::TableBlock(size_t(packed_layout_.total_bytes()));  // zeroed: padding stays zero
        } catch (const std::bad_alloc&) {
          return;
        }
      }
      detail::pack_tables_f32(packed_.data(), packed_layout_, tables_.data(), row_flags);
    } else {
      (void)row_flags;
    }
  }
  /// The "tables" view's values_written: copies the flat values [begin, end) into the copy while it is current.
  static void report_values_written(void* layer, std::size_t begin, std::size_t end) {
    static_cast<MemoryLayer*>(layer)->pack_values(begin, end);
  }
  void pack_values(std::size_t begin, std::size_t end) {
    if constexpr (keeps_packed_copy()) {
      if (packed_current()) detail::pack_values_f32(packed_.data(), packed_layout_, tables_.data(), begin, end);
    } else {
      (void)begin;
      (void)end;
    }
  }
  /// Frees the copy: forward packs per call until pack_tables runs again.
  void release_packed_tables() { packed_ = detail::TableBlock(); }

  /// Runs `write(new_rows)`, a lookup backward, which lists into new_rows (flagging each
  /// detail::fresh_row: its gradient is zero, so the kernel may store rather than add) the rows it writes that are not
  /// flagged yet; new_rows is nullptr once every row is listed (nothing left to find). The kernel flags every row it
  /// writes 1; if `write` throws, the rows it listed are flagged 1 here, so a later call adds to them.
  template <class Write>
  void write_table_gradients(Write&& write) {
    const std::size_t listed = touched_list_.size();
    try {
      // Every row listed leaves nothing to find, which is the rule for 2^τ-row tables after a few micro-batches of an
      // accumulated step. The list holds each flagged row once, so room for every row means its appends never throw.
      std::vector<Index>* new_rows = nullptr;
      if (listed < touched_.size()) {
        detail::allocating("MemoryLayer::backward", "the list of touched rows",
                           Index(touched_.size() * sizeof(Index)), [&] { touched_list_.reserve(touched_.size()); });
        new_rows = &touched_list_;
      }
      write(new_rows);
    } catch (...) {
      for (std::size_t i = listed; i < touched_list_.size(); ++i) touched_[std::size_t(touched_list_[i])] = 1;
      throw;
    }
  }

  MemoryLayerConfig config_;
  SignHasher<Scalar> hasher_;
  TableSharding sharding_;            // inactive unless table-parallel
  TableRange owned_;                  // the tables held here: [0, K) unless sharded
  BucketTable<Scalar> tables_;        // [K_own, 2^τ, d_out]
  BucketTable<Scalar> dtables_;       // [K_own, 2^τ, d_out]
  Vector<Scalar> bias_;               // [d_out]
  Vector<Scalar> dbias_;              // [d_out]
  std::vector<std::uint8_t> touched_; // [K_own·2^τ]
  std::vector<Index> touched_list_;   // [rows flagged in touched_], first-flagged order (see touched_list())
  Matrix<Scalar> dscores_;            // [N, K] scratch of backward, reused across calls
  // The packed copy of tables_ (see the class comment): held iff current, so "current" needs no separate flag that
  // could disagree with the bytes.
  detail::PanelLayout packed_layout_;  // F32 panels of [K, 2^τ, d_out]
  detail::TableBlock packed_;          // packed_layout_.total_bytes() bytes, or empty when released
};

using MemoryLayerF = MemoryLayer<float>;
using MemoryLayerD = MemoryLayer<double>;

}  // namespace memoryformer
