// SPDX-License-Identifier: MIT
// SignHasher throughput (design §1.2, §1.4): bytes/s of float32 input, tokens/s, for both score kinds and ISA paths.
// Names: hash/forward/d_in:…/tau:…/N:…/score:{l1,paper}/isa:….
#include <algorithm>
#include <string>

#include <memoryformer/hash.hpp>

#include "bench_support.hpp"

namespace mfbench {
namespace {

/// SignHasher::hash alone: codes and scores of x [N, d] (d a multiple of τ). Throughput in bytes/s of float32
/// input via SetBytesProcessed; tokens/s via SetItemsProcessed.
inline void bm_hash(benchmark::State& st, Index n, Index d, int tau, memoryformer::ScoreKind score,
                    memoryformer::Isa isa) {
  init_single_thread();
  const Index d_in = (d / tau) * tau;
  memoryformer::SignHasher<float> hasher(memoryformer::HashConfig{tau, score, 1.0});
  const auto& in = cached_inputs(n, d_in, d_in);
  memoryformer::HashResult<float> cache;
  for (auto _ : st) {
    hasher.hash(cache, in.x, isa);
    benchmark::DoNotOptimize(cache.codes.data());
    benchmark::DoNotOptimize(cache.scores.data());
    benchmark::ClobberMemory();
  }
  st.SetBytesProcessed(st.iterations() * static_cast<std::int64_t>(n * d_in * Index(sizeof(float))));
  st.SetItemsProcessed(st.iterations() * static_cast<std::int64_t>(n));
  st.counters["time_per_token"] =
      benchmark::Counter(double(n), benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
  st.counters["K"] = double(d_in / tau);
}

}  // namespace

void register_hash_benchmarks(const Grid& grid) {
  using memoryformer::Isa;
  using memoryformer::ScoreKind;
  const Index n_max = grid.n.empty() ? 2048 : *std::max_element(grid.n.begin(), grid.n.end());
  for (Index d : grid.d) {
    for (int tau : grid.tau) {
      if (d / tau < 1) continue;
      const std::string base = "hash/forward/d_in:" + std::to_string((d / tau) * tau) + "/tau:" + std::to_string(tau) +
                               "/N:" + std::to_string(n_max);
      struct Variant {
        ScoreKind score;
        Isa isa;
        const char* name;
      };
      const Variant variants[] = {{ScoreKind::L1, memoryformer::best_isa(), "l1"},
                                  {ScoreKind::Paper, memoryformer::best_isa(), "paper"},
                                  {ScoreKind::L1, Isa::Scalar, "l1"}};
      for (const auto& v : variants) {
        if (v.isa == Isa::Scalar && memoryformer::best_isa() == Isa::Scalar && &v != &variants[0]) continue;
        const std::string name =
            base + "/score:" + v.name + "/isa:" + std::string(memoryformer::isa_name(v.isa));
        benchmark::RegisterBenchmark(name.c_str(),
                                     [n_max, d, tau, v](benchmark::State& st) {
                                       bm_hash(st, n_max, d, tau, v.score, v.isa);
                                     })
            ->Unit(benchmark::kMicrosecond)
            ->MinTime(grid.min_time);
      }
    }
  }
}

}  // namespace mfbench
