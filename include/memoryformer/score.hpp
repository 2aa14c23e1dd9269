// SPDX-License-Identifier: MIT
// The differentiable weight of a retrieved table row (design §1.4): the `l1` variant of the authors' code (default)
// and the `paper` variant (Eq. 9–10, closed-form softmax over all 2^τ buckets, with a temperature).
#pragma once

#include <cmath>
#include <string>
#include <string_view>

#include "detail/checks.hpp"
#include "error.hpp"

namespace memoryformer {

/// Which score formula weights a retrieved row.
enum class ScoreKind {
  L1,     ///< s = (Σ_j |z_j|) · Π_j σ(2|z_j|)   — the authors' code, the default
  Paper,  ///< s = Π_j σ(2|z_j| / t)              — the paper's Eq. 9–10, temperature t > 0
};

inline std::string_view score_kind_name(ScoreKind kind) { return kind == ScoreKind::L1 ? "l1" : "paper"; }

/// Parses "l1" or "paper"; throws ConfigError otherwise.
inline ScoreKind parse_score_kind(std::string_view text) {
  if (text == "l1") return ScoreKind::L1;
  if (text == "paper") return ScoreKind::Paper;
  throw ConfigError("score kind is '" + std::string(text) + "', expected 'l1' or 'paper'");
}

/// The hashing settings shared by every layer that reads the same hash: code length and score formula.
struct HashConfig {
  int tau = 8;                      ///< bits per chunk (code length), 1..16
  ScoreKind score = ScoreKind::L1;  ///< score formula
  double temperature = 1.0;         ///< t of the paper variant (> 0); the l1 variant ignores it

  /// Throws ConfigError naming the bad value. `where` prefixes the message.
  void validate(std::string_view where) const {
    detail::check_config(tau >= 1 && tau <= 16, where, "tau = " + std::to_string(tau) + " is outside 1..16");
    detail::check_config(std::isfinite(temperature) && temperature > 0.0, where,
                         "temperature = " + std::to_string(temperature) + " must be finite and > 0");
  }
};

}  // namespace memoryformer
