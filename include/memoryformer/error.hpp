// SPDX-License-Identifier: MIT
// The exception types the library throws (the argument checks that throw them: detail/checks.hpp).
#pragma once

#include <stdexcept>
#include <string>

namespace memoryformer {

/// Bad shape of a tensor argument. Message names the function, the argument, what it is and what was expected.
class ShapeError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// Invalid configuration value (τ out of range, non-positive temperature, d not divisible by τ, ...).
class ConfigError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// A non-finite value (NaN or ±Inf) where the library rejects them (inputs of forward and backward).
class NonFiniteError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// Misuse of call order, e.g. backward before forward.
class StateError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A failed exchange between the ranks of a distributed run (an MPI error, a message too large for one call), or
/// ranks that no longer agree (replicas whose parameters differ, a rank count that does not match a checkpoint).
class DistributedError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A file that cannot be read: wrong magic, version, checksum mismatch, truncation, parse error.
class FormatError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace memoryformer
