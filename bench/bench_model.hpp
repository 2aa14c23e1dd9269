// SPDX-License-Identifier: MIT
// The whole-model section (bench_model.cpp): a MemoryFormer language model shaped like MemoryFormer-tiny against
// the dense language model of the same width, depth and heads (Pythia-70M's shape), byte vocabulary, timed in
// pairs: prefill, one-token decode and training steps, one and two threads, with each model's peak resident memory
// measured in a child process of its own.
#pragma once

#include <string>
#include <vector>

#include "bench_support.hpp"

namespace mfbench {

/// Shape of both models: MemoryFormerLM (MemoryFormerBlock, τ, e = 2) and TransformerLM (TransformerBlock).
struct ModelShape {
  Index d = 512;
  Index layers = 6;
  Index heads = 8;
  int tau = 8;
  Index vocab = 256;
};

enum class ModelMode { Prefill, Decode, Train };

/// One row of the section: a mode at a length, on a number of threads.
struct ModelRow {
  ModelMode mode = ModelMode::Prefill;
  Index length = 1024;  // prefill: s; decode: context (s − 1 cached tokens + the new one); train: seq
  Index batch = 1;      // sequences per call (train: the Trainer's batch)
  int threads = 1;
  /// The MemoryFormer side as a FrozenLanguageModel over bfloat16 tables (inference only: prefill and decode), in
  /// builds whose library has memoryformer/frozen_model.hpp; false: the fp32 MemoryFormerLM itself.
  bool bf16 = false;
  /// Decode rows: both models keep their KV caches as bfloat16 (KVCache with StorageType::BF16), else float32.
  bool kv_bf16 = false;
};

struct ModelGrid {
  ModelShape shape;
  std::vector<ModelRow> rows;
  double min_time = 0.5;  // seconds per paired benchmark
  int repetitions = 1;
  bool peak_memory = true;  // measure peak resident bytes in child processes
};

/// MemoryFormer-tiny against Pythia-70M's shape: prefill s ∈ {1024, 2048}, decode at context 1024, training at
/// seq 256 × batch 8, and (with a frozen model) prefill at 1024 and decode with bf16 tables, the latter also with
/// bf16 KV caches in both models; one thread, and two in OpenMP builds.
ModelGrid default_model_grid();
/// d = 64, 2 layers, 1 head, s = 32: the whole section in a few seconds (for tests).
ModelGrid smoke_model_grid();

const char* model_mode_name(ModelMode mode);
/// "model/paired/prefill/s:1024/threads:1", "model/paired/decode/context:1024/threads:1",
/// "model/paired/train/seq:256/batch:8/threads:1"; bf16 rows add "/tables:bf16" and bf16 KV caches "/kv:bf16"
/// before "/threads".
std::string model_benchmark_name(const ModelRow& row);
/// Paper-convention FLOPs per token of the whole model (blocks at this length + the LM head d·vocab; training
/// counts 3× the forward, which leaves the ratio unchanged).
double model_flops_per_token(const ModelShape& shape, const ModelRow& row, bool memoryformer);

/// Registers one paired benchmark per row (dense baseline, MemoryFormer candidate). Counters:
/// mf_tokens_per_second, dense_tokens_per_second, ratio (= MemoryFormer tokens/s ÷ dense tokens/s), flop_ratio
/// (MemoryFormer ÷ dense FLOPs per token), mf_peak_bytes, dense_peak_bytes (0 when not measured), baseline_ms
/// (dense), candidate_ms (MemoryFormer), x_dense (= ratio). Returns the names in registration order.
std::vector<std::string> register_model_benchmarks(const ModelGrid& grid);

/// The child side of the peak-memory measurement: when argv holds --mfbench-model-peak=…, builds that one model,
/// runs one call of the mode, prints its peak resident bytes (VmHWM) on stdout and returns true with `exit_code`
/// set; otherwise returns false. Both memoryformer_bench and memoryformer_report call it first thing in main().
bool model_peak_child(int argc, char** argv, int& exit_code);

}  // namespace mfbench
