// SPDX-License-Identifier: MIT
// SignHasher throughput (design §1.2, §1.4, §1.6): bytes/s of float32 input, tokens/s, for both score kinds and ISA
// paths, and of its backward with the input in cache or read from memory.
// Names: hash/forward/d_in:…/tau:…/N:…/score:{l1,paper}/isa:…,
//        hash/backward/d_in:…/tau:…/N:…/isa:…/input:{cache,memory}.
#include <algorithm>
#include <string>
#include <vector>

#include <memoryformer/hash.hpp>

#include "bench_support.hpp"

namespace mfbench {
namespace {

/// Throughput of a call on n tokens of d_in float32 inputs: bytes/s of input (SetBytesProcessed), tokens/s
/// (SetItemsProcessed) and time_per_token.
inline void set_hash_counters(benchmark::State& st, Index n, Index d_in) {
  st.SetBytesProcessed(st.iterations() * static_cast<std::int64_t>(n * d_in * Index(sizeof(float))));
  st.SetItemsProcessed(st.iterations() * static_cast<std::int64_t>(n));
  st.counters["time_per_token"] =
      benchmark::Counter(double(n), benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}

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
  set_hash_counters(st, n, d_in);
  st.counters["K"] = double(d_in / tau);
}

/// Distinct inputs the backward's "input:memory" rows take in turn: together (about 9 MB each at N = 2048, d = 512)
/// several times a large last-level cache, so each call reads its input from memory, as in training, where a layer's
/// input was written long before its backward.
inline constexpr Index hash_backward_memory_sets = 12;

/// SignHasher::backward alone (l1 score): dx [N, d] from the input x [N, d] and the score gradients [N, K]; `sets`
/// distinct inputs taken in turn (1: the input stays in cache). Throughput in bytes/s of float32 input.
inline void bm_hash_backward(benchmark::State& st, Index n, Index d, int tau, memoryformer::Isa isa, Index sets) {
  init_single_thread();
  const Index d_in = (d / tau) * tau, tables = d_in / tau;
  memoryformer::SignHasher<float> hasher(memoryformer::HashConfig{tau, memoryformer::ScoreKind::L1, 1.0});
  struct Set {
    MatrixF x, dscores, dx;                 // [N, d_in], [N, K], [N, d_in]
    memoryformer::HashResult<float> hash;  // of x
  };
  std::vector<Set> pool(static_cast<std::size_t>(sets));
  for (std::size_t i = 0; i < pool.size(); ++i) {
    Set& set = pool[i];
    set.x.resize(n, d_in);
    set.dscores.resize(n, tables);
    set.dx.resize(n, d_in);
    fill_normal(set.x, 11, 2 * i);
    fill_normal(set.dscores, 11, 2 * i + 1);
    hasher.hash(set.hash, set.x, isa);
    hasher.backward(set.dx, set.x, set.hash, set.dscores, isa);  // dx's pages faulted in before the timing
  }
  std::size_t next = 0;
  for (auto _ : st) {
    Set& set = pool[next];
    next = (next + 1) % pool.size();
    hasher.backward(set.dx, set.x, set.hash, set.dscores, isa);
    benchmark::DoNotOptimize(set.dx.data());
    benchmark::ClobberMemory();
  }
  set_hash_counters(st, n, d_in);
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
      // The backward: the best path with its input in cache and from memory, and the scalar path.
      const std::string backward = "hash/backward/d_in:" + std::to_string((d / tau) * tau) + "/tau:" +
                                   std::to_string(tau) + "/N:" + std::to_string(n_max);
      struct BackwardVariant {
        Isa isa;
        Index sets;
      };
      const BackwardVariant backward_variants[] = {{memoryformer::best_isa(), 1},
                                                   {memoryformer::best_isa(), hash_backward_memory_sets},
                                                   {Isa::Scalar, 1}};
      for (const auto& v : backward_variants) {
        // Where the best path is the scalar one, the last row would repeat the first.
        if (&v == &backward_variants[2] && memoryformer::best_isa() == Isa::Scalar) continue;
        const std::string name = backward + "/isa:" + std::string(memoryformer::isa_name(v.isa)) +
                                 (v.sets > 1 ? "/input:memory" : "/input:cache");
        benchmark::RegisterBenchmark(name.c_str(),
                                     [n_max, d, tau, v](benchmark::State& st) {
                                       bm_hash_backward(st, n_max, d, tau, v.isa, v.sets);
                                     })
            ->Unit(benchmark::kMicrosecond)
            ->MinTime(grid.min_time);
      }
    }
  }
}

}  // namespace mfbench
