// SPDX-License-Identifier: MIT
// MemoryFormerBlock against TransformerBlock (design §3, §4): prefill of one sequence, one-token decode through a
// stack deep enough that its weights exceed the L3, the attention both blocks share timed alone, and the paired
// prefill ratio. Names: block/{memoryformer,transformer,attention}/{prefill,decode}/d:…/heads:…/s:… and
// block/paired/prefill/d:…/heads:…/s:… (counters time_ratio = MemoryFormer / Transformer time, x_transformer its
// inverse, baseline_ms = Transformer, candidate_ms = MemoryFormer), block/paired/prefill_packed/… the same with
// the MemoryFormer block's packed table copy kept current (MemoryLayer::tables_changed), and
// block/paired/prefill_bf16/… with the MemoryFormer block frozen to bf16 panels (inference's default storage).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include <memoryformer/frozen_memoryformer_block.hpp>
#include <memoryformer/memoryformer_block.hpp>
#include <memoryformer/nn/attention.hpp>
#include <memoryformer/nn/kv_cache.hpp>
#include <memoryformer/transformer_block.hpp>

#include "bench_support.hpp"

namespace mfbench {
namespace {

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

/// The prefill block of `Block` at shape s, built once per (model, d) and its cache warmed once per shape.
template <class Block>
PrefillBlock<Block>& prefill_block(const BlockShape& s) {
  using Traits = BlockTraits<Block>;
  auto& p = cached_block_object<PrefillBlock<Block>>(
      Traits::slot, std::string(Traits::name) + "/prefill/" + std::to_string(s.d),
      prefill_bytes(Traits::weight_bytes(s), s), [&] {
        auto made = std::make_shared<PrefillBlock<Block>>();
        made->block = std::make_unique<Block>(Traits::config(s), /*seed=*/11);
        return made;
      });
  if (p.warmed != block_suffix(s)) {
    const auto& in = cached_inputs(s.s, s.d, s.d);
    MatrixF y(s.s, s.d);
    p.block->forward(y, in.x, 1, s.s, p.cache);
    p.warmed = block_suffix(s);
  }
  return p;
}

/// One prefill call: block.forward(y, x, batch = 1, seq = s, cache).
template <class Block>
void prefill_call(PrefillBlock<Block>& p, const BlockShape& s, MatrixF& y) {
  const auto& in = cached_inputs(s.s, s.d, s.d);
  p.block->forward(y, in.x, 1, s.s, p.cache);
  benchmark::DoNotOptimize(y.data());
  benchmark::ClobberMemory();
}

/// Prefill: block.forward(y, x, batch = 1, seq = s, cache) on x ~ N(0, 1). One block, built once per (model, d).
template <class Block>
inline void bm_block_prefill(benchmark::State& st, BlockShape s) {
  using Traits = BlockTraits<Block>;
  init_single_thread();
  auto& p = prefill_block<Block>(s);
  MatrixF y(s.s, s.d);
  for (auto _ : st) prefill_call(p, s, y);
  // bytes_per_iter: the MemoryFormer gathers s·(rows per token); the GEMMs read each weight once per call.
  const double bytes = Traits::memoryformer ? double(s.s) * Traits::bytes_per_token(s) : Traits::weight_bytes(s);
  set_block_counters(st, Traits::memoryformer, s, double(s.s), block_flops_paper(Traits::memoryformer, false, s), bytes,
                     1.0, 0.0, block_slot(Traits::slot).build_seconds);
}

/// time_ratio (MemoryFormer / Transformer time, from run_paired's x_transformer) and flop_ratio of a paired block row.
inline void set_block_ratio_counters(benchmark::State& st, const BlockShape& s) {
  const double x = st.counters["x_transformer"];
  st.counters["time_ratio"] = x > 0 ? 1.0 / x : 0.0;
  st.counters["flop_ratio"] = block_flops_paper(true, false, s) / block_flops_paper(false, false, s);
}

/// The Transformer block (baseline) and the MemoryFormer block (candidate) prefilling the same sequence
/// alternately (run_paired), one thread. time_ratio = MemoryFormer time / Transformer time. packed: the MemoryFormer
/// block's packed table copy is kept current (tables_changed(), as the Trainer keeps it and as inference on fixed
/// tables does), so its calls do not re-pack the row-major tables; the copy is released afterwards (parameters()
/// hands out writable views), so the other rows pack per call.
inline void bm_block_prefill_paired(benchmark::State& st, BlockShape s, bool packed) {
  using MF = memoryformer::MemoryFormerBlock<float>;
  using TF = memoryformer::TransformerBlock<float>;
  init_single_thread();
  auto& m = prefill_block<MF>(s);
  auto& t = prefill_block<TF>(s);
  MatrixF ym(s.s, s.d), yt(s.s, s.d);
  if (packed) {
    m.block->tables_changed();
    prefill_call(m, s, ym);  // first touch of the copy
  }
  run_paired(st, true, "x_transformer", [&] { prefill_call(t, s, yt); }, [&] { prefill_call(m, s, ym); });
  if (packed) (void)m.block->parameters();
  set_block_ratio_counters(st, s);
}

/// bm_block_prefill_paired with the MemoryFormer block frozen to bf16 prefill panels (FrozenMemoryFormerBlock,
/// StorageType::BF16, FrozenLayout::Panels: what `generate` runs by default), against the same Transformer block.
inline void bm_block_prefill_paired_bf16(benchmark::State& st, BlockShape s) {
  using MF = memoryformer::MemoryFormerBlock<float>;
  using TF = memoryformer::TransformerBlock<float>;
  init_single_thread();
  const memoryformer::FrozenMemoryFormerBlock frozen(*prefill_block<MF>(s).block, memoryformer::StorageType::BF16,
                                                     memoryformer::FrozenLayout::Panels);
  auto& t = prefill_block<TF>(s);
  const auto& in = cached_inputs(s.s, s.d, s.d);
  MatrixF ym(s.s, s.d), yt(s.s, s.d);
  memoryformer::FrozenMemoryFormerBlock::Scratch scratch;
  auto frozen_call = [&] {
    frozen.forward(ym, in.x, 1, s.s, scratch);
    benchmark::DoNotOptimize(ym.data());
    benchmark::ClobberMemory();
  };
  frozen_call();  // first touch of the scratch
  run_paired(st, true, "x_transformer", [&] { prefill_call(t, s, yt); }, frozen_call);
  set_block_ratio_counters(st, s);
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

}  // namespace

void release_block_objects() {
  for (int i = 0; i < kBlockSlots; ++i) block_slot(i) = BlockSlot{};
}

/// Registers, per prefill shape: memoryformer, transformer, attention, the paired ratio; then per decode shape: memoryformer,
/// transformer, attention (each twin right after the other, so both see the same machine load). Shapes are ordered by d so
/// a built block is reused across s. Returns the names in registration order.
std::vector<std::string> register_block_suite(const BlockGrid& g) {
  add_release_hook(&release_block_objects);
  std::vector<std::string> names;
  auto common = [&](benchmark::internal::Benchmark* b) {
    b->Unit(benchmark::kMicrosecond)->MinTime(g.min_time);
    if (g.repetitions > 1) b->Repetitions(g.repetitions);
    return b;
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
    // The ratio the report prints: both blocks alternately in one benchmark, several pairs per repetition.
    names.push_back(block_name("paired", "prefill", s));
    common(benchmark::RegisterBenchmark(names.back().c_str(),
                                        [s](benchmark::State& st) { bm_block_prefill_paired(st, s, false); }))
        ->MinTime(5 * g.min_time);
    names.push_back(block_name("paired", "prefill_packed", s));
    common(benchmark::RegisterBenchmark(names.back().c_str(),
                                        [s](benchmark::State& st) { bm_block_prefill_paired(st, s, true); }))
        ->MinTime(5 * g.min_time);
    names.push_back(block_name("paired", "prefill_bf16", s));
    common(benchmark::RegisterBenchmark(names.back().c_str(),
                                        [s](benchmark::State& st) { bm_block_prefill_paired_bf16(st, s); }))
        ->MinTime(5 * g.min_time);
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

}  // namespace mfbench
