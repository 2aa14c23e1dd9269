// SPDX-License-Identifier: MIT
// Runtime setting → compile-time kernel. τ is a user setting (1..16), but kernels unroll their per-chunk loops only
// when τ is a constant, so every kernel is instantiated for each supported τ and picked by one switch here. The
// instruction-set path (Isa) is a user setting too: checked here against what this build compiled in, and turned
// into the kernels' template argument by one dispatcher.
#pragma once

#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "../error.hpp"
#include "simd.hpp"

namespace memoryformer::detail {

inline constexpr int min_tau = 1;
inline constexpr int max_tau = 16;

template <int Tau>
using TauConstant = std::integral_constant<int, Tau>;

/// Calls f(TauConstant<tau>{}) for tau in [1, 16]; the caller has validated tau (configs reject others).
template <class F>
decltype(auto) dispatch_tau(int tau, F&& f) {
  switch (tau) {
    case 1: return f(TauConstant<1>{});
    case 2: return f(TauConstant<2>{});
    case 3: return f(TauConstant<3>{});
    case 4: return f(TauConstant<4>{});
    case 5: return f(TauConstant<5>{});
    case 6: return f(TauConstant<6>{});
    case 7: return f(TauConstant<7>{});
    case 8: return f(TauConstant<8>{});
    case 9: return f(TauConstant<9>{});
    case 10: return f(TauConstant<10>{});
    case 11: return f(TauConstant<11>{});
    case 12: return f(TauConstant<12>{});
    case 13: return f(TauConstant<13>{});
    case 14: return f(TauConstant<14>{});
    case 15: return f(TauConstant<15>{});
    case 16: return f(TauConstant<16>{});
    default: throw ConfigError("dispatch_tau: tau = " + std::to_string(tau) + " is outside 1..16");
  }
}

/// @throws ConfigError naming `where` when the `isa` kernels are not compiled into this build.
inline void check_isa_compiled(const std::string& where, Isa isa) {
  if (!isa_available(isa))
    throw ConfigError(where + ": the " + std::string(isa_name(isa)) +
                      " kernels are not compiled into this build (compile with the matching -m flags)");
}

/**
 * Calls f.template operator()<I>() with I = isa when isa is a SIMD path compiled into this translation unit and
 * returns true; returns false, calling nothing, for Isa::Scalar or a path not compiled in, so that the portable path
 * is the caller's and f is never instantiated for Isa::Scalar (fast kernels do not exist for it).
 */
template <class F>
bool dispatch_simd(Isa isa, F&& f) {
#if defined(MEMORYFORMER_HAVE_AVX512)
  if (isa == Isa::Avx512) {
    f.template operator()<Isa::Avx512>();
    return true;
  }
#endif
#if defined(MEMORYFORMER_HAVE_AVX2)
  if (isa == Isa::Avx2) {
    f.template operator()<Isa::Avx2>();
    return true;
  }
#endif
  (void)isa;
  (void)f;
  return false;
}

}  // namespace memoryformer::detail
