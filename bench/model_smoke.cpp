// SPDX-License-Identifier: MIT
// memoryformer_model_smoke: the whole-model section of the benchmarks (bench_model.cpp) on tiny shapes, built with
// the tests and run by ctest (bench.model_smoke). It checks that every row runs and yields what the report prints:
// tokens/s of both models, their ratio and both peak resident sizes (the child processes work). It measures
// nothing worth keeping; memoryformer_report --smoke --only model prints the same section as a table.
#include <cmath>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include "bench_model.hpp"

namespace {

/// Keeps the counters of every benchmark run and whether one failed.
class CheckingReporter : public benchmark::BenchmarkReporter {
 public:
  bool ReportContext(const Context&) override { return true; }
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const auto& r : runs) {
      if (r.error_occurred) errors_[r.benchmark_name()] = r.error_message;
      for (const auto& [k, c] : r.counters) counters_[r.run_name.function_name][k] = c.value;
    }
  }
  int check(const std::vector<std::string>& names) const {
    int failures = 0;
    for (const auto& [name, message] : errors_) {
      std::cerr << name << ": " << message << "\n";
      ++failures;
    }
    for (const auto& name : names) {
      const auto it = counters_.find(name);
      if (it == counters_.end()) {
        std::cerr << name << ": did not run\n";
        ++failures;
        continue;
      }
      for (const char* k : {"mf_tokens_per_second", "dense_tokens_per_second", "ratio", "flop_ratio", "mf_peak_bytes",
                            "dense_peak_bytes"}) {
        const auto c = it->second.find(k);
        const double v = c == it->second.end() ? 0.0 : c->second;
        if (!(std::isfinite(v) && v > 0)) {
          std::cerr << name << ": counter " << k << " = " << v << ", expected a positive number\n";
          ++failures;
        }
      }
      std::cout << name << ": ratio " << it->second.at("ratio") << ", flop_ratio " << it->second.at("flop_ratio")
                << ", peak MF " << it->second.at("mf_peak_bytes") / 1e6 << " MB, dense "
                << it->second.at("dense_peak_bytes") / 1e6 << " MB\n";
    }
    return failures;
  }

 private:
  std::map<std::string, std::string> errors_;
  std::map<std::string, std::map<std::string, double>> counters_;
};

}  // namespace

int main(int argc, char** argv) {
  if (int rc = 0; mfbench::model_peak_child(argc, argv, rc)) return rc;
  int bm_argc = 1;
  char* bm_argv[] = {argv[0], nullptr};
  benchmark::Initialize(&bm_argc, bm_argv);
  mfbench::init_single_thread();
  const auto names = mfbench::register_model_benchmarks(mfbench::smoke_model_grid());
  CheckingReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  const int failures = reporter.check(names);
  if (failures > 0) std::cerr << failures << " problem(s)\n";
  return failures > 0 ? 1 : 0;
}
