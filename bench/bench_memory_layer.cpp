// SPDX-License-Identifier: MIT
// MemoryLayer forward/backward against the dense Eigen layer y = x·W + b at the same shape (spec §1 Cost; P18).
#include <iostream>

#include "bench_common.hpp"

namespace mfbench {

void register_memory_layer_benchmarks(const Grid& grid) {
  // The paired suite (memory forward, dense forward, memory backward, dense backward per shape) is shared with
  // memoryformer_report, which computes the memory/dense time ratios from it.
  const auto skipped = register_layer_suite(grid);
  for (const auto& s : skipped)
    std::cerr << "memoryformer_bench: skipping " << shape_suffix(s) << ": tables + dtables = " << 2 * s.table_bytes() / 1e6
              << " MB exceed the cap of " << grid.max_table_bytes / 1e6 << " MB (--max-table-mb)\n";

  // Extras that only the bench binary runs, at τ = 8: the lookup half alone (hash precomputed), and the portable
  // scalar kernels, to show what hashing and SIMD each contribute.
  for (const auto& s : grid_shapes(grid)) {
    if (s.tau != 8 || !shape_fits(grid, s)) continue;
    benchmark::RegisterBenchmark(("memory_layer/forward_hashed/" + shape_suffix(s)).c_str(),
                                 [s](benchmark::State& st) { bm_memory_forward_hashed(st, s); })
        ->Unit(benchmark::kMicrosecond)
        ->MinTime(grid.min_time);
    if (memoryformer::best_isa() != memoryformer::Isa::Scalar)
      benchmark::RegisterBenchmark(("memory_layer/forward_scalar/" + shape_suffix(s)).c_str(),
                                   [s](benchmark::State& st) { bm_memory_forward(st, s, memoryformer::Isa::Scalar); })
          ->Unit(benchmark::kMicrosecond)
          ->MinTime(grid.min_time);
  }
}

}  // namespace mfbench
