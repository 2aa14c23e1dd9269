// SPDX-License-Identifier: MIT
// Runtime setting → compile-time kernel. τ is a user setting (1..16), but kernels unroll their per-chunk loops only
// when τ is a constant, so every kernel is instantiated for each supported τ and picked by one switch here. The
// instruction-set path is a user setting too (Isa), checked here against what this build compiled in.
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
    default: throw std::invalid_argument("dispatch_tau: tau = " + std::to_string(tau) + " is outside 1..16");
  }
}

/// @throws ConfigError naming `where` when the `isa` kernels are not compiled into this build.
inline void check_isa_compiled(const std::string& where, Isa isa) {
  if (!isa_available(isa))
    throw ConfigError(where + ": the " + std::string(isa_name(isa)) +
                      " kernels are not compiled into this build (compile with the matching -m flags)");
}

}  // namespace memoryformer::detail
