// SPDX-License-Identifier: MIT
// The exchanges of a table-parallel Memory Layer (design §11.3): codes and scores to the tables' owners, partial
// outputs back to the rows' ranks, output gradients to every owner and score gradients back.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

#include "../distributed/collectives.hpp"
#include "../distributed/communicator.hpp"
#include "../distributed/table_sharding.hpp"
#include "../hash.hpp"
#include "../types.hpp"
#include "checked_size.hpp"

namespace memoryformer::detail {

/// How many rows each rank brings to one exchange, and where its rows start in the all-ranks order (rank-major).
struct RankRows {
  std::vector<Index> rows;   // [R]
  std::vector<Index> first;  // [R]
  Index total = 0;
};

inline RankRows gather_rank_rows(Communicator& comm, Index my_rows) {
  RankRows r;
  r.rows = all_gather_value<Index>(comm, my_rows);
  r.first.resize(r.rows.size());
  for (std::size_t q = 0; q < r.rows.size(); ++q) {
    r.first[q] = r.total;
    r.total = checked_add("table-parallel exchange", "rows of all ranks", r.total, r.rows[q]);
  }
  return r;
}

/**
 * Sends every owner s the codes and scores of its tables for this rank's rows, and returns in `mine` those of this
 * rank's tables for every rank's rows: [total rows, K_own], rows in rank-major order.
 * @param h this rank's hash [N_r, K] (all K tables)
 */
template <class Scalar>
void exchange_table_codes(Communicator& comm, const RankRows& rows, const HashResult<Scalar>& h,
                          HashResult<Scalar>& mine) {
  const int ranks = comm.size(), me = comm.rank();
  const Index K = h.tables, n = h.rows;
  constexpr std::size_t pair = sizeof(std::int32_t) + sizeof(Scalar);
  const TableRange own = owned_tables(K, me, ranks);
  std::vector<std::size_t> send_bytes(static_cast<std::size_t>(ranks)), recv_bytes(static_cast<std::size_t>(ranks));
  std::size_t send_total = 0, recv_total = 0;
  for (int q = 0; q < ranks; ++q) {
    send_bytes[std::size_t(q)] = std::size_t(n * owned_tables(K, q, ranks).size()) * pair;
    recv_bytes[std::size_t(q)] = std::size_t(rows.rows[std::size_t(q)] * own.size()) * pair;
    send_total += send_bytes[std::size_t(q)];
    recv_total += recv_bytes[std::size_t(q)];
  }
  // Block for owner s: its K_s codes of every row, then their K_s scores.
  std::vector<std::byte> send(send_total), recv(recv_total);
  std::byte* out = send.data();
  for (int s = 0; s < ranks; ++s) {
    const TableRange t = owned_tables(K, s, ranks);
    for (Index i = 0; i < n; ++i, out += t.size() * Index(sizeof(std::int32_t)))
      std::memcpy(out, h.codes.data() + i * K + t.begin, std::size_t(t.size()) * sizeof(std::int32_t));
    for (Index i = 0; i < n; ++i, out += t.size() * Index(sizeof(Scalar)))
      std::memcpy(out, h.scores.data() + i * K + t.begin, std::size_t(t.size()) * sizeof(Scalar));
  }
  comm.all_to_all(send, send_bytes, recv, recv_bytes);
  mine.rows = rows.total;
  mine.tables = own.size();
  mine.tau = h.tau;
  mine.codes.resize(std::size_t(rows.total * own.size()));
  resize_buffer(mine.scores, rows.total, Index(own.size()));
  const std::byte* in = recv.data();
  for (int q = 0; q < ranks; ++q) {
    const std::size_t count = std::size_t(rows.rows[std::size_t(q)] * own.size());
    const std::size_t at = std::size_t(rows.first[std::size_t(q)] * own.size());
    std::memcpy(mine.codes.data() + at, in, count * sizeof(std::int32_t));
    in += count * sizeof(std::int32_t);
    std::memcpy(mine.scores.data() + at, in, count * sizeof(Scalar));
    in += count * sizeof(Scalar);
  }
}

/**
 * y [N_r, w] = Σ_s partial_s over the owners s in rank order, where partial [total rows, w] is this rank's sum over
 * its tables for every rank's rows (a reduce-scatter done as one all-to-all, summed here in a fixed order).
 */
template <class Scalar>
void reduce_scatter_rows(Communicator& comm, const RankRows& rows, const Matrix<Scalar>& partial, MatrixRef<Scalar> y) {
  const int ranks = comm.size(), me = comm.rank();
  const Index w = partial.cols(), n = rows.rows[std::size_t(me)];
  std::vector<std::size_t> send_bytes(static_cast<std::size_t>(ranks)), recv_bytes(static_cast<std::size_t>(ranks), std::size_t(n * w) * sizeof(Scalar));
  for (int q = 0; q < ranks; ++q) send_bytes[std::size_t(q)] = std::size_t(rows.rows[std::size_t(q)] * w) * sizeof(Scalar);
  std::vector<Scalar> recv(std::size_t(n * w) * std::size_t(ranks));
  comm.all_to_all(std::as_bytes(std::span<const Scalar>(partial.data(), std::size_t(partial.size()))), send_bytes,
                  std::as_writable_bytes(std::span<Scalar>(recv)), recv_bytes);
  for (Index i = 0; i < n; ++i) {
    Scalar* yi = y.data() + i * y.outerStride();
    const Scalar* first = recv.data() + i * w;
    for (Index j = 0; j < w; ++j) yi[j] = first[j];
    for (int s = 1; s < ranks; ++s) {
      const Scalar* p = recv.data() + std::size_t(s) * std::size_t(n * w) + std::size_t(i * w);
      for (Index j = 0; j < w; ++j) yi[j] += p[j];
    }
  }
}

/// all [total rows, w] = every rank's x [N_r, w] stacked in rank order.
template <class Scalar>
void all_gather_rows(Communicator& comm, const RankRows& rows, ConstMatrixRef<Scalar> x, Matrix<Scalar>& all) {
  const Index w = x.cols();
  resize_buffer(all, rows.total, w);
  std::vector<std::size_t> bytes(rows.rows.size());
  for (std::size_t q = 0; q < bytes.size(); ++q) bytes[q] = std::size_t(rows.rows[q] * w) * sizeof(Scalar);
  Matrix<Scalar> mine = x;  // contiguous copy: x may be a strided view
  comm.all_gather(std::as_bytes(std::span<const Scalar>(mine.data(), std::size_t(mine.size()))),
                  std::as_writable_bytes(std::span<Scalar>(all.data(), std::size_t(all.size()))), bytes);
}

/**
 * Returns the score gradients: `local` [total rows, K_own] holds ⟨dy, T_k[code]⟩ of this rank's tables for every
 * rank's rows; each rank adds the columns of every owner into its dscores [N_r, K].
 */
template <class Scalar>
void return_score_gradients(Communicator& comm, const RankRows& rows, Index tables, const Matrix<Scalar>& local,
                            MatrixRef<Scalar> dscores) {
  const int ranks = comm.size(), me = comm.rank();
  const Index n = rows.rows[std::size_t(me)];
  const TableRange own = owned_tables(tables, me, ranks);
  std::vector<std::size_t> send_bytes(static_cast<std::size_t>(ranks)), recv_bytes(static_cast<std::size_t>(ranks));
  std::size_t recv_total = 0;
  for (int q = 0; q < ranks; ++q) {
    send_bytes[std::size_t(q)] = std::size_t(rows.rows[std::size_t(q)] * own.size()) * sizeof(Scalar);
    recv_bytes[std::size_t(q)] = std::size_t(n * owned_tables(tables, q, ranks).size()) * sizeof(Scalar);
    recv_total += recv_bytes[std::size_t(q)];
  }
  std::vector<Scalar> recv(recv_total / sizeof(Scalar));
  comm.all_to_all(std::as_bytes(std::span<const Scalar>(local.data(), std::size_t(local.size()))), send_bytes,
                  std::as_writable_bytes(std::span<Scalar>(recv)), recv_bytes);
  const Scalar* in = recv.data();
  for (int s = 0; s < ranks; ++s) {
    const TableRange t = owned_tables(tables, s, ranks);
    for (Index i = 0; i < n; ++i, in += t.size())
      for (Index k = 0; k < t.size(); ++k) dscores(i, t.begin + k) += in[k];
  }
}

}  // namespace memoryformer::detail
