// SPDX-License-Identifier: MIT
// Non-temporal (streaming) stores for copies far larger than the caches, and the fence that orders them.
#pragma once

#include <cstddef>
#include <cstring>

#include "../types.hpp"
#include "simd.hpp"

namespace memoryformer::detail {

MEMORYFORMER_SIMD_WARNINGS_BEGIN

/// Copies `count` floats to dst (64-byte aligned) with non-temporal stores where whole 64-byte lines are written, so
/// that a copy of many megabytes neither reads every destination line first nor evicts the caches' contents; the
/// caller orders the stores (store_fence_if_streamed) before the data is read.
inline void copy_floats_streaming(std::byte* dst, const float* src, Index count) {
#if defined(MEMORYFORMER_HAVE_AVX512)
  if (count % 16 == 0) {
    for (Index i = 0; i < count; i += 16)
      _mm512_stream_ps(reinterpret_cast<float*>(dst) + i, _mm512_loadu_ps(src + i));
    return;
  }
#elif defined(MEMORYFORMER_HAVE_AVX2)
  if (count % 16 == 0) {
    for (Index i = 0; i < count; i += 8)
      _mm256_stream_ps(reinterpret_cast<float*>(dst) + i, _mm256_loadu_ps(src + i));
    return;
  }
#endif
  std::memcpy(dst, src, size_t(count) * sizeof(float));
}

/// Orders the non-temporal stores this thread made so far before any later load or store (another thread may read
/// their data once it has synchronised with this one).
inline void store_fence_if_streamed() {
#if defined(MEMORYFORMER_HAVE_AVX512) || defined(MEMORYFORMER_HAVE_AVX2)
  _mm_sfence();
#endif
}

MEMORYFORMER_SIMD_WARNINGS_END

}  // namespace memoryformer::detail
