// SPDX-License-Identifier: MIT
// Test support: locates the fields of a serialized checkpoint (io/checkpoint_format.hpp layout) and recomputes its
// checksums, so tests can craft files that pass the checksums and reach the deeper checks of the loader.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <memoryformer/detail/xxhash.hpp>

namespace memoryformer::testing_support {

using CheckpointBytes = std::vector<std::byte>;

/// File positions of one directory entry's fields.
struct EntryFields {
  std::string name;
  std::size_t dims_at = 0;    // rank × u64
  std::size_t rank = 0;
  std::size_t offset_at = 0;  // u64 byte offset
  std::size_t size_at = 0;    // u64 byte size
  std::size_t hash_at = 0;    // u64 XXH3-64 of the data
};

template <class T>
T get_at(const CheckpointBytes& b, std::size_t at) {
  T v{};
  if (at + sizeof(T) <= b.size()) std::memcpy(&v, b.data() + at, sizeof(T));
  return v;
}

template <class T>
void put_at(CheckpointBytes& b, std::size_t at, T v) {
  if (at + sizeof(T) <= b.size()) std::memcpy(b.data() + at, &v, sizeof(T));
}

/// The directory of a well-formed serialized checkpoint (as serialize_checkpoint writes it).
inline std::vector<EntryFields> directory_of(const CheckpointBytes& b) {
  std::size_t pos = 32;
  const auto n_config = get_at<std::uint32_t>(b, pos);
  const auto n_tensors = get_at<std::uint32_t>(b, pos + 4);
  pos = 40;
  for (std::uint32_t i = 0; i < 2 * n_config; ++i) pos += 4 + get_at<std::uint32_t>(b, pos);
  std::vector<EntryFields> out;
  for (std::uint32_t i = 0; i < n_tensors; ++i) {
    EntryFields e;
    const auto len = get_at<std::uint32_t>(b, pos);
    e.name.assign(reinterpret_cast<const char*>(b.data() + pos + 4), len);
    pos += 4 + len;
    e.rank = std::size_t(get_at<std::uint8_t>(b, pos + 1));
    pos += 4;
    e.dims_at = pos;
    pos += 8 * e.rank;
    e.offset_at = pos;
    e.size_at = pos + 8;
    e.hash_at = pos + 16;
    pos += 24;
    out.push_back(e);
  }
  return out;
}

/// Recomputes every tensor checksum (for entries whose range lies in the file) and the whole-file checksum.
inline void fix_checksums(CheckpointBytes& b, const std::vector<EntryFields>& dir) {
  if (b.size() < 48) return;
  for (const auto& e : dir) {
    const auto off = get_at<std::uint64_t>(b, e.offset_at);
    const auto size = get_at<std::uint64_t>(b, e.size_at);
    if (off <= b.size() && size <= b.size() - off)
      put_at<std::uint64_t>(b, e.hash_at, detail::xxh3_64(b.data() + off, std::size_t(size)));
  }
  put_at<std::uint64_t>(b, b.size() - 8, detail::xxh3_64(b.data(), b.size() - 8));
}

}  // namespace memoryformer::testing_support
