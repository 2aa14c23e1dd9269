// SPDX-License-Identifier: MIT
// Memory Layer kernel benchmarks against the dense Eigen layer in the same run (design §1.7): prefill
// forward (float32, bfloat16, float16 tables), a 48-layer decode stack whose tables exceed the caches, backward,
// hashing, two threads, and the measured memory rooflines every result is compared with.
//
// Shape of every kernel benchmark: d_in = d_out = 512, τ = 8, K = 64 (32 MB of float32 tables), N = 2048 for
// prefill and backward, N = 1 per layer for decode. Counters (besides Google Benchmark's time):
//   ns_per_token      time / (iterations · tokens)                       (kIsIterationInvariantRate | kInvert)
//   FLOPS             paper-convention FLOP/s (multiply-add = 1), items_per_second = tokens/s
//   gather_GBps       bytes of table rows gathered per second (N·K rows of d_out values; repeats counted)
//   roofline_GBps     measured streaming read of the same footprint (this binary, this machine)
//   roofline_frac     gather_GBps / roofline_GBps (> 1 when rows are reused from L2 faster than the footprint
//                     streams; the prefill footprint is the tables, the decode footprint the whole stack)
//   l2_frac           gather_GBps / the measured L2-resident (1 MB) streaming read
//   x_dense           dense time / this time, for the dense twin measured earlier in the same run
// memoryformer_bench registers this suite before the others; MEMORYFORMER_BENCH_KERNELS=0 leaves it out, and
// --benchmark_filter=kernels/ selects only it.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>


#include <memoryformer/detail/column_sums.hpp>
#include <memoryformer/hash.hpp>
#include <memoryformer/memory_layer.hpp>

#include "bench_support.hpp"

#include <memoryformer/detail/scratch.hpp>
#include <memoryformer/frozen_memory_layer.hpp>
#include <memoryformer/table_storage.hpp>

namespace mfbench {
namespace {

namespace mf = memoryformer;

constexpr Index kD = 512;
constexpr int kTau = 8;
constexpr Index kK = kD / kTau;
constexpr Index kPrefillN = 2048;
constexpr Index kStackLayers = 48;

// ------------------------------------------------------------------------------------------------ rooflines

/// Sum of one 8-byte word per 64-byte line of [p, p + words), four lines per step into four sums: the loads, not
/// the adds' latency, set the pace of the rooflines' reads.
std::uint64_t sum_line_words(const std::uint64_t* p, std::size_t words) {
  std::uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  for (std::size_t i = 0; i + 32 <= words; i += 32) {
    s0 += p[i];
    s1 += p[i + 8];
    s2 += p[i + 16];
    s3 += p[i + 24];
  }
  return s0 + s1 + s2 + s3;
}

/// Best of several timed sequential reads of a `bytes` buffer (64-byte loads summed so nothing is elided), GB/s.
double stream_read_gbps(std::size_t bytes) {
  static std::map<std::size_t, double> cache;
  if (auto it = cache.find(bytes); it != cache.end()) return it->second;
  mf::detail::TableBlock block(bytes);
  auto* p = reinterpret_cast<const std::uint64_t*>(block.data());
  const std::size_t words = bytes / sizeof(std::uint64_t);
  const int passes = int(std::max<std::size_t>(1, (std::size_t(256) << 20) / bytes));
  double best = 1e30;
  for (int rep = 0; rep < 5; ++rep) {
    const double t0 = now_seconds(true);
    for (int pass = 0; pass < passes; ++pass) benchmark::DoNotOptimize(sum_line_words(p, words));
    const double dt = now_seconds(true) - t0;
    best = std::min(best, dt / passes);
  }
  return cache[bytes] = double(bytes) / best / 1e9;
}

constexpr std::size_t kL2Bytes = std::size_t(1) << 20;

void set_roofline(benchmark::State& st, double gathered_bytes_per_iter, std::size_t footprint) {
  st.counters["gather_GBps"] = benchmark::Counter(gathered_bytes_per_iter / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  const double roof = stream_read_gbps(footprint), l2 = stream_read_gbps(kL2Bytes);
  st.counters["roofline_GBps"] = roof;
  st.counters["footprint_MB"] = double(footprint) / 1e6;
  // Rate counters use the benchmark's own time, so these fractions are gather_GBps / roof and / l2.
  st.counters["roofline_frac"] = benchmark::Counter(gathered_bytes_per_iter / 1e9 / roof, benchmark::Counter::kIsIterationInvariantRate);
  st.counters["l2_frac"] = benchmark::Counter(gathered_bytes_per_iter / 1e9 / l2, benchmark::Counter::kIsIterationInvariantRate);
}

void set_tokens(benchmark::State& st, double tokens, double flops_per_iter) {
  st.SetItemsProcessed(st.iterations() * static_cast<std::int64_t>(tokens));
  st.counters["FLOPS"] = benchmark::Counter(flops_per_iter, benchmark::Counter::kIsIterationInvariantRate);
  st.counters["ns_per_token"] = benchmark::Counter(tokens * 1e-9, benchmark::Counter::kIsIterationInvariantRate |
                                                                      benchmark::Counter::kInvert);
}

/// Seconds per iteration of the dense twins, by group, to report x_dense in the same run.
std::map<std::string, double>& dense_seconds() {
  static std::map<std::string, double> m;
  return m;
}

/// Seconds per iteration of the benchmark loop, measured alongside Google Benchmark's own timer (which it does not
/// expose to the benchmark body) so that x_dense can be computed in the same run.
struct LoopTimer {
  explicit LoopTimer(int threads = 1) : cpu(threads == 1), start(now_seconds(cpu)) {}
  bool cpu;
  double start;
  double seconds_per_iter(const benchmark::State& st) const {
    return (now_seconds(cpu) - start) / double(std::max<benchmark::IterationCount>(1, st.iterations()));
  }
};

void record_dense(benchmark::State& st, const std::string& group, const LoopTimer& t) {
  dense_seconds()[group] = t.seconds_per_iter(st);
}
void report_vs_dense(benchmark::State& st, const std::string& group, const LoopTimer& t) {
  const auto it = dense_seconds().find(group);
  if (it != dense_seconds().end()) st.counters["x_dense"] = it->second / t.seconds_per_iter(st);
}

// ------------------------------------------------------------------------------------------------ fixtures

mf::MemoryLayerConfig layer_config() {
  mf::MemoryLayerConfig c;
  c.d_in = kD;
  c.d_out = kD;
  c.tau = kTau;
  return c;
}

mf::MemoryLayer<float>& prefill_layer() {
  static mf::MemoryLayer<float> layer(layer_config(), 1);
  return layer;
}

const mf::FrozenMemoryLayer& frozen_layer(mf::StorageType storage) {
  static std::map<int, std::unique_ptr<mf::FrozenMemoryLayer>> cache;
  auto& p = cache[int(storage)];
  if (!p) p = std::make_unique<mf::FrozenMemoryLayer>(prefill_layer(), storage);
  return *p;
}

struct Batch {
  MatrixF x, dy, y, dx;
};
Batch& batch(Index n) {
  static std::map<Index, Batch> cache;
  auto it = cache.find(n);
  if (it == cache.end()) {
    Batch b;
    b.x.resize(n, kD);
    b.dy.resize(n, kD);
    fill_normal(b.x, 7, 0);
    fill_normal(b.dy, 7, 1);
    b.y.resize(n, kD);
    b.dx.resize(n, kD);
    it = cache.emplace(n, std::move(b)).first;
  }
  return it->second;
}

/// The dense twin's parameters at the kernel shape (the same cache as the layer-grid benchmarks).
DenseParams& dense() { return cached_dense(kD, kD); }

const double kRowBytesF32 = double(kPrefillN) * kK * kD * 4.0;  // rows gathered per prefill call, float32
const double kTableBytesF32 = double(kK) * 256 * kD * 4.0;

// ------------------------------------------------------------------------------------------------ prefill

/// The dense layer's forward, y = x·W + b.
void dense_forward(Batch& b, DenseParams& d) {
  b.y.noalias() = b.x * d.w;
  b.y.rowwise() += d.b;
  benchmark::DoNotOptimize(b.y.data());
  benchmark::ClobberMemory();
}

void bm_prefill_dense(benchmark::State& st, int threads) {
  set_threads(threads);
  auto& d = dense();
  auto& b = batch(kPrefillN);
  LoopTimer t(threads);
  for (auto _ : st) dense_forward(b, d);
  record_dense(st, "prefill/t" + std::to_string(threads), t);
  set_tokens(st, double(kPrefillN), double(kPrefillN) * kD * kD);
  st.counters["weight_MB"] = double(kD) * kD * 4 / 1e6;
  set_threads(1);
}

/// One Memory Layer forward, hashing included: a FrozenMemoryLayer over `storage`'s packed tables, or (nullopt)
/// MemoryLayer<float> itself (row-major training tables) on `isa`.
void memory_forward(Batch& b, std::optional<mf::StorageType> storage, mf::HashResult<float>& cache,
                    mf::Isa isa = mf::best_isa()) {
  if (storage) {
    frozen_layer(*storage).forward(b.y, b.x, cache, isa);
  } else {
    prefill_layer().forward(b.y, b.x, cache, isa);
  }
  benchmark::DoNotOptimize(b.y.data());
  benchmark::ClobberMemory();
}

/// MemoryLayer<float>::forward (float32 row-major training tables, hashing included) on `isa`.
void bm_prefill_memory_layer(benchmark::State& st, mf::Isa isa, int threads) {
  set_threads(threads);
  auto& b = batch(kPrefillN);
  mf::HashResult<float> cache;
  LoopTimer t(threads);
  for (auto _ : st) memory_forward(b, std::nullopt, cache, isa);
  report_vs_dense(st, "prefill/t" + std::to_string(threads), t);
  set_tokens(st, double(kPrefillN), mf::memory_layer_flops_paper(double(kPrefillN), double(kD), double(kD), kTau));
  set_roofline(st, kRowBytesF32, std::size_t(kTableBytesF32));
  set_threads(1);
}

/// FrozenMemoryLayer::forward (packed tables of `storage`, hashing included).
void bm_prefill_frozen(benchmark::State& st, mf::StorageType storage, int threads) {
  set_threads(threads);
  const auto& layer = frozen_layer(storage);
  auto& b = batch(kPrefillN);
  mf::HashResult<float> cache;
  LoopTimer t(threads);
  for (auto _ : st) memory_forward(b, storage, cache);
  report_vs_dense(st, "prefill/t" + std::to_string(threads), t);
  set_tokens(st, double(kPrefillN), mf::memory_layer_flops_paper(double(kPrefillN), double(kD), double(kD), kTau));
  const double value_bytes = mf::bytes_per_value(storage);
  set_roofline(st, kRowBytesF32 / 4.0 * value_bytes, layer.table_bytes());
  st.counters["table_MB"] = double(layer.table_bytes()) / 1e6;
  set_threads(1);
}

/// The lookup half alone (hash precomputed), to separate hashing from gathering.
void bm_prefill_lookup_only(benchmark::State& st, mf::StorageType storage) {
  set_threads(1);
  auto& b = batch(kPrefillN);
  mf::HashResult<float> cache;
  prefill_layer().hasher().hash(cache, b.x);
  const bool rowmajor = storage == mf::StorageType::F32 && st.range(0) == 0;
  const auto& frozen = frozen_layer(storage);
  LoopTimer t;
  for (auto _ : st) {
    if (rowmajor) {
      prefill_layer().forward_hashed(b.y, cache);
    } else {
      frozen.forward_hashed(b.y, cache);
    }
    benchmark::DoNotOptimize(b.y.data());
    benchmark::ClobberMemory();
  }
  report_vs_dense(st, "prefill/t1", t);
  set_tokens(st, double(kPrefillN), double(kPrefillN) * kK * kD);
  set_roofline(st, kRowBytesF32 / 4.0 * mf::bytes_per_value(storage), std::size_t(kTableBytesF32 / 4.0 * mf::bytes_per_value(storage)));
}

// ------------------------------------------------------------------------------------------------ backward

/// The dense layer's backward: dx = dy·Wᵀ, dW += xᵀ·dy, db += column sums of dy.
void dense_backward(Batch& b, DenseParams& d) {
  b.dx.noalias() = b.dy * d.w.transpose();
  d.dw.noalias() += b.x.transpose() * b.dy;
  d.db.noalias() += mf::detail::column_sums<float>(b.dy).transpose();  // the same column-sum loop as MemoryLayer
  benchmark::DoNotOptimize(b.dx.data());
  benchmark::DoNotOptimize(d.dw.data());
  benchmark::ClobberMemory();
}

void bm_backward_dense(benchmark::State& st, int threads) {
  set_threads(threads);
  auto& d = dense();
  auto& b = batch(kPrefillN);
  LoopTimer t(threads);
  for (auto _ : st) dense_backward(b, d);
  record_dense(st, "backward/t" + std::to_string(threads), t);
  set_tokens(st, double(kPrefillN), 2.0 * double(kPrefillN) * kD * kD);
  d.dw.setZero();
  d.db.setZero();
  set_threads(1);
}

/// MemoryLayer<float>::backward on `isa` from `cache` (its forward's hash of b.x).
void memory_backward(Batch& b, const mf::HashResult<float>& cache, mf::Isa isa = mf::best_isa()) {
  prefill_layer().backward(b.dx, b.x, b.dy, cache, isa);
  benchmark::DoNotOptimize(b.dx.data());
  benchmark::ClobberMemory();
}

/// MemoryLayer::backward: dx (through the hash), dtables and dbias accumulated (zero_grad after the loop only).
void bm_backward_memory_layer(benchmark::State& st, mf::Isa isa, int threads) {
  set_threads(threads);
  auto& layer = prefill_layer();
  auto& b = batch(kPrefillN);
  mf::HashResult<float> cache;
  layer.forward(b.y, b.x, cache, isa);
  LoopTimer t(threads);
  for (auto _ : st) memory_backward(b, cache, isa);
  report_vs_dense(st, "backward/t" + std::to_string(threads), t);
  set_tokens(st, double(kPrefillN), 2.0 * double(kPrefillN) * kK * kD);
  // Rows read (T) and read-modified-written (dT), as gathered contributions.
  set_roofline(st, 3.0 * kRowBytesF32, std::size_t(2 * kTableBytesF32));
  layer.zero_grad();
  set_threads(1);
}

// ------------------------------------------------------------------------------------------------ hashing

void bm_hash(benchmark::State& st, mf::ScoreKind score) {
  set_threads(1);
  const mf::SignHasher<float> hasher(mf::HashConfig{kTau, score, 1.0});
  auto& b = batch(kPrefillN);
  mf::HashResult<float> cache;
  for (auto _ : st) {
    hasher.hash(cache, b.x);
    benchmark::DoNotOptimize(cache.scores.data());
    benchmark::ClobberMemory();
  }
  st.SetBytesProcessed(st.iterations() * std::int64_t(kPrefillN * kD * 4));
  set_tokens(st, double(kPrefillN), 0.0);
  st.counters["input_GBps"] = benchmark::Counter(double(kPrefillN) * kD * 4 / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  st.counters["roofline_GBps"] = stream_read_gbps(std::size_t(kPrefillN * kD * 4));
}

// ------------------------------------------------------------------------------------------------ decode stack

/// 48 layers of one token each. The Memory Layers' tables (48 × 33.6 MB = 1.6 GB float32; 0.8 GB bfloat16 in the
/// row layout, FrozenLayout::Rows) exceed
/// the 480 MB L3, and each step hashes one of 4096 different inputs so the rows it reads were not read recently.
/// The dense twin is measured twice: the literal 48 layers (48 MB of weights: they DO fit the L3) and a pool of
/// 1024 weight matrices (1.07 GB) walked 48 at a time, so that its weights also come from DRAM.
struct DecodeStack {
  std::vector<std::unique_ptr<mf::MemoryLayer<float>>> layers;
  std::vector<std::unique_ptr<mf::FrozenMemoryLayer>> frozen_bf16;
  std::vector<MatrixF> dense_pool;  // [d, d] each
  MatrixF inputs;                   // [4096, d]
};
constexpr Index kInputs = 4096;
constexpr Index kDensePool = 1024;

DecodeStack& stack(bool need_frozen, bool need_dense_pool) {
  static DecodeStack s;
  if (s.layers.empty()) {
    for (Index l = 0; l < kStackLayers; ++l) {
      auto layer = std::make_unique<mf::MemoryLayer<float>>(layer_config(), 100 + std::uint64_t(l));
      s.layers.push_back(std::move(layer));
    }
    s.inputs.resize(kInputs, kD);
    fill_normal(s.inputs, 9, 0);
  }
  if (need_frozen && s.frozen_bf16.empty())
    for (const auto& l : s.layers)
      s.frozen_bf16.push_back(std::make_unique<mf::FrozenMemoryLayer>(*l, mf::StorageType::BF16, mf::FrozenLayout::Rows));
  if (need_dense_pool && s.dense_pool.empty()) {
    for (Index i = 0; i < kDensePool; ++i) {
      MatrixF w(kD, kD);
      fill_normal(w, 200 + std::uint64_t(i), 0);
      w *= 0.02f;
      s.dense_pool.push_back(std::move(w));
    }
  }
  return s;
}

/// One decode step through the stack: each layer's output is the next layer's input (scaled to keep the hash
/// inputs well-conditioned); the first layer's input cycles through the input pool.
template <class Layer>
void run_memory_stack(const std::vector<std::unique_ptr<Layer>>& layers, const MatrixF& inputs, Index step, MatrixF& a,
                      MatrixF& b, mf::HashResult<float>& cache) {
  a = inputs.row(step % kInputs);
  for (const auto& layer : layers) {
    layer->forward(b, a, cache);
    a.swap(b);
    a += inputs.row((step * 7 + 3) % kInputs);  // fresh codes per layer and step
  }
}

/// One decode step through the 48 Memory Layers (float32 training tables, or bfloat16 rows).
void memory_decode_step(const DecodeStack& s, bool bf16, Index step, MatrixF& a, MatrixF& b,
                        mf::HashResult<float>& cache) {
  if (bf16) {
    run_memory_stack(s.frozen_bf16, s.inputs, step, a, b, cache);
  } else {
    run_memory_stack(s.layers, s.inputs, step, a, b, cache);
  }
  benchmark::DoNotOptimize(a.data());
  benchmark::ClobberMemory();
}

void bm_decode_memory(benchmark::State& st, bool bf16) {
  set_threads(1);
  auto& s = stack(bf16, false);
  MatrixF a(1, kD), b(1, kD);
  mf::HashResult<float> cache;
  Index step = 0;
  LoopTimer t;
  for (auto _ : st) memory_decode_step(s, bf16, step++, a, b, cache);
  report_vs_dense(st, "decode/pool", t);
  if (auto it = dense_seconds().find("decode/l3"); it != dense_seconds().end())
    st.counters["x_dense_l3"] = it->second / t.seconds_per_iter(st);
  const double value_bytes = bf16 ? 2.0 : 4.0;
  set_tokens(st, 1.0, double(kStackLayers) * mf::memory_layer_flops_paper(1.0, double(kD), double(kD), kTau));
  set_roofline(st, double(kStackLayers) * kK * kD * value_bytes,
               std::size_t(double(kStackLayers) * kTableBytesF32 / 4.0 * value_bytes));
}

/// One decode step through 48 dense layers: the literal 48 matrices, or (literal == nullptr) 48 of the pool's,
/// a different 48 every step so that they come from DRAM.
void dense_decode_step(const DecodeStack& s, const DenseParams& d, const std::vector<MatrixF>* literal, Index step,
                       MatrixF& a, MatrixF& b) {
  a = s.inputs.row(step % kInputs);
  for (Index l = 0; l < kStackLayers; ++l) {
    const MatrixF& w = literal == nullptr ? s.dense_pool[size_t((step * kStackLayers + l) % kDensePool)]
                                          : (*literal)[size_t(l)];
    b.noalias() = a * w;
    b += d.b;
    a.swap(b);
  }
  benchmark::DoNotOptimize(a.data());
  benchmark::ClobberMemory();
}

void bm_decode_dense(benchmark::State& st, bool pool) {
  set_threads(1);
  auto& s = stack(false, pool);
  auto& d = dense();
  static std::vector<MatrixF> literal;
  if (!pool && literal.empty()) {
    for (Index l = 0; l < kStackLayers; ++l) {
      MatrixF w(kD, kD);
      fill_normal(w, 300 + std::uint64_t(l), 0);
      literal.push_back(w * 0.02f);
    }
  }
  MatrixF a(1, kD), b(1, kD);
  Index step = 0;
  LoopTimer t;
  for (auto _ : st) dense_decode_step(s, d, pool ? nullptr : &literal, step++, a, b);
  record_dense(st, pool ? "decode/pool" : "decode/l3", t);
  set_tokens(st, 1.0, double(kStackLayers) * kD * kD);
  set_roofline(st, double(kStackLayers) * kD * kD * 4.0,
               pool ? std::size_t(kDensePool * kD * kD * 4) : std::size_t(kStackLayers * kD * kD * 4));
}

// ------------------------------------------------------------------------------------------------ paired ratios

/// The prefill targets: dense forward (baseline) against a Memory Layer forward, hashing included, one thread.
/// storage: a FrozenMemoryLayer's packed tables; nullopt: MemoryLayer<float> itself (row-major training tables).
void bm_paired_prefill(benchmark::State& st, std::optional<mf::StorageType> storage) {
  set_threads(1);
  auto& d = dense();
  auto& b = batch(kPrefillN);
  mf::HashResult<float> cache;
  run_paired(st, true, "x_dense", [&] { dense_forward(b, d); }, [&] { memory_forward(b, storage, cache); });
}

/// The backward target: dense backward (baseline) against MemoryLayer::backward, one thread.
void bm_paired_backward(benchmark::State& st) {
  set_threads(1);
  auto& d = dense();
  auto& b = batch(kPrefillN);
  mf::HashResult<float> cache;
  memory_forward(b, std::nullopt, cache);
  run_paired(st, true, "x_dense", [&] { dense_backward(b, d); }, [&] { memory_backward(b, cache); });
  prefill_layer().zero_grad();
  d.dw.setZero();
  d.db.setZero();
}

/// The decode target: one token through 48 dense layers from the 1 GB pool (baseline) against 48 Memory Layers.
void bm_paired_decode(benchmark::State& st, bool bf16) {
  set_threads(1);
  auto& s = stack(bf16, true);
  auto& d = dense();
  MatrixF a(1, kD), b(1, kD);
  mf::HashResult<float> cache;
  Index dense_step = 0, memory_step = 0;
  run_paired(st, true, "x_dense", [&] { dense_decode_step(s, d, nullptr, dense_step++, a, b); },
             [&] { memory_decode_step(s, bf16, memory_step++, a, b, cache); });
}

#if defined(MEMORYFORMER_USE_OPENMP)
/// The two-thread target: the same Memory Layer call on one thread (baseline) and on two, wall time; the ratio is
/// the speed-up. The call is memory_forward(storage), or with `backward` MemoryLayer<float>'s backward.
void bm_paired_threads(benchmark::State& st, std::optional<mf::StorageType> storage, bool backward) {
  auto& b = batch(kPrefillN);
  mf::HashResult<float> cache;
  if (backward) memory_forward(b, std::nullopt, cache);
  auto call = [&](int threads) {
    set_threads(threads);
    if (backward) {
      memory_backward(b, cache);
    } else {
      memory_forward(b, storage, cache);
    }
  };
  run_paired(st, false, "speedup", [&] { call(1); }, [&] { call(2); });
  if (backward) prefill_layer().zero_grad();
  set_threads(1);
}
#endif

// ------------------------------------------------------------------------------------------------ rooflines

void bm_stream_read(benchmark::State& st) {
  const auto bytes = std::size_t(st.range(0));
  double gbps = 0;
  for (auto _ : st) gbps = stream_read_gbps(bytes);
  st.counters["read_GBps"] = gbps;
  st.counters["footprint_MB"] = double(bytes) / 1e6;
}

/// The DRAM rooflines of the training step's table kernels and optimizer, on `threads` threads (each its own
/// contiguous part of 256 MB float arrays, far beyond the L3, so every pass comes from memory; best of five passes,
/// the calling thread's CPU time with one thread and wall time with more, as in the paired rows): a read of src (the
/// clip's norm pass) and dst += src (the table gradient, which reads T and dT and writes dT; GB/s counts all three
/// streams).
void bm_stream_threads(benchmark::State& st, int threads) {
  constexpr std::size_t bytes = std::size_t(256) << 20;
  constexpr Index floats = Index(bytes / sizeof(float));
  mf::detail::TableBlock dst_block(bytes), src_block(bytes);
  auto* dst = reinterpret_cast<float*>(dst_block.data());
  const auto* src = reinterpret_cast<const float*>(src_block.data());
  set_threads(threads);
  const auto best_seconds = [&](auto&& pass) {
    pass();  // warms the TLB and the threads
    double best = 1e30;
    for (int rep = 0; rep < 5; ++rep) {
      const double t0 = now_seconds(threads == 1);
      pass();
      best = std::min(best, now_seconds(threads == 1) - t0);
    }
    return best;
  };
  double read = 0, update = 0;
  for (auto _ : st) {
    read = best_seconds([&] {
      constexpr auto words = bytes / sizeof(std::uint64_t);
      const auto* w = reinterpret_cast<const std::uint64_t*>(src);
      mf::detail::parallel_threads(threads, [&](Index t, Index nt) {
        const std::size_t begin = words * std::size_t(t) / std::size_t(nt) / 32 * 32;
        const std::size_t end = words * std::size_t(t + 1) / std::size_t(nt) / 32 * 32;
        benchmark::DoNotOptimize(sum_line_words(w + begin, end - begin));
      });
    });
    update = best_seconds([&] {
      mf::detail::parallel_rows(floats, 1, [&](Index begin, Index end) {
        for (Index i = begin; i < end; ++i) dst[i] += src[i];
      });
    });
  }
  benchmark::DoNotOptimize(dst[floats - 1]);
  set_threads(1);
  st.counters["read_GBps"] = double(bytes) / read / 1e9;
  st.counters["update_GBps"] = 3.0 * double(bytes) / update / 1e9;
  st.counters["threads"] = threads;
}

/// Random `chunk`-byte reads inside an L2-resident block the size of one prefill panel group: the ceiling of the
/// prefill gathers. Four named accumulators, one per chunk of a group of four, so the sums stay in registers (an
/// indexed accumulator array went through memory and measured store forwarding instead: 63 GB/s).
void bm_l2_random_gather(benchmark::State& st) {
  const Index chunk = st.range(0);
  const auto bytes = std::size_t(mf::detail::panel_budget_bytes());
  mf::detail::TableBlock block(bytes);
  std::memset(block.data(), 0, bytes);
  const auto* p = reinterpret_cast<const float*>(block.data());
  const Index chunks = Index(bytes) / chunk;
  std::vector<std::uint32_t> offsets(1 << 16);
  mf::Rng rng(5);
  for (auto& o : offsets) o = std::uint32_t(Index(rng.uniform() * double(chunks)) % chunks * (chunk / 4));
  using Lanes16 = Eigen::Array<float, 16, 1>;
  using Chunk = Eigen::Map<const Lanes16, Eigen::Aligned64>;
  Lanes16 a0 = Lanes16::Zero(), a1 = Lanes16::Zero(), a2 = Lanes16::Zero(), a3 = Lanes16::Zero();
  for (auto _ : st) {
    for (size_t i = 0; i + 4 <= offsets.size(); i += 4)
      for (Index j = 0; j < chunk / 4; j += 16) {
        a0 += Chunk(p + offsets[i] + j);
        a1 += Chunk(p + offsets[i + 1] + j);
        a2 += Chunk(p + offsets[i + 2] + j);
        a3 += Chunk(p + offsets[i + 3] + j);
      }
    benchmark::DoNotOptimize(a0);
    benchmark::DoNotOptimize(a1);
    benchmark::DoNotOptimize(a2);
    benchmark::DoNotOptimize(a3);
  }
  st.counters["block_KB"] = double(bytes) / 1024.0;
  st.counters["read_GBps"] = benchmark::Counter(double(offsets.size()) * double(chunk) / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

// ------------------------------------------------------------------------------------------------ registration

}  // namespace

void register_kernel_benchmarks() {
  // MEMORYFORMER_BENCH_KERNELS=0 leaves this suite out (its decode stacks hold ≈ 5 GB while they run).
  if (const char* env = std::getenv("MEMORYFORMER_BENCH_KERNELS"); env != nullptr && std::strcmp(env, "0") == 0) return;
  using mf::Isa;
  using mf::StorageType;
  auto ms = [](benchmark::internal::Benchmark* b) { b->Unit(benchmark::kMillisecond)->MinTime(0.5); };
  auto us = [](benchmark::internal::Benchmark* b) { b->Unit(benchmark::kMicrosecond)->MinTime(0.5); };
  const Isa best = mf::best_isa();

  // Rooflines first: every later "roofline_frac" divides by these.
  for (std::int64_t bytes : {std::int64_t(kL2Bytes), std::int64_t(16) << 20, std::int64_t(32) << 20,
                             std::int64_t(2) << 30})
    benchmark::RegisterBenchmark("kernels/roofline/stream_read", bm_stream_read)->Arg(bytes)->Iterations(1);
  for (std::int64_t chunk : {64, 128, 256})
    us(benchmark::RegisterBenchmark("kernels/roofline/l2_random_gather/chunk_bytes", bm_l2_random_gather)->Arg(chunk));
  benchmark::RegisterBenchmark("kernels/roofline/stream_dram/threads:1",
                               [](benchmark::State& st) { bm_stream_threads(st, 1); })
      ->Iterations(1);
#if defined(MEMORYFORMER_USE_OPENMP)
  benchmark::RegisterBenchmark("kernels/roofline/stream_dram/threads:2",
                               [](benchmark::State& st) { bm_stream_threads(st, 2); })
      ->Iterations(1)
      ->UseRealTime();
#endif

  // Prefill, one thread: the dense twin first (x_dense of the others refers to it).
  ms(benchmark::RegisterBenchmark("kernels/prefill/dense/N:2048/threads:1", [](benchmark::State& st) { bm_prefill_dense(st, 1); }));
  ms(benchmark::RegisterBenchmark("kernels/prefill/memory_layer_f32_rowmajor/N:2048/threads:1",
                                  [best](benchmark::State& st) { bm_prefill_memory_layer(st, best, 1); }));
  for (StorageType s : {StorageType::F32, StorageType::BF16, StorageType::F16})
    ms(benchmark::RegisterBenchmark(("kernels/prefill/frozen_" + std::string(mf::storage_type_name(s)) + "/N:2048/threads:1").c_str(),
                                    [s](benchmark::State& st) { bm_prefill_frozen(st, s, 1); }));
  ms(benchmark::RegisterBenchmark("kernels/prefill/lookup_only_f32_rowmajor/N:2048", [](benchmark::State& st) {
       bm_prefill_lookup_only(st, mf::StorageType::F32);
     })->Arg(0));
  for (StorageType s : {StorageType::F32, StorageType::BF16})
    ms(benchmark::RegisterBenchmark(("kernels/prefill/lookup_only_frozen_" + std::string(mf::storage_type_name(s)) + "/N:2048").c_str(),
                                    [s](benchmark::State& st) { bm_prefill_lookup_only(st, s); })->Arg(1));
  ms(benchmark::RegisterBenchmark("kernels/prefill/memory_layer_reference_scalar/N:2048/threads:1",
                                  [](benchmark::State& st) { bm_prefill_memory_layer(st, mf::Isa::Scalar, 1); }));

  // Backward, one thread.
  ms(benchmark::RegisterBenchmark("kernels/backward/dense/N:2048/threads:1", [](benchmark::State& st) { bm_backward_dense(st, 1); }));
  ms(benchmark::RegisterBenchmark("kernels/backward/memory_layer/N:2048/threads:1",
                                  [best](benchmark::State& st) { bm_backward_memory_layer(st, best, 1); }));
  ms(benchmark::RegisterBenchmark("kernels/backward/memory_layer_reference_scalar/N:2048/threads:1",
                                  [](benchmark::State& st) { bm_backward_memory_layer(st, mf::Isa::Scalar, 1); }));

  // Hashing.
  us(benchmark::RegisterBenchmark("kernels/hash/l1/N:2048/d_in:512/tau:8", [](benchmark::State& st) { bm_hash(st, mf::ScoreKind::L1); }));
  us(benchmark::RegisterBenchmark("kernels/hash/paper/N:2048/d_in:512/tau:8", [](benchmark::State& st) { bm_hash(st, mf::ScoreKind::Paper); }));

  // Decode stack of 48 layers (dense twins first).
  us(benchmark::RegisterBenchmark("kernels/decode48/dense_l3_resident_48MB", [](benchmark::State& st) { bm_decode_dense(st, false); }));
  us(benchmark::RegisterBenchmark("kernels/decode48/dense_pool_1GB", [](benchmark::State& st) { bm_decode_dense(st, true); }));
  us(benchmark::RegisterBenchmark("kernels/decode48/memory_layer_f32_1.6GB", [](benchmark::State& st) { bm_decode_memory(st, false); }));
  us(benchmark::RegisterBenchmark("kernels/decode48/frozen_bf16_0.8GB", [](benchmark::State& st) { bm_decode_memory(st, true); }));

  // The same targets as pairs: the dense twin and the Memory Layer call alternately in one benchmark (run_paired).
  ms(benchmark::RegisterBenchmark("kernels/paired/prefill_frozen_fp32/N:2048",
                                  [](benchmark::State& st) { bm_paired_prefill(st, StorageType::F32); }));
  ms(benchmark::RegisterBenchmark("kernels/paired/prefill_frozen_bf16/N:2048",
                                  [](benchmark::State& st) { bm_paired_prefill(st, StorageType::BF16); }));
  ms(benchmark::RegisterBenchmark("kernels/paired/prefill_memory_layer_f32_rowmajor/N:2048",
                                  [](benchmark::State& st) { bm_paired_prefill(st, std::nullopt); }));
  ms(benchmark::RegisterBenchmark("kernels/paired/backward_memory_layer/N:2048", bm_paired_backward));
  ms(benchmark::RegisterBenchmark("kernels/paired/decode48_memory_layer_f32", [](benchmark::State& st) { bm_paired_decode(st, false); }));
  ms(benchmark::RegisterBenchmark("kernels/paired/decode48_frozen_bf16", [](benchmark::State& st) { bm_paired_decode(st, true); }));

  // Two threads (OpenMP builds only: the kernels split columns / rows; Eigen gets 2 threads for the dense twin).
#if defined(MEMORYFORMER_USE_OPENMP)
  auto real = [](benchmark::internal::Benchmark* b) { b->Unit(benchmark::kMillisecond)->MinTime(0.5)->UseRealTime(); };
  real(benchmark::RegisterBenchmark("kernels/prefill/dense/N:2048/threads:2", [](benchmark::State& st) { bm_prefill_dense(st, 2); }));
  real(benchmark::RegisterBenchmark("kernels/prefill/memory_layer_f32_rowmajor/N:2048/threads:2",
                                    [best](benchmark::State& st) { bm_prefill_memory_layer(st, best, 2); }));
  real(benchmark::RegisterBenchmark("kernels/prefill/frozen_bf16/N:2048/threads:2",
                                    [](benchmark::State& st) { bm_prefill_frozen(st, mf::StorageType::BF16, 2); }));
  real(benchmark::RegisterBenchmark("kernels/prefill/frozen_fp32/N:2048/threads:2",
                                    [](benchmark::State& st) { bm_prefill_frozen(st, mf::StorageType::F32, 2); }));
  real(benchmark::RegisterBenchmark("kernels/backward/dense/N:2048/threads:2", [](benchmark::State& st) { bm_backward_dense(st, 2); }));
  real(benchmark::RegisterBenchmark("kernels/backward/memory_layer/N:2048/threads:2",
                                    [best](benchmark::State& st) { bm_backward_memory_layer(st, best, 2); }));
  const struct {
    const char* name;
    std::optional<StorageType> storage;
    bool backward;
  } thread_pairs[] = {{"prefill_frozen_fp32", StorageType::F32, false},
                      {"prefill_frozen_bf16", StorageType::BF16, false},
                      {"prefill_memory_layer_f32_rowmajor", std::nullopt, false},
                      {"backward_memory_layer", std::nullopt, true}};
  for (const auto& pair : thread_pairs)
    real(benchmark::RegisterBenchmark(("kernels/paired/threads_2_vs_1/" + std::string(pair.name) + "/N:2048").c_str(),
                                      [pair](benchmark::State& st) { bm_paired_threads(st, pair.storage, pair.backward); }));
  // One-thread twins in real time too, for the 2-thread speed-up.
  real(benchmark::RegisterBenchmark("kernels/prefill/frozen_bf16/N:2048/threads:1/real_time",
                                    [](benchmark::State& st) { bm_prefill_frozen(st, mf::StorageType::BF16, 1); }));
  real(benchmark::RegisterBenchmark("kernels/prefill/frozen_fp32/N:2048/threads:1/real_time",
                                    [](benchmark::State& st) { bm_prefill_frozen(st, mf::StorageType::F32, 1); }));
  real(benchmark::RegisterBenchmark("kernels/prefill/memory_layer_f32_rowmajor/N:2048/threads:1/real_time",
                                    [best](benchmark::State& st) { bm_prefill_memory_layer(st, best, 1); }));
  real(benchmark::RegisterBenchmark("kernels/backward/memory_layer/N:2048/threads:1/real_time",
                                    [best](benchmark::State& st) { bm_backward_memory_layer(st, best, 1); }));
#endif
  benchmark::AddCustomContext("kernels_shape", "d_in = d_out = 512, tau = 8, K = 64, prefill/backward N = 2048, decode 48 layers x N = 1");
#if defined(MEMORYFORMER_USE_OPENMP)
  benchmark::AddCustomContext("kernels_openmp", "yes (2-thread benchmarks registered)");
#else
  benchmark::AddCustomContext("kernels_openmp", "no (build with -fopenmp -DMEMORYFORMER_USE_OPENMP for the 2-thread benchmarks)");
#endif
}

}  // namespace mfbench
