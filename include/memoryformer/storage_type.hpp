// SPDX-License-Identifier: MIT
// StorageType: the precision table values or dense weights are stored in, its size and its printed name.
#pragma once

#include <string_view>

namespace memoryformer {

/// Storage precision of table values or dense weights.
enum class StorageType { F32, F16, BF16 };

/// Bytes of one stored value: 4 for F32, 2 for F16 and BF16.
constexpr double bytes_per_value(StorageType type) noexcept { return type == StorageType::F32 ? 4.0 : 2.0; }

/// Short name ("fp32", "fp16", "bf16") for printing.
constexpr std::string_view storage_type_name(StorageType type) noexcept {
  return type == StorageType::F32 ? "fp32" : (type == StorageType::F16 ? "fp16" : "bf16");
}

}  // namespace memoryformer
