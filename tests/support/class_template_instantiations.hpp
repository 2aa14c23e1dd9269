// SPDX-License-Identifier: MIT
// Test support: the library's class templates the unit tests use most, declared as explicitly instantiated
// elsewhere (tests/support/class_template_instantiations_*.cpp), so each test source stops compiling its own copy
// of every member of the models, blocks, trainers and optimizers: a build-time measure only (the unit-test target
// force-includes this header through its precompiled header, the examples and other programs built with the tests
// through memoryformer_use_class_instantiations); each still sees the library's full definitions, and a build
// without it compiles the same program.
#pragma once

#include <memoryformer/memoryformer.hpp>

// X(...) is applied to each class template specialisation (variadic: the names contain commas).
#define MEMORYFORMER_TEST_LAYER_TEMPLATES(X)                                                     \
  X(MemoryLayer<float>)                                                                          \
  X(MemoryLayer<double>)                                                                         \
  X(MemoryBlock<float>)                                                                          \
  X(MemoryBlock<double>)                                                                         \
  X(MemoryFormerBlock<float>)                                                                    \
  X(MemoryFormerBlock<double>)                                                                   \
  X(TransformerBlock<float>)                                                                     \
  X(TransformerBlock<double>)                                                                    \
  X(AdamW<float>)                                                                                \
  X(AdamW<double>)                                                                               \
  X(DataParallel<float>)                                                                         \
  X(DataParallel<double>)

#define MEMORYFORMER_TEST_MODEL_TEMPLATES(X)                                                     \
  X(LanguageModel<MemoryFormerBlock, float>)                                                     \
  X(LanguageModel<MemoryFormerBlock, double>)                                                    \
  X(LanguageModel<TransformerBlock, float>)                                                      \
  X(LanguageModel<TransformerBlock, double>)                                                     \
  X(Trainer<LanguageModel<MemoryFormerBlock, float>>)                                            \
  X(Trainer<LanguageModel<MemoryFormerBlock, double>>)                                           \
  X(Trainer<LanguageModel<TransformerBlock, float>>)

#define MEMORYFORMER_TEST_DECLARE_INSTANTIATION(...) extern template class __VA_ARGS__;

namespace memoryformer {
MEMORYFORMER_TEST_LAYER_TEMPLATES(MEMORYFORMER_TEST_DECLARE_INSTANTIATION)
MEMORYFORMER_TEST_MODEL_TEMPLATES(MEMORYFORMER_TEST_DECLARE_INSTANTIATION)
}  // namespace memoryformer
