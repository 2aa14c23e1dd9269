// SPDX-License-Identifier: MIT
// Causal multi-head attention: the tiled kernels of nn/attention.hpp against the reference implementation
// (detail/attention_reference.hpp: s × s probabilities, Eigen products), forward, backward and one-token decode, at
// d = 512, 8 heads (head size 64), s = 1024, batch 1, one thread, float; each pair also alternately in one
// benchmark (run_paired); and the core's measured FMA peak, so that every result states its fraction of it.
//
// Names: attention/{forward,backward}/{reference,tiled}/d:512/heads:8/s:1024,
//        attention/decode/{reference,tiled}/d:512/heads:8/context:1024,
//        attention/paired/{forward,backward}/d:512/heads:8/s:1024, attention/paired/decode/d:512/heads:8/context:1024
//        (x_reference = reference time / tiled time; baseline_ms = reference, candidate_ms = tiled),
//        roofline/fma_peak (FMA_per_s: fused multiply-adds per second of one core, registers only).
//
// FMA convention (counter FMA_per_s, and fma_peak_frac = FMA_per_s / the measured peak): the multiply-adds of the
// causal products only, per head of size dh, softmax and scaling not counted.
//   forward at s:   QKᵀ and PV over the causal triangle: 2 · (s(s+1)/2) · dh
//   backward at s:  2.5 × forward: dV = Pᵀ·dO, dP = dO·Vᵀ, dQ = dS·K, dK = dSᵀ·Q and the recomputed S = Q·Kᵀ of a
//                   tiled backward, five triangle products (the reference reads P from its cache and does four, but
//                   both are charged five so the rates compare the same work)
//   decode at c:    one query against c keys and values: 2 · c · dh
// A kernel that computes the full s × s square instead of the triangle does not get credit for the masked half.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#if defined(__AVX512F__) || defined(__FMA__)
#include <immintrin.h>
#endif

#include <memoryformer/detail/attention_reference.hpp>
#include <memoryformer/nn/attention.hpp>
#include <memoryformer/nn/kv_cache.hpp>

#include "bench_support.hpp"

namespace mfbench {
namespace {

namespace mf = memoryformer;

struct AttentionShape {
  Index d = 512;
  Index heads = 8;
  Index s = 1024;  // sequence length (forward, backward) or context (decode)
  Index dh() const { return d / heads; }
  std::string suffix(const char* length = "s") const {
    return "d:" + std::to_string(d) + "/heads:" + std::to_string(heads) + "/" + length + ":" + std::to_string(s);
  }
};

double forward_fma(const AttentionShape& a) {
  return double(a.heads) * 2.0 * (double(a.s) * double(a.s + 1) / 2.0) * double(a.dh());
}
double backward_fma(const AttentionShape& a) { return 2.5 * forward_fma(a); }
double decode_fma(const AttentionShape& a) { return double(a.heads) * 2.0 * double(a.s) * double(a.dh()); }

// ------------------------------------------------------------------------------------------------ FMA peak

/// Fused multiply-adds of one call of fma_loop: 12 independent accumulators (enough to cover the FMA latency on two
/// ports) of one vector each, `steps` times.
#if defined(__AVX512F__)
constexpr int kFmaLanes = 16;
#elif defined(__FMA__)
constexpr int kFmaLanes = 8;
#else
constexpr int kFmaLanes = 1;
#endif
constexpr int kFmaAccumulators = 12;

/// Hides v's value from the optimiser (an empty asm that takes and returns it in a vector register), so that a loop
/// over it cannot be folded at compile time.
template <class V>
inline void opaque(V& v) {
#if defined(__x86_64__) || defined(__i386__)
  asm volatile("" : "+v"(v));
#else
  benchmark::DoNotOptimize(v);
#endif
}

/// A register-resident FMA loop: the most multiply-adds one core can retire, the ceiling for any kernel here.
/// Only the operands b and c are made opaque, once, before the loop: an asm barrier on the accumulators inside the
/// loop made GCC keep them in a stack array and store all of them every step, which bound the loop by stores at
/// about half the FMA rate.
float fma_loop(std::int64_t steps) {
#if defined(__AVX512F__)
  using V = __m512;
  auto fma = [](V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); };
  V b = _mm512_set1_ps(0.999f), c = _mm512_set1_ps(1e-3f);
  V acc[kFmaAccumulators];
  for (int i = 0; i < kFmaAccumulators; ++i) acc[i] = _mm512_set1_ps(float(i));
#elif defined(__FMA__)
  using V = __m256;
  auto fma = [](V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); };
  V b = _mm256_set1_ps(0.999f), c = _mm256_set1_ps(1e-3f);
  V acc[kFmaAccumulators];
  for (int i = 0; i < kFmaAccumulators; ++i) acc[i] = _mm256_set1_ps(float(i));
#else
  using V = float;
  auto fma = [](V a, V b, V c) { return std::fma(a, b, c); };
  V b = 0.999f, c = 1e-3f;
  V acc[kFmaAccumulators];
  for (int i = 0; i < kFmaAccumulators; ++i) acc[i] = float(i);
#endif
  opaque(b);
  opaque(c);
  for (std::int64_t t = 0; t < steps; ++t)
    for (int i = 0; i < kFmaAccumulators; ++i) acc[i] = fma(acc[i], b, c);
  float sum = 0;
  for (int i = 0; i < kFmaAccumulators; ++i) {
    float lanes[kFmaLanes];
    std::copy_n(reinterpret_cast<const float*>(&acc[i]), kFmaLanes, lanes);
    for (float v : lanes) sum += v;
  }
  return sum;
}

constexpr std::int64_t kFmaSteps = 1 << 20;
constexpr double kFmaPerCall = double(kFmaSteps) * kFmaAccumulators * kFmaLanes;

/// Best of several timed runs of fma_loop (this thread's CPU time), FMAs per second; measured once per process.
double fma_peak_per_s() {
  static const double peak = [] {
    double best = 1e30;
    for (int rep = 0; rep < 7; ++rep) {
      const double t0 = now_seconds(true);
      benchmark::DoNotOptimize(fma_loop(kFmaSteps));
      best = std::min(best, now_seconds(true) - t0);
    }
    return kFmaPerCall / best;
  }();
  return peak;
}

void bm_fma_peak(benchmark::State& st) {
  for (auto _ : st) benchmark::DoNotOptimize(fma_loop(kFmaSteps));
  st.counters["FMA_per_s"] = benchmark::Counter(kFmaPerCall, benchmark::Counter::kIsIterationInvariantRate);
  st.counters["lanes"] = kFmaLanes;
  st.counters["accumulators"] = kFmaAccumulators;
}

void set_fma_counters(benchmark::State& st, double fma_per_call, double tokens) {
  st.SetItemsProcessed(st.iterations() * static_cast<std::int64_t>(tokens));
  st.counters["FMA_per_s"] = benchmark::Counter(fma_per_call, benchmark::Counter::kIsIterationInvariantRate);
  st.counters["fma_peak_frac"] =
      benchmark::Counter(fma_per_call / fma_peak_per_s(), benchmark::Counter::kIsIterationInvariantRate);
  st.counters["fma_per_call"] = fma_per_call;
}

// ------------------------------------------------------------------------------------------------ fixtures

/// q, k, v, dctx ~ N(0, 1) of one shape, outputs, and both implementations' forward caches.
struct AttentionData {
  AttentionShape shape;
  MatrixF q, k, v, dctx;             // [s, d]
  MatrixF ctx, dq, dk, dv;           // [s, d]
  mf::AttentionCache<float> tiled;
  mf::detail::ReferenceAttentionCache<float> reference;
  bool tiled_ready = false, reference_ready = false;
};

AttentionData& data(const AttentionShape& a) {
  static AttentionData x;
  if (x.shape.d != a.d || x.shape.heads != a.heads || x.shape.s != a.s || x.q.rows() != a.s) {
    x = AttentionData{};
    x.shape = a;
    for (MatrixF* m : {&x.q, &x.k, &x.v, &x.dctx, &x.ctx, &x.dq, &x.dk, &x.dv}) m->resize(a.s, a.d);
    fill_normal(x.q, 21, 0);
    fill_normal(x.k, 21, 1);
    fill_normal(x.v, 21, 2);
    fill_normal(x.dctx, 21, 3);
  }
  return x;
}

void forward_tiled(AttentionData& x) {
  mf::attention_forward<float>(x.ctx, x.q, x.k, x.v, 1, x.shape.s, x.shape.heads, x.tiled);
  x.tiled_ready = true;
  benchmark::DoNotOptimize(x.ctx.data());
  benchmark::ClobberMemory();
}
void forward_reference(AttentionData& x) {
  mf::detail::reference_attention_forward<float>(x.ctx, x.q, x.k, x.v, 1, x.shape.s, x.shape.heads, x.reference);
  x.reference_ready = true;
  benchmark::DoNotOptimize(x.ctx.data());
  benchmark::ClobberMemory();
}
void backward_tiled(AttentionData& x) {
  if (!x.tiled_ready) forward_tiled(x);
  mf::attention_backward<float>(x.dq, x.dk, x.dv, x.q, x.k, x.v, x.dctx, x.tiled);
  benchmark::DoNotOptimize(x.dq.data());
  benchmark::ClobberMemory();
}
void backward_reference(AttentionData& x) {
  if (!x.reference_ready) forward_reference(x);
  mf::detail::reference_attention_backward<float>(x.dq, x.dk, x.dv, x.q, x.k, x.v, x.dctx, x.reference);
  benchmark::DoNotOptimize(x.dq.data());
  benchmark::ClobberMemory();
}

/// A KV cache holding context − 1 tokens and a pool of new (q, k, v) rows; each step appends one token, attends to
/// `context` positions and truncates back.
struct DecodeData {
  AttentionShape shape;
  mf::KVCache<float> kv{1, 1, 1};
  MatrixF q, k, v, ctx;  // [pool, d], ctx [1, d]
  Index next = 0;
};
DecodeData& decode_data(const AttentionShape& a) {
  static DecodeData x;
  if (x.shape.d != a.d || x.shape.heads != a.heads || x.shape.s != a.s || x.q.rows() == 0) {
    x = DecodeData{};
    x.shape = a;
    x.kv = mf::KVCache<float>(1, a.s, a.d);
    MatrixF keys(a.s - 1, a.d), values(a.s - 1, a.d);
    fill_normal(keys, 23, 0);
    fill_normal(values, 23, 1);
    if (a.s > 1) x.kv.append(keys, values);
    constexpr Index kPool = 64;
    for (MatrixF* m : {&x.q, &x.k, &x.v}) m->resize(kPool, a.d);
    fill_normal(x.q, 23, 2);
    fill_normal(x.k, 23, 3);
    fill_normal(x.v, 23, 4);
    x.ctx.resize(1, a.d);
  }
  return x;
}
template <bool Tiled>
void decode_step(DecodeData& x) {
  const Index i = x.next;
  x.next = (x.next + 1) % x.q.rows();
  if constexpr (Tiled)
    mf::attention_decode<float>(x.ctx, x.q.row(i), x.k.row(i), x.v.row(i), x.kv, x.shape.heads);
  else
    mf::detail::reference_attention_decode<float>(x.ctx, x.q.row(i), x.k.row(i), x.v.row(i), x.kv, x.shape.heads);
  x.kv.truncate(x.shape.s - 1);
  benchmark::DoNotOptimize(x.ctx.data());
  benchmark::ClobberMemory();
}

// ------------------------------------------------------------------------------------------------ bodies

template <class Call>
void bm_attention(benchmark::State& st, double fma, double tokens, Call&& call) {
  init_single_thread();
  for (auto _ : st) call();
  set_fma_counters(st, fma, tokens);
}

template <class Reference, class Tiled>
void bm_attention_paired(benchmark::State& st, double fma, Reference&& reference, Tiled&& tiled) {
  init_single_thread();
  run_paired(st, true, "x_reference", reference, tiled);
  // FMA rates of each side from the pair's per-call times (milliseconds).
  const double ref_ms = st.counters["baseline_ms"], tiled_ms = st.counters["candidate_ms"];
  if (ref_ms > 0) st.counters["reference_fma_peak_frac"] = fma / (ref_ms * 1e-3) / fma_peak_per_s();
  if (tiled_ms > 0) st.counters["tiled_fma_peak_frac"] = fma / (tiled_ms * 1e-3) / fma_peak_per_s();
}

}  // namespace

std::vector<std::string> register_attention_benchmarks(bool smoke) {
  std::vector<std::string> names;
  const AttentionShape a = smoke ? AttentionShape{128, 2, 64} : AttentionShape{};
  const double min_time = smoke ? 0.005 : 0.5;
  auto add = [&](const std::string& name, auto&& body) {
    names.push_back(name);
    benchmark::RegisterBenchmark(name.c_str(), body)->Unit(benchmark::kMillisecond)->MinTime(min_time);
  };
  add("roofline/fma_peak", [](benchmark::State& st) { bm_fma_peak(st); });
  const double f = forward_fma(a), b = backward_fma(a), dec = decode_fma(a), s = double(a.s);
  add("attention/forward/reference/" + a.suffix(), [a, f, s](benchmark::State& st) {
    bm_attention(st, f, s, [&] { forward_reference(data(a)); });
  });
  add("attention/forward/tiled/" + a.suffix(), [a, f, s](benchmark::State& st) {
    bm_attention(st, f, s, [&] { forward_tiled(data(a)); });
  });
  add("attention/paired/forward/" + a.suffix(), [a, f](benchmark::State& st) {
    bm_attention_paired(st, f, [&] { forward_reference(data(a)); }, [&] { forward_tiled(data(a)); });
  });
  add("attention/backward/reference/" + a.suffix(), [a, b, s](benchmark::State& st) {
    bm_attention(st, b, s, [&] { backward_reference(data(a)); });
  });
  add("attention/backward/tiled/" + a.suffix(), [a, b, s](benchmark::State& st) {
    bm_attention(st, b, s, [&] { backward_tiled(data(a)); });
  });
  add("attention/paired/backward/" + a.suffix(), [a, b](benchmark::State& st) {
    bm_attention_paired(st, b, [&] { backward_reference(data(a)); }, [&] { backward_tiled(data(a)); });
  });
  add("attention/decode/reference/" + a.suffix("context"), [a, dec](benchmark::State& st) {
    bm_attention(st, dec, 1.0, [&] { decode_step<false>(decode_data(a)); });
  });
  add("attention/decode/tiled/" + a.suffix("context"), [a, dec](benchmark::State& st) {
    bm_attention(st, dec, 1.0, [&] { decode_step<true>(decode_data(a)); });
  });
  add("attention/paired/decode/" + a.suffix("context"), [a, dec](benchmark::State& st) {
    bm_attention_paired(st, dec, [&] { decode_step<false>(decode_data(a)); }, [&] { decode_step<true>(decode_data(a)); });
  });
  return names;
}

}  // namespace mfbench
