// SPDX-License-Identifier: MIT
// Key/value cache for incremental (token-by-token) causal attention decoding (design §3, attention of the block).
#pragma once

#include <concepts>
#include <stdexcept>
#include <string>

#include "../detail/checks.hpp"
#include "../detail/checked_size.hpp"
#include "../error.hpp"
#include "../types.hpp"

namespace memoryformer {

/**
 * @brief Keys and values of the tokens decoded so far, for `batch` sequences of at most `max_seq` tokens each.
 *
 * All sequences advance together: the cache has one current length. Keys are stored as given, i.e. already
 * rotated by the caller (Rotary at position_offset = length()). Storage is allocated once, in the constructor.
 * @tparam Scalar float or double.
 */
template <std::floating_point Scalar>
class KVCache {
 public:
  /**
   * @param batch    sequences, ≥ 1
   * @param max_seq  capacity in tokens per sequence, ≥ 1
   * @param d        features per token (all heads), ≥ 1
   * @throws ConfigError for a non-positive size.
   */
  KVCache(Index batch, Index max_seq, Index d) : batch_(batch), max_seq_(max_seq) {
    detail::check_config(batch >= 1, "KVCache", "batch = " + std::to_string(batch) + " must be ≥ 1");
    detail::check_config(max_seq >= 1, "KVCache", "max_seq = " + std::to_string(max_seq) + " must be ≥ 1");
    detail::check_config(d >= 1, "KVCache", "d = " + std::to_string(d) + " must be ≥ 1");
    // Checked before allocating: a wrapped batch·max_seq would give a cache too small for the positions it accepts.
    const Index rows = detail::checked_mul("KVCache", "batch × max_seq", batch, max_seq);
    detail::checked_mul("KVCache", "batch × max_seq × d", rows, d);
    keys_ = Matrix<Scalar>::Zero(rows, d);
    values_ = Matrix<Scalar>::Zero(rows, d);
  }

  Index batch() const { return batch_; }
  Index max_seq() const { return max_seq_; }
  Index d() const { return keys_.cols(); }
  /// Tokens cached per sequence (the position the next appended token gets).
  Index length() const { return length_; }

  /// Forgets every cached token (length 0); the storage is kept.
  void clear() { length_ = 0; }

  /**
   * @brief Drops the tokens at positions ≥ new_length (e.g. to roll back a speculative step).
   * @throws std::out_of_range unless 0 ≤ new_length ≤ length().
   */
  void truncate(Index new_length) {
    if (new_length < 0 || new_length > length_)
      throw std::out_of_range("KVCache::truncate: new_length = " + std::to_string(new_length) +
                              " is outside [0, length = " + std::to_string(length_) + "]");
    length_ = new_length;
  }

  /**
   * @brief Appends t = k_new.rows()/batch tokens to every sequence, at positions length() … length()+t−1.
   * @param k_new  [batch·t, d] keys (already rotated), batch-major: row b·t + i is token i of sequence b
   * @param v_new  [batch·t, d] values, same layout
   * @throws ShapeError when the rows are not a positive multiple of batch or the shapes differ;
   *         std::length_error when length() + t would exceed max_seq (the cache is then unchanged).
   */
  void append(ConstMatrixRef<Scalar> k_new, ConstMatrixRef<Scalar> v_new) {
    constexpr const char* where = "KVCache::append";
    const Index t = new_tokens(where, "k_new", k_new.rows(), k_new.cols());
    detail::check_shape(where, "v_new", v_new.rows(), v_new.cols(), k_new.rows(), d());
    if (length_ + t > max_seq_)
      throw std::length_error(std::string(where) + ": appending " + std::to_string(t) + " token(s) per sequence to " +
                              std::to_string(length_) + " cached would make " + std::to_string(length_ + t) +
                              " > max_seq = " + std::to_string(max_seq_));
    for (Index b = 0; b < batch_; ++b) {
      keys_.middleRows(b * max_seq_ + length_, t) = k_new.middleRows(b * t, t);
      values_.middleRows(b * max_seq_ + length_, t) = v_new.middleRows(b * t, t);
    }
    length_ += t;
  }

  /// Keys of sequence b at positions 0 … length()−1: a [length, d] view.
  auto keys(Index b) const { return keys_.middleRows(checked_batch(b) * max_seq_, length_); }
  /// Values of sequence b at positions 0 … length()−1: a [length, d] view.
  auto values(Index b) const { return values_.middleRows(checked_batch(b) * max_seq_, length_); }

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
  Index checked_batch(Index b) const {
    if (b < 0 || b >= batch_)
      throw std::out_of_range("KVCache: sequence " + std::to_string(b) + " is outside [0, batch = " +
                              std::to_string(batch_) + ")");
    return b;
  }

  Index batch_;
  Index max_seq_;
  Index length_ = 0;
  Matrix<Scalar> keys_;    // [batch·max_seq, d] row b·max_seq + p: key of sequence b at position p
  Matrix<Scalar> values_;  // [batch·max_seq, d] same layout
};

}  // namespace memoryformer
