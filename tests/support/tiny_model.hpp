// SPDX-License-Identifier: MIT
// Test support: the smallest MemoryFormer language model that still has every part (one block, two heads, rotary,
// τ = 4 with an expansion bit), for tests that need whole-model checkpoints quickly.
#pragma once

#include <memoryformer/model.hpp>

namespace memoryformer::testing_support {

/// A one-block MemoryFormerLM config: vocab 7, d = 8, 2 heads, rotary over 2 dims, τ = 4, 1 expansion bit.
inline MemoryFormerLM<float>::Config tiny_memoryformer_lm() {
  MemoryFormerLM<float>::Config c;
  c.vocab = 7;
  c.layers = 1;
  c.block.d = 8;
  c.block.heads = 2;
  c.block.rotary_dims = 2;
  c.block.tau = 4;
  c.block.expand_bits = 1;
  return c;
}

}  // namespace memoryformer::testing_support
