// SPDX-License-Identifier: MIT
// Test support: loading reference-vector tensors into layers, and the runners for the block-level files.
#pragma once

#include <algorithm>
#include <string>

#include <gtest/gtest.h>

#include <memoryformer/io/text_tensor.hpp>
#include <memoryformer/memory_layer.hpp>

namespace memoryformer::testing_support {

/// Copies a file tensor into a parameter buffer, checking the element count.
template <class Scalar>
void copy_tensor(std::span<Scalar> dst, const TextTensor& src) {
  ASSERT_EQ(Index(dst.size()), src.size()) << "tensor '" << src.name << "' does not fit its parameter";
  std::transform(src.values.begin(), src.values.end(), dst.begin(), [](double v) { return Scalar(v); });
}

/// Sets a MemoryLayer's tables (and bias, when the file has it) from the named tensors.
template <class Scalar>
void load_into(MemoryLayer<Scalar>& layer, const TextTensorFile& file, const std::string& tables,
               const std::string& bias) {
  copy_tensor(layer.tables().values(), file.at(tables));
  if (file.has(bias)) copy_tensor(std::span<Scalar>(layer.bias().data(), size_t(layer.bias().size())), file.at(bias));
}

template <class Scalar>
void run_memory_block_file(const TextTensorFile& file) {
  GTEST_SKIP() << file.path << ": skipped — MemoryBlock is not implemented yet";
}

template <class Scalar>
void run_memoryformer_block_file(const TextTensorFile& file) {
  GTEST_SKIP() << file.path << ": skipped — MemoryFormerBlock is not implemented yet";
}

}  // namespace memoryformer::testing_support
