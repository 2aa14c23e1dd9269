// SPDX-License-Identifier: MIT
// Element types of stored tensors (f32, f64): what checkpoints and model configs name a scalar type by.
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>

namespace memoryformer {

/// Element type of a checkpoint tensor.
enum class DType : std::uint8_t {
  F32 = 1,  ///< IEEE-754 binary32
  F64 = 2,  ///< IEEE-754 binary64
};

/// The element types a checkpoint tensor can hold.
template <class S>
concept CheckpointScalar = std::same_as<S, float> || std::same_as<S, double>;

/// Bytes per element of `dtype`.
constexpr std::size_t dtype_size(DType dtype) { return dtype == DType::F64 ? 8 : 4; }

/// "f32" or "f64".
constexpr const char* dtype_name(DType dtype) { return dtype == DType::F64 ? "f64" : "f32"; }

/// The DType of float (F32) or double (F64).
template <CheckpointScalar S>
constexpr DType dtype_of() {
  return std::same_as<S, double> ? DType::F64 : DType::F32;
}

}  // namespace memoryformer
