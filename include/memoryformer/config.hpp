// SPDX-License-Identifier: MIT
// Every user-overridable macro of the library, in one place.
#pragma once

#include <cassert>

/// Internal invariant check. Defaults to assert(); define before including any header to override.
/// Public entry points never rely on it: their argument checks throw, in every build type.
#ifndef MEMORYFORMER_ASSERT
#define MEMORYFORMER_ASSERT(cond) assert(cond)
#endif

// MEMORYFORMER_DISABLE_SIMD: define to compile only the portable scalar kernels, whatever -m flags say.
// (detail/simd.hpp reads it.)
