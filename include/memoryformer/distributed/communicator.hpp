// SPDX-License-Identifier: MIT
// Communicator: the ranks of a distributed run and the two exchanges every distributed algorithm of the library is
// built from (an all-to-all and an allgather of byte blocks), so that the algorithms need no MPI header (design §11).
#pragma once

#include <cstddef>
#include <span>

namespace memoryformer {

/**
 * @brief The processes ("ranks") of one distributed run, numbered 0 … size()−1, and the collective exchanges
 *        between them.
 *
 * Every call is *collective*: all ranks make the same calls in the same order, each with its own data, and a call
 * returns on a rank when that rank's part is done. A rank that stops making calls (an exception, a crash) leaves the
 * others waiting: a program catches exceptions at its top and calls abort(), which ends every rank of the run (see
 * docs/distributed.md).
 *
 * Blocks are bytes; the typed collectives (collectives.hpp) are built on these two. MpiCommunicator
 * (mpi_communicator.hpp) runs them over MPI; SelfCommunicator (self_communicator.hpp) is the one-rank run.
 */
class Communicator {
 public:
  virtual ~Communicator() = default;

  /// This process's number, in [0, size()).
  virtual int rank() const = 0;
  /// The number of ranks, ≥ 1.
  virtual int size() const = 0;

  /**
   * @brief All-to-all: this rank sends block q of `send` to rank q and receives rank q's block for it into block q
   *        of `recv`. Blocks lie back to back in rank order; block q has send_bytes[q] bytes in `send` and
   *        recv_bytes[q] bytes in `recv`, and recv_bytes[q] here equals send_bytes[this rank] on rank q.
   * @param send_bytes, recv_bytes size() counts each; their sums are send.size() and recv.size().
   * @throws ShapeError for counts that do not fit the buffers; DistributedError when the exchange fails.
   */
  virtual void all_to_all(std::span<const std::byte> send, std::span<const std::size_t> send_bytes,
                          std::span<std::byte> recv, std::span<const std::size_t> recv_bytes) = 0;

  /**
   * @brief Allgather: every rank's `send` block, concatenated in rank order into `recv` on every rank. Block q has
   *        recv_bytes[q] bytes, and recv_bytes[this rank] equals send.size(). `send` must not overlap `recv`.
   * @throws ShapeError for counts that do not fit the buffers; DistributedError when the exchange fails.
   */
  virtual void all_gather(std::span<const std::byte> send, std::span<std::byte> recv,
                          std::span<const std::size_t> recv_bytes) = 0;

  /// Returns once every rank has called it. @throws DistributedError when the exchange fails.
  virtual void barrier() = 0;

  /// Ends every rank of the run with exit code `code` (after an error that leaves this rank unable to follow the
  /// others). Never returns.
  [[noreturn]] virtual void abort(int code) noexcept = 0;
};

}  // namespace memoryformer
