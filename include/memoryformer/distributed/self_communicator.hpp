// SPDX-License-Identifier: MIT
// SelfCommunicator: a distributed run of one rank, in which every exchange is a copy.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <span>

#include "../detail/checks.hpp"
#include "../error.hpp"
#include "communicator.hpp"

namespace memoryformer {

/// The one-rank Communicator: rank 0 of 1. Code written against Communicator runs unchanged in a single process
/// with it (and its tests need no MPI).
class SelfCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }

  void all_to_all(std::span<const std::byte> send, std::span<const std::size_t> send_bytes,
                  std::span<std::byte> recv, std::span<const std::size_t> recv_bytes) override {
    check(send_bytes, send.size(), "send");
    check(recv_bytes, recv.size(), "recv");
    if (send.size() != recv.size()) throw ShapeError("SelfCommunicator::all_to_all: send and recv sizes differ");
    std::copy(send.begin(), send.end(), recv.begin());
  }

  void all_gather(std::span<const std::byte> send, std::span<std::byte> recv,
                  std::span<const std::size_t> recv_bytes) override {
    check(recv_bytes, recv.size(), "recv");
    if (send.size() != recv.size()) throw ShapeError("SelfCommunicator::all_gather: send and recv sizes differ");
    std::copy(send.begin(), send.end(), recv.begin());
  }

  void barrier() override {}

  [[noreturn]] void abort(int code) noexcept override { std::_Exit(code); }

 private:
  static void check(std::span<const std::size_t> counts, std::size_t bytes, const char* what) {
    if (counts.size() != 1 || counts[0] != bytes)
      throw ShapeError(std::string("SelfCommunicator: the ") + what + " counts do not describe one block of " +
                       std::to_string(bytes) + " bytes");
  }
};

}  // namespace memoryformer
