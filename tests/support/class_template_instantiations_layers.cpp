// SPDX-License-Identifier: MIT
// The explicit instantiations support/class_template_instantiations.hpp declares: the layer half (two sources, so
// the two halves compile in parallel).
#include "support/class_template_instantiations.hpp"

#define MEMORYFORMER_TEST_DEFINE_INSTANTIATION(...) template class __VA_ARGS__;

namespace memoryformer {
MEMORYFORMER_TEST_LAYER_TEMPLATES(MEMORYFORMER_TEST_DEFINE_INSTANTIATION)
}  // namespace memoryformer
