// SPDX-License-Identifier: MIT
// MpiCommunicator: Communicator over an MPI communicator (needs <mpi.h>: build with MEMORYFORMER_MPI or link MPI).
#pragma once

#include <mpi.h>

#include <climits>
#include <cstdlib>
#include <cstddef>
#include <numeric>
#include <span>
#include <string>
#include <vector>

#include "../error.hpp"
#include "communicator.hpp"

namespace memoryformer {

/**
 * @brief The ranks of an MPI communicator (MPI_COMM_WORLD by default).
 *
 * The program owns MPI: it calls MPI_Init (or MPI_Init_thread; the library calls MPI from one thread at a time, so
 * MPI_THREAD_FUNNELED suffices) before constructing a MpiCommunicator and MPI_Finalize after the last one is
 * destroyed. The communicator works on a duplicate of the one given, with MPI_ERRORS_RETURN, so that the library's
 * messages never mix with the program's and an MPI failure becomes a DistributedError instead of ending the job.
 */
class MpiCommunicator final : public Communicator {
 public:
  /// @throws DistributedError when MPI is not initialised or the communicator cannot be duplicated.
  explicit MpiCommunicator(MPI_Comm comm = MPI_COMM_WORLD) {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (!initialized) throw DistributedError("MpiCommunicator: MPI is not initialised (call MPI_Init first)");
    check(MPI_Comm_dup(comm, &comm_), "MPI_Comm_dup");
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  ~MpiCommunicator() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
  }
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  /// The duplicated communicator the exchanges run on.
  MPI_Comm native() const { return comm_; }

  void all_to_all(std::span<const std::byte> send, std::span<const std::size_t> send_bytes,
                  std::span<std::byte> recv, std::span<const std::size_t> recv_bytes) override {
    const Layout s = layout("all_to_all", "send", send_bytes, send.size());
    const Layout r = layout("all_to_all", "recv", recv_bytes, recv.size());
    check(MPI_Alltoallv(send.data(), s.counts.data(), s.offsets.data(), MPI_BYTE, recv.data(), r.counts.data(),
                        r.offsets.data(), MPI_BYTE, comm_),
          "MPI_Alltoallv");
  }

  void all_gather(std::span<const std::byte> send, std::span<std::byte> recv,
                  std::span<const std::size_t> recv_bytes) override {
    const Layout r = layout("all_gather", "recv", recv_bytes, recv.size());
    if (send.size() != recv_bytes[std::size_t(rank_)])
      throw ShapeError("MpiCommunicator::all_gather: this rank sends " + std::to_string(send.size()) +
                       " bytes but its block in recv has " + std::to_string(recv_bytes[std::size_t(rank_)]));
    check(MPI_Allgatherv(send.data(), int(send.size()), MPI_BYTE, recv.data(), r.counts.data(), r.offsets.data(),
                         MPI_BYTE, comm_),
          "MPI_Allgatherv");
  }

  void barrier() override { check(MPI_Barrier(comm_), "MPI_Barrier"); }

  [[noreturn]] void abort(int code) noexcept override {
    MPI_Abort(comm_, code);
    std::_Exit(code);  // MPI_Abort does not return; this keeps [[noreturn]] honest if it ever did
  }

 private:
  struct Layout {
    std::vector<int> counts, offsets;
  };

  /// MPI counts and displacements are int: blocks and buffers past INT_MAX bytes are refused (the typed collectives
  /// split large reductions into pieces well below that).
  Layout layout(const char* call, const char* what, std::span<const std::size_t> bytes, std::size_t total) const {
    if (bytes.size() != std::size_t(size_))
      throw ShapeError("MpiCommunicator::" + std::string(call) + ": " + std::to_string(bytes.size()) + " " + what +
                       " counts for " + std::to_string(size_) + " ranks");
    Layout l;
    l.counts.resize(bytes.size());
    l.offsets.resize(bytes.size());
    std::size_t offset = 0;
    for (std::size_t q = 0; q < bytes.size(); ++q) {
      if (offset > std::size_t(INT_MAX) || bytes[q] > std::size_t(INT_MAX) - offset)
        throw DistributedError("MpiCommunicator::" + std::string(call) + ": the " + what + " buffer passes " +
                               std::to_string(INT_MAX) + " bytes at block " + std::to_string(q) +
                               " (MPI counts are int); exchange less per call");
      l.counts[q] = int(bytes[q]);
      l.offsets[q] = int(offset);
      offset += bytes[q];
    }
    if (offset != total)
      throw ShapeError("MpiCommunicator::" + std::string(call) + ": the " + what + " counts add up to " +
                       std::to_string(offset) + " bytes, the buffer has " + std::to_string(total));
    return l;
  }

  void check(int status, const char* call) const {
    if (status == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING];
    int length = 0;
    MPI_Error_string(status, text, &length);
    throw DistributedError("MpiCommunicator: " + std::string(call) + " failed on rank " + std::to_string(rank_) +
                           ": " + std::string(text, std::size_t(length)));
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
};

}  // namespace memoryformer
