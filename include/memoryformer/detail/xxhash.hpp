// SPDX-License-Identifier: MIT
// Thin C++ wrappers over xxHash's XXH3-64 (one-shot and streaming), used for the checkpoint checksums (no design section).
#pragma once

// The only header of the library that includes <xxhash.h>. It links against libxxhash (CMake: xxHash::xxhash)
// rather than use XXH_INLINE_ALL, whose static functions would make these inline wrappers differ per TU.
#include <xxhash.h>

#include <cstddef>
#include <cstdint>
#include <new>
#include <utility>

namespace memoryformer::detail {

/// XXH3-64 of `size` bytes at `data` (data may be null when size is 0).
inline std::uint64_t xxh3_64(const void* data, std::size_t size, std::uint64_t seed = 0) noexcept {
  return static_cast<std::uint64_t>(XXH3_64bits_withSeed(data, size, static_cast<XXH64_hash_t>(seed)));
}

/**
 * @brief Streaming XXH3-64: feeding the bytes in any number of update() calls gives the same digest as xxh3_64
 *        over their concatenation. Move-only owner of an XXH3_state_t; a moved-from stream may only be destroyed
 *        or assigned to.
 * @throws std::bad_alloc when xxHash cannot allocate its state.
 */
class Xxh3Stream {
 public:
  explicit Xxh3Stream(std::uint64_t seed = 0) : state_(XXH3_createState()) {
    if (state_ == nullptr) throw std::bad_alloc();
    reset(seed);
  }
  Xxh3Stream(const Xxh3Stream&) = delete;
  Xxh3Stream& operator=(const Xxh3Stream&) = delete;
  Xxh3Stream(Xxh3Stream&& other) noexcept : state_(std::exchange(other.state_, nullptr)) {}
  Xxh3Stream& operator=(Xxh3Stream&& other) noexcept {
    if (this != &other) {
      if (state_ != nullptr) XXH3_freeState(state_);
      state_ = std::exchange(other.state_, nullptr);
    }
    return *this;
  }
  ~Xxh3Stream() {
    if (state_ != nullptr) XXH3_freeState(state_);
  }

  /// Starts over with `seed`, forgetting every byte fed so far.
  void reset(std::uint64_t seed = 0) noexcept {
    // Only fails for a null state, which the constructor excludes.
    (void)XXH3_64bits_reset_withSeed(state_, static_cast<XXH64_hash_t>(seed));
  }

  /// Feeds `size` more bytes (data may be null when size is 0).
  void update(const void* data, std::size_t size) noexcept {
    if (size == 0) return;
    (void)XXH3_64bits_update(state_, data, size);
  }

  /// The hash of every byte fed since construction or the last reset(); feeding may continue afterwards.
  std::uint64_t digest() const noexcept { return static_cast<std::uint64_t>(XXH3_64bits_digest(state_)); }

 private:
  XXH3_state_t* state_;
};

}  // namespace memoryformer::detail
