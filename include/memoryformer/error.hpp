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

/// A value outside its domain that is not a shape or a configuration: a token id ≥ vocab, a target outside the
/// classes, outputs that overlap inputs they must not.
class ValueError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// An index outside its range in checked access: a table row, a sequence of a cache, a validation window.
class IndexError : public std::out_of_range {
 public:
  using std::out_of_range::out_of_range;
};

/// More than a fixed capacity holds: tokens beyond a KV cache's max_seq (the cache is then unchanged).
class CapacityError : public std::length_error {
 public:
  using std::length_error::length_error;
};

/// A file or directory the system cannot open, write, sync or rename (the message names the path and the reason).
class IoError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace memoryformer
