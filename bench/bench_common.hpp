// SPDX-License-Identifier: MIT
// Shared benchmark bodies, shape grids, counters and machine description for memoryformer_bench and
// memoryformer_report (spec §1 Cost, §4; practices P18). Header-only so that both executables run the very same
// code: the report registers these functions programmatically and collects their results.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <benchmark/benchmark.h>

#include <Eigen/Core>

#include <memoryformer/flops.hpp>
#include <memoryformer/hash.hpp>
#include <memoryformer/memory_layer.hpp>
#include <memoryformer/random.hpp>
#include <memoryformer/types.hpp>

#if defined(MEMORYFORMER_USE_OPENMP) && MEMORYFORMER_USE_OPENMP
#include <omp.h>
#endif

namespace mfbench {

using memoryformer::Index;
using MatrixF = memoryformer::Matrix<float>;

// ------------------------------------------------------------------------------------------------ machine

/// One cache level as the kernel describes it in /sys/devices/system/cpu/cpu0/cache/index*/.
struct CacheLevel {
  int level = 0;
  std::string type;  // Data, Instruction, Unified
  double bytes = 0;
};

inline std::string read_first_line(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  if (in) std::getline(in, line);
  return line;
}

/// CPU model name from /proc/cpuinfo ("unknown" if absent).
inline std::string cpu_model_name() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) {
        auto v = line.substr(colon + 1);
        v.erase(0, v.find_first_not_of(" \t"));
        return v;
      }
    }
  }
  return "unknown";
}

/// Number of "processor" entries in /proc/cpuinfo (logical CPUs visible to us).
inline int logical_cpu_count() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  int n = 0;
  while (std::getline(in, line))
    if (line.rfind("processor", 0) == 0) ++n;
  return n;
}

/// Caches of cpu0 ("48K", "2048K", "491520K" → bytes). Empty when sysfs is not available.
inline std::vector<CacheLevel> read_caches() {
  std::vector<CacheLevel> out;
  for (int i = 0; i < 16; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    const std::string level = read_first_line(dir + "level");
    if (level.empty()) break;
    CacheLevel c;
    c.level = std::atoi(level.c_str());
    c.type = read_first_line(dir + "type");
    std::string size = read_first_line(dir + "size");
    double mult = 1;
    if (!size.empty() && (size.back() == 'K' || size.back() == 'k')) mult = 1024, size.pop_back();
    else if (!size.empty() && size.back() == 'M') mult = 1024.0 * 1024, size.pop_back();
    else if (!size.empty() && size.back() == 'G') mult = 1024.0 * 1024 * 1024, size.pop_back();
    c.bytes = std::atof(size.c_str()) * mult;
    out.push_back(c);
  }
  return out;
}

/// Size in bytes of the data/unified cache of `level` (0 if unknown).
inline double cache_bytes(const std::vector<CacheLevel>& caches, int level) {
  for (const auto& c : caches)
    if (c.level == level && c.type != "Instruction") return c.bytes;
  return 0;
}

inline std::string compiler_string() {
  std::string s;
#if defined(MEMORYFORMER_BENCH_COMPILER)
  s = MEMORYFORMER_BENCH_COMPILER;  // from bench/CMakeLists.txt: "<id> <version>"
#elif defined(__clang__)
  s = "clang " __clang_version__;
#elif defined(__GNUC__)
  s = "gcc " __VERSION__;
#else
  s = "unknown";
#endif
  while (!s.empty() && s.back() == ' ') s.pop_back();
  return s;
}

/// Compiler flags of the benchmark build, when the build system passes them (bench/CMakeLists.txt does).
inline std::string cxx_flags_string() {
#if defined(MEMORYFORMER_BENCH_CXX_FLAGS)
  return MEMORYFORMER_BENCH_CXX_FLAGS;
#else
  return "unknown (built without bench/CMakeLists.txt)";
#endif
}

/// gnuplot to call: the one CMake found at configure time, else whatever "gnuplot" is on PATH ("" if none).
inline std::string gnuplot_command() {
#if defined(MEMORYFORMER_GNUPLOT_EXECUTABLE)
  const std::string configured = MEMORYFORMER_GNUPLOT_EXECUTABLE;
  if (!configured.empty() && std::ifstream(configured).good()) return configured;
#endif
  return std::system("command -v gnuplot >/dev/null 2>&1") == 0 ? "gnuplot" : "";
}

/// The SIMD flags this translation unit was compiled with, and the kernel path the layers use.
inline std::string isa_string() {
  std::string s;
#if defined(__AVX512F__)
  s += "AVX512F ";
#endif
#if defined(__AVX2__)
  s += "AVX2 ";
#endif
#if defined(__FMA__)
  s += "FMA ";
#endif
  if (s.empty()) s = "(no AVX) ";
#if defined(MEMORYFORMER_BENCH_ISA)
  s += "(build ISA " MEMORYFORMER_BENCH_ISA ") ";
#endif
  s += "-> kernels: ";
  s += std::string(memoryformer::isa_name(memoryformer::best_isa()));
  return s;
}

inline std::string git_sha() {
#if defined(MEMORYFORMER_GIT_SHA)
#define MFBENCH_STR2(x) #x
#define MFBENCH_STR(x) MFBENCH_STR2(x)
  // Accept both -DMEMORYFORMER_GIT_SHA="\"abc\"" and -DMEMORYFORMER_GIT_SHA=abc.
  std::string s = MFBENCH_STR(MEMORYFORMER_GIT_SHA);
  if (s.size() >= 2 && s.front() == '"' && s.back() == '"') s = s.substr(1, s.size() - 2);
  return s.empty() ? "unknown" : s;
#undef MFBENCH_STR
#undef MFBENCH_STR2
#else
  return "unknown";
#endif
}

/// Benchmarks are single-threaded: Eigen's GEMM and the library's row partitioning both get one thread.
inline void init_single_thread() {
  Eigen::setNbThreads(1);
#if defined(MEMORYFORMER_USE_OPENMP) && MEMORYFORMER_USE_OPENMP
  omp_set_num_threads(1);
#endif
}

/// Context keys every benchmark JSON carries (P18): CPU, compiler, ISA, git SHA, caches, thread count.
inline void add_benchmark_context() {
  benchmark::AddCustomContext("cpu_model", cpu_model_name());
  benchmark::AddCustomContext("compiler", compiler_string());
  benchmark::AddCustomContext("cxx_flags", cxx_flags_string());
  benchmark::AddCustomContext("isa", isa_string());
  benchmark::AddCustomContext("git_sha", git_sha());
  benchmark::AddCustomContext("eigen", std::to_string(EIGEN_WORLD_VERSION) + "." + std::to_string(EIGEN_MAJOR_VERSION) +
                                           "." + std::to_string(EIGEN_MINOR_VERSION));
  benchmark::AddCustomContext("threads", "1 (Eigen::setNbThreads(1))");
  const auto caches = read_caches();
  for (int level = 1; level <= 3; ++level) {
    const double b = cache_bytes(caches, level);
    if (b > 0) benchmark::AddCustomContext("cache_L" + std::to_string(level) + "_bytes", std::to_string(Index(b)));
  }
}

// ------------------------------------------------------------------------------------------------ shapes

/// One Memory Layer shape and its dense twin. The grid is given as (d, τ, N); when τ does not divide d the layer
/// uses K = floor(d/τ) tables and d_in = K·τ (so τ = 6 and 10 work for d = 512 …), and the dense twin takes the
/// same d_in so both compute the same [N, d_in] → [N, d_out] map.
struct LayerShape {
  Index d = 0;      // nominal width from the grid
  int tau = 8;
  Index n = 1;      // tokens per call (batch × sequence)
  Index k() const { return d / tau; }
  Index d_in() const { return k() * tau; }
  Index d_out() const { return d; }
  /// float32 table bytes of the Memory Layer (K·2^τ·d_out·4).
  double table_bytes() const {
    return memoryformer::memory_layer_table_bytes(double(d_in()), double(d_out()), tau, memoryformer::StorageType::F32);
  }
  /// float32 bytes of the dense weight (d_in·d_out·4).
  double weight_bytes() const { return double(d_in()) * double(d_out()) * 4.0; }
};

/// Which shapes to run.
struct Grid {
  std::vector<Index> d;
  std::vector<int> tau;
  std::vector<Index> n;
  double max_table_bytes = 1.2e9;  // tables + dtables (fp32) above this are skipped (listed, not run)
  double min_time = 0.1;           // seconds per benchmark
  int repetitions = 1;
  std::vector<std::tuple<Index, int, Index>> extra;  // additional (d, τ, N) points outside the product
};

/// Small default: d ∈ {512, 1024}, τ ∈ {4, 8}, N ∈ {1, 16, 2048}, plus d = 256, τ = 4 (1 MB of tables: fits L2)
/// and d = 2048, τ = 8 (537 MB: far beyond L2) to show both ends of the cache story.
inline Grid default_grid() {
  Grid g;
  g.d = {512, 1024};
  g.tau = {4, 8};
  g.n = {1, 16, 2048};
  g.extra = {{256, 4, 1}, {256, 4, 16}, {256, 4, 2048}, {2048, 8, 1}, {2048, 8, 2048}};
  return g;
}

/// The whole grid of the issue: d ∈ {256, 512, 1024, 2048}, τ ∈ {4, 6, 8, 10}, N ∈ {1, 16, 2048}.
inline Grid full_grid() {
  Grid g;
  g.d = {256, 512, 1024, 2048};
  g.tau = {4, 6, 8, 10};
  g.n = {1, 16, 2048};
  g.max_table_bytes = 2.5e9;
  return g;
}

/// Seconds-long grid for tests of the executables themselves.
inline Grid smoke_grid() {
  Grid g;
  g.d = {64};
  g.tau = {4, 8};
  g.n = {1, 16};
  g.min_time = 0.005;
  return g;
}

/// Shapes of a grid in run order: per (d, τ) all N, so a cached layer is reused across N.
inline std::vector<LayerShape> grid_shapes(const Grid& g) {
  std::vector<LayerShape> out;
  auto add = [&](Index d, int tau, Index n) {
    if (d / tau < 1) return;
    for (const auto& s : out)
      if (s.d == d && s.tau == tau && s.n == n) return;
    out.push_back({d, tau, n});
  };
  for (Index d : g.d)
    for (int tau : g.tau)
      for (Index n : g.n) add(d, tau, n);
  for (const auto& [d, tau, n] : g.extra) add(d, tau, n);
  std::stable_sort(out.begin(), out.end(), [](const LayerShape& a, const LayerShape& b) {
    return std::tie(a.d, a.tau) < std::tie(b.d, b.tau);
  });
  return out;
}

/// True when tables and their gradient (2 × fp32 tables) fit the grid's cap.
inline bool shape_fits(const Grid& g, const LayerShape& s) { return 2.0 * s.table_bytes() <= g.max_table_bytes; }

inline std::string shape_suffix(const LayerShape& s) {
  return "d_in:" + std::to_string(s.d_in()) + "/d_out:" + std::to_string(s.d_out()) + "/tau:" + std::to_string(s.tau) +
         "/N:" + std::to_string(s.n);
}
inline std::string dense_suffix(const LayerShape& s) {
  return "d_in:" + std::to_string(s.d_in()) + "/d_out:" + std::to_string(s.d_out()) + "/N:" + std::to_string(s.n);
}
inline std::string memory_forward_name(const LayerShape& s) { return "memory_layer/forward/" + shape_suffix(s); }
inline std::string memory_backward_name(const LayerShape& s) { return "memory_layer/backward/" + shape_suffix(s); }
inline std::string dense_forward_name(const LayerShape& s) { return "dense/forward/" + dense_suffix(s); }
inline std::string dense_backward_name(const LayerShape& s) { return "dense/backward/" + dense_suffix(s); }

// ------------------------------------------------------------------------------------------------ fixtures

inline void fill_normal(MatrixF& m, std::uint64_t seed, std::uint64_t stream) {
  memoryformer::Rng rng = memoryformer::Rng::stream(seed, stream);
  rng.fill_normal(std::span<float>(m.data(), size_t(m.size())), 0.0, 1.0);
}

/// Google Benchmark calls a benchmark function several times while it sizes the iteration count; building a
/// 0.5 GB table each time would dominate the wall time, so the last layer (and inputs) are kept between calls.
/// One entry only: the grid is ordered so consecutive benchmarks share it, and memory stays bounded.
inline memoryformer::MemoryLayer<float>& cached_layer(const LayerShape& s) {
  static std::unique_ptr<memoryformer::MemoryLayer<float>> layer;
  static std::tuple<Index, Index, int> key{-1, -1, -1};
  const auto want = std::make_tuple(s.d_in(), s.d_out(), s.tau);
  if (!layer || key != want) {
    layer.reset();  // free the old tables before allocating the new ones
    memoryformer::MemoryLayerConfig cfg;
    cfg.d_in = s.d_in();
    cfg.d_out = s.d_out();
    cfg.tau = s.tau;
    layer = std::make_unique<memoryformer::MemoryLayer<float>>(cfg, /*seed=*/1);
    key = want;
  }
  return *layer;
}

/// Inputs x [N, d_in] and upstream gradient dy [N, d_out], N(0, 1), cached like the layer.
struct Inputs {
  MatrixF x, dy;
};
inline const Inputs& cached_inputs(Index n, Index d_in, Index d_out) {
  static Inputs in;
  static std::tuple<Index, Index, Index> key{-1, -1, -1};
  const auto want = std::make_tuple(n, d_in, d_out);
  if (key != want) {
    in.x.resize(n, d_in);
    in.dy.resize(n, d_out);
    fill_normal(in.x, 7, 0);
    fill_normal(in.dy, 7, 1);
    key = want;
  }
  return in;
}

/// Dense baseline parameters W [d_in, d_out] ~ N(0, 0.02²), b [1, d_out], and their gradients.
struct DenseParams {
  MatrixF w, dw;                                       // [d_in, d_out]
  Eigen::Matrix<float, 1, Eigen::Dynamic> b, db;      // [1, d_out]
};
inline DenseParams& cached_dense(Index d_in, Index d_out) {
  static DenseParams p;
  static std::pair<Index, Index> key{-1, -1};
  if (key != std::make_pair(d_in, d_out)) {
    p.w.resize(d_in, d_out);
    fill_normal(p.w, 3, 0);
    p.w *= 0.02f;
    p.dw = MatrixF::Zero(d_in, d_out);
    p.b = Eigen::Matrix<float, 1, Eigen::Dynamic>::Constant(d_out, 0.001f);
    p.db = Eigen::Matrix<float, 1, Eigen::Dynamic>::Zero(d_out);
    key = {d_in, d_out};
  }
  return p;
}

// ------------------------------------------------------------------------------------------------ counters

/// Counters shared by every layer benchmark:
///  FLOPS          paper-convention FLOP/s (multiply-add = 1), kIsIterationInvariantRate of flops_per_iter
///  flop_per_iter  the same count per call
///  bytes_per_iter table/weight bytes the call touches (estimate, see the callers)
///  storage_MB     table or weight storage in MB (1e6 bytes, fp32)
///  time_per_token seconds per token, time / (iterations · N) (an inverted rate; the console shows e.g. "95ns")
///  items_per_second (SetItemsProcessed) = tokens/s
inline void set_layer_counters(benchmark::State& st, double n, double flops_per_iter, double bytes_per_iter,
                               double storage_bytes) {
  st.SetItemsProcessed(st.iterations() * static_cast<std::int64_t>(n));
  st.counters["FLOPS"] = benchmark::Counter(flops_per_iter, benchmark::Counter::kIsIterationInvariantRate);
  st.counters["flop_per_iter"] = flops_per_iter;
  st.counters["bytes_per_iter"] = bytes_per_iter;
  st.counters["storage_MB"] = storage_bytes / 1e6;
  st.counters["time_per_token"] =
      benchmark::Counter(n, benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}

// ------------------------------------------------------------------------------------------------ bodies

/// MemoryLayer::forward, hashing included (what a user calls). Paper FLOPs: N·K·(τ + d_out).
/// Bytes: N·K rows of d_out floats read from the tables (repeats counted; rows may be cache-resident).
inline void bm_memory_forward(benchmark::State& st, LayerShape s, memoryformer::Isa isa = memoryformer::best_isa()) {
  init_single_thread();
  auto& layer = cached_layer(s);
  const auto& in = cached_inputs(s.n, s.d_in(), s.d_out());
  MatrixF y(s.n, s.d_out());
  memoryformer::HashResult<float> cache;
  for (auto _ : st) {
    layer.forward(y, in.x, cache, isa);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  const double rows = double(s.n) * double(s.k());
  set_layer_counters(st, double(s.n), memoryformer::memory_layer_flops_paper(double(s.n), double(s.d_in()),
                                                                             double(s.d_out()), s.tau),
                     rows * double(s.d_out()) * 4.0, s.table_bytes());
  st.counters["K"] = double(s.k());
}

/// Lookup half only (MemoryLayer::forward_hashed on a precomputed hash): separates gather cost from hashing.
inline void bm_memory_forward_hashed(benchmark::State& st, LayerShape s) {
  init_single_thread();
  auto& layer = cached_layer(s);
  const auto& in = cached_inputs(s.n, s.d_in(), s.d_out());
  MatrixF y(s.n, s.d_out());
  memoryformer::HashResult<float> cache;
  layer.hasher().hash(cache, in.x);
  for (auto _ : st) {
    layer.forward_hashed(y, cache);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  const double rows = double(s.n) * double(s.k());
  set_layer_counters(st, double(s.n), rows * double(s.d_out()), rows * double(s.d_out()) * 4.0, s.table_bytes());
  st.counters["K"] = double(s.k());
}

/// MemoryLayer::backward (dx overwritten, dtables/dbias accumulated; no zero_grad inside the loop — clearing the
/// whole K·2^τ·d_out gradient every call would measure memset, not backward). Paper-convention FLOPs: 2·N·K·d_out
/// (the scatter-add into dtables and ⟨dy, T_k[code_k]⟩), the same "2 × forward" rule as the dense twin.
/// Bytes: N·K rows read from the tables and N·K rows read-modified-written in dtables.
inline void bm_memory_backward(benchmark::State& st, LayerShape s, memoryformer::Isa isa = memoryformer::best_isa()) {
  init_single_thread();
  auto& layer = cached_layer(s);
  const auto& in = cached_inputs(s.n, s.d_in(), s.d_out());
  MatrixF y(s.n, s.d_out()), dx(s.n, s.d_in());
  memoryformer::HashResult<float> cache;
  layer.forward(y, in.x, cache, isa);
  for (auto _ : st) {
    layer.backward(dx, in.x, in.dy, cache, isa);
    benchmark::DoNotOptimize(dx.data());
    benchmark::ClobberMemory();
  }
  const double rows = double(s.n) * double(s.k());
  set_layer_counters(st, double(s.n), 2.0 * rows * double(s.d_out()), 3.0 * rows * double(s.d_out()) * 4.0,
                     s.table_bytes());
  st.counters["K"] = double(s.k());
  layer.zero_grad();
}

/// Dense twin of the forward: y.noalias() = x·W; y += b (row-broadcast). Paper FLOPs: N·d_in·d_out.
/// Bytes: W read once per call (d_in·d_out·4); the GEMM reuses it from cache for all N rows.
inline void bm_dense_forward(benchmark::State& st, LayerShape s) {
  init_single_thread();
  auto& p = cached_dense(s.d_in(), s.d_out());
  const auto& in = cached_inputs(s.n, s.d_in(), s.d_out());
  MatrixF y(s.n, s.d_out());
  for (auto _ : st) {
    y.noalias() = in.x * p.w;
    y.rowwise() += p.b;
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_layer_counters(st, double(s.n), memoryformer::dense_layer_flops_paper(double(s.n), double(s.d_in()),
                                                                            double(s.d_out())),
                     s.weight_bytes(), s.weight_bytes());
}

/// Dense twin of the backward: dX = dY·Wᵀ, dW += Xᵀ·dY, db += Σ dY. Paper FLOPs: 2·N·d_in·d_out.
/// Bytes: W read, dW read-modify-written: 3·d_in·d_out·4.
inline void bm_dense_backward(benchmark::State& st, LayerShape s) {
  init_single_thread();
  auto& p = cached_dense(s.d_in(), s.d_out());
  const auto& in = cached_inputs(s.n, s.d_in(), s.d_out());
  MatrixF dx(s.n, s.d_in());
  for (auto _ : st) {
    dx.noalias() = in.dy * p.w.transpose();
    p.dw.noalias() += in.x.transpose() * in.dy;
    p.db.noalias() += in.dy.colwise().sum();
    benchmark::DoNotOptimize(dx.data());
    benchmark::DoNotOptimize(p.dw.data());
    benchmark::ClobberMemory();
  }
  set_layer_counters(st, double(s.n), 2.0 * double(s.n) * double(s.d_in()) * double(s.d_out()),
                     3.0 * s.weight_bytes(), s.weight_bytes());
  p.dw.setZero();
  p.db.setZero();
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
  st.SetBytesProcessed(st.iterations() * static_cast<std::int64_t>(n * d_in * Index(sizeof(float))));
  st.SetItemsProcessed(st.iterations() * static_cast<std::int64_t>(n));
  st.counters["time_per_token"] =
      benchmark::Counter(double(n), benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
  st.counters["K"] = double(d_in / tau);
}

// ------------------------------------------------------------------------------------------------ registration

/// Registers, for every shape of the grid that fits, in this order: memory forward, dense forward, memory
/// backward, dense backward (each dense twin right after its memory benchmark, so both see the same machine
/// load). A dense twin shared by several τ (same d_in) is registered once. Returns the shapes skipped by the cap.
inline std::vector<LayerShape> register_layer_suite(const Grid& g) {
  std::vector<LayerShape> skipped;
  std::vector<std::string> dense_done;
  auto once = [&](const std::string& name) {
    if (std::find(dense_done.begin(), dense_done.end(), name) != dense_done.end()) return false;
    dense_done.push_back(name);
    return true;
  };
  auto common = [&](benchmark::internal::Benchmark* b) {
    b->Unit(benchmark::kMicrosecond)->MinTime(g.min_time);
    if (g.repetitions > 1) b->Repetitions(g.repetitions);
  };
  for (const auto& s : grid_shapes(g)) {
    if (!shape_fits(g, s)) {
      skipped.push_back(s);
      continue;
    }
    common(benchmark::RegisterBenchmark(memory_forward_name(s).c_str(),
                                        [s](benchmark::State& st) { bm_memory_forward(st, s); }));
    if (once(dense_forward_name(s)))
      common(benchmark::RegisterBenchmark(dense_forward_name(s).c_str(),
                                          [s](benchmark::State& st) { bm_dense_forward(st, s); }));
    common(benchmark::RegisterBenchmark(memory_backward_name(s).c_str(),
                                        [s](benchmark::State& st) { bm_memory_backward(st, s); }));
    if (once(dense_backward_name(s)))
      common(benchmark::RegisterBenchmark(dense_backward_name(s).c_str(),
                                          [s](benchmark::State& st) { bm_dense_backward(st, s); }));
  }
  return skipped;
}

// Defined in bench_memory_layer.cpp and bench_hash.cpp; called by bench_main.cpp after it has read --full/--smoke.
void register_memory_layer_benchmarks(const Grid& grid);
void register_hash_benchmarks(const Grid& grid);

}  // namespace mfbench
