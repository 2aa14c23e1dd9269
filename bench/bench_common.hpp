// SPDX-License-Identifier: MIT
// Shared benchmark bodies, shape grids, counters and machine description for memoryformer_bench and
// memoryformer_report (spec §1 Cost, §4; practices P18). Header-only so that both executables run the very same
// code: the report registers these functions programmatically and collects their results.
#pragma once

#include <algorithm>
#include <chrono>
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
#include <memoryformer/memoryformer_block.hpp>
#include <memoryformer/nn/attention.hpp>
#include <memoryformer/nn/kv_cache.hpp>
#include <memoryformer/random.hpp>
#include <memoryformer/transformer_block.hpp>
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

/// The one Memory Layer kept between benchmark calls (see cached_layer), and its shape.
struct CachedLayerSlot {
  std::unique_ptr<memoryformer::MemoryLayer<float>> layer;
  std::tuple<Index, Index, int> key{-1, -1, -1};
};
inline CachedLayerSlot& cached_layer_slot() {
  static CachedLayerSlot slot;
  return slot;
}
/// Frees the cached Memory Layer (up to 1 GB of tables + gradients) so that later benchmarks (the blocks) have the
/// memory; the next cached_layer() call rebuilds it.
inline void release_cached_layer() {
  cached_layer_slot().layer.reset();
  cached_layer_slot().key = {-1, -1, -1};
}
/// Google Benchmark calls a benchmark function several times while it sizes the iteration count; building a
/// 0.5 GB table each time would dominate the wall time, so the last layer (and inputs) are kept between calls.
/// One entry only: the grid is ordered so consecutive benchmarks share it, and memory stays bounded.
inline memoryformer::MemoryLayer<float>& cached_layer(const LayerShape& s) {
  auto& layer = cached_layer_slot().layer;
  auto& key = cached_layer_slot().key;
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
    p.db.noalias() += memoryformer::detail::column_sums<float>(in.dy).transpose();  // the same column-sum loop as MemoryLayer
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

// ------------------------------------------------------------------------------------------------ blocks

/// One shape of the block benchmarks (MemoryFormerBlock against TransformerBlock, spec §3, §4). Prefill: one
/// sequence of s tokens per call. Decode: one new token whose KV cache holds s − 1 tokens, so it attends to s.
/// Heads follow the paper's head size 64 (heads = d/64, at least 1); the MemoryFormer block uses τ and e = 2.
struct BlockShape {
  Index d = 512;
  Index s = 1024;
  int tau = 8;
  Index heads() const { return std::max<Index>(1, d / 64); }
  Index k() const { return d / tau; }
};

/// Which block shapes to run, and how the decode stacks are sized.
struct BlockGrid {
  std::vector<BlockShape> prefill;
  std::vector<BlockShape> decode;
  double min_time = 0.1;
  int repetitions = 1;
  /// Resident bytes one decode stack may take (weights + their gradient buffers, which the layers allocate, + KV
  /// caches). 5.5 GB keeps the process under 8 GB with everything else it holds.
  double max_stack_bytes = 5.5e9;
  /// The stacks get enough layers that their weights exceed this; 0: 1.25 × the L3 size sysfs reports.
  double cache_target_bytes = 0;
  Index min_layers = 2;
  /// Distinct decode inputs cycled through: a Memory Layer reads only the rows its input hashes to, so repeating one
  /// token would keep those few rows in L1/L2 and flatter it; thousands of tokens touch (nearly) every row.
  Index token_pool = 4096;
};

/// Default subset (keeps memoryformer_report under 5 minutes on 2 cores): prefill s = 1024 at d = 512, 768;
/// decode at d = 512 with 1023 tokens of context.
inline BlockGrid default_block_grid() {
  BlockGrid g;
  g.prefill = {{512, 1024}, {768, 1024}};
  g.decode = {{512, 1024}};
  return g;
}

/// The grid: s ∈ {1024, 2048} × d ∈ {512, 768, 1024}, prefill and decode.
inline BlockGrid full_block_grid() {
  BlockGrid g;
  for (Index d : {512, 768, 1024})
    for (Index s : {1024, 2048}) {
      g.prefill.push_back({d, s});
      g.decode.push_back({d, s});
    }
  return g;
}

/// Seconds-long grid for tests of the executables: d = 64 (one head), s = 32, two-layer decode stacks.
inline BlockGrid smoke_block_grid() {
  BlockGrid g;
  g.prefill = {{64, 32}};
  g.decode = {{64, 32}};
  g.min_time = 0.005;
  g.cache_target_bytes = 1;  // → min_layers
  g.token_pool = 16;
  return g;
}

inline std::string block_suffix(const BlockShape& s) {
  return "d:" + std::to_string(s.d) + "/heads:" + std::to_string(s.heads()) + "/s:" + std::to_string(s.s);
}
/// "block/<model>/<mode>/d:D/heads:H/s:S" with model memoryformer, transformer or attention (attention alone, the
/// part both blocks share) and mode prefill or decode.
inline std::string block_name(const std::string& model, const std::string& mode, const BlockShape& s) {
  return "block/" + model + "/" + mode + "/" + block_suffix(s);
}

inline memoryformer::MemoryFormerBlockConfig memoryformer_block_config(const BlockShape& s) {
  memoryformer::MemoryFormerBlockConfig c;
  c.d = s.d;
  c.heads = s.heads();
  c.tau = s.tau;
  return c;
}
inline memoryformer::TransformerBlockConfig transformer_block_config(const BlockShape& s) {
  memoryformer::TransformerBlockConfig c;
  c.d = s.d;
  c.heads = s.heads();
  return c;
}

/// fp32 bytes of one block's weights: MemoryFormer Q/K/V + Memory Block tables (biases and gains left out, < 0.1 %);
/// Transformer 12d² + 13d parameters.
inline double memoryformer_block_weight_bytes(const BlockShape& s) {
  const memoryformer::MemoryFormerBlockShape shape{.d = double(s.d), .heads = double(s.heads()), .tau = s.tau};
  return memoryformer::memoryformer_block_table_bytes(shape, memoryformer::StorageType::F32);
}
inline double transformer_block_weight_bytes(const BlockShape& s) {
  return memoryformer::dense_block_parameter_bytes(double(s.d), memoryformer::StorageType::F32);
}

/// Weight/table bytes one token reads in one block. MemoryFormer: the K rows each Memory Layer gathers (Q, K, V:
/// K rows of d; ML1: K rows of K(τ+e); ML2: K rows of d). Transformer: every weight (12d² + 13d values).
inline double memoryformer_block_bytes_per_token(const BlockShape& s) {
  const auto c = memoryformer_block_config(s);
  const auto mb = c.memory_block();
  const double rows_qkv = 3.0 * double(c.qkv().num_tables()) * double(s.d);
  const double rows_ml1 = double(mb.ml1().num_tables()) * double(mb.hidden());
  const double rows_ml2 = double(mb.ml2().num_tables()) * double(s.d);
  return 4.0 * (rows_qkv + rows_ml1 + rows_ml2);
}
inline double transformer_block_bytes_per_token(const BlockShape& s) { return transformer_block_weight_bytes(s); }
/// KV-cache bytes one decoded token reads in one block: keys and values of s positions (identical in both blocks).
inline double kv_bytes_per_token(const BlockShape& s) { return 2.0 * double(s.s) * double(s.d) * 4.0; }

/// Paper-convention FLOPs of one block call (spec §4): prefill on s tokens 2s²d + 12sd² (Transformer), 2s²d + 6Ksd
/// (MemoryFormer); one decoded token at context s is that divided by s: 2sd + 12d² resp. 2sd + 6Kd.
inline double block_flops_paper(bool memoryformer, bool decode, const BlockShape& s, bool with_attention = true) {
  const double sd = double(s.s), d = double(s.d);
  double f = 0;
  if (memoryformer)
    f = with_attention ? memoryformer::memoryformer_block_flops_paper(sd, d, s.tau)
                       : memoryformer::memoryformer_block_flops_paper_no_attention(sd, d, s.tau);
  else
    f = with_attention ? memoryformer::transformer_block_flops_paper(sd, d)
                       : memoryformer::transformer_block_flops_paper_no_attention(sd, d);
  return decode ? f / sd : f;
}

/// The size the decode stacks' weights (and KV caches) should exceed: the grid's cache_target_bytes, else 1.25 × the
/// L3 size sysfs reports (L2, then 32 MiB when that is unknown).
inline double block_cache_target(const BlockGrid& g) {
  if (g.cache_target_bytes > 0) return g.cache_target_bytes;
  const auto caches = read_caches();
  double l3 = cache_bytes(caches, 3);
  if (l3 <= 0) l3 = cache_bytes(caches, 2);
  if (l3 <= 0) l3 = 32.0 * 1024 * 1024;
  return 1.25 * l3;
}

/// How many KV caches of s tokens it takes for their bytes to exceed the cache target (at least min_layers,
/// within max_stack_bytes): the attention-only decode benchmark uses that many, and the block stacks rotate through
/// that many, so keys and values come from DRAM as in a deep model.
inline Index kv_caches_for_target(const BlockGrid& g, const BlockShape& s) {
  const double kv = kv_bytes_per_token(s);
  Index n = std::max<Index>(g.min_layers, Index(std::floor(block_cache_target(g) / kv)) + 1);
  return std::min(n, std::max<Index>(1, Index(std::floor(g.max_stack_bytes / kv))));
}

/// How a decode stack is sized. Layers: the fewest whose weights exceed the cache target (so every token streams
/// them from DRAM rather than L3), at least min_layers, at most what max_stack_bytes allows. KV caches: each layer
/// cycles through kv_sets caches, one set per token, so that the stack's KV data also exceed the cache target.
/// Without that a 3-layer MemoryFormer stack would re-read 3 small KV caches from L3 while a 50-layer Transformer
/// stack reads 50 from DRAM; in a real deep model a layer's KV cache is re-read only after all other layers ran.
struct StackPlan {
  Index layers = 0;
  Index kv_sets = 1;          // KV caches per layer, used in rotation
  double weight_bytes = 0;    // whole stack, fp32
  double resident_bytes = 0;  // weights + gradient buffers + all KV caches
  double target_bytes = 0;    // cache target the weights were meant to exceed
  bool exceeds_target = false;
  bool capped = false;        // the memory cap stopped it short of the target
};
inline StackPlan plan_decode_stack(const BlockGrid& g, const BlockShape& s, bool memoryformer) {
  StackPlan p;
  p.target_bytes = block_cache_target(g);
  const double w = memoryformer ? memoryformer_block_weight_bytes(s) : transformer_block_weight_bytes(s);
  const double kv = kv_bytes_per_token(s);
  const double kv_total = double(kv_caches_for_target(g, s)) * kv;
  // Each layer also holds its gradient buffers (the layers allocate them up front).
  Index layers = std::max<Index>(g.min_layers, Index(std::floor(p.target_bytes / w)) + 1);
  const Index cap = std::max<Index>(1, Index(std::floor(std::max(0.0, g.max_stack_bytes - kv_total) / (2.0 * w))));
  if (layers > cap) {
    layers = cap;
    p.capped = true;
  }
  p.layers = layers;
  p.kv_sets = std::max<Index>(1, (kv_caches_for_target(g, s) + layers - 1) / layers);
  p.weight_bytes = double(layers) * w;
  p.resident_bytes = double(layers) * (2.0 * w + double(p.kv_sets) * kv);
  p.exceeds_target = p.weight_bytes > p.target_bytes;
  return p;
}

/// One object kept between the calls Google Benchmark makes of a benchmark function (iteration sizing,
/// repetitions): building a block's tables takes seconds. Three slots, MemoryFormer (0), Transformer (1) and
/// attention alone (2), so the benchmarks that alternate in the run order each keep theirs; a slot frees its old
/// object before building a new one, and the other slots' objects too when all together would exceed kMaxSlotBytes.
struct BlockSlot {
  std::string key;
  std::shared_ptr<void> object;
  double bytes = 0;  // resident estimate of the object
  double build_seconds = 0;
};
inline constexpr int kBlockSlots = 3;
inline constexpr double kMaxSlotBytes = 6.5e9;
inline BlockSlot& block_slot(int which) {
  static BlockSlot slots[kBlockSlots];
  return slots[which];
}
template <class T, class Make>
T& cached_block_object(int which, const std::string& key, double bytes, Make&& make) {
  auto& slot = block_slot(which);
  if (!slot.object || slot.key != key) {
    slot = BlockSlot{};
    release_cached_layer();
    double others = 0;
    for (int i = 0; i < kBlockSlots; ++i) others += block_slot(i).bytes;
    if (others + bytes > kMaxSlotBytes)
      for (int i = 0; i < kBlockSlots; ++i) block_slot(i) = BlockSlot{};
    const auto t0 = std::chrono::steady_clock::now();
    std::shared_ptr<T> made = make();
    slot.build_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    slot.object = made;
    slot.key = key;
    slot.bytes = bytes;
  }
  return *static_cast<T*>(slot.object.get());
}

template <class Block>
struct BlockTraits;
template <>
struct BlockTraits<memoryformer::MemoryFormerBlock<float>> {
  static constexpr int slot = 0;
  static constexpr bool memoryformer = true;
  static constexpr const char* name = "memoryformer";
  static memoryformer::MemoryFormerBlockConfig config(const BlockShape& s) { return memoryformer_block_config(s); }
  static double weight_bytes(const BlockShape& s) { return memoryformer_block_weight_bytes(s); }
  static double bytes_per_token(const BlockShape& s) { return memoryformer_block_bytes_per_token(s); }
};
template <>
struct BlockTraits<memoryformer::TransformerBlock<float>> {
  static constexpr int slot = 1;
  static constexpr bool memoryformer = false;
  static constexpr const char* name = "transformer";
  static memoryformer::TransformerBlockConfig config(const BlockShape& s) { return transformer_block_config(s); }
  static double weight_bytes(const BlockShape& s) { return transformer_block_weight_bytes(s); }
  static double bytes_per_token(const BlockShape& s) { return transformer_block_bytes_per_token(s); }
};

/// Counters of the block benchmarks (on top of set_layer_counters' FLOPS, flop_per_iter, bytes_per_iter,
/// storage_MB, items_per_second = tokens/s and time_per_token): layers (1 for prefill), weight_bytes_per_token (per
/// layer, see *_block_bytes_per_token), kv_bytes_per_token (per layer, decode), stack_weight_MB, build_s (seconds it
/// took to build the blocks; not part of the timed loop), tau and K (0 for the Transformer).
inline void set_block_counters(benchmark::State& st, bool memoryformer, const BlockShape& s, double tokens,
                               double flops_per_iter, double bytes_per_iter, double layers, double kv_bytes,
                               double build_seconds) {
  const double per_token = memoryformer ? memoryformer_block_bytes_per_token(s) : transformer_block_bytes_per_token(s);
  const double weights = memoryformer ? memoryformer_block_weight_bytes(s) : transformer_block_weight_bytes(s);
  set_layer_counters(st, tokens, flops_per_iter, bytes_per_iter, layers * weights);
  st.counters["layers"] = layers;
  st.counters["weight_bytes_per_token"] = per_token;
  st.counters["kv_bytes_per_token"] = kv_bytes;
  st.counters["stack_weight_MB"] = layers * weights / 1e6;
  st.counters["build_s"] = build_seconds;
  st.counters["tau"] = memoryformer ? s.tau : 0;
  st.counters["K"] = memoryformer ? double(s.k()) : 0.0;
}

/// A prefill block with its forward cache. The cache is kept across calls and warmed once per shape: a large shape
/// runs 1 iteration per call, and allocating and first-touching its buffers (attention probabilities alone are
/// heads·s² floats, 268 MB at d = 1024, s = 2048) would otherwise be timed.
template <class Block>
struct PrefillBlock {
  std::unique_ptr<Block> block;
  typename Block::Cache cache;
  std::string warmed;  // block_suffix of the shape the cache was sized for
};

/// Resident estimate of a prefill object: weights + gradient buffers + the attention probabilities.
inline double prefill_bytes(double weight_bytes, const BlockShape& s) {
  return 2.0 * weight_bytes + double(s.heads()) * double(s.s) * double(s.s) * 4.0;
}

/// Prefill: block.forward(y, x, batch = 1, seq = s, cache) on x ~ N(0, 1). One block, built once per (model, d).
template <class Block>
inline void bm_block_prefill(benchmark::State& st, BlockShape s) {
  using Traits = BlockTraits<Block>;
  init_single_thread();
  auto& p = cached_block_object<PrefillBlock<Block>>(
      Traits::slot, std::string(Traits::name) + "/prefill/" + std::to_string(s.d),
      prefill_bytes(Traits::weight_bytes(s), s), [&] {
        auto made = std::make_shared<PrefillBlock<Block>>();
        made->block = std::make_unique<Block>(Traits::config(s), /*seed=*/11);
        return made;
      });
  const auto& in = cached_inputs(s.s, s.d, s.d);
  MatrixF y(s.s, s.d);
  if (p.warmed != block_suffix(s)) {
    p.block->forward(y, in.x, 1, s.s, p.cache);
    p.warmed = block_suffix(s);
  }
  for (auto _ : st) {
    p.block->forward(y, in.x, 1, s.s, p.cache);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  // bytes_per_iter: the MemoryFormer gathers s·(rows per token); the GEMMs read each weight once per call.
  const double bytes = Traits::memoryformer ? double(s.s) * Traits::bytes_per_token(s) : Traits::weight_bytes(s);
  set_block_counters(st, Traits::memoryformer, s, double(s.s), block_flops_paper(Traits::memoryformer, false, s), bytes,
                     1.0, 0.0, block_slot(Traits::slot).build_seconds);
}

/// The attention cache of bm_attention_prefill, kept and warmed as in PrefillBlock.
struct AttentionPrefill {
  memoryformer::AttentionCache<float> cache;
  std::string warmed;
};

/// The causal multi-head attention both blocks run (attention_forward on q, k, v ~ N(0, 1)), timed alone to show
/// how much of a block's prefill time it takes. Paper FLOPs 2s²d.
inline void bm_attention_prefill(benchmark::State& st, BlockShape s) {
  init_single_thread();
  auto& p = cached_block_object<AttentionPrefill>(2, "attention/prefill/" + block_suffix(s), prefill_bytes(0.0, s),
                                                  [] { return std::make_shared<AttentionPrefill>(); });
  const auto& in = cached_inputs(s.s, s.d, s.d);
  MatrixF ctx(s.s, s.d);
  if (p.warmed != block_suffix(s)) {
    memoryformer::attention_forward<float>(ctx, in.x, in.dy, in.x, 1, s.s, s.heads(), p.cache);
    p.warmed = block_suffix(s);
  }
  for (auto _ : st) {
    memoryformer::attention_forward<float>(ctx, in.x, in.dy, in.x, 1, s.s, s.heads(), p.cache);
    benchmark::DoNotOptimize(ctx.data());
    benchmark::ClobberMemory();
  }
  const double f = memoryformer::attention_flops_paper(double(s.s), double(s.d));
  st.SetItemsProcessed(st.iterations() * static_cast<std::int64_t>(s.s));
  st.counters["FLOPS"] = benchmark::Counter(f, benchmark::Counter::kIsIterationInvariantRate);
  st.counters["flop_per_iter"] = f;
  st.counters["time_per_token"] =
      benchmark::Counter(double(s.s), benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}

/// A stack of decode layers with their KV caches and a pool of distinct input tokens.
template <class Block>
struct DecodeStack {
  std::vector<std::unique_ptr<Block>> layers;
  std::vector<std::vector<memoryformer::KVCache<float>>> kv;  // [kv_sets][layers]; s − 1 cached tokens each
  Index set = 0;                                               // KV set of the next token
  Index context = -1;                                          // s the KV caches were filled for
  MatrixF pool;                                   // [token_pool, d] decode inputs, cycled through
  Index next = 0;                                 // next pool row (continues across calls: no re-warmed rows)
};

/// Decode: one token through a stack of plan_decode_stack() layers, each attending to a KV cache of s − 1 tokens
/// plus the new one; the cache is truncated back to s − 1 after every step, and the next token uses the next KV
/// set (see StackPlan). Successive iterations take successive tokens of a pool of distinct N(0, 1) inputs. Time,
/// FLOPs and bytes are for the whole stack; the report divides by `layers`. The KV caches hold N(0, 1) keys and
/// values (their values do not change the work).
template <class Block>
inline void bm_block_decode(benchmark::State& st, BlockShape s, BlockGrid g) {
  using Traits = BlockTraits<Block>;
  init_single_thread();
  const StackPlan plan = plan_decode_stack(g, s, Traits::memoryformer);
  const std::string key = std::string(Traits::name) + "/decode/" + std::to_string(s.d) + "/" +
                          std::to_string(plan.layers) + "/" + std::to_string(g.token_pool);
  auto& stack = cached_block_object<DecodeStack<Block>>(Traits::slot, key, plan.resident_bytes, [&] {
    auto p = std::make_shared<DecodeStack<Block>>();
    for (Index l = 0; l < plan.layers; ++l)
      p->layers.push_back(std::make_unique<Block>(Traits::config(s), /*seed=*/100 + std::uint64_t(l)));
    p->pool.resize(g.token_pool, s.d);
    fill_normal(p->pool, 5, 0);
    return p;
  });
  if (stack.context != s.s) {
    stack.kv.clear();
    MatrixF keys(s.s - 1, s.d), values(s.s - 1, s.d);
    fill_normal(keys, 9, 0);
    fill_normal(values, 9, 1);
    stack.kv.resize(size_t(plan.kv_sets));
    for (auto& set : stack.kv)
      for (const auto& layer : stack.layers) {
        set.push_back(layer->make_kv_cache(1, s.s));
        if (s.s > 1) set.back().append(keys, values);
      }
    stack.set = 0;
    stack.context = s.s;
  }
  MatrixF a(1, s.d), b(1, s.d);
  const Index past = s.s - 1;
  for (auto _ : st) {
    a = stack.pool.row(stack.next);
    stack.next = (stack.next + 1) % stack.pool.rows();
    auto& kv = stack.kv[size_t(stack.set)];
    stack.set = (stack.set + 1) % Index(stack.kv.size());
    for (size_t l = 0; l < stack.layers.size(); ++l) {
      stack.layers[l]->forward_decode(b, a, kv[l]);
      kv[l].truncate(past);
      a.swap(b);
    }
    benchmark::DoNotOptimize(a.data());
    benchmark::ClobberMemory();
  }
  const double layers = double(plan.layers);
  set_block_counters(st, Traits::memoryformer, s, 1.0, layers * block_flops_paper(Traits::memoryformer, true, s),
                     layers * (Traits::bytes_per_token(s) + kv_bytes_per_token(s)), layers, kv_bytes_per_token(s),
                     block_slot(Traits::slot).build_seconds);
  st.counters["stack_exceeds_cache_target"] = plan.exceeds_target ? 1.0 : 0.0;
  st.counters["kv_sets"] = double(plan.kv_sets);
}

/// KV caches of the attention-only decode benchmark and a pool of new (q, k, v) rows.
struct AttentionDecodeStack {
  std::vector<memoryformer::KVCache<float>> kv;  // [layers], s − 1 cached tokens each
  MatrixF q, k, v;                                // [token_pool, d]
  Index next = 0;
};

/// What decoding one token costs in the attention both blocks share: attention_decode (append the new key/value,
/// attend to s positions, truncate back) over kv_caches_for_target() KV caches, so the keys and values come from
/// DRAM as in a deep model (and as in the block stacks). Time and FLOPs (2sd per layer) are for all layers.
inline void bm_attention_decode(benchmark::State& st, BlockShape s, BlockGrid g) {
  init_single_thread();
  const Index layers = kv_caches_for_target(g, s);
  const std::string key = "attention/decode/" + std::to_string(s.d) + "/" + std::to_string(s.s) + "/" +
                          std::to_string(layers) + "/" + std::to_string(g.token_pool);
  auto& stack = cached_block_object<AttentionDecodeStack>(2, key, double(layers) * kv_bytes_per_token(s), [&] {
    auto p = std::make_shared<AttentionDecodeStack>();
    MatrixF keys(s.s - 1, s.d), values(s.s - 1, s.d);
    fill_normal(keys, 9, 0);
    fill_normal(values, 9, 1);
    for (Index l = 0; l < layers; ++l) {
      p->kv.emplace_back(1, s.s, s.d);
      if (s.s > 1) p->kv.back().append(keys, values);
    }
    for (MatrixF* m : {&p->q, &p->k, &p->v}) m->resize(g.token_pool, s.d);
    fill_normal(p->q, 13, 0);
    fill_normal(p->k, 13, 1);
    fill_normal(p->v, 13, 2);
    return p;
  });
  MatrixF ctx(1, s.d);
  const Index past = s.s - 1;
  for (auto _ : st) {
    const Index i = stack.next;
    stack.next = (stack.next + 1) % stack.q.rows();
    for (auto& kv : stack.kv) {
      memoryformer::attention_decode<float>(ctx, stack.q.row(i), stack.k.row(i), stack.v.row(i), kv, s.heads());
      kv.truncate(past);
    }
    benchmark::DoNotOptimize(ctx.data());
    benchmark::ClobberMemory();
  }
  const double f = double(layers) * 2.0 * double(s.s) * double(s.d);
  st.SetItemsProcessed(st.iterations());
  st.counters["FLOPS"] = benchmark::Counter(f, benchmark::Counter::kIsIterationInvariantRate);
  st.counters["flop_per_iter"] = f;
  st.counters["bytes_per_iter"] = double(layers) * kv_bytes_per_token(s);
  st.counters["layers"] = double(layers);
  st.counters["kv_bytes_per_token"] = kv_bytes_per_token(s);
  st.counters["build_s"] = block_slot(2).build_seconds;
  st.counters["time_per_token"] =
      benchmark::Counter(1.0, benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}

/// Registers, per prefill shape: memoryformer, transformer, attention; then per decode shape: memoryformer,
/// transformer, attention (each twin right after the other, so both see the same machine load). Shapes are ordered by d so
/// a built block is reused across s. Returns the names in registration order.
inline std::vector<std::string> register_block_suite(const BlockGrid& g) {
  std::vector<std::string> names;
  auto common = [&](benchmark::internal::Benchmark* b) {
    b->Unit(benchmark::kMicrosecond)->MinTime(g.min_time);
    if (g.repetitions > 1) b->Repetitions(g.repetitions);
  };
  auto by_d = [](std::vector<BlockShape> v) {
    std::stable_sort(v.begin(), v.end(), [](const BlockShape& a, const BlockShape& b) { return a.d < b.d; });
    return v;
  };
  using MF = memoryformer::MemoryFormerBlock<float>;
  using TF = memoryformer::TransformerBlock<float>;
  for (const auto& s : by_d(g.prefill)) {
    names.push_back(block_name("memoryformer", "prefill", s));
    common(benchmark::RegisterBenchmark(names.back().c_str(), [s](benchmark::State& st) { bm_block_prefill<MF>(st, s); }));
    names.push_back(block_name("transformer", "prefill", s));
    common(benchmark::RegisterBenchmark(names.back().c_str(), [s](benchmark::State& st) { bm_block_prefill<TF>(st, s); }));
    names.push_back(block_name("attention", "prefill", s));
    common(benchmark::RegisterBenchmark(names.back().c_str(), [s](benchmark::State& st) { bm_attention_prefill(st, s); }));
  }
  // A Transformer decode step through a deep stack takes ~60 ms; 3x the min time gives it a few iterations.
  auto decode_common = [&](benchmark::internal::Benchmark* b) {
    common(b);
    b->MinTime(3 * g.min_time);
  };
  for (const auto& s : by_d(g.decode)) {
    names.push_back(block_name("memoryformer", "decode", s));
    decode_common(benchmark::RegisterBenchmark(names.back().c_str(),
                                               [s, g](benchmark::State& st) { bm_block_decode<MF>(st, s, g); }));
    names.push_back(block_name("transformer", "decode", s));
    decode_common(benchmark::RegisterBenchmark(names.back().c_str(),
                                               [s, g](benchmark::State& st) { bm_block_decode<TF>(st, s, g); }));
    names.push_back(block_name("attention", "decode", s));
    decode_common(benchmark::RegisterBenchmark(names.back().c_str(),
                                               [s, g](benchmark::State& st) { bm_attention_decode(st, s, g); }));
  }
  return names;
}

// Defined in bench_memory_layer.cpp and bench_hash.cpp; called by bench_main.cpp after it has read --full/--smoke.
void register_memory_layer_benchmarks(const Grid& grid);
void register_hash_benchmarks(const Grid& grid);

}  // namespace mfbench
