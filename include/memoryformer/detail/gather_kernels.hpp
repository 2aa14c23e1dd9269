// SPDX-License-Identifier: MIT
// Fast forward kernels of the Memory Layer (design §1.5: y = b + Σ_k s_k · T_k[code_k]) for float32 activations over
// float32, bfloat16 or float16 table storage, AVX-512 and AVX2.
//
// Three loop orders, all computing every output as the same fused-multiply-add chain — acc = b; acc = fma(s_k,
// T_k[code_k], acc) for k = 0, 1, …, K−1 — so they give identical bits for any thread count, token count, ISA
// (AVX-512 or AVX2) and loop order:
//  - decode (few tokens): token-major, a token's output columns stay in vector registers while its K rows stream
//    past; the rows come from DRAM, so the call requests them into L2 as far ahead as a quarter of L2 holds (all of
//    them at d_out = 512, K = 64).
//  - prefill (many tokens): column-blocked. Tables are cut into panels of 32 output columns × a group of tables
//    that fits a quarter of L2; each packed panel is first read through once in order (the hardware streams it into
//    L2), then all tokens go through it, 4 tokens at a time, reading the group's plan (chunk offsets and scores) as
//    one contiguous stream. Rows are read with plain vector loads, never hardware gathers.
//  - table order (row-major float32 tables, about 2^τ tokens): every used row read once, in address order, and added
//    into the output rows of the tokens that selected it (rowmajor_table_order).
// The panel layout (PanelLayout) is the storage of PackedTables and of MemoryLayer<float>'s packed copy of its
// training tables; while that copy is out of date, the row-major tables are packed into a per-thread panel buffer on
// the fly.
#pragma once

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "../storage_type.hpp"
#include "../types.hpp"
#include "cache_size.hpp"
#include "half.hpp"
#include "parallel.hpp"
#include "prefetch.hpp"
#include "scratch.hpp"
#include "simd.hpp"
#include "sorted_contributions.hpp"
#include "streaming_stores.hpp"
#include "vector_ops.hpp"

namespace memoryformer::detail {

/// Largest number of output columns per panel chunk (4 zmm / 8 ymm of float accumulators per token).
inline constexpr Index max_chunk_values = 64;
/// Bytes of one table group of a panel: the L2-resident working set of the prefill loop. A quarter of L2, because
/// L2 also holds the partial sums [N, cv], the group's plan and the lines of the previous panel not yet evicted;
/// larger groups measured slower (see docs/performance.md, "What bounds each kernel").
inline Index panel_budget_bytes() {
  static const Index bytes = std::clamp<Index>(l2_cache_bytes() / 4, Index(128) << 10, Index(1) << 20);
  return bytes;
}

/// chunk_values argument of PanelLayout::make selecting the row layout.
inline constexpr Index row_chunk = -1;

/// Columns per chunk used unless told otherwise, for every storage type (chosen by measurement, see
/// docs/performance-log.md): 32 columns are 128 B of fp32 or 64 B of bf16 per chunk; 64-column bf16 chunks halve the
/// table groups per panel, which costs more than the wider chunks save.
constexpr Index default_chunk_values(StorageType) { return 32; }

/// Geometry of the panel layout. Chunk (cb, k, r) — columns [cv·cb, cv·cb + cv) of row r of table k — lives at
/// byte cb · cb_stride + k · table_stride + r · chunk_bytes.
/// A table is 2^τ chunks plus one spare cache line, so that row r of consecutive tables falls in different cache
/// sets; the last column block is zero-padded to cv columns.
struct PanelLayout {
  Index tables = 0;
  Index rows = 0;
  Index width = 0;
  StorageType storage = StorageType::F32;
  Index cv = 16;  // columns per chunk: 16, 32 or 64 (bf16: 32 or 64)
  Index value_bytes = 4;
  Index chunk_bytes = 0;
  Index table_stride = 0;
  Index cb_stride = 0;
  Index column_blocks = 0;
  Index budget = panel_budget_bytes();  // bytes of one table group (the prefill loop's L2 working set)
  bool row_layout = false;              // made with row_chunk (for widths ≤ 64 it coincides with one panel)

  /// chunk_values: 0 = default_chunk_values, 16/32/64 = panels, row_chunk = whole rows (one column block: each
  /// row contiguous, padded to a multiple of 64 values — the decode layout).
  static PanelLayout make(Index tables, int tau, Index width, StorageType storage, Index chunk_values = 0) {
    PanelLayout l;
    l.tables = tables;
    l.rows = Index(1) << tau;
    l.width = width;
    l.storage = storage;
    l.row_layout = chunk_values == row_chunk;
    l.cv = chunk_values == row_chunk ? (width + max_chunk_values - 1) / max_chunk_values * max_chunk_values
                                     : (chunk_values > 0 ? chunk_values : default_chunk_values(storage));
    l.value_bytes = storage == StorageType::F32 ? 4 : 2;
    l.chunk_bytes = l.cv * l.value_bytes;
    l.table_stride = l.rows * l.chunk_bytes + 64;
    l.cb_stride = tables * l.table_stride;
    l.column_blocks = (width + l.cv - 1) / l.cv;
    return l;
  }
  Index total_bytes() const { return column_blocks * cb_stride; }
  /// True for the row layout (chunks wider than a panel chunk).
  bool rows_contiguous() const { return cv > max_chunk_values; }
  Index chunk_offset(Index cb, Index k, Index code) const {
    return cb * cb_stride + k * table_stride + code * chunk_bytes;
  }
  /// Valid columns of column block cb (cv except possibly the last).
  Index block_columns(Index cb) const { return std::min(cv, width - cb * cv); }
  /// Tables per L2 group: as many as fit the budget, then evened out over the groups (64 tables of 2^8 rows in
  /// fp32: 8 groups of 8, not 9 of 7 and one of 1).
  Index group_tables() const {
    const Index fit = std::clamp<Index>(budget / (rows * chunk_bytes), 1, tables);
    const Index groups = (tables + fit - 1) / fit;
    return (tables + groups - 1) / groups;
  }
};

/// Token counts from which the column-blocked prefill loop beats the token-major one. Each token reads 1/2^τ of
/// the tables, and a prefill call streams all of them, so the switch is a multiple of 2^τ (set by benchmarks at
/// τ = 8 and 10, d_out = 512; the paths give identical bits, so the thresholds only move time):
///  - pre-packed panels, no row copy (token-major reads scattered 64-byte chunks): from 2^τ/2 tokens;
///  - panels and a row copy (FrozenLayout::Both; token-major reads whole rows): from 0.75·2^τ;
///  - row-major training tables without MemoryLayer's packed copy (every prefill call repacks all the panels):
///    from 3·2^τ. With a current copy MemoryLayer switches like FrozenLayout::Both (its row-major tables are the row
///    copy).
inline Index prefill_min_tokens(int tau) { return std::max<Index>(32, (Index(1) << tau) / 2); }
inline Index rows_prefill_min_tokens(int tau) { return std::max<Index>(32, 3 * (Index(1) << tau) / 4); }
inline Index rowmajor_prefill_min_tokens(int tau) { return std::max<Index>(32, 3 * (Index(1) << tau)); }
/// From this many tokens (and below rowmajor_prefill_min_tokens) row-major float32 tables are read in table order
/// (rowmajor_table_order) when the output also fits `table_order_max_output_bytes`; fewer run token-major.
inline Index table_order_min_tokens(int tau) { return std::max<Index>(256, (Index(1) << tau) / 2); }
/// The table-order loop adds each row into its tokens' output rows in a data-dependent order: the whole output is
/// kept cache-resident (L3) instead of streamed.
inline constexpr Index table_order_max_output_bytes = Index(8) << 20;

/// Calls run(n, b, span_end) for every token n < rows and column block b < blocks. Threads split the tokens when
/// there are enough of them, else the column blocks; each (n, b) is computed by one thread in the same way, so the
/// bits do not depend on the split. span_end > b on the first block a thread runs for token n: blocks
/// [b, span_end) of that token follow in the same thread, so the call can request all their table rows at once
/// (span_end is 0 on the others).
template <class Run>
void for_each_token_and_block(Index rows, Index blocks, Run& run) {
  auto run_span = [&](Index n, Index b0, Index b1) {
    for (Index b = b0; b < b1; ++b) run(n, b, b == b0 ? b1 : Index(0));
  };
  if (rows >= available_threads()) {
    parallel_rows(rows, 1, [&](Index n0, Index n1) {
      for (Index n = n0; n < n1; ++n) run_span(n, 0, blocks);
    });
  } else {
    parallel_rows(blocks, 1, [&](Index b0, Index b1) {
      for (Index n = 0; n < rows; ++n) run_span(n, b0, b1);
    });
  }
}

// ------------------------------------------------------------------------------------------------ packing

/// Stores `count` floats as a chunk of `cv` `storage` values at dst (count ≤ cv; zero-padded to cv values).
/// Chunks wider than 64 values (the row layout) are stored as consecutive 64-value pieces.
inline void encode_chunk(std::byte* dst, const float* src, Index count, Index cv, StorageType storage) {
  if (cv > max_chunk_values) {
    const Index piece_bytes = max_chunk_values * (storage == StorageType::F32 ? 4 : 2);
    for (Index p = 0; p * max_chunk_values < cv; ++p)
      encode_chunk(dst + p * piece_bytes, src + p * max_chunk_values,
                   std::clamp<Index>(count - p * max_chunk_values, 0, max_chunk_values), max_chunk_values, storage);
    return;
  }
  float v[max_chunk_values] = {};
  std::memcpy(v, src, size_t(count) * sizeof(float));
  if (storage == StorageType::F32) {
    std::memcpy(dst, v, size_t(cv) * sizeof(float));
  } else if (storage == StorageType::F16) {
    std::uint16_t h[max_chunk_values];
    for (Index i = 0; i < cv; ++i) h[i] = float_to_f16(v[i]);
    std::memcpy(dst, h, size_t(cv) * 2);
  } else {
    // bf16 pairs: 32-bit word j of each 64-byte group of 32 values holds value j (low half, its bfloat16) and
    // value j + 16 (the whole word, read as a float: see bf16_high_half), so one shift turns a 64-byte load into
    // two vectors of 16 consecutive columns.
    std::uint32_t w[max_chunk_values / 2];
    for (Index group = 0; group < cv / 32; ++group)
      for (Index j = 0; j < 16; ++j) {
        const std::uint16_t low = float_to_bf16(v[group * 32 + j]);
        w[group * 16 + j] = std::uint32_t(low) | (std::uint32_t(bf16_high_half(v[group * 32 + 16 + j], low)) << 16);
      }
    std::memcpy(dst, w, size_t(cv) * 2);
  }
}

/// Value i (< chunk size) of a stored chunk, decoded to float (exact).
inline float decode_value(const std::byte* chunk, Index i, StorageType storage) {
  if (i >= max_chunk_values) {  // row layout: 64-value pieces
    const Index piece_bytes = max_chunk_values * (storage == StorageType::F32 ? 4 : 2);
    return decode_value(chunk + (i / max_chunk_values) * piece_bytes, i % max_chunk_values, storage);
  }
  if (storage == StorageType::F32) {
    float v;
    std::memcpy(&v, chunk + i * 4, 4);
    return v;
  }
  if (storage == StorageType::F16) {
    std::uint16_t h;
    std::memcpy(&h, chunk + i * 2, 2);
    return f16_to_float(h);
  }
  const Index group = i / 32, j = i % 32;
  std::uint32_t w;
  std::memcpy(&w, chunk + (group * 16 + j % 16) * 4, 4);
  return j < 16 ? bf16_to_float(std::uint16_t(w & 0xffffu)) : std::bit_cast<float>(w);
}

/// Copies the values [begin, end) of float32 row-major tables [K, 2^τ, width] (flat element indices) into an F32
/// panel layout at dst: whole column blocks through copy_floats_streaming (non-temporal stores where it can), parts
/// of a block (a range cut inside a row) with ordinary stores. Disjoint ranges may be copied by several threads at
/// once; each thread orders its stores (store_fence_if_streamed) before the copy is read.
inline void pack_values_f32(std::byte* dst, const PanelLayout& l, const float* tables, std::size_t begin,
                            std::size_t end) {
  const std::size_t width = std::size_t(l.width);
  for (std::size_t i = begin; i < end;) {
    const std::size_t flat_row = i / width, row_end = std::min(end, (flat_row + 1) * width);
    const Index k = Index(flat_row) / l.rows, r = Index(flat_row) % l.rows;
    const Index c0 = Index(i - flat_row * width), c1 = Index(row_end - flat_row * width);
    const float* src = tables + flat_row * width;
    for (Index cb = c0 / l.cv; cb < l.column_blocks && cb * l.cv < c1; ++cb) {
      const Index first = std::max(c0, cb * l.cv), last = std::min(c1, cb * l.cv + l.block_columns(cb));
      std::byte* out = dst + l.chunk_offset(cb, k, r) + (first - cb * l.cv) * Index(sizeof(float));
      if (first == cb * l.cv && last == cb * l.cv + l.block_columns(cb)) {
        copy_floats_streaming(out, src + first, last - first);
      } else {
        std::memcpy(out, src + first, size_t(last - first) * sizeof(float));
      }
    }
    i = row_end;
  }
}

/// Packs float32 row-major tables [K, 2^τ, width] (row stride `row_stride` floats) into the F32 panel of column
/// block cb, tables [k0, k0 + kg), at dst (laid out as PanelLayout with k relative to k0).
inline void pack_panel_f32(std::byte* dst, const PanelLayout& l, const float* tables, Index row_stride, Index cb,
                           Index k0, Index kg) {
  const Index cols = l.block_columns(cb);
  for (Index k = 0; k < kg; ++k) {
    std::byte* table = dst + k * l.table_stride;
    const float* src = tables + ((k0 + k) * l.rows) * row_stride + cb * l.cv;
    if (cols == l.cv) {
      for (Index r = 0; r < l.rows; ++r)
        std::memcpy(table + r * l.chunk_bytes, src + r * row_stride, size_t(l.cv) * sizeof(float));
    } else {
      for (Index r = 0; r < l.rows; ++r) {
        std::memset(table + r * l.chunk_bytes, 0, size_t(l.chunk_bytes));
        std::memcpy(table + r * l.chunk_bytes, src + r * row_stride, size_t(cols) * sizeof(float));
      }
    }
  }
}

/// Packs float32 row-major tables [K, 2^τ, width] (contiguous) into a whole F32 panel layout at dst (64-byte
/// aligned): every row of every table whose flag in `row_flags` (K·2^τ flags, nullptr: all rows) is set. Threads
/// split the tables, so they write disjoint chunks; the stores bypass the caches (copy_floats_streaming), since the
/// whole copy is far larger than they are. Padding columns and spare lines are left as they are (the caller zeroes
/// them once).
inline void pack_tables_f32(std::byte* dst, const PanelLayout& l, const float* tables,
                            const std::uint8_t* row_flags = nullptr) {
  parallel_rows(l.tables, 1, [&](Index k0, Index k1) {
    for (Index k = k0; k < k1; ++k)
      for (Index r = 0; r < l.rows; ++r) {
        if (row_flags != nullptr && row_flags[k * l.rows + r] == 0) continue;
        const std::size_t row_begin = std::size_t(k * l.rows + r) * std::size_t(l.width);
        pack_values_f32(dst, l, tables, row_begin, row_begin + std::size_t(l.width));
      }
    store_fence_if_streamed();  // each thread orders its own stores before the region ends
  });
}

/// Packs the listed rows (flat indices k·2^τ + r, each < K·2^τ, repeats allowed) of float32 row-major tables into
/// an F32 panel layout at dst, in order on one thread (a list may name a row twice), its stores ordered on return.
inline void pack_listed_rows_f32(std::byte* dst, const PanelLayout& l, const float* tables, const Index* rows,
                                 Index count) {
  for (Index i = 0; i < count; ++i) {
    const std::size_t row_begin = std::size_t(rows[i]) * std::size_t(l.width);
    pack_values_f32(dst, l, tables, row_begin, row_begin + std::size_t(l.width));
  }
  store_fence_if_streamed();
}

/**
 * The row requests of a decode loop (one token, rows read at random from DRAM): `request(k)` asks L2 for table k's
 * part of the row. The first block a thread runs for a token (`lead`) requests the first `ahead` tables before its
 * loop and table k + ahead at step k, with `ahead` as many tables as a quarter of L2 holds, so that all of a layer's
 * rows are in flight at once where they fit (d_out = 512, K = 64: 128 KB of float32 rows); the other blocks find
 * their part in L2. One core keeps many more L2 misses in flight than L1 misses, so requests into L2 far ahead beat
 * requests into L1 a few tables ahead, alone or together. Every line of a row is requested: rows already in L2 then
 * cost two L2 lookups per line (the request, and the demand load that misses L1), but requesting every second line
 * only leaves rows from DRAM half fetched, because the hardware does not fetch the other line of the pair (see
 * docs/performance.md, "Known costs").
 */
template <class Request>
class DecodeRowRequests {
 public:
  DecodeRowRequests(Index tables, Index bytes_per_table, bool lead, Request request)
      : tables_(tables),
        ahead_(lead ? std::clamp<Index>(panel_budget_bytes() / std::max<Index>(bytes_per_table, 1), 1,
                                        std::max<Index>(tables, 1))
                    : 0),
        request_(request) {
    for (Index k = 0; k < ahead_; ++k) request_(k);
  }
  /// Called at step k of the table loop.
  void step(Index k) const {
    if (ahead_ > 0 && k + ahead_ < tables_) request_(k + ahead_);
  }

 private:
  Index tables_, ahead_;
  Request request_;
};


/// Reads [p, p + bytes) once, in order, so that the hardware streams it into L2 at full bandwidth before the
/// random accesses of the token loop.
inline void touch_sequential(const std::byte* p, Index bytes) {
  std::uint64_t sink = 0;
  for (Index i = 0; i < bytes; i += 64) {
    std::uint64_t v;
    std::memcpy(&v, p + i, sizeof(v));
    sink ^= v;
  }
  volatile std::uint64_t keep = sink;  // one volatile store keeps every load
  (void)keep;
}

/// The prefill plan, group-major: for table group g (tables [k0, k0 + kg_g), k0 = g·kg), entry (n, j) sits at
/// k0·N + n·kg_g + j and holds the byte offset of chunk (n, k0 + j) relative to the group's panel,
/// j·table_stride + code·chunk_bytes, and its score. Each group's pass over the tokens then reads its plan as one
/// contiguous stream (N·kg_g entries) instead of kg_g values out of every token's row of K, and the strided plan
/// and scores would take L2 space beside the panel. Threads split the tokens, so the plan is not serial work.
inline void build_plan(std::int32_t* off, float* plan_scores, const std::int32_t* codes, const float* scores,
                       Index count_rows, Index tables, const PanelLayout& l, Index kg) {
  parallel_rows(count_rows, 256, [&](Index n0, Index n1) {
    for (Index k0 = 0; k0 < tables; k0 += kg) {
      const Index kg_g = std::min(kg, tables - k0);
      std::int32_t* o = off + k0 * count_rows;
      float* ps = plan_scores + k0 * count_rows;
      for (Index n = n0; n < n1; ++n)
        for (Index j = 0; j < kg_g; ++j) {
          o[n * kg_g + j] = std::int32_t(j * l.table_stride + codes[n * tables + k0 + j] * l.chunk_bytes);
          ps[n * kg_g + j] = scores[n * tables + k0 + j];
        }
    }
  });
}

// ------------------------------------------------------------------------------------------------ SIMD lanes

#if defined(MEMORYFORMER_HAVE_AVX512) || defined(MEMORYFORMER_HAVE_AVX2)
#define MEMORYFORMER_HAVE_SIMD_KERNELS 1

MEMORYFORMER_SIMD_WARNINGS_BEGIN

/// VectorOps<I> and the lookup's own operations on it: partial loads and stores, and one table chunk's FMAs.
template <Isa I>
struct Lanes;

#if defined(MEMORYFORMER_HAVE_AVX512)
template <>
struct Lanes<Isa::Avx512> : VectorOps<Isa::Avx512> {
  static V load_partial(const float* p, Index count) {
    if (count >= n) return load(p);
    if (count <= 0) return zero();
    return _mm512_maskz_loadu_ps(__mmask16((1u << count) - 1u), p);
  }
  static void store_partial(float* p, V v, Index count) {
    if (count >= n) return store(p, v);
    if (count > 0) _mm512_mask_storeu_ps(p, __mmask16((1u << count) - 1u), v);
  }
  /// Non-temporal store (p 64-byte aligned): the line goes to memory without being read first.
  static void stream(float* p, V v) { _mm512_stream_ps(p, v); }
  template <StorageType S, Index CV>
  static void fma_chunk(V* acc, V s, const std::byte* p) {
    if constexpr (S == StorageType::F32) {
      const float* f = reinterpret_cast<const float*>(p);
      for (Index j = 0; j < CV / 16; ++j) acc[j] = _mm512_fmadd_ps(s, _mm512_loadu_ps(f + 16 * j), acc[j]);
    } else if constexpr (S == StorageType::BF16) {
      for (Index m = 0; m < CV / 32; ++m) {
        const __m512i w = _mm512_loadu_si512(p + 64 * m);
        acc[2 * m] = _mm512_fmadd_ps(s, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)), acc[2 * m]);
        acc[2 * m + 1] = _mm512_fmadd_ps(s, _mm512_castsi512_ps(w), acc[2 * m + 1]);
      }
    } else {
      for (Index j = 0; j < CV / 16; ++j) {
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * j));
        acc[j] = _mm512_fmadd_ps(s, _mm512_cvtph_ps(h), acc[j]);
      }
    }
  }
};
#endif

#if defined(MEMORYFORMER_HAVE_AVX2)
template <>
struct Lanes<Isa::Avx2> : VectorOps<Isa::Avx2> {
  static __m256i mask(Index count) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(count)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static V load_partial(const float* p, Index count) {
    if (count >= n) return load(p);
    if (count <= 0) return zero();
    return _mm256_maskload_ps(p, mask(count));
  }
  static void store_partial(float* p, V v, Index count) {
    if (count >= n) return store(p, v);
    if (count > 0) _mm256_maskstore_ps(p, mask(count), v);
  }
  /// Non-temporal store (p 32-byte aligned).
  static void stream(float* p, V v) { _mm256_stream_ps(p, v); }
  /// binary16 → float for 8 values without F16C: move exponent and mantissa into float position and rescale by
  /// 2^112 (exact for every finite half, subnormals included); the packer rejects values beyond the half range.
  static V half_to_float(__m128i h) {
#if defined(__F16C__)
    return _mm256_cvtph_ps(h);
#else
    const __m256i w = _mm256_cvtepu16_epi32(h);
    const __m256i magnitude = _mm256_slli_epi32(_mm256_and_si256(w, _mm256_set1_epi32(0x7fff)), 13);
    const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(w, _mm256_set1_epi32(0x8000)), 16);
    const __m256 scaled = _mm256_mul_ps(_mm256_castsi256_ps(magnitude), _mm256_set1_ps(0x1p112f));
    return _mm256_or_ps(scaled, _mm256_castsi256_ps(sign));
#endif
  }
  template <StorageType S, Index CV>
  static void fma_chunk(V* acc, V s, const std::byte* p) {
    if constexpr (S == StorageType::F32) {
      const float* f = reinterpret_cast<const float*>(p);
      for (Index j = 0; j < CV / 8; ++j) acc[j] = _mm256_fmadd_ps(s, _mm256_loadu_ps(f + 8 * j), acc[j]);
    } else if constexpr (S == StorageType::BF16) {
      // 32-byte load m covers words 8·(m%2) … +7 of 64-byte group m/2: columns 32·(m/2) + 8·(m%2) + i (low
      // halves) and the same + 16 (high halves).
      for (Index m = 0; m < CV / 16; ++m) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * m));
        const Index lo = 4 * (m / 2) + (m % 2), hi = lo + 2;
        acc[lo] = _mm256_fmadd_ps(s, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)), acc[lo]);
        acc[hi] = _mm256_fmadd_ps(s, _mm256_castsi256_ps(w), acc[hi]);
      }
    } else {
      for (Index j = 0; j < CV / 8; ++j) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * j));
        acc[j] = _mm256_fmadd_ps(s, half_to_float(h), acc[j]);
      }
    }
  }
};
#endif

/// Tokens per tile of the prefill loop: enough independent FMA chains to cover the FMA latency (≥ 8) without
/// running out of registers (32 zmm, 16 ymm).
template <Isa I, Index CV>
inline constexpr int tile_tokens = I == Isa::Avx512 ? (CV == 64 ? 4 : (CV == 32 ? 4 : 8)) : (CV == 64 ? 1 : (CV == 32 ? 2 : 4));

/// Loads the CV starting values of a token's chunk: previous partial sums, the bias, or zero.
template <Isa I, Index CV>
inline void init_chunk(typename Lanes<I>::V* acc, const float* init, const float* bias_chunk) {
  using L = Lanes<I>;
  constexpr Index nv = CV / L::n;
  for (Index j = 0; j < nv; ++j)
    acc[j] = init != nullptr ? L::load(init + j * L::n)
                             : (bias_chunk != nullptr ? L::load(bias_chunk + j * L::n) : L::zero());
}

/// Writes the first `cols` of CV values; `streaming`: all CV with non-temporal stores (out aligned to the vector).
template <Isa I, Index CV>
inline void store_chunk(float* out, const typename Lanes<I>::V* acc, Index cols, bool streaming = false) {
  using L = Lanes<I>;
  constexpr Index nv = CV / L::n;
  if (streaming) {
    for (Index j = 0; j < nv; ++j) L::stream(out + j * L::n, acc[j]);
  } else if (cols == CV) {
    for (Index j = 0; j < nv; ++j) L::store(out + j * L::n, acc[j]);
  } else {
    for (Index j = 0; j < nv; ++j) L::store_partial(out + j * L::n, acc[j], cols - j * L::n);
  }
}

/**
 * Prefill inner loop over one panel group: for tokens n in [n0, n1) and tables k in [k0, k0 + kg),
 *   out[n] = (init ? init[n] : bias_chunk) + Σ_k s[n,k] · chunk(n,k),
 * chunk(n,k) at group_base + off[n·plan_stride + k] (byte offsets relative to the group), s = scores[…].
 * out/init rows hold CV values; out keeps the first `cols`. init may alias out (each tile reads before it writes).
 * stream_out: write out with non-temporal stores (cols == CV, out and out_stride 64-byte aligned).
 */
template <Isa I, StorageType S, Index CV>
void panel_gather(float* out, Index out_stride, Index cols, const float* init, Index init_stride,
                  const float* bias_chunk, const std::byte* group_base, const std::int32_t* off, const float* scores,
                  Index plan_stride, Index k0, Index kg, Index n0, Index n1, bool stream_out = false) {
  using L = Lanes<I>;
  using V = typename L::V;
  constexpr Index nv = CV / L::n;
  constexpr int B = tile_tokens<I, CV>;
  const Index k1 = k0 + kg;
  Index n = n0;
  for (; n + B <= n1; n += B) {
    V acc[B][nv];
    for (int b = 0; b < B; ++b) init_chunk<I, CV>(acc[b], init ? init + (n + b) * init_stride : nullptr, bias_chunk);
    const std::int32_t* o = off + n * plan_stride;
    const float* s = scores + n * plan_stride;
    for (Index k = k0; k < k1; ++k) {
      for (int b = 0; b < B; ++b)
        L::template fma_chunk<S, CV>(acc[b], L::set1(s[b * plan_stride + k]), group_base + o[b * plan_stride + k]);
    }
    for (int b = 0; b < B; ++b) store_chunk<I, CV>(out + (n + b) * out_stride, acc[b], cols, stream_out);
  }
  for (; n < n1; ++n) {
    V acc[nv];
    init_chunk<I, CV>(acc, init ? init + n * init_stride : nullptr, bias_chunk);
    const std::int32_t* o = off + n * plan_stride;
    const float* s = scores + n * plan_stride;
    for (Index k = k0; k < k1; ++k) L::template fma_chunk<S, CV>(acc, L::set1(s[k]), group_base + o[k]);
    store_chunk<I, CV>(out + n * out_stride, acc, cols, stream_out);
  }
}

/**
 * Column-blocked forward over all N tokens. `panel_of(cb, k0, kg_g)` returns the bytes of the panel of column block
 * cb and tables [k0, k0 + kg_g), in L2 — pre-packed storage it has just read through, or a per-thread buffer it has
 * just packed. Threads claim column blocks one at a time (no reduction).
 */
template <Isa I, StorageType S, Index CV, class PanelOf>
void prefill_forward(float* y, Index y_stride, const PanelLayout& l, const std::int32_t* codes, const float* scores,
                     const float* bias, Index rows, PanelOf&& panel_of) {
  const Index kg = l.group_tables();
  const Index groups = (l.tables + kg - 1) / kg;
  std::int32_t* plan = thread_scratch<0, std::int32_t>(size_t(rows * l.tables));
  float* plan_scores = thread_scratch<10, float>(size_t(rows * l.tables));
  build_plan(plan, plan_scores, codes, scores, rows, l.tables, l, kg);
  // Full, 64-byte-aligned output chunks are written straight from the registers with non-temporal stores: plain
  // stores to y's strided rows would read every line of y from memory first, and the contiguous buffer copied out
  // after each column block that did this before was slower.
  const bool stream_out =
      (reinterpret_cast<std::uintptr_t>(y) % 64 == 0) && (y_stride * Index(sizeof(float))) % 64 == 0;
  // Column blocks are claimed one at a time (parallel_claims).
  parallel_claims(l.column_blocks, [&](WorkQueue& queue) {
    float* partial = groups > 1 ? thread_scratch<1, float>(size_t(rows * CV)) : nullptr;
    alignas(64) float bias_chunk[max_chunk_values];
    for (Index cb = queue.claim(); cb >= 0; cb = queue.claim()) {
      const Index cols = l.block_columns(cb);
      const bool streaming = stream_out && cols == CV;
      std::fill(bias_chunk, bias_chunk + CV, 0.0f);
      if (bias != nullptr) std::copy(bias + cb * CV, bias + cb * CV + cols, bias_chunk);
      for (Index g = 0; g < groups; ++g) {
        const Index k0 = g * kg, kg_g = std::min(kg, l.tables - k0);
        const std::byte* panel = panel_of(cb, k0, kg_g);
        const bool last = g + 1 == groups;
        float* out = last ? y + cb * CV : partial;
        const Index out_stride = last ? y_stride : CV;
        panel_gather<I, S, CV>(out, out_stride, last ? cols : CV, g == 0 ? nullptr : partial, CV,
                               bias != nullptr ? bias_chunk : nullptr, panel, plan + k0 * rows,
                               plan_scores + k0 * rows, kg_g, 0, kg_g, 0, rows, last && streaming);
      }
    }
    if (stream_out) store_fence_if_streamed();  // each thread orders its own non-temporal stores before the region ends
  });
}

/// Calls f(std::integral_constant<Index, cv>) for the layout's chunk width.
template <class F>
void dispatch_chunk(Index cv, F&& f) {
  if (cv == 64) return f(std::integral_constant<Index, 64>{});
  if (cv == 32) return f(std::integral_constant<Index, 32>{});
  return f(std::integral_constant<Index, 16>{});
}

/// Forward over pre-packed panels (PackedTables), prefill loop.
template <Isa I, StorageType S>
void packed_prefill(float* y, Index y_stride, const PanelLayout& l, const std::byte* data, const std::int32_t* codes,
                    const float* scores, const float* bias, Index rows) {
  dispatch_chunk(l.cv, [&](auto cv) {
    if constexpr (S == StorageType::BF16 && decltype(cv)::value == 16) return;  // not a bf16 layout
    else
    prefill_forward<I, S, decltype(cv)::value>(
        y, y_stride, l, codes, scores, bias, rows,
        [&](Index cb, Index k0, Index kg_g) -> const std::byte* {
          // One sequential read of the whole panel before its gathers, at the rate the hardware prefetchers stream:
          // software prefetches of the next panel spread over these gathers, one line at a time, fetched it more
          // slowly than this and took load slots from the gathers.
          const std::byte* p = data + cb * l.cb_stride + k0 * l.table_stride;
          touch_sequential(p, kg_g * l.table_stride);
          return p;
        });
  });
}

/// Forward over row-major float32 tables [K, 2^τ, width], prefill loop: each panel is packed into a per-thread
/// L2-resident buffer, then all tokens stream through it.
template <Isa I>
void rowmajor_prefill(float* y, Index y_stride, const float* tables, int tau, Index width, Index num_tables,
                      const std::int32_t* codes, const float* scores, const float* bias, Index rows,
                      Index chunk_values = 0, Index budget = panel_budget_bytes()) {
  PanelLayout l = PanelLayout::make(num_tables, tau, width, StorageType::F32, chunk_values);
  l.budget = budget;
  dispatch_chunk(l.cv, [&](auto cv) {
    prefill_forward<I, StorageType::F32, decltype(cv)::value>(
        y, y_stride, l, codes, scores, bias, rows,
        [&](Index cb, Index k0, Index kg_g) -> const std::byte* {
          std::byte* buffer = thread_scratch<2, std::byte>(size_t(kg_g * l.table_stride));
          pack_panel_f32(buffer, l, tables, width, cb, k0, kg_g);
          return buffer;
        });
  });
}

/// Forward over pre-packed panels, token-major (decode): per token and column block, 64 columns in registers
/// across all K tables. Threads split tokens, or column blocks when there are fewer tokens than threads.
template <Isa I, StorageType S, Index CV>
void packed_decode_cv(float* y, Index y_stride, const PanelLayout& l, const std::byte* data, const std::int32_t* codes,
                      const float* scores, const float* bias, Index rows) {
  using L = Lanes<I>;
  using V = typename L::V;
  constexpr Index nv = CV / L::n;
  const Index K = l.tables;
  auto run = [&](Index n, Index cb, Index span_end) {
    alignas(64) float bias_chunk[max_chunk_values] = {};
    const Index cols = l.block_columns(cb);
    if (bias != nullptr) std::copy(bias + cb * CV, bias + cb * CV + cols, bias_chunk);
    V acc[nv];
    init_chunk<I, CV>(acc, nullptr, bias != nullptr ? bias_chunk : nullptr);
    const std::int32_t* c = codes + n * K;
    const float* s = scores + n * K;
    const std::byte* base = data + cb * l.cb_stride;
    // Table k's chunks of every block of the span.
    const DecodeRowRequests requests(K, (span_end - cb) * l.chunk_bytes, span_end > cb, [&](Index k) {
      for (Index b = cb; b < span_end; ++b)
        prefetch_range<PrefetchTo::L2>(data + b * l.cb_stride + k * l.table_stride + c[k] * l.chunk_bytes,
                                       l.chunk_bytes);
    });
    for (Index k = 0; k < K; ++k) {
      requests.step(k);
      L::template fma_chunk<S, CV>(acc, L::set1(s[k]), base + k * l.table_stride + c[k] * l.chunk_bytes);
    }
    store_chunk<I, CV>(y + n * y_stride + cb * CV, acc, cols);
  };
  for_each_token_and_block(rows, l.column_blocks, run);
}

template <Isa I, StorageType S>
void packed_decode(float* y, Index y_stride, const PanelLayout& l, const std::byte* data, const std::int32_t* codes,
                   const float* scores, const float* bias, Index rows) {
  dispatch_chunk(l.cv, [&](auto cv) {
    if constexpr (S == StorageType::BF16 && decltype(cv)::value == 16) return;  // not a bf16 layout
    else packed_decode_cv<I, S, decltype(cv)::value>(y, y_stride, l, data, codes, scores, bias, rows);
  });
}

/// Forward over the row layout (each row contiguous, pieces of 64 values), token-major: blocks of 256 columns
/// (AVX-512: 16 zmm) or 128 (AVX2) accumulate over the K rows, requested into L2 ahead (DecodeRowRequests).
template <Isa I, StorageType S>
void packed_rows_decode(float* y, Index y_stride, const PanelLayout& l, const std::byte* data,
                        const std::int32_t* codes, const float* scores, const float* bias, Index rows) {
  using L = Lanes<I>;
  using V = typename L::V;
  constexpr Index pieces = I == Isa::Avx512 ? 4 : 2;  // 64-value pieces per block
  constexpr Index block = pieces * max_chunk_values;
  constexpr Index nv = block / L::n;
  constexpr Index piece_vectors = max_chunk_values / L::n;
  const Index K = l.tables, blocks = (l.width + block - 1) / block;
  const Index piece_bytes = max_chunk_values * l.value_bytes;
  auto run = [&](Index n, Index blk, Index span_end) {
    const Index c0 = blk * block, cols = std::min(block, l.width - c0);
    const Index used_pieces = (cols + max_chunk_values - 1) / max_chunk_values;
    const std::int32_t* c = codes + n * K;
    const float* s = scores + n * K;
    V acc[nv];
    for (Index j = 0; j < nv; ++j)
      acc[j] = bias != nullptr ? L::load_partial(bias + c0 + j * L::n, cols - j * L::n) : L::zero();
    auto row = [&](Index k) { return data + k * l.table_stride + c[k] * l.chunk_bytes; };
    // The span's part of row k (the whole row for one thread).
    const Index span_bytes =
        (std::min(span_end * block, l.width) - c0 + max_chunk_values - 1) / max_chunk_values * piece_bytes;
    const DecodeRowRequests requests(K, span_bytes, span_end > blk, [&](Index k) {
      prefetch_range<PrefetchTo::L2>(row(k) + c0 / max_chunk_values * piece_bytes, span_bytes);
    });
    for (Index k = 0; k < K; ++k) {
      requests.step(k);
      const V sv = L::set1(s[k]);
      const std::byte* p = row(k) + (c0 / max_chunk_values) * piece_bytes;
      // The pieces are unrolled at compile time so that acc stays in registers: with the trip count used_pieces in
      // a loop, GCC kept acc on the stack and every FMA went through a store and a reload.
      [&]<std::size_t... q>(std::index_sequence<q...>) {
        ((Index(q) < used_pieces
              ? L::template fma_chunk<S, max_chunk_values>(acc + q * piece_vectors, sv, p + Index(q) * piece_bytes)
              : void()),
         ...);
      }(std::make_index_sequence<size_t(pieces)>{});
    }
    float* out = y + n * y_stride + c0;
    for (Index j = 0; j < nv; ++j) L::store_partial(out + j * L::n, acc[j], cols - j * L::n);
  };
  for_each_token_and_block(rows, blocks, run);
}

/// Forward over row-major float32 tables, token-major (decode): column blocks of 16 vectors (256 columns with
/// AVX-512, 128 with AVX2) accumulate in registers over the K rows, requested into L2 ahead (DecodeRowRequests).
template <Isa I>
void rowmajor_decode(float* y, Index y_stride, const float* tables, int tau, Index width, Index num_tables,
                     const std::int32_t* codes, const float* scores, const float* bias, Index rows) {
  using L = Lanes<I>;
  using V = typename L::V;
  constexpr Index nv = I == Isa::Avx512 ? 16 : 12;
  constexpr Index block = nv * L::n;
  const Index K = num_tables, R = Index(1) << tau;
  const Index blocks = (width + block - 1) / block;
  auto run = [&](Index n, Index blk, Index span_end) {
    const Index c0 = blk * block, cols = std::min(block, width - c0);
    const std::int32_t* c = codes + n * K;
    const float* s = scores + n * K;
    V acc[nv];
    for (Index j = 0; j < nv; ++j) acc[j] = bias != nullptr ? L::load_partial(bias + c0 + j * L::n, cols - j * L::n) : L::zero();
    auto row = [&](Index k) { return tables + (k * R + c[k]) * width + c0; };
    // The span's part of row k (the whole row for one thread).
    const Index span_bytes = (std::min(span_end * block, width) - c0) * Index(sizeof(float));
    const DecodeRowRequests requests(K, span_bytes, span_end > blk,
                                     [&](Index k) { prefetch_range<PrefetchTo::L2>(row(k), span_bytes); });
    // The table loop is instantiated once per loader (full block, partial block): with the choice (and
    // load_partial's branches) inside one loop, GCC kept acc on the stack and every FMA read and wrote it through
    // memory, depending on how the build happened to lay the loop out; separate loops keep it in registers.
    auto accumulate = [&](auto load_vector) {
      for (Index k = 0; k < K; ++k) {
        requests.step(k);
        const V sv = L::set1(s[k]);
        const float* r = row(k);
        for (Index j = 0; j < nv; ++j) acc[j] = L::fmadd(sv, load_vector(r, j), acc[j]);
      }
    };
    if (cols == block) {
      accumulate([](const float* r, Index j) { return L::load(r + j * L::n); });
    } else {
      accumulate([cols](const float* r, Index j) { return L::load_partial(r + j * L::n, cols - j * L::n); });
    }
    float* out = y + n * y_stride + c0;
    for (Index j = 0; j < nv; ++j) L::store_partial(out + j * L::n, acc[j], cols - j * L::n);
  };
  for_each_token_and_block(rows, blocks, run);
}

/// Ahead, in used rows, of the table-order loop's requests into L2.
inline constexpr Index table_order_prefetch_rows = 8;

/**
 * Forward over row-major float32 tables in table order (mid-sized prefill: about 2^τ tokens, where token-major
 * reads of random whole rows are bound by the misses in flight and packing panels per call costs more than it
 * saves). The (token, table) pairs are sorted by table row (sort_contributions); each used row is read once, in
 * increasing address order (a stream the prefetchers follow), and added into the output rows of its tokens:
 *   y[n] = b;   y[n] = fma(s[n,k], T_k[code], y[n])   for every used row (k, code) in increasing order.
 * A token's rows come in increasing k, so each output is the same FMA chain as the token-major loop's: the same
 * bits, whichever thread computes it.
 */
template <Isa I>
void rowmajor_table_order(float* y, Index y_stride, const float* tables, int tau, Index width, Index num_tables,
                          const std::int32_t* codes, const float* scores, const float* bias, Index rows) {
  using L = Lanes<I>;
  using V = typename L::V;
  const Index R = Index(1) << tau, total_rows = num_tables * R, entries = rows * num_tables;
  SortedContributions sc;
  sc.start = thread_scratch<3, std::int32_t>(size_t(total_rows + 1));
  sc.token = thread_scratch<4, std::int32_t>(size_t(entries));
  sc.score = thread_scratch<5, float>(size_t(entries));
  sc.used = thread_scratch<9, std::int32_t>(size_t(std::min(entries, total_rows)));
  sort_contributions(sc, codes, scores, rows, num_tables, tau);
  const Index full_end = width / L::n * L::n, left = width - full_end;  // whole vectors, then `left` columns
  // Threads split the tokens: each keeps whole output rows (column halves of 2 KB rows would use only half of the
  // L2 sets) and walks every used row, taking the entries of its own tokens (a row's entries are in token order).
  parallel_rows(rows, 64, [&](Index n0, Index n1) {
    for (Index n = n0; n < n1; ++n) {
      float* out = y + n * y_stride;
      for (Index c = 0; c < full_end; c += L::n) L::store(out + c, bias != nullptr ? L::load(bias + c) : L::zero());
      if (left > 0) L::store_partial(out + full_end, bias != nullptr ? L::load_partial(bias + full_end, left) : L::zero(), left);
    }
    for (Index u = 0; u < sc.used_count; ++u) {
      if (u + table_order_prefetch_rows < sc.used_count)
        prefetch_range<PrefetchTo::L2>(tables + Index(sc.used[u + table_order_prefetch_rows]) * width,
                                       width * Index(sizeof(float)));
      const Index r = sc.used[u];
      const float* row = tables + r * width;
      Index e = sc.start[r];
      const Index e1 = sc.start[r + 1];
      while (e < e1 && sc.token[e] < n0) ++e;
      for (; e < e1 && sc.token[e] < n1; ++e) {
        float* out = y + Index(sc.token[e]) * y_stride;
        const V sv = L::set1(sc.score[e]);
        for (Index c = 0; c < full_end; c += L::n) L::store(out + c, L::fmadd(sv, L::load(row + c), L::load(out + c)));
        if (left > 0)
          L::store_partial(out + full_end,
                           L::fmadd(sv, L::load_partial(row + full_end, left), L::load_partial(out + full_end, left)),
                           left);
      }
    }
  });
}

MEMORYFORMER_SIMD_WARNINGS_END

#endif  // SIMD kernels

}  // namespace memoryformer::detail
