// SPDX-License-Identifier: MIT
// The data-parallel gradient exchange of one table parameter under MPI (design §11.2): the touched rows packed and
// summed, against the whole gradient summed, for a share of touched rows from 1/16 to all. Where the packed exchange
// stops being faster is the crossover that DataParallelOptions::dense_row_fraction stands for. Run under mpirun:
//   mpirun -np 2 memoryformer_gradient_exchange_bench [Google Benchmark options]
// Every rank runs the same fixed iteration counts (collective calls must match); rank 0 alone reports (so leave out
// --benchmark_out, which every rank would write).
#include <benchmark/benchmark.h>
#include <mpi.h>

#include <cstdint>
#include <string>
#include <vector>

#include <memoryformer/distributed/data_parallel.hpp>
#include <memoryformer/distributed/mpi_communicator.hpp>

namespace {

namespace mf = memoryformer;

mf::Communicator& world() {
  static mf::MpiCommunicator comm;
  return comm;
}

/// One table parameter of the train_lm default's Q layer: 32 tables × 256 rows of 256 floats (8 MB), range(0)/16 of
/// its rows touched, the same rows on every rank, so that the union is that share.
void exchange(benchmark::State& state, bool packed) {
  const mf::Index rows = 32 * 256, width = 256, touched = rows * state.range(0) / 16;
  std::vector<float> value(std::size_t(rows * width)), grad(value.size());
  std::vector<std::uint8_t> flags(static_cast<std::size_t>(rows));
  std::vector<mf::Index> list;
  mf::ParameterView<float> view{"t", {32, 256, width}, value, grad, mf::ParameterKind::Table, width, &flags, &list};
  mf::DataParallelOptions options;
  options.dense_row_fraction = packed ? 1.0 : 0.0;
  mf::DataParallel<float> dp(world(), {view}, options);
  for (auto _ : state) {
    list.clear();
    for (mf::Index r = 0; r < touched; ++r) {
      const mf::Index row = r * 7 % rows;  // spread over the tables, as hashing spreads them (7 is prime to rows)
      flags[std::size_t(row)] = 1;
      list.push_back(row);
    }
    dp.sum_gradients();
  }
  state.counters["touched_share"] = double(touched) / double(rows);
  state.counters["ranks"] = world().size();
}

/// What the ranks other than 0 report: nothing.
class Silent : public benchmark::BenchmarkReporter {
 public:
  bool ReportContext(const Context&) override { return true; }
  void ReportRuns(const std::vector<Run>&) override {}
};

}  // namespace

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  {
    for (const bool packed : {true, false})
      benchmark::RegisterBenchmark(packed ? "exchange/packed_rows" : "exchange/whole_table",
                                   [packed](benchmark::State& s) { exchange(s, packed); })
          ->DenseRange(1, 16, 3)
          ->Iterations(20)
          ->Repetitions(5)
          ->ReportAggregatesOnly(true)
          ->Unit(benchmark::kMillisecond);
    benchmark::Initialize(&argc, argv);
    if (world().rank() == 0) {
      benchmark::RunSpecifiedBenchmarks();
    } else {
      Silent quiet;
      benchmark::RunSpecifiedBenchmarks(&quiet);
    }
    benchmark::Shutdown();
  }
  MPI_Finalize();
  return 0;
}
