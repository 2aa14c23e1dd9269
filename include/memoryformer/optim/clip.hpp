// SPDX-License-Identifier: MIT
// Global gradient-norm clipping over all parameters (design §3.3: gradient clip 1.0; §9.3).
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "../detail/checks.hpp"
#include "../detail/parallel.hpp"
#include "../error.hpp"
#include "../parameter.hpp"

namespace memoryformer {

namespace detail::clip {

/// Elements per piece of work. Pieces are cut from the parameters alone, never from the thread count, and every
/// piece is summed by one thread in one fixed order, so the reduced result has the same bits for any thread count.
inline constexpr std::size_t piece_elements = std::size_t(1) << 15;

/// How a piece walks its parameter: a plain element range, entries of the touched-row list, or rows whose flag is
/// checked (flags == nullptr: every row).
enum class PieceMode : std::uint8_t { Elements, ListedRows, FlaggedRows };

/// A piece of work on parameter `param`: elements, list entries or rows [begin, end) according to `mode`.
struct Piece {
  std::size_t param = 0;
  PieceMode mode = PieceMode::Elements;
  std::size_t begin = 0, end = 0;
};

/// Throws unless p's touched-row flags (if any) have one entry per row of p.
template <class Scalar>
void check_touched(const ParameterView<Scalar>& p, std::string_view where) {
  if (p.touched_rows == nullptr || p.row_size <= 0) return;
  const std::size_t n = p.grad.size(), row = std::size_t(p.row_size);
  if (n % row != 0 || p.touched_rows->size() != n / row)
    throw ShapeError(std::string(where) + ": parameter '" + p.name + "' has " + std::to_string(n) +
                     " gradient values, row_size " + std::to_string(row) + " and " +
                     std::to_string(p.touched_rows->size()) + " touched-row flags");
  // The list's entries index rows directly (the norm reads them, the update writes them).
  if (p.touched_list != nullptr)
    for (const Index r : *p.touched_list)
      if (r < 0 || std::size_t(r) >= n / row)
        throw ShapeError(std::string(where) + ": parameter '" + p.name + "' lists touched row " + std::to_string(r) +
                         ", outside [0, " + std::to_string(n / row) + ")");
}

/// A touched list longer than 1/list_scan_divisor of the rows is walked by scanning the flags instead: rows in
/// ascending order stream through memory, where the list's first-touched order jumps between rows at random from
/// one backward call to the next.
inline constexpr std::size_t list_scan_divisor = 8;

/// Appends the pieces of parameter `index` that walk its rows (by_rows) or its elements. Rows go by the touched list
/// when the view has one and it is short, else by the flags (nullptr flags: every row).
template <class Scalar>
void append_pieces(std::vector<Piece>& out, const ParameterView<Scalar>& p, std::size_t index, bool by_rows) {
  if (!by_rows) {
    const std::size_t n = p.value.size();
    for (std::size_t b = 0; b < n; b += piece_elements) out.push_back({index, PieceMode::Elements, b, std::min(n, b + piece_elements)});
    return;
  }
  const std::size_t row = std::size_t(p.row_size);
  const std::size_t per_piece = std::max<std::size_t>(1, piece_elements / row);
  const std::size_t rows = p.value.size() / row;
  const bool listed = p.touched_list != nullptr && p.touched_rows != nullptr &&
                      p.touched_list->size() * list_scan_divisor < rows;
  const std::size_t count = listed ? p.touched_list->size() : rows;
  for (std::size_t b = 0; b < count; b += per_piece)
    out.push_back({index, listed ? PieceMode::ListedRows : PieceMode::FlaggedRows, b, std::min(count, b + per_piece)});
}

/// Calls f(begin, end) for every element range of piece `c` of parameter p (rows are row_size elements).
template <class Scalar, class F>
void for_each_range(const ParameterView<Scalar>& p, const Piece& c, F&& f) {
  if (c.mode == PieceMode::Elements) {
    f(c.begin, c.end);
    return;
  }
  const std::size_t row = std::size_t(p.row_size);
  for (std::size_t i = c.begin; i < c.end; ++i) {
    std::size_t r = i;
    if (c.mode == PieceMode::ListedRows) {
      r = std::size_t((*p.touched_list)[i]);
    } else if (p.touched_rows != nullptr && (*p.touched_rows)[i] == 0) {
      continue;
    }
    f(r * row, (r + 1) * row);
  }
}

/// The pieces that cover every gradient element that may be non-zero: the whole gradient, or only the touched rows
/// when the view carries touched-row flags (untouched rows are zero by the ParameterView contract, so skipping them
/// changes neither the norm nor the clipped gradient).
template <class Scalar>
std::vector<Piece> live_pieces(const std::vector<ParameterView<Scalar>>& params, std::string_view where) {
  std::vector<Piece> pieces;
  for (std::size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    check_touched(p, where);
    append_pieces(pieces, p, i, p.touched_rows != nullptr && p.row_size > 0);
  }
  return pieces;
}

/// Independent double accumulators of the norm pass (several vectors of them on any SIMD width): with one vector, each
/// multiply-add waits for the previous one and the pass runs slower than memory delivers the gradients.
inline constexpr std::size_t square_lanes = 32;

/// Adds Σ g² over [0, n) into the lanes, element i into lane i mod square_lanes (a fixed order the compiler
/// vectorises).
template <class Scalar>
inline void add_squares(const Scalar* g, std::size_t n, double (&lanes)[square_lanes]) {
  std::size_t i = 0;
  for (; i + square_lanes <= n; i += square_lanes)
    for (std::size_t j = 0; j < square_lanes; ++j) {
      const double x = double(g[i + j]);
      lanes[j] += x * x;
    }
  for (; i < n; ++i) {
    const double x = double(g[i]);
    lanes[i % square_lanes] += x * x;
  }
}

/// The lanes' total, in a fixed pairwise order.
inline double lane_total(double (&lanes)[square_lanes]) {
  for (std::size_t width = square_lanes / 2; width > 0; width /= 2)
    for (std::size_t j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  return lanes[0];
}

/// Σ g² over the pieces: per-piece sums in parallel, then added in piece order (same bits for any thread count).
template <class Scalar>
double sum_of_squares(const std::vector<ParameterView<Scalar>>& params, const std::vector<Piece>& pieces) {
  std::vector<double> partial(pieces.size(), 0.0);  // [pieces]
  parallel_streams(Index(pieces.size()), [&](StreamQueue::Claims& claims) {
    for (Index c = claims.claim(); c >= 0; c = claims.claim()) {
      const Piece& piece = pieces[std::size_t(c)];
      const auto& p = params[piece.param];
      double lanes[square_lanes] = {};
      for_each_range(p, piece, [&](std::size_t b, std::size_t e) { add_squares(p.grad.data() + b, e - b, lanes); });
      partial[std::size_t(c)] = lane_total(lanes);
    }
  });
  double sum = 0.0;
  for (double s : partial) sum += s;
  return sum;
}

}  // namespace detail::clip

/**
 * @brief The L2 norm of all gradients together, sqrt(Σ_params Σ_i g_i²), accumulated in double. Deterministic: the
 *        gradients are cut into fixed pieces (independent of the thread count), each piece is summed by one thread in
 *        a fixed order and the pieces' sums are added in order, so the result has the same bits for any thread count.
 *        Rows listed in touched_list (or flagged in touched_rows) are the only ones read when a view has them.
 * @throws ShapeError if a view's touched-row flags do not match its gradient size and row_size.
 */
template <std::floating_point Scalar>
double global_grad_norm(const std::vector<ParameterView<Scalar>>& params) {
  return std::sqrt(detail::clip::sum_of_squares(params, detail::clip::live_pieces(params, "global_grad_norm")));
}

/**
 * @brief Scales all gradients by max_norm / norm when their global norm exceeds max_norm (exactly, without the
 *        1e-6 that torch.nn.utils.clip_grad_norm_ adds to the norm); otherwise leaves them unchanged.
 * @return the norm before clipping. When it is not finite (a NaN/Inf gradient) the gradients are left unchanged,
 *         so the caller can detect it and skip the step.
 * @throws ConfigError unless max_norm is finite and positive; ShapeError as global_grad_norm.
 */
template <std::floating_point Scalar>
double clip_grad_norm(const std::vector<ParameterView<Scalar>>& params, double max_norm) {
  detail::check_config(std::isfinite(max_norm) && max_norm > 0.0, "clip_grad_norm",
                       "max_norm = " + std::to_string(max_norm) + " must be positive");
  const auto pieces = detail::clip::live_pieces(params, "clip_grad_norm");
  const double norm = std::sqrt(detail::clip::sum_of_squares(params, pieces));
  if (!std::isfinite(norm) || norm <= max_norm) return norm;
  const double scale = max_norm / norm;
  detail::parallel_streams(Index(pieces.size()), [&](detail::StreamQueue::Claims& claims) {
    for (Index c = claims.claim(); c >= 0; c = claims.claim()) {
      const auto& piece = pieces[std::size_t(c)];
      const auto& p = params[piece.param];
      detail::clip::for_each_range(p, piece, [&](std::size_t b, std::size_t e) {
        for (std::size_t i = b; i < e; ++i) p.grad[i] = Scalar(double(p.grad[i]) * scale);
      });
    }
  });
  return norm;
}

}  // namespace memoryformer
