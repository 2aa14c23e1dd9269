// SPDX-License-Identifier: MIT
// The checks a Memory Layer (MemoryLayer, FrozenMemoryLayer) runs on its input and on a hash it is handed. `Config`
// is a MemoryLayerConfig; it is a template parameter so that this header need not include memory_layer.hpp.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <sstream>
#include <string>

#include "../error.hpp"
#include "../hash.hpp"
#include "../types.hpp"
#include "checks.hpp"

namespace memoryformer::detail {

/// The input shape a layer with `config` expects, for error messages.
template <class Config>
std::string expected_layer_input(const Config& config) {
  std::ostringstream os;
  os << "(N, " << config.d_in << ") = (N, K·τ) with K = " << config.num_tables() << ", τ = " << config.tau;
  return os.str();
}

/// @throws ShapeError naming `where` if x does not have d_in columns.
template <class Scalar, class Config>
void check_layer_input(const char* where, const Config& config, ConstMatrixRef<Scalar> x) {
  if (x.cols() != config.d_in) throw_shape(where, "x", x.rows(), x.cols(), expected_layer_input(config));
}

/// @throws StateError for an empty hash, ShapeError for one that does not fit a layer with `config`.
template <class Scalar, class Config>
void check_layer_hash(const char* where, const Config& config, const HashResult<Scalar>& h) {
  if (h.empty()) throw StateError(std::string(where) + ": the hash cache is empty; call forward (or hash) first");
  if (h.tau != config.tau || h.tables != config.num_tables() || Index(h.codes.size()) != h.rows * h.tables ||
      h.scores.rows() != h.rows || h.scores.cols() != h.tables) {
    std::ostringstream os;
    os << where << ": the hash has K = " << h.tables << ", τ = " << h.tau << "; this layer needs K = "
       << config.num_tables() << ", τ = " << config.tau;
    throw ShapeError(os.str());
  }
  // Codes index table rows directly: one outside [0, 2^τ) would read or write another table's rows or past the end.
  // The unsigned maximum catches negative codes too, in one pass the compiler vectorises.
  std::uint32_t max_code = 0;
  for (std::int32_t c : h.codes) max_code = std::max(max_code, std::uint32_t(c));
  if (max_code >= (std::uint32_t(1) << config.tau)) {
    for (std::size_t i = 0; i < h.codes.size(); ++i) {
      const std::int32_t c = h.codes[i];
      if (c < 0 || c >= (std::int32_t(1) << config.tau)) {
        std::ostringstream os;
        os << where << ": the hash has code " << c << " at (row " << Index(i) / h.tables << ", table "
           << Index(i) % h.tables << "), outside [0, 2^" << config.tau << ")";
        throw ShapeError(os.str());
      }
    }
  }
}

}  // namespace memoryformer::detail
