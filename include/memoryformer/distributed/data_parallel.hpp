// SPDX-License-Identifier: MIT
// DataParallel: sums the gradients of the parameters every rank holds whole (one bucketed allreduce for dense ones,
// only the touched rows for tables and the embedding) and checks that the replicas stay identical (design §11.2).
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "../detail/checks.hpp"
#include "../detail/xxhash.hpp"
#include "../error.hpp"
#include "../parameter.hpp"
#include "../types.hpp"
#include "collectives.hpp"
#include "communicator.hpp"

namespace memoryformer {

/// Settings of DataParallel.
struct DataParallelOptions {
  /// A row-sparse parameter (tables, embedding) whose union of touched rows over the ranks is more than this share
  /// of its rows is summed whole, without packing rows: 0 always sums whole, 1 always packs. The default is about
  /// where the two cost the same in bench/bench_gradient_exchange.cpp on two ranks of one machine
  /// (docs/performance.md); on links slower than shared memory packing pays up to a higher share.
  double dense_row_fraction = 0.3;
  /// Dense gradients are packed into buffers of at most this many bytes, one allreduce each (larger parameters go
  /// alone, in place).
  std::size_t bucket_bytes = std::size_t(16) << 20;

  /// @throws ConfigError naming the offending value.
  void validate(std::string_view where = "DataParallelOptions") const {
    detail::check_config(std::isfinite(dense_row_fraction) && dense_row_fraction >= 0.0 && dense_row_fraction <= 1.0,
                         where, "dense_row_fraction = " + std::to_string(dense_row_fraction) + " is outside [0, 1]");
    detail::check_config(bucket_bytes >= 1, where, "bucket_bytes must be ≥ 1");
  }
};

/// What the last DataParallel::sum_gradients exchanged (values of Scalar, summed over the parameters).
struct GradientExchange {
  Index dense_values = 0;     ///< values of dense parameters and of row-sparse ones summed whole
  Index row_values = 0;       ///< values of touched rows summed packed
  Index row_ids = 0;          ///< touched row ids gathered (all ranks' lists)
  Index whole_sparse = 0;     ///< row-sparse parameters summed whole (more than dense_row_fraction of rows touched)
  Index packed_sparse = 0;    ///< row-sparse parameters summed as packed rows
};

/**
 * @brief Data parallelism over a Communicator for a list of parameters (every rank lists the same parameters in the
 *        same order).
 *
 * After each rank's backward on its share of the batch, sum_gradients() replaces every gradient of a parameter the
 * ranks hold whole (ParameterView::sharded false) by its sum over the ranks, with all_reduce_sum, so the result has
 * the same bits on every rank. Scale the loss by 1/R (R ranks) to get the mean. Then an optimiser that runs
 * identically on every rank keeps the replicas bit-identical; check_replicas() verifies it.
 *
 *  - Dense parameters (and row-sparse ones without touched flags) go in buckets of options.bucket_bytes.
 *  - Row-sparse parameters (tables and the embedding, with touched flags): the ranks gather their touched row ids;
 *    the union U, sorted, is summed as U packed rows — or the whole gradient when U exceeds dense_row_fraction of the
 *    rows. Either way every rank then flags exactly the rows of U, and the touched list becomes U in ascending order,
 *    so a row-sparse optimiser visits the same rows in the same order on every rank.
 *  - Sharded parameters (table parallelism) are skipped: each rank's part already sums every rank's rows.
 *
 * With one rank every call returns at once and changes nothing.
 * @tparam Scalar float or double
 */
template <std::floating_point Scalar>
class DataParallel {
 public:
  /// @throws ConfigError for invalid options
  DataParallel(Communicator& comm, std::vector<ParameterView<Scalar>> params, DataParallelOptions options = {})
      : comm_(comm), params_(std::move(params)), options_((options.validate("DataParallel"), options)) {}

  Communicator& communicator() { return comm_; }
  const DataParallelOptions& options() const { return options_; }
  /// What the last sum_gradients() exchanged.
  const GradientExchange& last_exchange() const { return exchange_; }

  /**
   * @brief Sums the gradients of the whole (not sharded) parameters over the ranks (see the class comment).
   * @throws DistributedError as the Communicator
   */
  void sum_gradients() {
    exchange_ = {};
    if (comm_.size() == 1) return;
    std::vector<const ParameterView<Scalar>*> bucket;
    std::size_t bucket_values = 0;
    const std::size_t bucket_capacity = std::max<std::size_t>(1, options_.bucket_bytes / sizeof(Scalar));
    for (const auto& p : params_) {
      if (p.sharded) continue;
      if (row_sparse(p)) {
        sum_rows(p);
        continue;
      }
      exchange_.dense_values += Index(p.grad.size());
      if (p.grad.size() >= bucket_capacity) {
        all_reduce_sum(comm_, p.grad);
        continue;
      }
      if (bucket_values + p.grad.size() > bucket_capacity) flush(bucket, bucket_values);
      bucket.push_back(&p);
      bucket_values += p.grad.size();
    }
    flush(bucket, bucket_values);
  }

  /// XXH3-64 of the values of every whole (not sharded) parameter on this rank, in list order.
  std::uint64_t replica_fingerprint() const {
    detail::Xxh3Stream hash;
    for (const auto& p : params_)
      if (!p.sharded) hash.update(p.value.data(), p.value.size() * sizeof(Scalar));
    return hash.digest();
  }

  /**
   * @brief Compares replica_fingerprint() across the ranks (collective).
   * @param when what the message says about the moment, e.g. "after step 100"
   * @throws DistributedError on every rank, naming each rank's fingerprint, when they differ
   */
  void check_replicas(const std::string& when) {
    if (comm_.size() == 1) return;
    const std::vector<std::uint64_t> all = all_gather_value<std::uint64_t>(comm_, replica_fingerprint());
    if (std::all_of(all.begin(), all.end(), [&](std::uint64_t f) { return f == all[0]; })) return;
    std::string message = "DataParallel: the replicated parameters differ between ranks " + when + " (XXH3:";
    for (std::size_t q = 0; q < all.size(); ++q) message += " rank " + std::to_string(q) + " " + hex(all[q]);
    throw DistributedError(message + ")");
  }

 private:
  static bool row_sparse(const ParameterView<Scalar>& p) {
    return (p.kind == ParameterKind::Table || p.kind == ParameterKind::Embedding) && p.touched_rows != nullptr &&
           p.row_size > 0;
  }

  static std::string hex(std::uint64_t v) {
    char buf[20];
    std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(v));
    return buf;
  }

  void flush(std::vector<const ParameterView<Scalar>*>& bucket, std::size_t& values) {
    if (bucket.empty()) return;
    buffer_.resize(values);
    std::size_t at = 0;
    for (const auto* p : bucket) {
      std::copy(p->grad.begin(), p->grad.end(), buffer_.begin() + std::ptrdiff_t(at));
      at += p->grad.size();
    }
    all_reduce_sum(comm_, std::span<Scalar>(buffer_));
    at = 0;
    for (const auto* p : bucket) {
      std::copy_n(buffer_.begin() + std::ptrdiff_t(at), p->grad.size(), p->grad.begin());
      at += p->grad.size();
    }
    bucket.clear();
    values = 0;
  }

  /// One row-sparse parameter: the union of the touched rows, summed packed or whole.
  void sum_rows(const ParameterView<Scalar>& p) {
    const std::size_t width = std::size_t(p.row_size), rows = p.grad.size() / width;
    std::vector<Index>& flags_list = list_;
    flags_list.clear();
    if (p.touched_list != nullptr) {
      flags_list.assign(p.touched_list->begin(), p.touched_list->end());
    } else {
      for (std::size_t r = 0; r < rows; ++r)
        if ((*p.touched_rows)[r] != 0) flags_list.push_back(Index(r));
    }
    std::vector<Index> ids = all_gather_list<Index>(comm_, flags_list);
    exchange_.row_ids += Index(ids.size());
    std::sort(ids.begin(), ids.end());
    ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
    if (double(ids.size()) > options_.dense_row_fraction * double(rows)) {
      all_reduce_sum(comm_, p.grad);
      exchange_.dense_values += Index(p.grad.size());
      ++exchange_.whole_sparse;
    } else {
      buffer_.resize(ids.size() * width);
      for (std::size_t i = 0; i < ids.size(); ++i)
        std::copy_n(p.grad.begin() + std::ptrdiff_t(std::size_t(ids[i]) * width), width,
                    buffer_.begin() + std::ptrdiff_t(i * width));
      all_reduce_sum(comm_, std::span<Scalar>(buffer_));
      for (std::size_t i = 0; i < ids.size(); ++i)
        std::copy_n(buffer_.begin() + std::ptrdiff_t(i * width), width,
                    p.grad.begin() + std::ptrdiff_t(std::size_t(ids[i]) * width));
      exchange_.row_values += Index(buffer_.size());
      ++exchange_.packed_sparse;
    }
    for (const Index r : ids) (*p.touched_rows)[std::size_t(r)] = 1;
    if (p.touched_list != nullptr) p.touched_list->assign(ids.begin(), ids.end());
  }

  Communicator& comm_;
  std::vector<ParameterView<Scalar>> params_;
  DataParallelOptions options_;
  GradientExchange exchange_;
  std::vector<Scalar> buffer_;  // packed dense bucket or touched rows
  std::vector<Index> list_;     // this rank's touched rows of one parameter
};

}  // namespace memoryformer
