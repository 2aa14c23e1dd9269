// SPDX-License-Identifier: MIT
// ThreadCommunicator: R ranks as R threads of one test process, so that the distributed algorithms are tested with
// several ranks without MPI (and under the sanitizers). Test support only.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstring>
#include <exception>
#include <functional>
#include <mutex>
#include <span>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <memoryformer/distributed/communicator.hpp>
#include <memoryformer/error.hpp>

namespace memoryformer_test {

/// What the ranks of one run share: a reusable barrier and each rank's posted buffers.
class ThreadGroup {
 public:
  explicit ThreadGroup(int ranks) : ranks_(ranks), posted_(std::size_t(ranks)) {}
  int size() const { return ranks_; }

  /// Waits for every rank; throws once any rank has failed, so that no rank waits forever for a dead one.
  void arrive() {
    std::unique_lock lock(mutex_);
    if (broken_) throw std::runtime_error("ThreadGroup: another rank failed");
    const std::size_t generation = generation_;
    if (++waiting_ == ranks_) {
      waiting_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    cv_.wait(lock, [&] { return generation_ != generation || broken_; });
    if (generation_ == generation) throw std::runtime_error("ThreadGroup: another rank failed");
  }
  void fail() {
    std::lock_guard lock(mutex_);
    broken_ = true;
    cv_.notify_all();
  }

  struct Posted {
    const std::byte* data = nullptr;
    std::span<const std::size_t> bytes;  // per destination block (all_to_all) or empty (all_gather)
    std::size_t size = 0;
  };
  std::vector<Posted>& posted() { return posted_; }

 private:
  int ranks_;
  std::mutex mutex_;
  std::condition_variable cv_;
  int waiting_ = 0;
  std::size_t generation_ = 0;
  bool broken_ = false;
  std::vector<Posted> posted_;
};

/// One rank of a ThreadGroup.
class ThreadCommunicator final : public memoryformer::Communicator {
 public:
  ThreadCommunicator(ThreadGroup& group, int rank) : group_(group), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return group_.size(); }

  void all_to_all(std::span<const std::byte> send, std::span<const std::size_t> send_bytes,
                  std::span<std::byte> recv, std::span<const std::size_t> recv_bytes) override {
    check(send_bytes, send.size());
    check(recv_bytes, recv.size());
    group_.posted()[std::size_t(rank_)] = {send.data(), send_bytes, send.size()};
    group_.arrive();
    std::size_t at = 0;
    for (int q = 0; q < size(); ++q) {
      const auto& peer = group_.posted()[std::size_t(q)];
      std::size_t offset = 0;
      for (int j = 0; j < rank_; ++j) offset += peer.bytes[std::size_t(j)];
      if (peer.bytes[std::size_t(rank_)] != recv_bytes[std::size_t(q)])
        throw memoryformer::ShapeError("ThreadCommunicator::all_to_all: rank " + std::to_string(q) + " sends " +
                                       std::to_string(peer.bytes[std::size_t(rank_)]) + " bytes, rank " +
                                       std::to_string(rank_) + " expects " +
                                       std::to_string(recv_bytes[std::size_t(q)]));
      if (recv_bytes[std::size_t(q)] != 0) std::memcpy(recv.data() + at, peer.data + offset, recv_bytes[std::size_t(q)]);
      at += recv_bytes[std::size_t(q)];
    }
    group_.arrive();  // the peers' buffers stay valid until everyone has copied
  }

  void all_gather(std::span<const std::byte> send, std::span<std::byte> recv,
                  std::span<const std::size_t> recv_bytes) override {
    check(recv_bytes, recv.size());
    group_.posted()[std::size_t(rank_)] = {send.data(), {}, send.size()};
    group_.arrive();
    std::size_t at = 0;
    for (int q = 0; q < size(); ++q) {
      const auto& peer = group_.posted()[std::size_t(q)];
      if (peer.size != recv_bytes[std::size_t(q)])
        throw memoryformer::ShapeError("ThreadCommunicator::all_gather: rank " + std::to_string(q) + " sends " +
                                       std::to_string(peer.size) + " bytes, " + std::to_string(recv_bytes[std::size_t(q)]) +
                                       " expected");
      if (peer.size != 0) std::memcpy(recv.data() + at, peer.data, peer.size);
      at += peer.size;
    }
    group_.arrive();
  }

  void barrier() override { group_.arrive(); }
  [[noreturn]] void abort(int) noexcept override { std::terminate(); }

 private:
  void check(std::span<const std::size_t> bytes, std::size_t total) const {
    std::size_t sum = 0;
    for (std::size_t b : bytes) sum += b;
    if (bytes.size() != std::size_t(size()) || sum != total)
      throw memoryformer::ShapeError("ThreadCommunicator: block counts do not describe the buffer");
  }

  ThreadGroup& group_;
  int rank_;
};

/// Runs body(communicator) on `ranks` threads, one rank each; rethrows the first rank's exception after all end.
inline void run_ranks(int ranks, const std::function<void(memoryformer::Communicator&)>& body) {
  ThreadGroup group(ranks);
  std::mutex mutex;
  std::exception_ptr first;  // the first failure in time: the others are ranks released from a wait by it
  std::vector<std::thread> threads;
  for (int r = 0; r < ranks; ++r)
    threads.emplace_back([&, r] {
      ThreadCommunicator comm(group, r);
      try {
        body(comm);
      } catch (...) {
        {
          std::lock_guard lock(mutex);
          if (!first) first = std::current_exception();
        }
        group.fail();
      }
    });
  for (auto& t : threads) t.join();
  if (first) std::rethrow_exception(first);
}

}  // namespace memoryformer_test
