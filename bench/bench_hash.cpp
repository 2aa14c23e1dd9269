// SPDX-License-Identifier: MIT
// SignHasher throughput (spec §1.2, §1.4): bytes/s of float32 input, tokens/s, for both score kinds and ISA paths.
#include <algorithm>
#include <string>

#include "bench_common.hpp"

namespace mfbench {

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
