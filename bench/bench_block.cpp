// SPDX-License-Identifier: MIT
// MemoryFormerBlock against TransformerBlock, prefill and KV-cache decode, in memoryformer_bench (spec §3, §4;
// practices P18). The bodies live in bench_common.hpp because memoryformer_report runs the very same ones.
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

#include "bench_common.hpp"

namespace mfbench {
namespace {

/// The block grid memoryformer_bench runs, chosen by the same switches bench_main.cpp reads (--full, --smoke,
/// MEMORYFORMER_BENCH_FULL). bench_main.cpp does not call into this file, so the arguments are read from
/// /proc/self/cmdline (Linux; elsewhere the default grid runs, or the full one with MEMORYFORMER_BENCH_FULL=1).
BlockGrid block_grid_from_command_line() {
  BlockGrid grid = default_block_grid();
  const char* env_full = std::getenv("MEMORYFORMER_BENCH_FULL");
  if (env_full != nullptr && std::strcmp(env_full, "0") != 0 && *env_full != '\0') grid = full_block_grid();
  std::ifstream in("/proc/self/cmdline", std::ios::binary);
  const std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  size_t start = 0;
  bool first = true;  // argv[0]
  while (start < all.size()) {
    size_t end = all.find('\0', start);
    if (end == std::string::npos) end = all.size();
    const std::string arg = all.substr(start, end - start);
    if (!first) {
      if (arg == "--full") grid = full_block_grid();
      if (arg == "--smoke") grid = smoke_block_grid();
    }
    first = false;
    start = end + 1;
  }
  return grid;
}

/// Registered during static initialisation (like BENCHMARK()), so bench_main.cpp needs no change; Google Benchmark
/// applies --benchmark_filter etc. to these as to every other benchmark.
[[maybe_unused]] const bool registered = [] {
  register_block_suite(block_grid_from_command_line());
  return true;
}();

}  // namespace
}  // namespace mfbench
