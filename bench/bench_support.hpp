// SPDX-License-Identifier: MIT
// What the benchmark sources share: thread settings and clocks, the paired-timing helper, the
// Memory Layer and block shapes with their names and analytic sizes, N(0, 1) inputs, the common counters, and the
// registration functions of each subject (bench_<subject>.cpp), called by memoryformer_bench and memoryformer_report.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <time.h>

#include <benchmark/benchmark.h>

#include <Eigen/Core>

#include <memoryformer/flops.hpp>
#include <memoryformer/memoryformer_block.hpp>
#include <memoryformer/random.hpp>
#include <memoryformer/transformer_block.hpp>
#include <memoryformer/types.hpp>

#include "machine.hpp"

#if defined(MEMORYFORMER_USE_OPENMP) && MEMORYFORMER_USE_OPENMP
#include <omp.h>
#endif

namespace mfbench {

using MatrixF = memoryformer::Matrix<float>;

// ------------------------------------------------------------------------------------------------ threads, clocks

/// Benchmarks are single-threaded: Eigen's GEMM and the library's row partitioning both get one thread.
inline void init_single_thread() {
  Eigen::setNbThreads(1);
#if defined(MEMORYFORMER_USE_OPENMP) && MEMORYFORMER_USE_OPENMP
  omp_set_num_threads(1);
#endif
}

/// Threads for Eigen's products and the library's OpenMP kernels.
inline void set_threads(int threads) {
  Eigen::setNbThreads(threads);
#if defined(MEMORYFORMER_USE_OPENMP) && MEMORYFORMER_USE_OPENMP
  omp_set_num_threads(threads);
#endif
}

/// This thread's CPU seconds (one-thread runs: what Google Benchmark's CPU time reports, insensitive to other
/// processes' time slices on a shared machine) or wall seconds (multi-threaded runs).
inline double now_seconds(bool cpu) {
  if (cpu) {
    timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return double(t.tv_sec) + 1e-9 * double(t.tv_nsec);
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

/**
 * Calls `baseline` and `candidate` alternately, one call each per benchmark iteration (which goes first swaps every
 * iteration), timing each call, and reports baseline_ms, candidate_ms and `ratio` = Σ baseline time / Σ candidate
 * time. Separately registered benchmarks compare medians of repetitions that ran seconds apart; in a shared VM the
 * speed drifts on that scale (one vCPU at times 30–45 % slower than the other), so such a ratio can set a fast spell
 * against a slow one. Here both sides of every pair see the same state, and each side also runs right after the
 * other, as layers do in a model, rather than after itself. The benchmark's own time is the pair's (of `calls`
 * calls of each side per iteration). cpu_time: this thread's CPU time (one-thread pairs), else wall time.
 */
template <class Baseline, class Candidate>
void run_paired(benchmark::State& st, bool cpu_time, const char* ratio, Baseline&& baseline, Candidate&& candidate,
                int calls = 1) {
  // calls > 1: each side runs that many times between two clock reads, for calls too short to time one by one.
  auto run = [calls](auto& f) {
    for (int i = 0; i < calls; ++i) f();
  };
  double baseline_seconds = 0, candidate_seconds = 0;
  bool baseline_first = true;
  for (auto _ : st) {
    const double t0 = now_seconds(cpu_time);
    if (baseline_first) run(baseline); else run(candidate);
    const double t1 = now_seconds(cpu_time);
    if (baseline_first) run(candidate); else run(baseline);
    const double t2 = now_seconds(cpu_time);
    baseline_seconds += baseline_first ? t1 - t0 : t2 - t1;
    candidate_seconds += baseline_first ? t2 - t1 : t1 - t0;
    baseline_first = !baseline_first;
  }
  const double total = double(std::max<benchmark::IterationCount>(1, st.iterations())) * double(calls);
  st.counters["baseline_ms"] = baseline_seconds / total * 1e3;
  st.counters["candidate_ms"] = candidate_seconds / total * 1e3;
  st.counters[ratio] = candidate_seconds > 0 ? baseline_seconds / candidate_seconds : 0.0;
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

/// The full grid (`--full`): d ∈ {256, 512, 1024, 2048}, τ ∈ {4, 6, 8, 10}, N ∈ {1, 16, 2048}.
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
/// "memory_layer/paired/{forward,backward}/<shape>": the dense twin and the Memory Layer alternately (run_paired).
inline std::string memory_paired_name(const LayerShape& s, bool backward) {
  return std::string("memory_layer/paired/") + (backward ? "backward/" : "forward/") + shape_suffix(s);
}

// ------------------------------------------------------------------------------------------------ blocks

/// One shape of the block benchmarks (MemoryFormerBlock against TransformerBlock, design §3, §4). Prefill: one
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

/// The block benchmark grid: s ∈ {1024, 2048} × d ∈ {512, 768, 1024}, prefill and decode.
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

/// Paper-convention FLOPs of one block call (design §4): prefill on s tokens 2s²d + 12sd² (Transformer), 2s²d + 6Ksd
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

// ------------------------------------------------------------------------------------------------ inputs

inline void fill_normal(MatrixF& m, std::uint64_t seed, std::uint64_t stream) {
  memoryformer::Rng rng = memoryformer::Rng::stream(seed, stream);
  rng.fill_normal(std::span<float>(m.data(), size_t(m.size())), 0.0, 1.0);
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

// ------------------------------------------------------------------------------------------------ subjects

/// Frees the Memory Layer the layer benchmarks keep between calls (up to 1 GB of tables + gradients), so that
/// later benchmarks (the blocks) have the memory (bench_memory_layer.cpp).
void release_cached_layer();
/// Frees the blocks, decode stacks and attention caches the block benchmarks keep between calls (bench_blocks.cpp).
void release_block_objects();

/// What each registered subject keeps between benchmark calls, as functions that free it: a subject adds its own
/// when it registers, and a later subject that needs the memory calls release_kept_objects(). (Through this list,
/// not by name, so that an executable can link one subject alone.)
inline std::vector<void (*)()>& release_hooks() {
  static std::vector<void (*)()> hooks;
  return hooks;
}
inline void add_release_hook(void (*hook)()) {
  auto& h = release_hooks();
  if (std::find(h.begin(), h.end(), hook) == h.end()) h.push_back(hook);
}
inline void release_kept_objects() {
  for (auto* hook : release_hooks()) hook();
}

/// Which Memory Layer extras to register besides the suite (memory forward, dense forward, memory backward, dense
/// backward per shape): the paired ratios, the lookup half alone (τ = 8) and the portable scalar forward (τ = 8).
struct LayerExtras {
  bool lookup_only = true;
  bool scalar = true;
  bool paired = true;  // memory_layer/paired/{forward,backward}/… after each shape's four benchmarks
};

/// bench_memory_layer.cpp: the layer suite and its extras; returns the shapes skipped by the table cap.
std::vector<LayerShape> register_memory_layer_benchmarks(const Grid& grid, LayerExtras extras = {});
/// bench_hash.cpp: SignHasher throughput over the grid's (d, τ).
void register_hash_benchmarks(const Grid& grid);
/// bench_blocks.cpp: MemoryFormerBlock / TransformerBlock prefill and decode, attention alone, and the paired
/// prefill ratio per prefill shape. Returns the names in registration order.
std::vector<std::string> register_block_suite(const BlockGrid& grid);
/// bench_attention.cpp: reference against tiled attention (forward, backward, decode), paired, and the FMA peak.
std::vector<std::string> register_attention_benchmarks(bool smoke);
/// bench_kernels.cpp: the Memory Layer kernel suite at d = 512, τ = 8 (see its header).
void register_kernel_benchmarks();

}  // namespace mfbench
