// SPDX-License-Identifier: MIT
// Byte-level text data for language-model training: tokens are the 256 byte values, a train/validation split of
// one text, seeded random contiguous training windows and deterministic validation windows.
#pragma once

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "../detail/checked_size.hpp"
#include "../detail/checks.hpp"
#include "../error.hpp"
#include "../random.hpp"
#include "../types.hpp"

namespace memoryformer {

/// Number of byte-level tokens.
inline constexpr Index byte_vocab = 256;

/// Byte-level tokens of `text`: one token per byte, its unsigned value 0 … 255 (UTF-8 text becomes its bytes).
inline std::vector<std::int32_t> encode_bytes(std::string_view text) {
  std::vector<std::int32_t> out(text.size());
  for (std::size_t i = 0; i < text.size(); ++i) out[i] = std::int32_t(static_cast<unsigned char>(text[i]));
  return out;
}

/// The bytes of byte-level tokens. @throws ValueError naming the first id outside 0 … 255.
inline std::string decode_bytes(std::span<const std::int32_t> tokens) {
  std::string out(tokens.size(), '\0');
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] > 255)
      throw ValueError("decode_bytes: token " + std::to_string(i) + " is " + std::to_string(tokens[i]) +
                       ", outside 0 … 255");
    out[i] = char(static_cast<unsigned char>(tokens[i]));
  }
  return out;
}

/// Reads a whole file as bytes, at most `max_bytes` (1 GiB by default).
/// @throws IoError naming the path and the system's reason; ConfigError for a longer file.
inline std::string read_text_file(const std::filesystem::path& path, std::size_t max_bytes = std::size_t(1) << 30) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IoError("read_text_file: cannot open '" + path.string() + "': " + std::strerror(errno));
  // Read in chunks against the limit: a device such as /dev/zero never ends and must not exhaust memory.
  std::string text;
  std::vector<char> chunk(std::size_t(1) << 20);
  while (in) {
    in.read(chunk.data(), std::streamsize(chunk.size()));
    const std::size_t got = std::size_t(in.gcount());
    if (got > max_bytes - text.size())
      throw ConfigError("read_text_file: '" + path.string() + "' is longer than the limit of " +
                        std::to_string(max_bytes) + " bytes");
    text.append(chunk.data(), got);
  }
  if (in.bad()) throw IoError("read_text_file: reading '" + path.string() + "' failed");
  return text;
}

/// Entropy in bits per byte of the byte frequencies of `tokens` (the loss of the best model that ignores context).
inline double unigram_entropy_bits(std::span<const std::int32_t> tokens) {
  if (tokens.empty()) return 0.0;
  std::array<std::uint64_t, 256> counts{};
  for (std::int32_t t : tokens) ++counts[std::size_t(t & 255)];
  double h = 0.0;
  const double n = double(tokens.size());
  for (std::uint64_t c : counts)
    if (c > 0) h -= double(c) / n * std::log2(double(c) / n);
  return h;
}

/// A batch of next-token examples: row r of sequence b predicts targets[b·seq + r] from inputs[b·seq … b·seq + r].
struct TokenBatch {
  Index batch = 0;                    ///< sequences
  Index seq = 0;                      ///< tokens per sequence
  std::vector<std::int32_t> inputs;   ///< [batch·seq] window[0 … seq)
  std::vector<std::int32_t> targets;  ///< [batch·seq] window[1 … seq] (the inputs shifted by one)
};

/**
 * @brief One text as byte tokens, split into a training prefix and a validation suffix.
 *
 * The split is at floor((1 − validation_fraction)·size) bytes: the validation text is the END of the file, never
 * seen in training (a contiguous split, so no window straddles both). Training windows are drawn uniformly at random
 * from the training split; validation windows are a fixed, evenly spread subset of the non-overlapping windows of
 * the validation split, so every evaluation sees the same tokens.
 */
class TextDataset {
 public:
  /**
   * @param text                 any bytes (byte-level tokens)
   * @param validation_fraction  in [0, 1): share of the text held out at its end
   * @throws ConfigError for a fraction outside [0, 1) or an empty text.
   */
  explicit TextDataset(std::string_view text, double validation_fraction = 0.1) {
    detail::check_config(validation_fraction >= 0.0 && validation_fraction < 1.0, "TextDataset",
                         "validation_fraction = " + std::to_string(validation_fraction) + " is outside [0, 1)");
    detail::check_config(!text.empty(), "TextDataset", "the text is empty");
    tokens_ = encode_bytes(text);
    split_ = std::size_t(std::floor((1.0 - validation_fraction) * double(tokens_.size())));
  }

  /// The text of `path`. @throws IoError when it cannot be read; ConfigError as the constructor.
  static TextDataset from_file(const std::filesystem::path& path, double validation_fraction = 0.1) {
    return TextDataset(read_text_file(path), validation_fraction);
  }

  /// 256: byte-level tokens.
  static constexpr Index vocab() { return byte_vocab; }
  /// Every token of the text.
  std::span<const std::int32_t> tokens() const { return tokens_; }
  /// The training split (the first part of the text).
  std::span<const std::int32_t> train() const { return std::span<const std::int32_t>(tokens_).first(split_); }
  /// The validation split (the last part of the text).
  std::span<const std::int32_t> validation() const { return std::span<const std::int32_t>(tokens_).subspan(split_); }

  /**
   * @brief `batch` windows of seq + 1 consecutive training tokens, each at a start drawn uniformly from
   *        [0, train().size() − seq − 1] with `rng` (one uniform_index per window, in order).
   * @throws ConfigError for batch or seq < 1, or a training split shorter than seq + 1 tokens.
   */
  void sample_train(TokenBatch& out, Index batch, Index seq, Rng& rng) const {
    const auto split = train();
    check_window("TextDataset::sample_train", "training", split.size(), batch, seq);
    const std::uint64_t starts = std::uint64_t(split.size()) - std::uint64_t(seq);  // starts 0 … size − seq − 1
    resize(out, batch, seq);
    for (Index b = 0; b < batch; ++b) copy_window(out, b, split, std::size_t(rng.uniform_index(starts)));
  }

  /**
   * @brief Start offsets of validation windows for sequences of `seq` tokens: the non-overlapping windows
   *        [k·seq, k·seq + seq] (k = 0 … (size − 1)/seq − 1), or `max_windows` of them evenly spread when there are
   *        more (max_windows = 0: all).
   * @throws ConfigError for seq < 1, max_windows < 0 or a validation split shorter than seq + 1 tokens.
   */
  std::vector<Index> validation_windows(Index seq, Index max_windows = 0) const {
    const auto split = validation();
    check_window("TextDataset::validation_windows", "validation", split.size(), 1, seq);
    detail::check_config(max_windows >= 0, "TextDataset::validation_windows",
                         "max_windows = " + std::to_string(max_windows) + " must be ≥ 0 (0: every window)");
    const Index available = (Index(split.size()) - 1) / seq;
    const Index count = max_windows > 0 ? std::min(max_windows, available) : available;
    std::vector<Index> starts(static_cast<std::size_t>(count));
    for (Index i = 0; i < count; ++i) starts[std::size_t(i)] = (i * available / count) * seq;
    return starts;
  }

  /**
   * @brief The validation windows starts[first … first + batch) as a batch (fewer when the list ends first).
   * @throws ConfigError / IndexError for bad arguments.
   */
  void validation_batch(TokenBatch& out, std::span<const Index> starts, Index first, Index batch, Index seq) const {
    const auto split = validation();
    if (first < 0 || first >= Index(starts.size()))
      throw IndexError("TextDataset::validation_batch: first = " + std::to_string(first) + " is outside [0, " +
                       std::to_string(starts.size()) + ")");
    const Index n = std::min(batch, Index(starts.size()) - first);
    check_window("TextDataset::validation_batch", "validation", split.size(), n, seq);
    resize(out, n, seq);
    for (Index b = 0; b < n; ++b) {
      const Index s = starts[std::size_t(first + b)];
      if (s < 0 || std::size_t(s) >= split.size() || split.size() - std::size_t(s) <= std::size_t(seq))
        throw IndexError("TextDataset::validation_batch: window start " + std::to_string(s) +
                         " leaves no room for seq + 1 tokens (seq = " + std::to_string(seq) + ")");
      copy_window(out, b, split, std::size_t(s));
    }
  }

 private:
  static void check_window(const char* where, const char* which, std::size_t size, Index batch, Index seq) {
    detail::check_config(batch >= 1 && seq >= 1, where,
                         "batch = " + std::to_string(batch) + " and seq = " + std::to_string(seq) + " must be ≥ 1");
    (void)detail::checked_mul(where, "batch·seq", batch, seq);
    detail::check_config(size >= std::size_t(seq) + 1, where,
                         std::string("the ") + which + " split has " + std::to_string(size) +
                             " tokens, fewer than seq + 1 tokens (seq = " + std::to_string(seq) + ")" +
                             " (use a longer text, a shorter seq or another validation fraction)");
  }
  static void resize(TokenBatch& out, Index batch, Index seq) {
    out.batch = batch;
    out.seq = seq;
    const Index tokens = batch * seq;  // checked by check_window
    detail::allocating("TextDataset", "a batch of " + std::to_string(tokens) + " tokens",
                       tokens * Index(2 * sizeof(std::int32_t)), [&] {
                         out.inputs.resize(std::size_t(tokens));
                         out.targets.resize(std::size_t(tokens));
                       });
  }
  static void copy_window(TokenBatch& out, Index b, std::span<const std::int32_t> split, std::size_t start) {
    const std::size_t seq = std::size_t(out.seq), row = std::size_t(b) * seq;
    std::copy_n(split.begin() + std::ptrdiff_t(start), seq, out.inputs.begin() + std::ptrdiff_t(row));
    std::copy_n(split.begin() + std::ptrdiff_t(start + 1), seq, out.targets.begin() + std::ptrdiff_t(row));
  }

  std::vector<std::int32_t> tokens_;  // [size] every byte of the text
  std::size_t split_ = 0;             // first validation token
};

}  // namespace memoryformer
