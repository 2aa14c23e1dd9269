// SPDX-License-Identifier: MIT
// Fast backward of the Memory Layer's lookup (design §1.6), float32, AVX-512 and AVX2, without float atomics:
//   dT[k, code] += Σ_{n : code_{n,k} = code} s_{n,k} · dy[n]      and      ds_{n,k} += ⟨dy[n], T_k[code_{n,k}]⟩.
// The (token, table) contributions are counting-sorted by table row (a stable sort on the forward's codes, so a
// row's tokens stay in ascending order). Each row's gradient is then accumulated once in registers and added to
// dT once, and ⟨dy[n], T_k[code]⟩ comes from the same row load. Columns are processed in slices of 64 (AVX-512)
// or 32 (AVX2) so that the slice of dy, packed contiguously per thread, stays in L2 while the rows stream past;
// where rows have few tokens each (ML2), row by row instead, so that T and dT stream whole (gradient_rows).
// Threads split the table rows into chunks (disjoint writes) and run their own share first, then the chunks of a
// slower thread's share that it has not reached (in the column-slice order from the slice it reached: a chunk's
// slices run in order, one thread at a time). Every sum has a fixed order, so the bits do not depend on the thread
// count or on which thread ran which chunk. A row marked fresh (touched value 2: zero since the last zero_grad) is
// stored, not added to: with whole 64-byte lines it is written with non-temporal stores, so its old zeros are never
// read from memory.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <vector>

#include "../types.hpp"
#include "gather_kernels.hpp"
#include "parallel.hpp"
#include "scratch.hpp"
#include "simd.hpp"
#include "sorted_contributions.hpp"
#include "streaming_stores.hpp"
#include "vector_ops.hpp"

namespace memoryformer::detail {

/// The touched-row value that marks a row as fresh for lookup_backward: its gradient is zero (flagged before the
/// rows are written, by list_new_rows or the caller; every written row leaves with the value 1).
inline constexpr std::uint8_t fresh_row = 2;

/// Lists the rows a lookup backward will write that are not flagged yet: appends each to `new_rows` and flags it
/// detail::fresh_row. new_rows's capacity must cover its size plus every row not flagged yet (MemoryLayer reserves
/// one entry per row), so the appends cannot throw. From the sort's used rows, in row order.
inline void list_new_rows(std::vector<Index>& new_rows, std::uint8_t* touched, const SortedContributions& sc) {
  for (Index u = 0; u < sc.used_count; ++u) {
    const std::int32_t row = sc.used[u];
    if (touched[row] == 0) {
      new_rows.push_back(row);  // first, so that a flagged row is always listed
      touched[row] = fresh_row;
    }
  }
}

/// The same from the [rows, tables] codes of the pairs (the kernels that do not sort), in the order rows first appear.
inline void list_new_rows(std::vector<Index>& new_rows, std::uint8_t* touched, const std::int32_t* codes, Index rows,
                          Index tables, int tau) {
  const Index per_table = Index(1) << tau;
  for (Index n = 0; n < rows; ++n)
    for (Index k = 0; k < tables; ++k) {
      const Index row = k * per_table + codes[n * tables + k];
      if (touched[row] == 0) {
        new_rows.push_back(row);
        touched[row] = fresh_row;
      }
    }
}

/// The loop orders of lookup_backward_fast, which give the same bits: over column slices (gradient_slice) or over
/// whole rows (gradient_rows).
enum class GradientOrder { automatic, column_slices, rows };

/// Whether the row order is the faster: fewer than four contributions per table row on average (ML2's 2^10 rows
/// at 2,048 tokens, not τ = 8's 2^8), where the rows' traffic outweighs dy's reuse from L2.
inline bool gradient_rows_pay(Index rows, int tau) { return rows < (Index(4) << tau); }

#if defined(MEMORYFORMER_HAVE_SIMD_KERNELS)

MEMORYFORMER_SIMD_WARNINGS_BEGIN

template <Isa I>
struct SliceTraits;
#if defined(MEMORYFORMER_HAVE_AVX512)
template <>
struct SliceTraits<Isa::Avx512> {
  // 64 columns: the packed dy slice [N, 64] is 512 KB at N = 2048, half of Zen 4's 1 MB L2, so the rows streaming
  // past do not evict it (128 columns would fill the whole L2).
  static constexpr Index vectors = 4;
  static float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
};
#endif
#if defined(MEMORYFORMER_HAVE_AVX2)
template <>
struct SliceTraits<Isa::Avx2> {
  static constexpr Index vectors = 4;  // 32 columns: 12 of the 16 ymm registers
  static float hsum(__m256 v) { return VectorOps<Isa::Avx2>::lane_sum(v); }
};
#endif

#if defined(MEMORYFORMER_HAVE_AVX512)
/// Lane j of the result = the sum of the 16 lanes of v[j] (a tree of two-source permutes: 45 instructions for 16
/// horizontal sums instead of ~8 each). Each lane's sum depends on its own vector only, in a fixed order.
inline __m512 horizontal_sums16(const __m512* v) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)
    a[i] = _mm512_add_ps(_mm512_permutex2var_ps(v[2 * i], even, v[2 * i + 1]),
                         _mm512_permutex2var_ps(v[2 * i], odd, v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    b[i] = _mm512_add_ps(_mm512_permutex2var_ps(a[2 * i], even, a[2 * i + 1]),
                         _mm512_permutex2var_ps(a[2 * i], odd, a[2 * i + 1]));
  for (int i = 0; i < 2; ++i)
    c[i] = _mm512_add_ps(_mm512_permutex2var_ps(b[2 * i], even, b[2 * i + 1]),
                         _mm512_permutex2var_ps(b[2 * i], odd, b[2 * i + 1]));
  return _mm512_add_ps(_mm512_permutex2var_ps(c[0], even, c[1]), _mm512_permutex2var_ps(c[0], odd, c[1]));
}

/// dot[i] += the lane sum of v[i] for i < count ≤ 16: the ⟨dy, T⟩ vectors of `count` consecutive entries, reduced
/// together by horizontal_sums16 (a partial group padded with zeros). Lane i of the tree depends on v[i] alone, so an
/// entry gets the same bits in a whole group as in a partial one.
inline void add_dot_group(float* dot, const __m512* v, Index count) {
  if (count == 16) {
    _mm512_storeu_ps(dot, _mm512_add_ps(_mm512_loadu_ps(dot), horizontal_sums16(v)));
    return;
  }
  __m512 padded[16];
  for (Index i = 0; i < 16; ++i) padded[i] = i < count ? v[i] : _mm512_setzero_ps();
  alignas(64) float sums[16];
  _mm512_store_ps(sums, horizontal_sums16(padded));
  for (Index i = 0; i < count; ++i) dot[i] += sums[i];
}
#endif

/// One table row's column slice in registers, shared by both loop orders: its T values, and the sum of the
/// contributions added so far (from +0, in the order they are added).
template <Isa I>
struct RowSlice {
  using L = Lanes<I>;
  using V = typename L::V;
  static constexpr Index nv = SliceTraits<I>::vectors;
  V t[nv], acc[nv];

  /// T's slice from `trow` (cols values, the rest zero) and an empty sum.
  void begin(const float* trow, Index cols) {
    for (Index j = 0; j < nv; ++j) {
      t[j] = cols >= (j + 1) * L::n ? L::load(trow + j * L::n) : L::load_partial(trow + j * L::n, cols - j * L::n);
      acc[j] = L::zero();
    }
  }
  /// acc += score·d for the slice of dy at d (whole vectors, zero-padded); returns a vector whose lanes sum to the
  /// slice's part of ⟨d, t⟩.
  V add(const float* d, float score) {
    const V s = L::set1(score);
    V dot0 = L::zero(), dot1 = L::zero();
    for (Index j = 0; j < nv; j += 2) {
      const V d0 = L::load(d + j * L::n), d1 = L::load(d + (j + 1) * L::n);
      acc[j] = L::fmadd(s, d0, acc[j]);
      acc[j + 1] = L::fmadd(s, d1, acc[j + 1]);
      dot0 = L::fmadd(d0, t[j], dot0);
      dot1 = L::fmadd(d1, t[j + 1], dot1);
    }
    return L::add(dot0, dot1);
  }
  /// Adds the sum to the gradient row slice at grow (cols values). A fresh row gets +0 + acc, the bits of adding
  /// acc to its stored zeros (also when acc is −0 from an underflow), without reading it; with `stream` (a whole
  /// slice of whole lines) through non-temporal stores.
  void write(float* grow, Index cols, bool fresh, bool stream) const {
    const bool full = cols == nv * L::n;
    for (Index j = 0; j < nv; ++j) {
      const Index left = cols - j * L::n;
      if (fresh && full && stream) {
        L::stream(grow + j * L::n, L::add(L::zero(), acc[j]));
      } else if (full) {
        L::store(grow + j * L::n, L::add(fresh ? L::zero() : L::load(grow + j * L::n), acc[j]));
      } else if (left > 0) {
        L::store_partial(grow + j * L::n, L::add(fresh ? L::zero() : L::load_partial(grow + j * L::n, left), acc[j]),
                         left);
      }
    }
  }
};

/// Contributions ahead whose dy slice is prefetched (the sorted order makes every future access known).
inline constexpr Index gradient_prefetch_entries = 6;
/// Used table rows ahead whose T and dT slices are prefetched into L2 (they come from L3 or DRAM): far enough that the
/// row stream overlaps the dy gathers instead of adding to them, and into L2 only so the line-fill buffers stay
/// free for the dy gathers. 32 rows was the best of 16, 32, 48 and 64 with 64-column slices (see
/// docs/performance-log.md).
inline constexpr Index gradient_prefetch_rows = 32;

/// One column slice over the used rows sc.used[u0, u1). Fresh rows (touched[r] == fresh_row) are stored instead of
/// added to (not read), with non-temporal stores and without a prefetch when `stream_fresh` and the slice is whole
/// (every slice then covers whole 64-byte lines). Rows and entries are requested ahead up to used row u_ahead ≥ u1
/// (the rows this thread takes next), so a range that ends inside a thread's share does not stall the next one.
/// dyp is the slice of dy packed as [N, slice] (slice = vectors · lanes columns, zero-padded).
template <Isa I>
void gradient_slice(float* dtables, const float* tables, const std::uint8_t* touched, bool stream_fresh, Index width,
                    Index c0, Index cols, const float* dyp, const SortedContributions& sc, Index u0, Index u1,
                    Index u_ahead) {
  using L = Lanes<I>;
  using V = typename L::V;
  const Index sc_total = sc.start[sc.used[u1 - 1] + 1], ahead_total = sc.start[sc.used[u_ahead - 1] + 1];
  V pending[16];
  int pending_count = 0;
  constexpr Index nv = SliceTraits<I>::vectors;
  constexpr Index slice = nv * L::n;
  const bool full = cols == slice;
  for (Index u = u0; u < u1; ++u) {
    const Index r = sc.used[u];
    const Index e0 = sc.start[r], e1 = sc.start[r + 1];
    const float* trow = tables + r * width + c0;
    float* grow = dtables + r * width + c0;
    const bool fresh = touched[r] == fresh_row;
    // The rows stream in order: fetch ahead (T read, dT written unless fresh).
    if (u + gradient_prefetch_rows < u_ahead) {
      const Index r2 = sc.used[u + gradient_prefetch_rows];
      const Index bytes = cols * Index(sizeof(float));
      prefetch_range<PrefetchTo::L2>(tables + r2 * width + c0, bytes);
      if (!(stream_fresh && full && touched[r2] == fresh_row))
        prefetch_range<PrefetchTo::L2>(dtables + r2 * width + c0, bytes);
    }
    RowSlice<I> row;
    row.begin(trow, cols);
    for (Index e = e0; e < e1; ++e) {
      if (e + gradient_prefetch_entries < ahead_total) {
        const float* next = dyp + Index(sc.token[e + gradient_prefetch_entries]) * slice;
        // One hint per 16 floats from `next`, not prefetch_range: its aligned runtime loop costs more in this hot
        // loop than the fixed-stride hints.
        for (Index j = 0; j < slice; j += 16) prefetch_line(next + j);
      }
      const V dot = row.add(dyp + Index(sc.token[e]) * slice, sc.score[e]);
      if constexpr (I == Isa::Avx512) {
        // Entries are visited in increasing order, so 16 consecutive dot vectors are reduced together.
        pending[pending_count++] = dot;
        if (pending_count == 16) {
          add_dot_group(sc.dot + e - 15, pending, 16);
          pending_count = 0;
        }
      } else {
        sc.dot[e] += SliceTraits<I>::hsum(dot);
      }
    }
    row.write(grow, cols, fresh, stream_fresh);
  }
  if constexpr (I == Isa::Avx512) {
    // The last < 16 entries of the range, through the same reduction tree, so an entry's bits do not depend on
    // where a thread's row range starts.
    if (pending_count > 0) add_dot_group(sc.dot + sc_total - pending_count, pending, pending_count);
  }
}

/// Used table rows ahead whose whole T and dT rows gradient_rows requests into L2.
inline constexpr Index gradient_rows_prefetch = 8;
/// Contributions ahead whose dy row gradient_rows requests into L1.
inline constexpr Index gradient_rows_prefetch_entries = 4;

/// Floats of gradient_rows' per-thread scratch for rows of `width` values (a multiple of the slice): its groups of
/// ⟨dy, T⟩ vectors, AVX-512 only (AVX2 adds each entry's sum at once and needs none).
template <Isa I>
constexpr Index gradient_rows_scratch_floats(Index width) {
  if constexpr (I != Isa::Avx512) return 0;
  else return width / (SliceTraits<I>::vectors * Lanes<I>::n) * 16 * Lanes<I>::n;
}

/// Row order over the used rows sc.used[u0, u1), for tables whose rows have few contributions (ML2's 2^10 rows per
/// table get about two of 2,048 tokens each): each row's T and dT are read whole, in address order, so they stream
/// like an array, where the column-slice order reads every row in pieces a row apart; dy's rows are read in place.
/// Per column slice it computes what gradient_slice computes, in the same order (the row's sum from +0, each entry's
/// slice part of ⟨dy, T⟩ through the same reduction tree, added to dot in slice order), so the bits are the same.
/// width must be a multiple of the slice. Only the slices from `first_slice` on are computed (the earlier ones are
/// done: a range that another thread began column slice by column slice). `pending`: the thread's scratch of
/// gradient_rows_scratch_floats<I>(width) floats, 64-byte aligned.
template <Isa I>
void gradient_rows(float* dtables, const float* tables, const std::uint8_t* touched, bool stream_fresh, Index width,
                   const float* dy, Index dy_stride, const SortedContributions& sc, Index u0, Index u1,
                   [[maybe_unused]] float* pending, Index first_slice = 0) {
  using L = Lanes<I>;
  using V = typename L::V;
  constexpr Index nv = SliceTraits<I>::vectors;
  constexpr Index slice = nv * L::n;
  const Index slices = width / slice, first_col = first_slice * slice;
  [[maybe_unused]] const Index e_begin = sc.start[sc.used[u0]];
  const Index e_end = sc.start[sc.used[u1 - 1] + 1];
  // pending holds, per slice, the ⟨dy, T⟩ vectors of the current group of 16 entries (groups counted from e_begin;
  // AVX-512 only).
  const Index row_bytes = (width - first_col) * Index(sizeof(float));
  for (Index u = u0; u < u1; ++u) {
    const Index r = sc.used[u];
    const Index e0 = sc.start[r], e1 = sc.start[r + 1];
    const bool fresh = touched[r] == fresh_row;
    if (u + gradient_rows_prefetch < u1) {
      const Index r2 = sc.used[u + gradient_rows_prefetch];
      prefetch_range<PrefetchTo::L2>(tables + r2 * width + first_col, row_bytes);
      if (!(stream_fresh && touched[r2] == fresh_row))
        prefetch_range<PrefetchTo::L2>(dtables + r2 * width + first_col, row_bytes);
    }
    for (Index e = e0; e < e1 && e + gradient_rows_prefetch_entries < e_end; ++e)
      prefetch_range<PrefetchTo::L1>(dy + Index(sc.token[e + gradient_rows_prefetch_entries]) * dy_stride + first_col,
                                     row_bytes);
    for (Index sl = first_slice; sl < slices; ++sl) {
      const Index c0 = sl * slice;
      const float* trow = tables + r * width + c0;
      float* grow = dtables + r * width + c0;
      RowSlice<I> row;
      row.begin(trow, slice);
      [[maybe_unused]] float* group = pending + sl * 16 * L::n;
      for (Index e = e0; e < e1; ++e) {
        const V dot = row.add(dy + Index(sc.token[e]) * dy_stride + c0, sc.score[e]);
#if defined(MEMORYFORMER_HAVE_AVX512)
        if constexpr (I == Isa::Avx512) {
          const Index position = (e - e_begin) % 16;
          _mm512_store_ps(group + position * 16, dot);
          if (position == 15) {
            __m512 v[16];
            for (int i = 0; i < 16; ++i) v[i] = _mm512_load_ps(group + i * 16);
            add_dot_group(sc.dot + e - 15, v, 16);
          }
        } else
#endif
        {
          sc.dot[e] += SliceTraits<I>::hsum(dot);
        }
      }
      row.write(grow, slice, fresh, stream_fresh);
    }
  }
#if defined(MEMORYFORMER_HAVE_AVX512)
  if constexpr (I == Isa::Avx512) {
    const Index count = (e_end - e_begin) % 16;  // the last group, through the same tree, slice by slice
    if (count > 0) {
      for (Index sl = first_slice; sl < slices; ++sl) {
        __m512 v[16];
        for (Index i = 0; i < count; ++i) v[i] = _mm512_load_ps(pending + (sl * 16 + i) * 16);
        add_dot_group(sc.dot + e_end - count, v, count);
      }
    }
  }
#endif
}

/// Chunks of used rows per thread in lookup_backward_fast: enough that a thread slowed by a busy neighbour (two vCPUs
/// share a host) hands the end of its share to the others, few enough that every chunk stays long.
inline constexpr Index gradient_chunks_per_thread = 8;

/// Who runs which column slice of which chunk of rows, for threads that take each other's chunks: a chunk's slices run
/// in order (each entry's ⟨dy, T⟩ is summed slice by slice), one thread at a time. The acquire and release order a
/// slice's writes before the next slice's reads on another thread.
class SliceChunks {
 public:
  SliceChunks(Index chunks, Index slices)
      : slices_(slices), state_(new std::atomic<Index>[std::size_t(chunks)]) {
    for (Index c = 0; c < chunks; ++c) state_[std::size_t(c)].store(0, std::memory_order_relaxed);
  }
  /// Takes slice `slice` of chunk c if it is the chunk's next slice and no thread runs the chunk.
  bool claim(Index c, Index slice) {
    Index expected = 2 * slice;
    return state(c).compare_exchange_strong(expected, expected + 1, std::memory_order_acquire,
                                            std::memory_order_relaxed);
  }
  /// Takes all remaining slices of chunk c if it has some and no thread runs it: the first of them, or −1.
  Index claim_rest(Index c) {
    Index seen = state(c).load(std::memory_order_relaxed);
    if (seen % 2 != 0 || seen >= 2 * slices_) return -1;
    return state(c).compare_exchange_strong(seen, seen + 1, std::memory_order_acquire, std::memory_order_relaxed)
               ? seen / 2
               : -1;
  }
  /// Gives chunk c back with its slices before `next` done.
  void release(Index c, Index next) { state(c).store(2 * next, std::memory_order_release); }

 private:
  std::atomic<Index>& state(Index c) { return state_[std::size_t(c)]; }
  Index slices_;
  std::unique_ptr<std::atomic<Index>[]> state_;  // [chunks], 2·(next slice) + 1 while a thread runs the chunk
};

/**
 * Fast lookup backward over row-major float tables: dtables += row gradients (stored into rows flagged fresh_row),
 * touched rows flagged 1, dscores[n,k] += ⟨dy[n], T_k[code]⟩. dbias is not touched (the caller sums dy's columns).
 * `presorted`: the pairs of codes/scores already sorted (by SortedContributionsBuffer::sort, which keeps entry_of),
 * or nullptr to sort them here; the result is the same. `new_rows`: see list_new_rows (the sort's used rows
 * replace a scan of all N·K codes). `order` picks the loop order (the same bits either way);
 * automatic takes the row order where gradient_rows_pay and the width is whole slices.
 */
template <Isa I>
void lookup_backward_fast(float* dscores, Index ds_stride, const float* dy, Index dy_stride, const float* tables,
                          float* dtables, std::uint8_t* touched, int tau, Index width, Index num_tables,
                          const std::int32_t* codes, const float* scores, Index rows,
                          const SortedContributions* presorted, std::vector<Index>* new_rows,
                          GradientOrder order = GradientOrder::automatic) {
  using L = Lanes<I>;
  constexpr Index slice = SliceTraits<I>::vectors * L::n;
  const Index R = Index(1) << tau, total_rows = num_tables * R, entries = rows * num_tables;
  SortedContributions sc;
  if (presorted != nullptr) {
    sc = *presorted;
    sc.dot = thread_scratch<7, float>(size_t(entries));
    std::fill(sc.dot, sc.dot + entries, 0.0f);
  } else {
    sc.start = thread_scratch<3, std::int32_t>(size_t(total_rows + 1));
    sc.token = thread_scratch<4, std::int32_t>(size_t(entries));
    sc.score = thread_scratch<5, float>(size_t(entries));
    sc.dot = thread_scratch<7, float>(size_t(entries));
    sc.used = thread_scratch<9, std::int32_t>(size_t(std::min(entries, total_rows)));
    sc.entry_of = thread_scratch<14, std::int32_t>(size_t(entries));
    sort_contributions(sc, codes, scores, rows, num_tables, tau);
  }
  // Non-temporal stores need every row slice to start a 64-byte line.
  const bool stream_fresh = reinterpret_cast<std::uintptr_t>(dtables) % 64 == 0 && width % 16 == 0;
  const bool whole_slices = width % slice == 0;
  const bool row_order = whole_slices && (order == GradientOrder::rows ||
                                          (order == GradientOrder::automatic && gradient_rows_pay(rows, tau)));
  const Index threads = std::max<Index>(1, std::min<Index>(available_threads(), sc.used_count));
  const Index chunks = std::min<Index>(threads * gradient_chunks_per_thread, sc.used_count);
  std::vector<Index> bounds(size_t(chunks + 1));  // chunk c: used rows [bounds[c], bounds[c + 1])
  for (Index c = 0; c <= chunks; ++c) bounds[size_t(c)] = balanced_row_split(sc, c, chunks);
  const auto chunk_begin = [&](Index c) { return bounds[size_t(c)]; };
  const Index slices = (width + slice - 1) / slice;
  SliceChunks work(row_order ? 0 : chunks, slices);
  // Every thread's scratch, and the row order's queue, are allocated before the first row is flagged or written, so
  // that a call refused for memory changes nothing; thread t's part of a scratch starts at t times its size.
  const Index pending_floats = whole_slices ? gradient_rows_scratch_floats<I>(width) : 0;
  float* const pending = thread_scratch<13, float>(size_t(threads * pending_floats));
  float* const dy_slices = row_order ? nullptr : thread_scratch<8, float>(size_t(threads * rows * slice));
  std::optional<StreamQueue> row_queue;  // the row order's chunks, in at most `threads` shares (chunks ≤ used rows)
  if (row_order) row_queue.emplace(chunks, std::min(available_threads(), chunks));
  if (new_rows != nullptr) list_new_rows(*new_rows, touched, sc);
  // The rows' last step: flagged written.
  const auto flag_rows = [&](Index u0, Index u1) {
    for (Index u = u0; u < u1; ++u) touched[sc.used[u]] = 1;
  };
  // Every entry's ⟨dy, T⟩ added to dscores once all are summed, token by token through entry_of (each (token, table)
  // has one entry): a token's dscores row is written in order, where adding in row order scattered the adds over
  // all of dscores. Tokens [n0, n1).
  const auto add_dots = [&](Index n0, Index n1) {
    for (Index n = n0; n < n1; ++n) {
      float* ds = dscores + n * ds_stride;
      for (Index k = 0; k < num_tables; ++k) ds[k] += sc.dot[sc.entry_of[k * rows + n]];
    }
  };
  if (row_order) {
    // Each chunk whole (all slices, then finished) by one thread: own share first, then the others'.
    parallel_streams(*row_queue, [&](StreamQueue::Claims& claims) {
      float* const own_pending = pending + claims.thread() * pending_floats;
      for (Index c = claims.claim(); c >= 0; c = claims.claim()) {
        if (chunk_begin(c) >= chunk_begin(c + 1)) continue;
        gradient_rows<I>(dtables, tables, touched, stream_fresh, width, dy, dy_stride, sc, chunk_begin(c),
                         chunk_begin(c + 1), own_pending);
        if (stream_fresh) store_fence_if_streamed();  // the rows' streamed stores before anyone reads them
        flag_rows(chunk_begin(c), chunk_begin(c + 1));
      }
    });
    parallel_rows(rows, 64, add_dots);
    return;
  }
  parallel_threads(threads, [&](Index t, Index nt) {
    // Own share, slice by slice: dy's slice packed once and read from L2 by every chunk.
    const Index own0 = chunks * t / nt, own1 = chunks * (t + 1) / nt;
    float* const dyp = dy_slices + t * rows * slice;
    for (Index sl = 0; sl < slices; ++sl) {
      const Index c0 = sl * slice, cols = std::min(slice, width - c0);
      bool packed = false;
      for (Index c = own0; c < own1; ++c) {
        if (chunk_begin(c) >= chunk_begin(c + 1) || !work.claim(c, sl)) continue;
        if (!packed) {
          if (cols == slice) {
            // A whole slice is a copy of constant size, which the compiler inlines instead of calling memcpy per row.
            for (Index n = 0; n < rows; ++n)
              std::memcpy(dyp + n * slice, dy + n * dy_stride + c0, size_t(slice) * sizeof(float));
          } else {
            for (Index n = 0; n < rows; ++n) {
              std::memcpy(dyp + n * slice, dy + n * dy_stride + c0, size_t(cols) * sizeof(float));
              std::fill(dyp + n * slice + cols, dyp + (n + 1) * slice, 0.0f);
            }
          }
          packed = true;
        }
        gradient_slice<I>(dtables, tables, touched, stream_fresh, width, c0, cols, dyp, sc, chunk_begin(c),
                          chunk_begin(c + 1), chunk_begin(own1));
        if (stream_fresh) store_fence_if_streamed();
        work.release(c, sl + 1);
      }
    }
    // Then the chunks of other shares that are free, last first (their owner reaches them last): all their remaining
    // slices, row by row (dy read in place, no packing for a few rows).
    if (!whole_slices) return;
    for (bool took = true; took;) {
      took = false;
      for (Index o = 1; o < nt; ++o) {
        const Index other = (t + o) % nt, b0 = chunks * other / nt, b1 = chunks * (other + 1) / nt;
        for (Index c = b1 - 1; c >= b0; --c) {
          if (chunk_begin(c) >= chunk_begin(c + 1)) continue;
          const Index first = work.claim_rest(c);
          if (first < 0) continue;
          gradient_rows<I>(dtables, tables, touched, stream_fresh, width, dy, dy_stride, sc, chunk_begin(c),
                           chunk_begin(c + 1), pending + t * pending_floats, first);
          if (stream_fresh) store_fence_if_streamed();
          work.release(c, slices);
          took = true;
        }
      }
    }
  });
  parallel_threads(threads, [&](Index t, Index nt) {
    flag_rows(chunk_begin(chunks * t / nt), chunk_begin(chunks * (t + 1) / nt));
    add_dots(rows * t / nt, rows * (t + 1) / nt);
  });
}

MEMORYFORMER_SIMD_WARNINGS_END

#endif  // MEMORYFORMER_HAVE_SIMD_KERNELS

}  // namespace memoryformer::detail
