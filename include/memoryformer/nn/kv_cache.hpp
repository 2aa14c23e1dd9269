// SPDX-License-Identifier: MIT
// Key/value cache for incremental (token-by-token) causal attention decoding (design §6.4).
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "../detail/checks.hpp"
#include "../detail/checked_size.hpp"
#include "../detail/half.hpp"
#include "../error.hpp"
#include "../storage_type.hpp"
#include "../types.hpp"

namespace memoryformer {

/**
 * @brief Keys and values of the tokens decoded so far, for `batch` sequences of at most `max_seq` tokens each.
 *
 * All sequences advance together: the cache has one current length. Keys are stored as given, i.e. already
 * rotated by the caller (Rotary at position_offset = length()). Storage is allocated once, in the constructor.
 *
 * Storage precision (KVCache<float> only): StorageType::F32 (default) keeps keys and values as given;
 * StorageType::BF16 rounds them to bfloat16 on append (round to nearest even) and attention_decode widens them back
 * to float inside its kernel, accumulating in float. Decoding reads the whole cache per step, so halving its bytes
 * halves that traffic. Bytes per cached token and sequence (bytes_per_token()): 2·d·sizeof(Scalar) as stored
 * (8·d for float, 16·d for double), 4·d with BF16 (keys and values, d features each).
 * @tparam Scalar float or double.
 */
template <std::floating_point Scalar>
class KVCache {
 public:
  /**
   * @param batch    sequences, ≥ 1
   * @param max_seq  capacity in tokens per sequence, ≥ 1
   * @param d        features per token (all heads), ≥ 1
   * @param storage  precision of the stored keys and values: F32 (as Scalar) or, for KVCache<float>, BF16
   * @throws ConfigError for a non-positive size, a batch·max_seq·d that overflows, F16, BF16 with Scalar = double,
   *         or a value that is not a StorageType.
   */
  KVCache(Index batch, Index max_seq, Index d, StorageType storage = StorageType::F32)
      : batch_(batch), max_seq_(max_seq), d_(d), storage_(storage) {
    detail::check_config(batch >= 1, "KVCache", "batch = " + std::to_string(batch) + " must be ≥ 1");
    detail::check_config(max_seq >= 1, "KVCache", "max_seq = " + std::to_string(max_seq) + " must be ≥ 1");
    detail::check_config(d >= 1, "KVCache", "d = " + std::to_string(d) + " must be ≥ 1");
    // Checked before allocating: a wrapped batch·max_seq would give a cache too small for the positions it accepts.
    const Index rows = detail::checked_mul("KVCache", "batch × max_seq", batch, max_seq);
    const Index elements = detail::checked_mul("KVCache", "batch × max_seq × d", rows, d);
    detail::check_enum("KVCache", "storage", storage, {StorageType::F32, StorageType::F16, StorageType::BF16},
                       "StorageType");
    detail::check_config(storage != StorageType::F16, "KVCache", "storage fp16 is not supported (use fp32 or bf16)");
    detail::check_config(storage == StorageType::F32 || std::is_same_v<Scalar, float>, "KVCache",
                         std::string("storage ") + std::string(storage_type_name(storage)) +
                             " needs KVCache<float>; a double cache stores fp32 only");
    const Index bytes = 2 * elements * Index(storage_ == StorageType::BF16 ? 2 : sizeof(Scalar));
    detail::allocating("KVCache", "a cache of batch × max_seq × d = " + std::to_string(batch) + " × " +
                                      std::to_string(max_seq) + " × " + std::to_string(d) + " keys and values",
                       bytes, [&] {
                         if (storage_ == StorageType::BF16) {
                           keys_bf16_.assign(std::size_t(elements), 0);
                           values_bf16_.assign(std::size_t(elements), 0);
                         } else {
                           keys_ = Matrix<Scalar>::Zero(rows, d);
                           values_ = Matrix<Scalar>::Zero(rows, d);
                         }
                       });
  }

  Index batch() const { return batch_; }
  Index max_seq() const { return max_seq_; }
  Index d() const { return d_; }
  /// Precision of the stored keys and values.
  StorageType storage() const { return storage_; }
  /// Bytes of one cached token of one sequence, key and value: 2·d·sizeof(Scalar), or 2·d·2 with BF16.
  std::size_t bytes_per_token() const {
    return 2 * std::size_t(d_) * (storage_ == StorageType::BF16 ? sizeof(std::uint16_t) : sizeof(Scalar));
  }
  /// Tokens cached per sequence (the position the next appended token gets).
  Index length() const { return length_; }

  /// Forgets every cached token (length 0); the storage is kept.
  void clear() { length_ = 0; }

  /**
   * @brief Drops the tokens at positions ≥ new_length (e.g. to roll back a speculative step).
   * @throws IndexError unless 0 ≤ new_length ≤ length().
   */
  void truncate(Index new_length) {
    if (new_length < 0 || new_length > length_)
      throw IndexError("KVCache::truncate: new_length = " + std::to_string(new_length) +
                       " is outside [0, length = " + std::to_string(length_) + "]");
    length_ = new_length;
  }

  /**
   * @brief Appends t = k_new.rows()/batch tokens to every sequence, at positions length() … length()+t−1.
   * @param k_new  [batch·t, d] keys (already rotated), batch-major: row b·t + i is token i of sequence b
   * @param v_new  [batch·t, d] values, same layout
   * @throws ShapeError when the rows are not a positive multiple of batch or the shapes differ;
   *         CapacityError when length() + t would exceed max_seq (the cache is then unchanged).
   */
  void append(ConstMatrixRef<Scalar> k_new, ConstMatrixRef<Scalar> v_new) {
    constexpr const char* where = "KVCache::append";
    const Index t = new_tokens(where, "k_new", k_new.rows(), k_new.cols());
    detail::check_shape(where, "v_new", v_new.rows(), v_new.cols(), k_new.rows(), d());
    if (length_ + t > max_seq_)
      throw CapacityError(std::string(where) + ": appending " + std::to_string(t) + " token(s) per sequence to " +
                          std::to_string(length_) + " cached would make " + std::to_string(length_ + t) +
                          " > max_seq = " + std::to_string(max_seq_));
    if (storage_ == StorageType::BF16) {
      for (Index b = 0; b < batch_; ++b)
        for (Index i = 0; i < t; ++i) {
          std::uint16_t* key = keys_bf16_.data() + (b * max_seq_ + length_ + i) * d_;
          std::uint16_t* value = values_bf16_.data() + (b * max_seq_ + length_ + i) * d_;
          for (Index c = 0; c < d_; ++c) {
            key[c] = detail::float_to_bf16(float(k_new(b * t + i, c)));
            value[c] = detail::float_to_bf16(float(v_new(b * t + i, c)));
          }
        }
    } else {
      for (Index b = 0; b < batch_; ++b) {
        keys_.middleRows(b * max_seq_ + length_, t) = k_new.middleRows(b * t, t);
        values_.middleRows(b * max_seq_ + length_, t) = v_new.middleRows(b * t, t);
      }
    }
    length_ += t;
  }

  /// Keys of sequence b at positions 0 … length()−1: a [length, d] view.
  /// @throws StateError for a BF16 cache (use keys_bf16).
  auto keys(Index b) const { return stored_as_scalar("keys", keys_).middleRows(checked_batch(b) * max_seq_, length_); }
  /// Values of sequence b at positions 0 … length()−1: a [length, d] view.
  /// @throws StateError for a BF16 cache (use values_bf16).
  auto values(Index b) const {
    return stored_as_scalar("values", values_).middleRows(checked_batch(b) * max_seq_, length_);
  }

  /// BF16 cache: bfloat16 bits of the keys of sequence b, [length, d] row-major (row p at keys_bf16(b) + p·d).
  /// @throws StateError unless storage() is BF16.
  const std::uint16_t* keys_bf16(Index b) const {
    return stored_as_bf16("keys_bf16", keys_bf16_) + checked_batch(b) * max_seq_ * d_;
  }
  /// BF16 cache: bfloat16 bits of the values of sequence b, laid out as keys_bf16.
  /// @throws StateError unless storage() is BF16.
  const std::uint16_t* values_bf16(Index b) const {
    return stored_as_bf16("values_bf16", values_bf16_) + checked_batch(b) * max_seq_ * d_;
  }

  /// Throws ShapeError unless the cache holds d features per token (a block of width d decoding into it).
  void check_features(const char* where, Index d) const {
    if (d_ != d)
      throw ShapeError(std::string(where) + ": kv holds " + std::to_string(d_) + " features per token, expected d = " +
                       std::to_string(d));
  }

  /**
   * @brief Validates a [batch·t, d] block of new tokens and returns t (used by append and attention_decode).
   * @throws ShapeError naming `what` and its shape.
   */
  Index new_tokens(const char* where, const char* what, Index rows, Index cols) const {
    if (rows < batch_ || rows % batch_ != 0 || cols != d())
      throw ShapeError(std::string(where) + ": " + what + " is " + detail::shape_string({rows, cols}) +
                       ", expected (batch·t, d) = (" + std::to_string(batch_) + "·t, " + std::to_string(d()) +
                       ") with t ≥ 1 new tokens per sequence");
    return rows / batch_;
  }

 private:
  const Matrix<Scalar>& stored_as_scalar(const char* what, const Matrix<Scalar>& data) const {
    if (storage_ != StorageType::F32)
      throw StateError(std::string("KVCache::") + what + ": the cache stores bf16; read it with " + what + "_bf16");
    return data;
  }
  const std::uint16_t* stored_as_bf16(const char* what, const std::vector<std::uint16_t>& data) const {
    if (storage_ != StorageType::BF16)
      throw StateError(std::string("KVCache::") + what + ": the cache stores " +
                       std::string(storage_type_name(storage_)) + ", not bf16");
    return data.data();
  }

  Index checked_batch(Index b) const {
    if (b < 0 || b >= batch_)
      throw IndexError("KVCache: sequence " + std::to_string(b) + " is outside [0, batch = " +
                       std::to_string(batch_) + ")");
    return b;
  }

  Index batch_;
  Index max_seq_;
  Index d_;
  StorageType storage_;
  Index length_ = 0;
  Matrix<Scalar> keys_;    // [batch·max_seq, d] row b·max_seq + p: key of sequence b at position p (F32 storage)
  Matrix<Scalar> values_;  // [batch·max_seq, d] same layout
  std::vector<std::uint16_t> keys_bf16_;    // [batch·max_seq, d] row-major bfloat16 bits, same rows (BF16 storage)
  std::vector<std::uint16_t> values_bf16_;  // [batch·max_seq, d] same layout
};

namespace detail {

/// Throws StateError unless every cache of a model's decode state has the batch, width, capacity, length and storage
/// of the first: then a capacity or batch checked on the first holds for all, and no block refuses the tokens after
/// an earlier block appended them.
template <std::floating_point Scalar>
void check_caches_match(const char* where, const std::vector<KVCache<Scalar>>& kv) {
  if (kv.empty()) return;
  const KVCache<Scalar>& first = kv.front();
  for (std::size_t i = 1; i < kv.size(); ++i) {
    const KVCache<Scalar>& c = kv[i];
    if (c.batch() != first.batch() || c.d() != first.d() || c.max_seq() != first.max_seq() ||
        c.length() != first.length() || c.storage() != first.storage())
      throw StateError(std::string(where) + ": the cache of block " + std::to_string(i) + " (batch " +
                       std::to_string(c.batch()) + ", max_seq " + std::to_string(c.max_seq()) + ", length " +
                       std::to_string(c.length()) + ") does not match block 0's (batch " +
                       std::to_string(first.batch()) + ", max_seq " + std::to_string(first.max_seq()) + ", length " +
                       std::to_string(first.length()) + "); use make_decode_state");
  }
}

/// A decoding step that may append to `caches` (all of one length): runs step() and, when it throws, truncates every
/// cache back to that length, so a call that fails part-way (a buffer of a later block that cannot be allocated, say)
/// leaves the caches as they were. A failed allocation becomes allocating_activations' ConfigError, naming `where`,
/// the rows and the width d.
template <std::floating_point Scalar, class Step>
void decode_step(std::string_view where, Index rows, Index d, Index layers, std::span<KVCache<Scalar>> caches,
                 Step&& step) {
  const Index length = caches.empty() ? 0 : caches.front().length();
  try {
    allocating_activations(where, rows, d, layers, sizeof(Scalar), std::forward<Step>(step));
  } catch (...) {
    for (KVCache<Scalar>& cache : caches) cache.truncate(length);
    throw;
  }
}

}  // namespace detail

}  // namespace memoryformer
