// SPDX-License-Identifier: MIT
// Overflow-checked size arithmetic for sizes that come from callers or files: a product, shift or sum that does
// not fit, or exceeds a stated limit, is an exception naming the quantity, never an allocation of a wrapped value.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <new>
#include <string>
#include <string_view>
#include <utility>

#include "../error.hpp"
#include "../types.hpp"

namespace memoryformer::detail {

/// The largest element count any single buffer of the library may hold: 2^48 values (far beyond any real
/// memory, small enough that count × 8 bytes and count × alignment padding never overflow 64 bits).
inline constexpr Index max_elements = Index(1) << 48;

/// Throws Error("<where>: <what> = <text> <why>").
template <class Error = ConfigError>
[[noreturn]] void throw_size(std::string_view where, std::string_view what, const std::string& text,
                             std::string_view why) {
  throw Error(std::string(where) + ": " + std::string(what) + " " + text + " " + std::string(why));
}

/// a × b for non-negative a, b; throws Error naming `what` when it overflows or exceeds `limit`.
template <class Error = ConfigError>
Index checked_mul(std::string_view where, std::string_view what, Index a, Index b, Index limit = max_elements) {
  if (a < 0 || b < 0)
    throw_size<Error>(where, what, "= " + std::to_string(a) + " × " + std::to_string(b), "has a negative factor");
  Index out = 0;
  if (__builtin_mul_overflow(a, b, &out) || out > limit)
    throw_size<Error>(where, what, "= " + std::to_string(a) + " × " + std::to_string(b),
                      "exceeds the limit of " + std::to_string(limit));
  return out;
}

/// The product of non-negative factors; throws Error naming `what` when it overflows or exceeds `limit`.
template <class Error = ConfigError>
Index checked_product(std::string_view where, std::string_view what, std::initializer_list<Index> factors,
                      Index limit = max_elements) {
  auto text = [&] {
    std::string t;
    for (Index f : factors) t += (t.empty() ? "= " : " × ") + std::to_string(f);
    return t;
  };
  Index out = 1;
  for (Index f : factors) {
    if (f < 0) throw_size<Error>(where, what, text(), "has a negative factor");
    if (__builtin_mul_overflow(out, f, &out) || out > limit)
      throw_size<Error>(where, what, text(), "exceeds the limit of " + std::to_string(limit));
  }
  return out;
}

/// allocate() with a std::bad_alloc turned into Error naming `what` and its size: a size the caller chose that memory
/// cannot hold reads as the caller's error, not as a bare std::bad_alloc.
template <class Error = ConfigError, class Allocate>
decltype(auto) allocating(std::string_view where, std::string_view what, Index bytes, Allocate&& allocate) {
  try {
    return allocate();
  } catch (const std::bad_alloc&) {
    throw_size<Error>(where, what, "of " + std::to_string(bytes) + " bytes", "cannot be allocated");
  }
}

/// allocating() for a forward or backward over n = batch·seq positions of width d (a model's, a block's, a layer's): a
/// failed allocation becomes a ConfigError naming the positions and the bytes of one [n, d] tensor (several are kept).
/// The message is built only on failure: these run on every call.
template <class Allocate>
decltype(auto) allocating_activations(std::string_view where, Index n, Index d, Index layers, std::size_t value_bytes,
                                      Allocate&& allocate) {
  try {
    return std::forward<Allocate>(allocate)();
  } catch (const std::bad_alloc&) {
    Index bytes = 0;  // saturated: the message only reports it
    if (__builtin_mul_overflow(n, d, &bytes) || __builtin_mul_overflow(bytes, Index(value_bytes), &bytes))
      bytes = std::numeric_limits<Index>::max();
    throw ConfigError(std::string(where) + ": the buffers of batch·seq = " + std::to_string(n) +
                      " positions cannot be allocated ([" + std::to_string(n) + ", " + std::to_string(d) +
                      "] per tensor, " + std::to_string(bytes) + " bytes each" +
                      (layers > 1 ? "; " + std::to_string(layers) + " layers)" : std::string(")")));
  }
}

/// m.resize(rows, cols) that leaves m empty, never dangling, when memory cannot hold the new size: Eigen frees the
/// old storage before it allocates the new one and keeps the freed pointer when that allocation throws, so a buffer
/// reused across calls would be freed again later. The same allocations as m.resize otherwise.
template <class Dense>
void resize_buffer(Dense& m, Index rows, Index cols) {
  if (m.rows() == rows && m.cols() == cols) return;
  // A rows·cols that overflows is compared without being formed; Eigen's resize then throws std::bad_alloc.
  const bool fits = rows >= 0 && cols >= 0 && (cols == 0 || rows <= std::numeric_limits<Index>::max() / cols);
  if (!fits || m.size() != rows * cols) m = Dense();
  m.resize(rows, cols);
}

/// resize_buffer for a vector of `size` entries.
template <class Dense>
void resize_buffer(Dense& v, Index size) {
  if (v.size() == size) return;
  v = Dense();
  v.resize(size);
}

/// m.setZero(rows, cols) through resize_buffer.
template <class Dense>
void zeroed_buffer(Dense& m, Index rows, Index cols) {
  resize_buffer(m, rows, cols);
  m.setZero();
}

/// A [rows, cols] matrix for the activations of a call (the allocating forms of forward), through
/// allocating_activations.
template <class Scalar>
Matrix<Scalar> activation_matrix(std::string_view where, Index rows, Index cols) {
  return allocating_activations(where, rows, cols, 1, sizeof(Scalar), [&] { return Matrix<Scalar>(rows, cols); });
}

/// a + b for non-negative a, b; throws Error naming `what` when it overflows or exceeds `limit`.
template <class Error = ConfigError>
Index checked_add(std::string_view where, std::string_view what, Index a, Index b, Index limit = max_elements) {
  Index out = 0;
  if (a < 0 || b < 0 || __builtin_add_overflow(a, b, &out) || out > limit)
    throw_size<Error>(where, what, "= " + std::to_string(a) + " + " + std::to_string(b),
                      "is negative or exceeds the limit of " + std::to_string(limit));
  return out;
}

/// value << bits for value ≥ 0 and bits in [0, 62]; throws Error naming `what` when bits is out of range or the
/// result overflows or exceeds `limit` (a shift by ≥ 64 or by a negative count would be undefined behaviour).
template <class Error = ConfigError>
Index checked_shift(std::string_view where, std::string_view what, Index value, Index bits,
                    Index limit = max_elements) {
  if (value < 0 || bits < 0 || bits > 62)
    throw_size<Error>(where, what, "= " + std::to_string(value) + " << " + std::to_string(bits),
                      "has a shift outside 0..62 or a negative value");
  if (value > (limit >> bits))
    throw_size<Error>(where, what, "= " + std::to_string(value) + " << " + std::to_string(bits),
                      "exceeds the limit of " + std::to_string(limit));
  return value << bits;
}

/// A non-negative Index as a size_t.
template <class Error = ConfigError>
std::size_t to_size(std::string_view where, std::string_view what, Index value) {
  if (value < 0) throw_size<Error>(where, what, "= " + std::to_string(value), "is negative");
  return std::size_t(value);
}

/// A size_t as an Index; throws Error when it does not fit or exceeds `limit`.
template <class Error = ConfigError>
Index to_index(std::string_view where, std::string_view what, std::size_t value, Index limit = max_elements) {
  if (value > std::size_t(limit))
    throw_size<Error>(where, what, "= " + std::to_string(value), "exceeds the limit of " + std::to_string(limit));
  return Index(value);
}

/// Throws Error unless lo ≤ value ≤ hi.
template <class Error = ConfigError>
void check_range(std::string_view where, std::string_view what, std::int64_t value, std::int64_t lo,
                 std::int64_t hi) {
  if (value < lo || value > hi)
    throw_size<Error>(where, what, "= " + std::to_string(value),
                      "is outside " + std::to_string(lo) + ".." + std::to_string(hi));
}

}  // namespace memoryformer::detail
