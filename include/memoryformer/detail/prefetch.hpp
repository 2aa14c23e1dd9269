// SPDX-License-Identifier: MIT
// Software prefetch hints of the kernels: one cache line, or every line of a byte range, into L1 or L2.
#pragma once

#include <cstdint>

#include "../types.hpp"

namespace memoryformer::detail {

/// Where a prefetch hint asks the line to go: L1 for data read soon, L2 for streams fetched far ahead of their use.
enum class PrefetchTo { L1, L2 };

// The prefetch hints are inline assembly on x86 rather than __builtin_prefetch: GCC 12 (-O2 and above) deleted the
// __builtin_prefetch calls of both row decode kernels (packed_rows_decode, rowmajor_decode) as dead code — their
// assembly had no prefetch instruction at all (-fno-tree-dce brought them back) — while a volatile asm statement is
// always kept. Its "m" operand only names the address: nothing is loaded.

/// Hint that [p, p + 64) will be read (prefetcht0 into L1, prefetcht1 into L2).
template <PrefetchTo To = PrefetchTo::L1>
inline void prefetch_line(const void* p) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  if constexpr (To == PrefetchTo::L1)
    __asm__ __volatile__("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
  else
    __asm__ __volatile__("prefetcht1 %0" : : "m"(*static_cast<const char*>(p)));
#elif defined(__GNUC__)
  __builtin_prefetch(p, 0, To == PrefetchTo::L1 ? 3 : 2);
#else
  (void)p;
#endif
}

/// Hint that every cache line of [p, p + bytes) will be read.
template <PrefetchTo To = PrefetchTo::L1>
inline void prefetch_range(const void* p, Index bytes) {
  const auto end = reinterpret_cast<std::uintptr_t>(p) + std::uintptr_t(bytes);
  for (auto a = reinterpret_cast<std::uintptr_t>(p) & ~std::uintptr_t(63); a < end; a += 64)
    prefetch_line<To>(reinterpret_cast<const void*>(a));
}

}  // namespace memoryformer::detail
