// SPDX-License-Identifier: MIT
// main() of memoryformer_bench: machine context, grid selection (--full / --smoke), then Google Benchmark.
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include "bench_model.hpp"
#include "bench_support.hpp"

namespace {

void print_usage() {
  std::cout << "memoryformer_bench [--full | --smoke] [--max-table-mb=MB] [Google Benchmark flags]\n"
               "  default   small grid: d in {512, 1024}, tau in {4, 8}, N in {1, 16, 2048}, plus d = 256, tau = 4\n"
               "            and d = 2048, tau = 8\n"
               "  --full    d in {256, 512, 1024, 2048} x tau in {4, 6, 8, 10} x N in {1, 16, 2048}\n"
               "            (also: environment MEMORYFORMER_BENCH_FULL=1)\n"
               "  --smoke   tiny shapes, a few seconds\n"
               "  --max-table-mb=MB  skip Memory Layer shapes whose fp32 tables + gradients exceed MB (1 MB = 1e6 B)\n"
               "  e.g. --benchmark_filter=memory_layer/forward --benchmark_out=bench.json --benchmark_out_format=json\n"
               "  Subjects: kernels/, memory_layer/ and dense/, hash/, block/, attention/ and roofline/, model/.\n"
               "  For the paper tables and memory/dense ratios run memoryformer_report.\n\n";
}

}  // namespace

int main(int argc, char** argv) {
  if (int rc = 0; mfbench::model_peak_child(argc, argv, rc)) return rc;
  mfbench::Grid grid = mfbench::default_grid();
  mfbench::BlockGrid block_grid = mfbench::default_block_grid();
  mfbench::ModelGrid model_grid = mfbench::default_model_grid();
  bool smoke = false;
  const char* env_full = std::getenv("MEMORYFORMER_BENCH_FULL");
  if (env_full != nullptr && std::strcmp(env_full, "0") != 0 && *env_full != '\0') {
    grid = mfbench::full_grid();
    block_grid = mfbench::full_block_grid();
  }
  double max_table_mb = -1;
  bool help = false;
  // This program's own flags are removed before Google Benchmark sees argv (it rejects flags it does not know).
  std::vector<char*> rest{argv[0]};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--full") {
      grid = mfbench::full_grid();
      block_grid = mfbench::full_block_grid();
    } else if (a == "--smoke") {
      smoke = true;
      grid = mfbench::smoke_grid();
      block_grid = mfbench::smoke_block_grid();
      model_grid = mfbench::smoke_model_grid();
    } else if (a.rfind("--max-table-mb=", 0) == 0) {
      max_table_mb = std::atof(a.c_str() + 15);
    } else {
      if (a == "--help" || a == "-h") help = true;
      rest.push_back(argv[i]);
    }
  }
  if (max_table_mb > 0) grid.max_table_bytes = max_table_mb * 1e6;
  if (help) print_usage();
  int rest_argc = int(rest.size());
  rest.push_back(nullptr);

  benchmark::Initialize(&rest_argc, rest.data());
  if (benchmark::ReportUnrecognizedArguments(rest_argc, rest.data())) return 1;
  mfbench::init_single_thread();
  mfbench::add_benchmark_context();
  // Registration order is run order: the kernel suite first, then the grids, then the models.
  mfbench::register_kernel_benchmarks();
  const auto skipped = mfbench::register_memory_layer_benchmarks(grid);
  for (const auto& s : skipped)
    std::cerr << "memoryformer_bench: skipping " << mfbench::shape_suffix(s) << ": tables + dtables = "
              << 2 * s.table_bytes() / 1e6 << " MB exceed the cap of " << grid.max_table_bytes / 1e6
              << " MB (--max-table-mb)\n";
  mfbench::register_hash_benchmarks(grid);
  mfbench::register_block_suite(block_grid);
  mfbench::register_attention_benchmarks(smoke);
  mfbench::register_model_benchmarks(model_grid);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
