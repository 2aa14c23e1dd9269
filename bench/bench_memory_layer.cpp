// SPDX-License-Identifier: MIT
// MemoryLayer forward/backward against the dense Eigen layer y = x·W + b at the same shape (design §1.7).
// Names: memory_layer/{forward,backward}/d_in:…/d_out:…/tau:…/N:…, dense/{forward,backward}/d_in:…/d_out:…/N:…,
// memory_layer/forward_hashed/… (lookup half alone), memory_layer/forward_scalar/… (portable kernels) and
// memory_layer/paired/{forward,backward}/… (dense and Memory Layer call alternately: the ratios to quote).
#include <algorithm>
#include <cmath>
#include <iostream>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include <memoryformer/detail/column_sums.hpp>
#include <memoryformer/hash.hpp>
#include <memoryformer/memory_layer.hpp>

#include "bench_support.hpp"

namespace mfbench {
namespace {

/// The one Memory Layer kept between benchmark calls (see cached_layer), and its shape.
struct CachedLayerSlot {
  std::unique_ptr<memoryformer::MemoryLayer<float>> layer;
  std::tuple<Index, Index, int> key{-1, -1, -1};
};
inline CachedLayerSlot& cached_layer_slot() {
  static CachedLayerSlot slot;
  return slot;
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

/// Each side's calls per clock read in the paired layer benchmarks: enough for ≈ 1e6 dense multiply-adds (tens of
/// µs), so that reading the clock (a fraction of a µs) does not weigh on calls of a few hundred ns.
int paired_calls(const LayerShape& s) {
  const double flops = double(s.n) * double(s.d_in()) * double(s.d_out());
  return int(std::clamp(1e6 / flops, 1.0, 1000.0));
}

/// The dense forward (baseline) and MemoryLayer::forward (candidate) alternately (run_paired). Counters x_dense =
/// dense time / memory time and time_ratio = memory time / dense time (the report's forward ratio, paired).
inline void bm_paired_forward(benchmark::State& st, LayerShape s) {
  init_single_thread();
  auto& layer = cached_layer(s);
  auto& p = cached_dense(s.d_in(), s.d_out());
  const auto& in = cached_inputs(s.n, s.d_in(), s.d_out());
  MatrixF y(s.n, s.d_out()), yd(s.n, s.d_out());
  memoryformer::HashResult<float> cache;
  run_paired(
      st, true, "x_dense",
      [&] {
        yd.noalias() = in.x * p.w;
        yd.rowwise() += p.b;
        benchmark::DoNotOptimize(yd.data());
        benchmark::ClobberMemory();
      },
      [&] {
        layer.forward(y, in.x, cache);
        benchmark::DoNotOptimize(y.data());
        benchmark::ClobberMemory();
      },
      paired_calls(s));
  const double x = st.counters["x_dense"];
  st.counters["time_ratio"] = x > 0 ? 1.0 / x : 0.0;
}

/// The dense backward (baseline) and MemoryLayer::backward (candidate) alternately, as bm_paired_forward.
inline void bm_paired_backward(benchmark::State& st, LayerShape s) {
  init_single_thread();
  auto& layer = cached_layer(s);
  auto& p = cached_dense(s.d_in(), s.d_out());
  const auto& in = cached_inputs(s.n, s.d_in(), s.d_out());
  MatrixF y(s.n, s.d_out()), dx(s.n, s.d_in()), dxd(s.n, s.d_in());
  memoryformer::HashResult<float> cache;
  layer.forward(y, in.x, cache);
  run_paired(
      st, true, "x_dense",
      [&] {
        dxd.noalias() = in.dy * p.w.transpose();
        p.dw.noalias() += in.x.transpose() * in.dy;
        p.db.noalias() += memoryformer::detail::column_sums<float>(in.dy).transpose();
        benchmark::DoNotOptimize(dxd.data());
        benchmark::DoNotOptimize(p.dw.data());
        benchmark::ClobberMemory();
      },
      [&] {
        layer.backward(dx, in.x, in.dy, cache);
        benchmark::DoNotOptimize(dx.data());
        benchmark::ClobberMemory();
      },
      paired_calls(s));
  const double x = st.counters["x_dense"];
  st.counters["time_ratio"] = x > 0 ? 1.0 / x : 0.0;
  layer.zero_grad();
  p.dw.setZero();
  p.db.setZero();
}

}  // namespace

/// The next cached_layer() call rebuilds it.
void release_cached_layer() {
  cached_layer_slot().layer.reset();
  cached_layer_slot().key = {-1, -1, -1};
}

std::vector<LayerShape> register_memory_layer_benchmarks(const Grid& g, LayerExtras extras) {
  // Per shape, in this order: memory forward, dense forward, memory backward, dense backward (each dense twin right
  // after its memory benchmark, so both see the same machine load). A dense twin shared by several τ (same d_in) is
  // registered once. memoryformer_report computes the memory/dense time ratios from these.
  add_release_hook(&release_cached_layer);
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
    if (extras.paired) {
      common(benchmark::RegisterBenchmark(memory_paired_name(s, false).c_str(),
                                          [s](benchmark::State& st) { bm_paired_forward(st, s); }));
      common(benchmark::RegisterBenchmark(memory_paired_name(s, true).c_str(),
                                          [s](benchmark::State& st) { bm_paired_backward(st, s); }));
    }
  }

  // Extras at τ = 8: the lookup half alone (hash precomputed) and the portable scalar kernels, to show what hashing
  // and SIMD each contribute.
  for (const auto& s : grid_shapes(g)) {
    if (s.tau != 8 || !shape_fits(g, s)) continue;
    if (extras.lookup_only)
      common(benchmark::RegisterBenchmark(("memory_layer/forward_hashed/" + shape_suffix(s)).c_str(),
                                          [s](benchmark::State& st) { bm_memory_forward_hashed(st, s); }));
    if (extras.scalar && memoryformer::best_isa() != memoryformer::Isa::Scalar)
      common(benchmark::RegisterBenchmark(("memory_layer/forward_scalar/" + shape_suffix(s)).c_str(),
                                          [s](benchmark::State& st) { bm_memory_forward(st, s, memoryformer::Isa::Scalar); }));
  }
  return skipped;
}

}  // namespace mfbench
