// SPDX-License-Identifier: MIT
// The (token, table) pairs of a lookup sorted by table row (design §1.6): the order in which the sorted backward
// accumulates each row's gradient once, and in which the table-order forward reads each used row once.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "../types.hpp"
#include "parallel.hpp"
#include "scratch.hpp"

namespace memoryformer::detail {

/// Contributions sorted by table row: entries of row r are [start[r], start[r+1]), each a token and its score.
/// `used` lists the rows with at least one entry, in increasing order: the loops visit only those (for small N most
/// of the K·2^τ rows are empty) and prefetch the rows they will visit next.
struct SortedContributions {
  std::int32_t* start = nullptr;     // [K·2^τ + 1]
  std::int32_t* token = nullptr;     // [N·K]
  float* score = nullptr;            // [N·K]
  float* dot = nullptr;              // [N·K] ⟨dy[n], T_k[code]⟩ accumulated over column slices (backward only)
  std::int32_t* used = nullptr;      // [≤ min(N·K, K·2^τ)] rows with entries
  std::int32_t* entry_of = nullptr;  // [K·N] the entry of (token n, table k) at k·N + n; nullptr: not kept
  Index used_count = 0;
};

/// True when the sort's int32 positions can index all N·K pairs and K·2^τ + 1 row starts; larger calls take the
/// kernels that do not sort.
inline bool contributions_fit_int32(Index rows, Index tables, int tau) {
  constexpr Index limit = std::numeric_limits<std::int32_t>::max();
  return tau < 31 && tables <= limit / (Index(1) << tau) - 1 && (rows == 0 || tables <= limit / rows);
}

/// Counting sort of the N·K (token, table) pairs by global row k·2^τ + code, stable in the token index.
/// Every table holds exactly N entries, so table k's rows occupy [k·N, (k+1)·N) and each table is sorted on its
/// own: threads take groups of tables, with the same result for any thread count (a token-major sort would be
/// serial).
inline void sort_contributions(SortedContributions& out, const std::int32_t* codes, const float* scores, Index rows,
                               Index tables, int tau) {
  const Index R = Index(1) << tau;
  std::int32_t* start = out.start;
  start[0] = 0;
  // Threads claim groups of 8 tables one at a time: at K = 32 (d = 256, τ = 8) four items, which two threads
  // share more evenly than two. Each group's codes and scores are copied table-major: the [N, K] arrays are read
  // once per group, half a line at a time, instead of once per table and pass with a stride of K. The copies'
  // stride is padded by a line: a power-of-two stride would put all 8 in the same L1 sets.
  constexpr Index group = 8;
  // Table k lists its used rows in its own stretch of `used`, [k·min(N, 2^τ), …) (it has at most that many), and
  // the stretches are closed up afterwards: a serial scan of all K·2^τ row starts would leave the other threads
  // waiting.
  const Index per_table = std::min(rows, R);
  Index* used_counts = thread_scratch<15, Index>(size_t(tables));
  parallel_claims((tables + group - 1) / group, [&](WorkQueue& queue) {
    std::int32_t* cursor = thread_scratch<6, std::int32_t>(size_t(R));
    const Index stride = (rows + 15) / 16 * 16 + 16;
    std::int32_t* group_codes = thread_scratch<11, std::int32_t>(size_t(group * stride));
    float* group_scores = thread_scratch<12, float>(size_t(group * stride));
    for (Index claimed = queue.claim(); claimed >= 0; claimed = queue.claim()) {
      const Index g0 = claimed * group, g1 = std::min(tables, g0 + group);
      for (Index n = 0; n < rows; ++n)
        for (Index k = g0; k < g1; ++k) {
          group_codes[(k - g0) * stride + n] = codes[n * tables + k];
          group_scores[(k - g0) * stride + n] = scores[n * tables + k];
        }
      for (Index k = g0; k < g1; ++k) {
        const std::int32_t* table_codes = group_codes + (k - g0) * stride;
        const float* table_scores = group_scores + (k - g0) * stride;
        // Table k writes start[kR + 1 .. (k+1)R] (the ends of its rows); its first row starts at k·N.
        std::int32_t* ends = start + k * R + 1;
        std::fill(ends, ends + R, 0);
        for (Index n = 0; n < rows; ++n) ++ends[table_codes[n]];
        std::int32_t begin = std::int32_t(k * rows);
        for (Index r = 0; r < R; ++r) {
          cursor[r] = begin;
          begin += ends[r];
          ends[r] = begin;
        }
        std::int32_t* table_used = out.used + k * per_table;
        Index used_count = 0;
        for (Index r = 0, row_begin = k * rows; r < R; row_begin = ends[r], ++r)
          if (ends[r] != row_begin) table_used[used_count++] = std::int32_t(k * R + r);
        used_counts[k] = used_count;
        for (Index n = 0; n < rows; ++n) {
          const std::int32_t e = cursor[table_codes[n]]++;
          out.token[e] = std::int32_t(n);
          out.score[e] = table_scores[n];
          if (out.entry_of != nullptr) out.entry_of[k * rows + n] = e;
        }
        if (out.dot != nullptr) std::fill(out.dot + k * rows, out.dot + (k + 1) * rows, 0.0f);
      }
    }
  });
  Index used_count = 0;
  for (Index k = 0; k < tables; ++k) {
    if (used_counts[k] == 0) continue;  // also keeps a null `used` (no tokens) out of memmove
    std::memmove(out.used + used_count, out.used + k * per_table, size_t(used_counts[k]) * sizeof(std::int32_t));
    used_count += used_counts[k];
  }
  out.used_count = used_count;
}

/// One sort in storage of its own (sort_contributions fills `sorted`, whose dot stays nullptr), for a sort that several
/// lookups of one hash share: the per-thread scratch the backward kernel sorts into is reused by every call.
struct SortedContributionsBuffer {
  std::vector<std::int32_t> start, token, used;  // [K·2^τ + 1], [N·K], [≤ min(N·K, K·2^τ)]
  std::vector<std::int32_t> entry_of;            // [K·N]
  std::vector<float> score;                      // [N·K]
  SortedContributions sorted;
  bool current = false;  // sorted holds the pairs of the hash its users share (they reset it for a new hash)

  void sort(const std::int32_t* codes, const float* scores, Index rows, Index tables, int tau) {
    const Index total_rows = tables * (Index(1) << tau), entries = rows * tables;
    start.resize(size_t(total_rows + 1));
    token.resize(size_t(entries));
    score.resize(size_t(entries));
    used.resize(size_t(std::min(entries, total_rows)));
    entry_of.resize(size_t(entries));
    sorted = SortedContributions{start.data(), token.data(), score.data(), nullptr, used.data(), entry_of.data(), 0};
    sort_contributions(sorted, codes, scores, rows, tables, tau);
  }
};

/// Splits the used rows [0, used_count) into `parts` contiguous ranges holding about equal numbers of
/// contributions; returns where range `part` begins.
inline Index balanced_row_split(const SortedContributions& sc, Index part, Index parts) {
  if (part <= 0) return 0;
  if (part >= parts) return sc.used_count;
  const std::int64_t total = sc.used_count > 0 ? sc.start[sc.used[sc.used_count - 1] + 1] : 0;
  const std::int64_t target = total * part / parts;
  return Index(std::partition_point(sc.used, sc.used + sc.used_count,
                                    [&](std::int32_t r) { return sc.start[r] < target; }) -
               sc.used);
}

}  // namespace memoryformer::detail
