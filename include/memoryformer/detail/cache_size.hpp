// SPDX-License-Identifier: MIT
// The size of this core's L2 cache, which sets the working set of the prefill loop (gather_kernels.hpp): the
// best panel size follows the L2 size, which differs between CPUs (2 MB on some Intel Xeons, 1 MB on Zen 4).
#pragma once

#include "../types.hpp"

#if defined(__has_include)
#if __has_include(<unistd.h>)
#include <unistd.h>
#endif
#endif

namespace memoryformer::detail {

/// Bytes of one core's L2 cache as the C library reports it (glibc reads cpuid), or 1 MB where it does not tell.
inline Index l2_cache_bytes() {
#if defined(_SC_LEVEL2_CACHE_SIZE)
  const long bytes = sysconf(_SC_LEVEL2_CACHE_SIZE);
  if (bytes > 0) return Index(bytes);
#endif
  return Index(1) << 20;
}

}  // namespace memoryformer::detail
