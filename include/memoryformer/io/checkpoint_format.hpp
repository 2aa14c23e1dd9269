// SPDX-License-Identifier: MIT
// The checkpoint byte format: the in-memory Checkpoint (config + named f32/f64 tensors), its encoding with XXH3-64
// checksums, and a decoder that validates every byte it reads (serialize_checkpoint, parse_checkpoint).
#pragma once

/*
 * File layout, format version 1. Integers are unsigned, in the byte order of the machine that wrote the file
 * (recorded by the marker; a loader accepts only its own order, it does not byte-swap). Offsets are from byte 0.
 *
 *   offset  size  field
 *   0       4     magic "MFRM"
 *   4       4     u32 format version (1)
 *   8       4     u32 byte-order marker 0x01020304 (reads as 0x04030201 on a machine of the other order)
 *   12      4     u32 reserved, 0
 *   16      8     u64 file size in bytes, including the trailing checksum
 *   24      8     u64 header size: bytes 0 .. end of the tensor directory
 *   32      4     u32 number of config entries C
 *   36      4     u32 number of tensors T
 *   40            C config entries:  u32 key length, key bytes, u32 value length, value bytes
 *                 T directory entries: u32 name length, name bytes, u8 dtype (1 = f32, 2 = f64), u8 rank (0..8),
 *                                      u16 reserved 0, rank × u64 dims, u64 byte offset, u64 byte size,
 *                                      u64 XXH3-64 (seed 0) of the tensor's bytes
 *   header size   zero padding to a multiple of 64, then the tensors in directory order, each at a 64-byte aligned
 *                 offset (zero padding between), values row-major in the writer's byte order
 *   file size − 8 u64 XXH3-64 (seed 0) of bytes [0, file size − 8)
 *
 * Strings are raw bytes (UTF-8 by convention, not checked). Names and config keys are unique. A rank-0 tensor
 * holds one value. The loader does not require the exact padding above; it requires every tensor to lie inside
 * [header size, file size − 8), at a 64-aligned offset, without overlapping another, with byte size equal to
 * (product of dims) × (dtype size). An empty tensor overlaps a tensor whose range contains its offset strictly
 * inside (it may sit at the start or end of a range, or share its offset with other empty tensors), so the tensors
 * together never declare more bytes than the file holds.
 */

#include <algorithm>
#include <bit>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <ranges>
#include <span>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "../config.hpp"
#include "../detail/xxhash.hpp"
#include "../dtype.hpp"
#include "../error.hpp"
#include "../types.hpp"

namespace memoryformer {

namespace detail::ckpt {

// Built with append: GCC 12 reports a false -Wrestrict for "'" + std::string(s) at -O3 (GCC bug 105329).
inline std::string quote_name(std::string_view s) {
  std::string out;
  out.reserve(s.size() + 2);
  out.push_back('\'');
  out.append(s);
  out.push_back('\'');
  return out;
}

inline std::string shape_text(std::span<const Index> shape) {
  std::ostringstream os;
  os << '(';
  for (std::size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << ')';
  return os.str();
}

/// Product of dims (1 for rank 0); false when a dim is negative or the product overflows Index.
inline bool checked_numel(std::span<const Index> shape, Index& out) {
  Index n = 1;
  for (Index d : shape) {
    if (d < 0 || __builtin_mul_overflow(n, d, &n)) return false;
  }
  out = n;
  return true;
}

template <class Range>
concept ReadableScalarRange = std::ranges::contiguous_range<Range> && std::ranges::sized_range<Range> &&
                              CheckpointScalar<std::remove_cv_t<std::ranges::range_value_t<Range>>>;

template <class Range>
concept WritableScalarRange =
    ReadableScalarRange<Range> && !std::is_const_v<std::remove_reference_t<std::ranges::range_reference_t<Range>>>;

}  // namespace detail::ckpt

/// One named tensor of a checkpoint; its values are kept as raw bytes in this machine's byte order.
struct CheckpointTensor {
  std::string name;              ///< unique within a checkpoint, e.g. "blocks.0.q.tables"
  DType dtype = DType::F32;      ///< element type of `bytes`
  std::vector<Index> shape;      ///< row-major shape; empty = a single value
  std::vector<std::byte> bytes;  ///< numel() × dtype_size(dtype) bytes, row-major

  /// Product of the shape (1 for rank 0). @throws ShapeError for a negative or overflowing shape.
  Index numel() const {
    Index n = 0;
    if (!detail::ckpt::checked_numel(shape, n))
      throw ShapeError("CheckpointTensor::numel: tensor " + detail::ckpt::quote_name(name) + " has an invalid shape " +
                       detail::ckpt::shape_text(shape));
    return n;
  }

  /**
   * @brief A tensor holding a copy of `values` (float or double; any contiguous range, e.g. std::vector, std::span).
   * @throws ShapeError if the shape has a negative dim or its product differs from values.size().
   */
  template <detail::ckpt::ReadableScalarRange Range>
  static CheckpointTensor from_values(std::string name, std::vector<Index> shape, const Range& values) {
    using S = std::remove_cv_t<std::ranges::range_value_t<Range>>;
    CheckpointTensor t;
    t.name = std::move(name);
    t.dtype = dtype_of<S>();
    t.shape = std::move(shape);
    Index n = 0;
    if (!detail::ckpt::checked_numel(t.shape, n) || n != Index(std::ranges::size(values)))
      throw ShapeError("CheckpointTensor::from_values: tensor " + detail::ckpt::quote_name(t.name) + " has shape " +
                       detail::ckpt::shape_text(t.shape) + " but " + std::to_string(std::ranges::size(values)) +
                       " values");
    t.bytes.resize(std::size_t(n) * sizeof(S));
    if (n > 0) std::memcpy(t.bytes.data(), std::ranges::data(values), t.bytes.size());
    return t;
  }

  /**
   * @brief Copies the values into `out` (float or double, exactly numel() elements).
   * @param allow_conversion convert f64 ↔ f32 (round to nearest) when the dtypes differ; otherwise that is an error.
   * @throws FormatError when the element count differs, or the dtype differs and conversion is not allowed;
   *         ShapeError when `bytes` does not match the shape (a hand-built tensor).
   */
  template <detail::ckpt::WritableScalarRange Range>
  void copy_to(Range&& out, bool allow_conversion = false) const {
    using S = std::remove_cv_t<std::ranges::range_value_t<Range>>;
    const Index n = numel();
    if (bytes.size() != std::size_t(n) * dtype_size(dtype))
      throw ShapeError("CheckpointTensor::copy_to: tensor " + detail::ckpt::quote_name(name) + " has " +
                       std::to_string(bytes.size()) + " bytes, its shape " + detail::ckpt::shape_text(shape) + " and dtype " +
                       dtype_name(dtype) + " need " + std::to_string(std::size_t(n) * dtype_size(dtype)));
    if (Index(std::ranges::size(out)) != n)
      throw FormatError("tensor " + detail::ckpt::quote_name(name) + " has " + std::to_string(n) + " values (shape " +
                        detail::ckpt::shape_text(shape) + "), the destination has " +
                        std::to_string(std::ranges::size(out)));
    S* dst = std::ranges::data(out);
    if (dtype == dtype_of<S>()) {
      if (n > 0) std::memcpy(dst, bytes.data(), bytes.size());
      return;
    }
    if (!allow_conversion)
      throw FormatError(std::string("tensor ") + detail::ckpt::quote_name(name) + " is " + dtype_name(dtype) +
                        " in the checkpoint, the destination is " + dtype_name(dtype_of<S>()) +
                        " (allow conversion to convert it)");
    // memcpy per element: `bytes` holds no float/double objects, so reading it through a cast pointer would be UB.
    if (dtype == DType::F64) {
      for (Index i = 0; i < n; ++i) {
        double v;
        std::memcpy(&v, bytes.data() + std::size_t(i) * 8, 8);
        dst[i] = S(v);
      }
    } else {
      for (Index i = 0; i < n; ++i) {
        float v;
        std::memcpy(&v, bytes.data() + std::size_t(i) * 4, 4);
        dst[i] = S(v);
      }
    }
  }

  /// The values as a std::vector<S>; see copy_to for conversion and errors.
  template <CheckpointScalar S>
  std::vector<S> values(bool allow_conversion = false) const {
    std::vector<S> out(static_cast<std::size_t>(numel()));
    copy_to(out, allow_conversion);
    return out;
  }
};

/// An in-memory checkpoint: string config pairs (e.g. "tau" → "8") and named tensors, both in insertion order.
struct Checkpoint {
  std::vector<std::pair<std::string, std::string>> config;  ///< unique keys
  std::vector<CheckpointTensor> tensors;                    ///< unique names

  /// Sets `key` to `value`, replacing an existing entry in place or appending a new one.
  void set_config(std::string key, std::string value) {
    for (auto& [k, v] : config) {
      if (k == key) {
        v = std::move(value);
        return;
      }
    }
    config.emplace_back(std::move(key), std::move(value));
  }

  /// The value of `key`, or nullptr.
  const std::string* find_config(std::string_view key) const {
    for (const auto& [k, v] : config)
      if (k == key) return &v;
    return nullptr;
  }

  /**
   * @brief Appends a tensor holding a copy of `values` (float or double; any contiguous range).
   * @throws ConfigError if a tensor of that name exists; ShapeError if the shape does not match values.size().
   */
  template <detail::ckpt::ReadableScalarRange Range>
  CheckpointTensor& add_tensor(std::string name, std::vector<Index> shape, const Range& values) {
    if (find_tensor(name) != nullptr)
      throw ConfigError("Checkpoint::add_tensor: a tensor named " + detail::ckpt::quote_name(name) + " already exists");
    tensors.push_back(CheckpointTensor::from_values(std::move(name), std::move(shape), values));
    return tensors.back();
  }

  /// The tensor called `name`, or nullptr.
  const CheckpointTensor* find_tensor(std::string_view name) const {
    for (const auto& t : tensors)
      if (t.name == name) return &t;
    return nullptr;
  }

  /// The tensor called `name`. @throws FormatError if there is none.
  const CheckpointTensor& tensor(std::string_view name) const {
    if (const auto* t = find_tensor(name)) return *t;
    throw FormatError("checkpoint has no tensor named " + detail::ckpt::quote_name(name));
  }

  /**
   * @brief Copies tensor `name` into `out` (exactly its element count). See CheckpointTensor::copy_to.
   * @throws FormatError if the tensor is missing, its size differs, or its dtype differs and !allow_conversion.
   */
  template <detail::ckpt::WritableScalarRange Range>
  void copy_tensor(std::string_view name, Range&& out, bool allow_conversion = false) const {
    tensor(name).copy_to(std::forward<Range>(out), allow_conversion);
  }

  /// As copy_tensor above, and the stored shape must equal `expected_shape`. @throws FormatError naming both.
  template <detail::ckpt::WritableScalarRange Range>
  void copy_tensor(std::string_view name, std::span<const Index> expected_shape, Range&& out,
                   bool allow_conversion = false) const {
    const auto& t = tensor(name);
    if (!std::ranges::equal(t.shape, expected_shape))
      throw FormatError("tensor " + detail::ckpt::quote_name(name) + " has shape " + detail::ckpt::shape_text(t.shape) +
                        " in the checkpoint, expected " + detail::ckpt::shape_text(expected_shape));
    t.copy_to(std::forward<Range>(out), allow_conversion);
  }
};

namespace detail::ckpt {

inline constexpr char checkpoint_magic[4] = {'M', 'F', 'R', 'M'};
inline constexpr std::uint32_t checkpoint_version = 1;
inline constexpr std::uint32_t checkpoint_byte_order_marker = 0x01020304u;
inline constexpr std::uint64_t checkpoint_preamble_size = 40;
inline constexpr std::uint64_t checkpoint_alignment = 64;
inline constexpr std::uint64_t checkpoint_max_rank = 8;
/// Larger dims are rejected as corrupt; a legitimate dim is bounded by memory long before 2^48.
inline constexpr std::uint64_t checkpoint_max_dim = std::uint64_t(1) << 48;

inline std::string hex64(std::uint64_t v) {
  static constexpr char digits[] = "0123456789abcdef";
  std::string s = "0x0000000000000000";
  for (int i = 0; i < 16; ++i) s[std::size_t(17 - i)] = digits[(v >> (4 * i)) & 0xF];
  return s;
}

/// The first name that occurs twice among key(item) of `items` (O(n log n): counts in a file may be large).
template <class Items, class Key>
std::optional<std::string> first_duplicate(const Items& items, Key key) {
  std::vector<std::string_view> names;
  names.reserve(items.size());
  for (const auto& item : items) names.push_back(key(item));
  std::ranges::sort(names);
  if (const auto it = std::ranges::adjacent_find(names); it != names.end()) return std::string(*it);
  return std::nullopt;
}

constexpr std::uint64_t align_up(std::uint64_t v, std::uint64_t a) { return (v + a - 1) / a * a; }

/// What the writer needs of one tensor: a view, so save_parameters can write parameters without copying them.
struct TensorToWrite {
  std::string_view name;
  DType dtype;
  std::span<const Index> shape;
  std::span<const std::byte> bytes;
};

/// Everything the writer needs, checked by validate_for_write.
struct CheckpointToWrite {
  std::span<const std::pair<std::string, std::string>> config;
  std::vector<TensorToWrite> tensors;
};

inline CheckpointToWrite view_for_write(const Checkpoint& ckpt) {
  CheckpointToWrite w;
  w.config = ckpt.config;
  w.tensors.reserve(ckpt.tensors.size());
  for (const auto& t : ckpt.tensors) w.tensors.push_back({t.name, t.dtype, t.shape, t.bytes});
  return w;
}

/// Throws ConfigError/ShapeError for anything the format cannot represent, before a byte is written.
inline void validate_for_write(std::string_view where, const CheckpointToWrite& w) {
  constexpr std::uint64_t max_len = std::numeric_limits<std::uint32_t>::max();
  if (w.config.size() > max_len || w.tensors.size() > max_len)
    throw ConfigError(std::string(where) + ": too many config entries or tensors");
  for (const auto& [k, v] : w.config)
    if (k.size() > max_len || v.size() > max_len)
      throw ConfigError(std::string(where) + ": config entry " + quote_name(k) + " is too long");
  if (const auto dup = first_duplicate(w.config, [](const auto& kv) -> std::string_view { return kv.first; }))
    throw ConfigError(std::string(where) + ": duplicate config key " + quote_name(*dup));
  if (const auto dup = first_duplicate(w.tensors, [](const TensorToWrite& t) { return t.name; }))
    throw ConfigError(std::string(where) + ": duplicate tensor name " + quote_name(*dup));
  for (const auto& t : w.tensors) {
    if (t.name.size() > max_len) throw ConfigError(std::string(where) + ": a tensor name is too long");
    if (t.dtype != DType::F32 && t.dtype != DType::F64)
      throw ConfigError(std::string(where) + ": tensor " + quote_name(t.name) + " has an invalid dtype " +
                        std::to_string(int(t.dtype)));
    if (t.shape.size() > checkpoint_max_rank)
      throw ShapeError(std::string(where) + ": tensor " + quote_name(t.name) + " has rank " +
                       std::to_string(t.shape.size()) + ", at most " + std::to_string(checkpoint_max_rank) +
                       " is supported");
    Index n = 0;
    bool ok = checked_numel(t.shape, n);
    for (Index d : t.shape) ok = ok && std::uint64_t(d) < checkpoint_max_dim;
    if (!ok) throw ShapeError(std::string(where) + ": tensor " + quote_name(t.name) + " has an invalid shape " + shape_text(t.shape));
    std::size_t expected = 0;
    if (__builtin_mul_overflow(std::size_t(n), dtype_size(t.dtype), &expected) || expected != t.bytes.size())
      throw ShapeError(std::string(where) + ": tensor " + quote_name(t.name) + " has " + std::to_string(t.bytes.size()) +
                       " bytes, its shape " + shape_text(t.shape) + " and dtype " + dtype_name(t.dtype) + " need " +
                       std::to_string(std::size_t(n) * dtype_size(t.dtype)));
  }
}

template <class T>
void put_raw(std::vector<std::byte>& out, const T& v) {
  const auto* p = reinterpret_cast<const std::byte*>(&v);
  out.insert(out.end(), p, p + sizeof(T));
}

inline void put_string(std::vector<std::byte>& out, std::string_view s) {
  put_raw(out, std::uint32_t(s.size()));
  const auto* p = reinterpret_cast<const std::byte*>(s.data());
  out.insert(out.end(), p, p + s.size());
}

/**
 * Streams a validated checkpoint into `sink(const void*, size_t)`. Two passes over tensor data: one for the
 * per-tensor checksums the directory needs, one to write (while hashing the whole file).
 */
template <class Sink>
void write_checkpoint(const CheckpointToWrite& w, Sink&& sink) {
  std::vector<std::byte> header;
  header.insert(header.end(), reinterpret_cast<const std::byte*>(checkpoint_magic),
                reinterpret_cast<const std::byte*>(checkpoint_magic) + 4);
  put_raw(header, checkpoint_version);
  put_raw(header, checkpoint_byte_order_marker);
  put_raw(header, std::uint32_t(0));
  const std::size_t file_size_at = header.size();
  put_raw(header, std::uint64_t(0));  // file size, patched below
  put_raw(header, std::uint64_t(0));  // header size, patched below
  put_raw(header, std::uint32_t(w.config.size()));
  put_raw(header, std::uint32_t(w.tensors.size()));
  for (const auto& [k, v] : w.config) {
    put_string(header, k);
    put_string(header, v);
  }
  // The header size does not depend on the offset values, so compute it first and lay out the blob after it.
  std::uint64_t header_size = header.size();
  for (const auto& t : w.tensors) header_size += 4 + t.name.size() + 4 + 8 * t.shape.size() + 24;
  std::uint64_t pos = header_size;
  std::vector<std::uint64_t> offsets;
  offsets.reserve(w.tensors.size());
  for (const auto& t : w.tensors) {
    pos = align_up(pos, checkpoint_alignment);
    offsets.push_back(pos);
    pos += t.bytes.size();
  }
  const std::uint64_t file_size = pos + 8;
  for (std::size_t i = 0; i < w.tensors.size(); ++i) {
    const auto& t = w.tensors[i];
    put_string(header, t.name);
    put_raw(header, std::uint8_t(t.dtype));
    put_raw(header, std::uint8_t(t.shape.size()));
    put_raw(header, std::uint16_t(0));
    for (Index d : t.shape) put_raw(header, std::uint64_t(d));
    put_raw(header, offsets[i]);
    put_raw(header, std::uint64_t(t.bytes.size()));
    put_raw(header, xxh3_64(t.bytes.data(), t.bytes.size()));
  }
  MEMORYFORMER_ASSERT(header.size() == header_size);
  std::memcpy(header.data() + file_size_at, &file_size, 8);
  std::memcpy(header.data() + file_size_at + 8, &header_size, 8);

  Xxh3Stream hash;
  auto emit = [&](const void* data, std::size_t size) {
    if (size == 0) return;
    hash.update(data, size);
    sink(data, size);
  };
  static constexpr std::byte zeros[checkpoint_alignment] = {};
  emit(header.data(), header.size());
  pos = header.size();
  for (std::size_t i = 0; i < w.tensors.size(); ++i) {
    emit(zeros, std::size_t(offsets[i] - pos));
    emit(w.tensors[i].bytes.data(), w.tensors[i].bytes.size());
    pos = offsets[i] + w.tensors[i].bytes.size();
  }
  const std::uint64_t digest = hash.digest();
  sink(&digest, 8);
}

/// Bounds-checked cursor over the header bytes; every read failure is a FormatError naming the field.
class HeaderCursor {
 public:
  HeaderCursor(std::span<const std::byte> bytes, std::size_t pos, const std::string& origin)
      : bytes_(bytes), pos_(pos), origin_(origin) {}

  template <class T>
  T read(const char* what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, bytes_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }

  std::string read_string(const char* what) {
    const auto len = read<std::uint32_t>(what);
    need(len, what);
    std::string s(reinterpret_cast<const char*>(bytes_.data() + pos_), len);
    pos_ += len;
    return s;
  }

  std::size_t pos() const { return pos_; }
  std::size_t remaining() const { return bytes_.size() - pos_; }

  [[noreturn]] void fail(const std::string& why) const {
    throw FormatError(origin_ + ": " + why + " (header offset " + std::to_string(pos_) + ")");
  }

 private:
  void need(std::size_t n, const char* what) const {
    if (n > remaining())
      fail(std::string("header ends inside ") + what + ": needs " + std::to_string(n) + " bytes, " +
           std::to_string(remaining()) + " left");
  }

  std::span<const std::byte> bytes_;
  std::size_t pos_;
  const std::string& origin_;
};

struct DirectoryEntry {
  std::string name;
  DType dtype = DType::F32;
  std::vector<Index> shape;
  std::uint64_t offset = 0;
  std::uint64_t size = 0;
  std::uint64_t hash = 0;
};

struct ParsedHeader {
  std::vector<std::pair<std::string, std::string>> config;
  std::vector<DirectoryEntry> entries;
};

/// Parses and validates the config and directory in header[40, header size) of a file of `file_size` bytes.
inline ParsedHeader parse_header(std::span<const std::byte> header, std::uint64_t file_size, std::uint32_t n_config,
                                 std::uint32_t n_tensors, const std::string& origin) {
  HeaderCursor cur(header, checkpoint_preamble_size, origin);
  ParsedHeader out;
  // Reserve by what the bytes can hold, never by the counts alone (they may be garbage).
  out.config.reserve(std::min<std::size_t>(n_config, cur.remaining() / 8));
  for (std::uint32_t i = 0; i < n_config; ++i) {
    std::string key = cur.read_string("a config key");
    std::string value = cur.read_string("a config value");
    out.config.emplace_back(std::move(key), std::move(value));
  }
  if (const auto dup = first_duplicate(out.config, [](const auto& kv) -> std::string_view { return kv.first; }))
    cur.fail("duplicate config key " + quote_name(*dup));
  const std::uint64_t blob_end = file_size - 8;
  out.entries.reserve(std::min<std::size_t>(n_tensors, cur.remaining() / 32));
  for (std::uint32_t i = 0; i < n_tensors; ++i) {
    DirectoryEntry e;
    e.name = cur.read_string("a tensor name");
    const std::string what = "tensor " + quote_name(e.name);
    const auto dtype = cur.read<std::uint8_t>("a dtype");
    if (dtype != std::uint8_t(DType::F32) && dtype != std::uint8_t(DType::F64))
      cur.fail(what + " has unknown dtype code " + std::to_string(int(dtype)) + " (1 = f32, 2 = f64)");
    e.dtype = DType(dtype);
    const auto rank = cur.read<std::uint8_t>("a rank");
    if (rank > checkpoint_max_rank)
      cur.fail(what + " has rank " + std::to_string(int(rank)) + ", at most " + std::to_string(checkpoint_max_rank));
    if (cur.read<std::uint16_t>("a reserved field") != 0) cur.fail(what + " has a non-zero reserved field");
    std::uint64_t numel = 1;
    bool overflow = false;
    for (int r = 0; r < rank; ++r) {
      const auto d = cur.read<std::uint64_t>("a dimension");
      if (d >= checkpoint_max_dim) cur.fail(what + " has an absurd dimension " + std::to_string(d));
      e.shape.push_back(Index(d));
      overflow = overflow || __builtin_mul_overflow(numel, d, &numel);
    }
    e.offset = cur.read<std::uint64_t>("a tensor offset");
    e.size = cur.read<std::uint64_t>("a tensor size");
    e.hash = cur.read<std::uint64_t>("a tensor checksum");
    std::uint64_t expected_size = 0;
    if (overflow || __builtin_mul_overflow(numel, std::uint64_t(dtype_size(e.dtype)), &expected_size) ||
        expected_size != e.size)
      cur.fail(what + " has byte size " + std::to_string(e.size) + ", but shape " + shape_text(e.shape) + " of " +
               dtype_name(e.dtype) + " needs " + (overflow ? std::string("more than 2^64") : std::to_string(expected_size)));
    if (e.offset % checkpoint_alignment != 0)
      cur.fail(what + " starts at offset " + std::to_string(e.offset) + ", which is not 64-byte aligned");
    if (e.offset < header.size() || e.offset > blob_end || e.size > blob_end - e.offset)
      cur.fail(what + " occupies bytes [" + std::to_string(e.offset) + ", " +
               (e.size > std::numeric_limits<std::uint64_t>::max() - e.offset ? std::string("overflow")
                                                                              : std::to_string(e.offset + e.size)) +
               "), outside the data region [" + std::to_string(header.size()) + ", " + std::to_string(blob_end) +
               ") of the file");
    out.entries.push_back(std::move(e));
  }
  if (cur.remaining() != 0)
    cur.fail("header size says " + std::to_string(header.size()) + " bytes, the entries end at " +
             std::to_string(cur.pos()));
  // Names unique and data regions disjoint: sort by (offset, size), then compare each range with the furthest end
  // seen so far, not only with its neighbour (O(T log T)). A zero-size tensor at offset o conflicts with any tensor
  // that covers o strictly inside its range: without that rule, empty tensors between overlapping ones would hide
  // them from a neighbour-only check, and a small file could declare the same bytes many times over.
  if (const auto dup = first_duplicate(out.entries, [](const DirectoryEntry& e) -> std::string_view { return e.name; }))
    throw FormatError(origin + ": duplicate tensor name " + quote_name(*dup));
  std::vector<std::size_t> order(out.entries.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::ranges::sort(order, [&](std::size_t a, std::size_t b) {
    const auto& ea = out.entries[a];
    const auto& eb = out.entries[b];
    return ea.offset != eb.offset ? ea.offset < eb.offset : ea.size < eb.size;
  });
  std::uint64_t furthest_end = 0, total = 0;
  std::size_t furthest = 0;
  for (std::size_t i = 0; i < order.size(); ++i) {
    const auto& e = out.entries[order[i]];
    if (i > 0 && e.offset < furthest_end)
      throw FormatError(origin + ": tensors " + quote_name(out.entries[furthest].name) + " and " + quote_name(e.name) +
                        " overlap (bytes [" + std::to_string(e.offset) + ", " + std::to_string(e.offset + e.size) +
                        ") start before " + std::to_string(furthest_end) + ")");
    if (e.offset + e.size > furthest_end) {
      furthest_end = e.offset + e.size;  // no overflow: every range was checked to lie inside the file
      furthest = order[i];
    }
    total += e.size;
  }
  // Implied by the disjoint ranges inside the file; kept as the explicit bound every allocation relies on.
  if (total > file_size)
    throw FormatError(origin + ": the tensors declare " + std::to_string(total) + " bytes, more than the file's " +
                      std::to_string(file_size));
  return out;
}

/// Reads a checkpoint from `src` (size(), read(offset, dst, n) that reads exactly n bytes or throws FormatError),
/// validating everything before returning. Never allocates more than size() bytes plus small constants.
template <class Source>
Checkpoint read_checkpoint(Source& src, const std::string& origin) {
  const std::uint64_t size = src.size();
  auto fail = [&](const std::string& why) -> void { throw FormatError(origin + ": " + why); };
  constexpr std::uint64_t min_size = checkpoint_preamble_size + 8;

  std::byte preamble[checkpoint_preamble_size] = {};
  src.read(0, preamble, std::size_t(std::min(size, checkpoint_preamble_size)));
  const std::size_t have = std::size_t(std::min(size, checkpoint_preamble_size));
  if (std::memcmp(preamble, checkpoint_magic, std::min<std::size_t>(have, 4)) != 0 || size == 0) {
    if (size == 0) fail("empty file, not a memoryformer checkpoint");
    fail("not a memoryformer checkpoint (the file does not start with \"MFRM\")");
  }
  if (have < 12) fail("truncated: the file is " + std::to_string(size) + " bytes, a checkpoint has at least " +
                      std::to_string(min_size));
  std::uint32_t version = 0, marker = 0;
  std::memcpy(&version, preamble + 4, 4);
  std::memcpy(&marker, preamble + 8, 4);
  if (marker != checkpoint_byte_order_marker) {
    if (marker == __builtin_bswap32(checkpoint_byte_order_marker))
      fail(std::string("written on a ") + (std::endian::native == std::endian::little ? "big" : "little") +
           "-endian machine; this build reads only its own byte order");
    fail("bad byte-order marker " + hex64(marker) + " (expected 0x01020304): the header is corrupted");
  }
  if (version != checkpoint_version)
    fail("unsupported checkpoint format version " + std::to_string(version) + " (this build reads version " +
         std::to_string(checkpoint_version) + (version > checkpoint_version ? "; upgrade memoryformer)" : ")"));
  if (size < min_size)
    fail("truncated: the file is " + std::to_string(size) + " bytes, a checkpoint has at least " +
         std::to_string(min_size));
  std::uint32_t reserved = 0, n_config = 0, n_tensors = 0;
  std::uint64_t declared_size = 0, header_size = 0;
  std::memcpy(&reserved, preamble + 12, 4);
  std::memcpy(&declared_size, preamble + 16, 8);
  std::memcpy(&header_size, preamble + 24, 8);
  std::memcpy(&n_config, preamble + 32, 4);
  std::memcpy(&n_tensors, preamble + 36, 4);
  if (declared_size > size)
    fail("truncated: the header says the file is " + std::to_string(declared_size) + " bytes, it is " +
         std::to_string(size));
  if (declared_size < size)
    fail("the header says the file is " + std::to_string(declared_size) + " bytes, it is " + std::to_string(size) +
         " (trailing bytes)");

  // Whole-file checksum first, so that any corruption is reported as such rather than as a confusing parse error.
  std::uint64_t stored = 0;
  src.read(size - 8, &stored, 8);
  std::uint64_t computed = 0;
  {
    Xxh3Stream hash;
    std::vector<std::byte> chunk(std::size_t(std::min<std::uint64_t>(size - 8, std::uint64_t(1) << 20)));
    for (std::uint64_t off = 0; off < size - 8; off += chunk.size()) {
      const std::size_t n = std::size_t(std::min<std::uint64_t>(chunk.size(), size - 8 - off));
      src.read(off, chunk.data(), n);
      hash.update(chunk.data(), n);
    }
    computed = hash.digest();
  }

  const bool header_size_ok = header_size >= checkpoint_preamble_size && header_size <= size - 8;
  auto parse = [&]() -> ParsedHeader {
    if (!header_size_ok)
      fail("header size " + std::to_string(header_size) + " is outside [" + std::to_string(checkpoint_preamble_size) +
           ", " + std::to_string(size - 8) + "]");
    if (reserved != 0) fail("reserved header field is " + std::to_string(reserved) + ", expected 0");
    std::vector<std::byte> header(static_cast<std::size_t>(header_size));
    src.read(0, header.data(), header.size());
    return parse_header(header, size, n_config, n_tensors, origin);
  };

  if (stored != computed) {
    std::string msg = "checksum mismatch: the file is corrupted (stored " + hex64(stored) + ", computed " +
                      hex64(computed) + ")";
    // Best effort: if the directory still parses, name the tensors whose data no longer match their checksums.
    try {
      const ParsedHeader parsed = parse();
      std::vector<std::byte> buf;
      std::string bad;
      for (const auto& e : parsed.entries) {
        buf.resize(std::size_t(e.size));
        src.read(e.offset, buf.data(), buf.size());
        if (xxh3_64(buf.data(), buf.size()) != e.hash) bad += (bad.empty() ? "" : ", ") + quote_name(e.name);
      }
      if (!bad.empty()) msg += "; damaged tensor data: " + bad;
    } catch (const FormatError&) {
    }
    fail(msg);
  }

  ParsedHeader parsed = parse();
  Checkpoint ckpt;
  ckpt.config = std::move(parsed.config);
  ckpt.tensors.reserve(parsed.entries.size());
  for (auto& e : parsed.entries) {
    CheckpointTensor t;
    t.name = std::move(e.name);
    t.dtype = e.dtype;
    t.shape = std::move(e.shape);
    t.bytes.resize(std::size_t(e.size));
    src.read(e.offset, t.bytes.data(), t.bytes.size());
    if (xxh3_64(t.bytes.data(), t.bytes.size()) != e.hash)
      fail("checksum mismatch in the data of tensor " + quote_name(t.name) + " (the file checksum matches, so the file "
           "was written damaged)");
    ckpt.tensors.push_back(std::move(t));
  }
  return ckpt;
}

/// A byte buffer as a read_checkpoint source.
struct MemorySource {
  std::span<const std::byte> bytes;
  const std::string& origin;
  std::uint64_t size() const { return bytes.size(); }
  void read(std::uint64_t offset, void* dst, std::size_t n) const {
    if (offset > bytes.size() || n > bytes.size() - offset)
      throw FormatError(origin + ": read of " + std::to_string(n) + " bytes at offset " + std::to_string(offset) +
                        " is past the end");
    if (n > 0) std::memcpy(dst, bytes.data() + offset, n);
  }
};

}  // namespace detail::ckpt

/**
 * @brief The checkpoint file's bytes (see the layout at the top of this header), e.g. to send or embed elsewhere.
 * @throws ConfigError for duplicate config keys or tensor names, ShapeError for a tensor whose bytes do not match
 *         its shape and dtype or whose rank exceeds 8.
 */
inline std::vector<std::byte> serialize_checkpoint(const Checkpoint& ckpt) {
  const auto w = detail::ckpt::view_for_write(ckpt);
  detail::ckpt::validate_for_write("serialize_checkpoint", w);
  std::vector<std::byte> out;
  detail::ckpt::write_checkpoint(w, [&](const void* data, std::size_t n) {
    const auto* p = static_cast<const std::byte*>(data);
    out.insert(out.end(), p, p + n);
  });
  return out;
}

/**
 * @brief Parses checkpoint bytes (as produced by serialize_checkpoint or read from a file), validating everything.
 * @param origin name used in error messages.
 * @throws FormatError as load_checkpoint.
 */
inline Checkpoint parse_checkpoint(std::span<const std::byte> bytes, const std::string& origin = "<memory>") {
  const std::string where = "parse_checkpoint: " + origin;
  detail::ckpt::MemorySource src{bytes, where};
  return detail::ckpt::read_checkpoint(src, where);
}

}  // namespace memoryformer
