// SPDX-License-Identifier: MIT
// Which SIMD instruction sets the kernels may use, decided at compile time from the target flags.
// MEMORYFORMER_DISABLE_SIMD forces the portable scalar kernels (CI builds the tests that way too).
#pragma once

#include <string_view>

#include "../config.hpp"

#if !defined(MEMORYFORMER_DISABLE_SIMD) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__)
#define MEMORYFORMER_HAVE_AVX512 1
#endif
#if !defined(MEMORYFORMER_DISABLE_SIMD) && defined(__AVX2__) && defined(__FMA__)
#define MEMORYFORMER_HAVE_AVX2 1
#endif
#if defined(MEMORYFORMER_HAVE_AVX512) || defined(MEMORYFORMER_HAVE_AVX2)
#include <immintrin.h>
#endif

// GCC 12's AVX-512 intrinsics initialise their pass-through operand with itself (GCC bug 105593), which
// -Wmaybe-uninitialized reports at every inlined call; the operand is never read. Kernels using AVX-512
// intrinsics are wrapped in these two macros.
#if defined(__GNUC__) && !defined(__clang__)
#define MEMORYFORMER_SIMD_WARNINGS_BEGIN \
  _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#define MEMORYFORMER_SIMD_WARNINGS_END _Pragma("GCC diagnostic pop")
#else
#define MEMORYFORMER_SIMD_WARNINGS_BEGIN
#define MEMORYFORMER_SIMD_WARNINGS_END
#endif

// The small helpers of the SIMD kernels (transposes, the vector exponential, per-chunk statistics) pass arrays of
// vectors by pointer. If the compiler declines to inline one (GCC does once a translation unit has instantiated
// enough kernels: the benchmark's did, for TransposedBlock::load), those arrays go through memory in the hot loop
// (see docs/performance-log.md, e8fa8d3), so they are always inlined.
#define MEMORYFORMER_ALWAYS_INLINE [[gnu::always_inline]] inline

namespace memoryformer {

/// An instruction-set path of the kernels. Every path computes the same codes; scores agree within a few ulp.
enum class Isa { Scalar, Avx2, Avx512 };

inline std::string_view isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "scalar";
  }
}

/// The best path compiled into this translation unit (what the layers use by default).
constexpr Isa best_isa() {
#if defined(MEMORYFORMER_HAVE_AVX512)
  return Isa::Avx512;
#elif defined(MEMORYFORMER_HAVE_AVX2)
  return Isa::Avx2;
#else
  return Isa::Scalar;
#endif
}

/// True when `isa` was compiled in (the scalar path always is).
constexpr bool isa_available(Isa isa) {
  switch (isa) {
    case Isa::Avx512:
#if defined(MEMORYFORMER_HAVE_AVX512)
      return true;
#else
      return false;
#endif
    case Isa::Avx2:
#if defined(MEMORYFORMER_HAVE_AVX2)
      return true;
#else
      return false;
#endif
    default: return true;
  }
}

}  // namespace memoryformer
