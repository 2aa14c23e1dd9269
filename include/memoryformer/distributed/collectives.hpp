// SPDX-License-Identifier: MIT
// Typed collectives on a Communicator: allgather of values and of variable-length lists, and a sum over ranks whose
// result has the same bits on every rank and, for a given rank count, in every run (design §11.1).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <span>
#include <type_traits>
#include <vector>

#include "../detail/checked_size.hpp"
#include "communicator.hpp"

namespace memoryformer {

/// Every rank's `value`, in rank order.
template <class T>
  requires std::is_trivially_copyable_v<T>
std::vector<T> all_gather_value(Communicator& comm, const T& value) {
  std::vector<T> out(std::size_t(comm.size()));
  const std::vector<std::size_t> bytes(out.size(), sizeof(T));
  comm.all_gather(std::as_bytes(std::span<const T>(&value, 1)), std::as_writable_bytes(std::span<T>(out)), bytes);
  return out;
}

/**
 * @brief Every rank's list, concatenated in rank order (lists may differ in length).
 * @param counts if not null, receives each rank's length
 */
template <class T>
  requires std::is_trivially_copyable_v<T>
std::vector<T> all_gather_list(Communicator& comm, std::span<const T> mine, std::vector<std::size_t>* counts = nullptr) {
  const std::vector<std::size_t> lengths = all_gather_value<std::size_t>(comm, mine.size());
  std::vector<std::size_t> bytes(lengths.size());
  std::size_t total = 0;
  for (std::size_t q = 0; q < lengths.size(); ++q) {
    bytes[q] = detail::checked_mul("all_gather_list", "list bytes", Index(lengths[q]), Index(sizeof(T)));
    total = detail::checked_add("all_gather_list", "total length", Index(total), Index(lengths[q]));
  }
  std::vector<T> out(total);
  comm.all_gather(std::as_bytes(mine), std::as_writable_bytes(std::span<T>(out)), bytes);
  if (counts != nullptr) *counts = lengths;
  return out;
}

/**
 * @brief Replaces `data` on every rank by the element-wise sum of all ranks' `data` (same length everywhere).
 *
 * Deterministic: the buffer is cut into size() segments; rank q receives segment q from every rank (one all-to-all),
 * adds the contributions in rank order 0, 1, …, and sends its sum to everyone (one allgather). So every element is
 * ((x_0 + x_1) + x_2) + … on every rank — the same bits on all ranks and in every run with this rank count, whatever
 * algorithm the transport would have chosen for a reduction. Each rank sends and receives 2·(R−1)/R of the buffer,
 * as a ring allreduce does. Buffers of more than `piece_elements` elements go in pieces of that many.
 * @throws DistributedError as the Communicator
 */
template <class T>
  requires std::is_arithmetic_v<T>
void all_reduce_sum(Communicator& comm, std::span<T> data, std::size_t piece_elements = std::size_t(1) << 24) {
  const std::size_t ranks = std::size_t(comm.size()), me = std::size_t(comm.rank());
  if (ranks == 1) return;
  piece_elements = std::max<std::size_t>(piece_elements, 1);
  std::vector<T> received, mine;
  std::vector<std::size_t> send_bytes(ranks), recv_bytes(ranks), segment_bytes(ranks);
  for (std::size_t first = 0; first < data.size(); first += piece_elements) {
    const std::span<T> piece = data.subspan(first, std::min(piece_elements, data.size() - first));
    const std::size_t n = piece.size();
    // Segment q is [n·q/R, n·(q+1)/R): contiguous in rank order, so the piece itself is the send buffer.
    auto begin = [&](std::size_t q) { return n * q / ranks; };
    const std::size_t my_length = begin(me + 1) - begin(me);
    for (std::size_t q = 0; q < ranks; ++q) {
      send_bytes[q] = (begin(q + 1) - begin(q)) * sizeof(T);
      recv_bytes[q] = my_length * sizeof(T);
      segment_bytes[q] = send_bytes[q];
    }
    received.resize(my_length * ranks);
    comm.all_to_all(std::as_bytes(std::span<const T>(piece)), send_bytes,
                    std::as_writable_bytes(std::span<T>(received)), recv_bytes);
    mine.assign(received.begin(), received.begin() + std::ptrdiff_t(my_length));
    for (std::size_t q = 1; q < ranks; ++q)
      for (std::size_t i = 0; i < my_length; ++i) mine[i] = T(mine[i] + received[q * my_length + i]);
    comm.all_gather(std::as_bytes(std::span<const T>(mine)), std::as_writable_bytes(piece), segment_bytes);
  }
}

/// all_reduce_sum of one value.
template <class T>
  requires std::is_arithmetic_v<T>
T all_reduce_sum(Communicator& comm, T value) {
  const std::vector<T> all = all_gather_value(comm, value);
  T sum = all[0];
  for (std::size_t q = 1; q < all.size(); ++q) sum = T(sum + all[q]);
  return sum;
}

}  // namespace memoryformer
