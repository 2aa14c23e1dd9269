// SPDX-License-Identifier: MIT
// Whole models (design §3): MemoryFormerLM shaped like MemoryFormer-tiny (d = 512, 6 layers, 8 heads, τ = 8) against
// TransformerLM of the same d, layers and heads (Pythia-70M's shape), byte vocabulary (256), fp32 tables and weights.
// Every row is one paired benchmark (run_paired: dense baseline and MemoryFormer candidate alternately), so the
// ratio compares both models in the same machine state:
//   prefill  LanguageModel::forward of one sequence of s tokens (logits of every position)
//   decode   LanguageModel::forward_decode of one token after context − 1 cached tokens (KV caches truncated back
//            after every step; successive steps take successive tokens of a pool), 16 tokens of one model in a row
//            per pair (kDecodeRun), as a generation loop runs them
//   train    one Trainer step without the data sampling: zero_grad, forward_loss, backward and AdamW::step_fused
//            (clip 1.0) with the Trainer's AdamW options (row-sparse tables), which keeps the tables' packed copy
//            that prefill reads current (TrainerOptions::packed_tables), seq 256 × batch 8
// With two threads both models run the library's OpenMP kernels and Eigen's threaded products on both threads
// (set_deterministic_threads(false): the default serial Eigen products would leave the dense model one thread).
// Where the library has a FrozenLanguageModel (memoryformer/frozen_model.hpp), prefill and decode rows also run the
// MemoryFormer model frozen to bf16 tables ("/tables:bf16"), against the same fp32 dense model; decode rows with
// "/kv:bf16" keep both models' KV caches as bfloat16 (half the bytes every new token reads).
// Peak resident memory: each model and mode runs once in a process of its own (this executable re-run with
// --mfbench-model-peak), which reports its VmHWM, so that neither model's pages, nor the benchmarks', count for the
// other.
#include "bench_model.hpp"

#include <spawn.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include <memoryformer/model.hpp>
#include <memoryformer/optim/adamw.hpp>
#include <memoryformer/train/trainer.hpp>

#if __has_include(<memoryformer/frozen_model.hpp>)
#include <memoryformer/frozen_model.hpp>
#define MFBENCH_FROZEN_MODEL 1
#else
#define MFBENCH_FROZEN_MODEL 0
#endif

extern char** environ;

namespace mfbench {
namespace {

namespace mf = memoryformer;
using MfLM = mf::MemoryFormerLM<float>;
using DenseLM = mf::TransformerLM<float>;

std::unique_ptr<MfLM> make_model(const ModelShape& m, MfLM*) {
  MfLM::Config c;
  c.vocab = m.vocab;
  c.layers = m.layers;
  c.block.d = m.d;
  c.block.heads = m.heads;
  c.block.tau = m.tau;
  return std::make_unique<MfLM>(c, /*seed=*/31);
}
std::unique_ptr<DenseLM> make_model(const ModelShape& m, DenseLM*) {
  DenseLM::Config c;
  c.vocab = m.vocab;
  c.layers = m.layers;
  c.block.d = m.d;
  c.block.heads = m.heads;
  return std::make_unique<DenseLM>(c, /*seed=*/31);
}

/// Byte tokens, uniformly drawn (their values do not change the dense model's work; they pick the MemoryFormer's
/// embedding rows, whose hashes then spread over the tables as text would).
std::vector<std::int32_t> random_tokens(Index n, Index vocab, std::uint64_t seed) {
  mf::Rng rng(seed);
  std::vector<std::int32_t> t(static_cast<std::size_t>(n));
  for (auto& v : t) v = std::int32_t(rng.next_u64() % std::uint64_t(vocab));
  return t;
}

mf::StorageType kv_storage(const ModelRow& row) { return row.kv_bf16 ? mf::StorageType::BF16 : mf::StorageType::F32; }

/// What the decode rows of a runner keep: KV caches filled with context − 1 prompt tokens (re-made when a row asks for
/// another context or KV storage), the [1, vocab] logits, and a pool of distinct inputs taken in turn.
template <class Model>
struct DecodeSide {
  std::optional<typename Model::DecodeState> state;
  Index context = -1;  // context the state was filled for
  bool kv_bf16 = false;
  MatrixF logits;
  std::vector<std::int32_t> pool;
  Index next = 0;

  void prepare(const Model& model, const ModelRow& row) {
    if (context == row.length && kv_bf16 == row.kv_bf16) return;
    const Index vocab = model.vocab();
    state.reset();
    state.emplace(model.make_decode_state(1, row.length, kv_storage(row)));
    if (row.length > 1) {
      const auto prompt = random_tokens(row.length - 1, vocab, 43);
      MatrixF prompt_logits(row.length - 1, vocab);
      model.forward_decode(prompt_logits, prompt, *state);
    }
    context = row.length;
    kv_bf16 = row.kv_bf16;
    if (pool.empty()) pool = random_tokens(4096, vocab, 47);
    logits.resize(1, vocab);
  }

  /// One token after context − 1 cached ones; the caches are truncated back afterwards.
  void step(const Model& model, const ModelRow& row) {
    model.forward_decode(logits, std::span<const std::int32_t>(&pool[std::size_t(next)], 1), *state);
    next = (next + 1) % Index(pool.size());
    for (auto& kv : state->kv) kv.truncate(row.length - 1);
    benchmark::DoNotOptimize(logits.data());
  }
};

/// One model with what its calls need, kept between benchmark calls.
template <class LM>
struct Runner {
  std::unique_ptr<LM> model;
  typename LM::Cache cache;
  DecodeSide<LM> decode;                           // the decode rows' state
  std::vector<std::int32_t> tokens;                // prefill input / training inputs
  std::vector<std::int32_t> targets;               // training targets
  std::unique_ptr<mf::AdamW<float>> optimizer;
  std::vector<mf::ParameterView<float>> params;

  explicit Runner(const ModelShape& m) : model(make_model(m, static_cast<LM*>(nullptr))) {
    model->set_deterministic_threads(false);
  }

  void prepare(const ModelRow& row) {
    const Index vocab = model->vocab();
    // Prefill and decode rows run on the training tables as they are, so a packed copy that a train row made is
    // released (writable access does that): a row's figure does not depend on the rows run before it.
    if (row.mode != ModelMode::Train && optimizer) (void)model->parameters();
    if (row.mode == ModelMode::Prefill) {
      if (Index(tokens.size()) != row.length) tokens = random_tokens(row.length, vocab, 41);
    } else if (row.mode == ModelMode::Decode) {
      decode.prepare(*model, row);
    } else {
      const Index n = row.batch * row.length;
      if (Index(targets.size()) != n || Index(tokens.size()) != n) {
        const auto stream = random_tokens(n + 1, vocab, 53);
        tokens.assign(stream.begin(), stream.end() - 1);
        targets.assign(stream.begin() + 1, stream.end());
      }
      if (!optimizer) {
        params = model->parameters();
        optimizer = std::make_unique<mf::AdamW<float>>(params, mf::TrainerOptions{}.adamw);
      }
      model->keep_tables_packed();  // as the Trainer: once, then the optimizer keeps the copy current
    }
  }

  void call(const ModelRow& row) {
    if (row.mode == ModelMode::Prefill) {
      const auto& out = model->forward(tokens, 1, row.length, cache);
      benchmark::DoNotOptimize(out.data());
    } else if (row.mode == ModelMode::Decode) {
      decode.step(*model, row);
    } else {
      model->zero_grad();
      const float loss = model->forward_loss(tokens, targets, row.batch, row.length, cache);
      benchmark::DoNotOptimize(loss);
      model->backward(cache);
      benchmark::DoNotOptimize(optimizer->step_fused(1e-4, 1.0));
      model->keep_tables_packed();
    }
    benchmark::ClobberMemory();
  }
};

#if MFBENCH_FROZEN_MODEL
/// The MemoryFormer model frozen to bfloat16 tables (FrozenLanguageModel), for the inference rows.
struct FrozenRunner {
  std::unique_ptr<mf::FrozenLanguageModel> model;
  DecodeSide<mf::FrozenLanguageModel> decode;
  MatrixF logits;                    // [s, vocab] prefill
  std::vector<std::int32_t> tokens;  // prefill input

  explicit FrozenRunner(const MfLM& trained) : model(std::make_unique<mf::FrozenLanguageModel>(trained, mf::StorageType::BF16)) {}

  void prepare(const ModelRow& row) {
    const Index vocab = model->vocab();
    if (row.mode == ModelMode::Prefill) {
      if (Index(tokens.size()) != row.length) tokens = random_tokens(row.length, vocab, 41);
      logits.resize(row.length, vocab);
    } else {
      decode.prepare(*model, row);
    }
  }

  void call(const ModelRow& row) {
    if (row.mode == ModelMode::Prefill) {
      model->forward(logits, tokens, 1, row.length);
      benchmark::DoNotOptimize(logits.data());
    } else {
      decode.step(*model, row);
    }
    benchmark::ClobberMemory();
  }
};
#endif

struct Models {
  std::string key;
  std::unique_ptr<Runner<MfLM>> mf;
  std::unique_ptr<Runner<DenseLM>> dense;
#if MFBENCH_FROZEN_MODEL
  std::unique_ptr<FrozenRunner> frozen_bf16;  // built from mf on first use
#endif
};

std::string shape_key(const ModelShape& m) {
  return std::to_string(m.d) + "," + std::to_string(m.layers) + "," + std::to_string(m.heads) + "," +
         std::to_string(m.tau) + "," + std::to_string(m.vocab);
}

Models& models(const ModelShape& m) {
  static Models x;
  if (x.key != shape_key(m)) {
    x = Models{};
    release_kept_objects();  // the layer and block benchmarks' objects are not needed any more
    x.mf = std::make_unique<Runner<MfLM>>(m);
    x.dense = std::make_unique<Runner<DenseLM>>(m);
    x.key = shape_key(m);
  }
  return x;
}

double tokens_per_call(const ModelRow& row) {
  return row.mode == ModelMode::Decode ? 1.0 : double(row.batch) * double(row.length);
}

// ------------------------------------------------------------------------------------------------ peak memory

constexpr const char* kPeakFlag = "--mfbench-model-peak=";

/// Peak resident bytes of this process: VmHWM of /proc/self/status (per address space, so it starts afresh at
/// exec), else getrusage's ru_maxrss.
double peak_resident_bytes() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::atof(line.c_str() + 6) * 1024.0;
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return double(u.ru_maxrss) * 1024.0;
}

std::string peak_argument(bool memoryformer, const ModelShape& m, const ModelRow& row) {
  return std::string(kPeakFlag) + (memoryformer ? (row.bf16 ? "mf_bf16," : "mf,") : "dense,") +
         model_mode_name(row.mode) + "," + (row.kv_bf16 ? "kv_bf16," : "kv_f32,") +
         std::to_string(row.length) + "," + std::to_string(row.batch) + "," + shape_key(m);
}

/// Runs this executable with the peak flag and reads the bytes it prints; 0 when that fails.
double measure_peak(bool memoryformer, const ModelShape& m, const ModelRow& row) {
  static std::map<std::string, double> done;
  const std::string arg = peak_argument(memoryformer, m, row);
  if (auto it = done.find(arg); it != done.end()) return it->second;
  int fds[2];
  if (pipe(fds) != 0) return done[arg] = 0.0;
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
  posix_spawn_file_actions_addclose(&actions, fds[0]);
  std::string exe = "/proc/self/exe";
  std::vector<char*> argv{exe.data(), const_cast<char*>(arg.c_str()), nullptr};
  pid_t pid = 0;
  const int rc = posix_spawn(&pid, exe.c_str(), &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  close(fds[1]);
  std::string out;
  char buf[256];
  for (ssize_t n; (n = read(fds[0], buf, sizeof buf)) > 0;) out.append(buf, std::size_t(n));
  close(fds[0]);
  int status = 0;
  if (rc != 0 || waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
    return done[arg] = 0.0;
  return done[arg] = std::atof(out.c_str());
}

template <class LM>
int run_peak_child(const ModelShape& m, const ModelRow& row) {
  set_threads(1);
#if MFBENCH_FROZEN_MODEL
  if constexpr (std::is_same_v<LM, MfLM>) {
    if (row.bf16) {
      // The frozen model is made from a trained one, which it does not need afterwards: free that, then restart
      // the peak from what is resident now (writing 5 to clear_refs resets VmHWM), so only inference counts.
      std::unique_ptr<FrozenRunner> frozen;
      {
        Runner<MfLM> trained(m);
        frozen = std::make_unique<FrozenRunner>(*trained.model);
      }
      std::ofstream("/proc/self/clear_refs") << "5";
      frozen->prepare(row);
      frozen->call(row);
      std::printf("%.0f\n", peak_resident_bytes());
      return 0;
    }
  }
#endif
  Runner<LM> r(m);
  r.prepare(row);
  r.call(row);
  std::printf("%.0f\n", peak_resident_bytes());
  return 0;
}

// ------------------------------------------------------------------------------------------------ benchmark

/// Tokens each model decodes in a row per pair in the decode rows: a generation loop runs one model token after token,
/// and alternating single tokens would instead time each token after the other model's pass, which evicts the KV
/// cache and table rows from the caches (the dense model streams all its weights for every token).
constexpr int kDecodeRun = 16;

void bm_model_paired(benchmark::State& st, ModelShape m, ModelRow row, bool peak) {
  const double mf_peak = peak ? measure_peak(true, m, row) : 0.0;
  const double dense_peak = peak ? measure_peak(false, m, row) : 0.0;
  auto& x = models(m);
  set_threads(row.threads);
  x.dense->prepare(row);
  // The MemoryFormer side: the fp32 training model, or its bf16 frozen copy.
  std::function<void()> candidate;
#if MFBENCH_FROZEN_MODEL
  if (row.bf16) {
    if (!x.frozen_bf16) x.frozen_bf16 = std::make_unique<FrozenRunner>(*x.mf->model);
    x.frozen_bf16->prepare(row);
    candidate = [&] { x.frozen_bf16->call(row); };
  }
#endif
  if (!candidate) {
    x.mf->prepare(row);
    candidate = [&] { x.mf->call(row); };
  }
  // One untimed call of each first: a row may run a single pair per repetition, and the first call of a shape
  // allocates and first-touches the models' forward and gradient buffers.
  static std::set<std::string> warmed;
  if (warmed.insert(model_benchmark_name(row)).second) {
    x.dense->call(row);
    candidate();
  }
  run_paired(st, row.threads == 1, "x_dense", [&] { x.dense->call(row); }, candidate,
             row.mode == ModelMode::Decode ? kDecodeRun : 1);
  set_threads(1);
  const double tokens = tokens_per_call(row);
  const double dense_ms = st.counters["baseline_ms"], mf_ms = st.counters["candidate_ms"];
  st.SetItemsProcessed(st.iterations() * static_cast<std::int64_t>(2 * tokens));
  st.counters["mf_tokens_per_second"] = mf_ms > 0 ? tokens / (mf_ms * 1e-3) : 0.0;
  st.counters["dense_tokens_per_second"] = dense_ms > 0 ? tokens / (dense_ms * 1e-3) : 0.0;
  st.counters["ratio"] = st.counters["x_dense"];
  st.counters["flop_ratio"] = model_flops_per_token(m, row, true) / model_flops_per_token(m, row, false);
  st.counters["mf_peak_bytes"] = mf_peak;
  st.counters["dense_peak_bytes"] = dense_peak;
  st.counters["threads"] = row.threads;
}

}  // namespace

const char* model_mode_name(ModelMode mode) {
  return mode == ModelMode::Prefill ? "prefill" : (mode == ModelMode::Decode ? "decode" : "train");
}

std::string model_benchmark_name(const ModelRow& row) {
  std::string n = "model/paired/" + std::string(model_mode_name(row.mode)) + "/";
  if (row.mode == ModelMode::Prefill) n += "s:" + std::to_string(row.length);
  if (row.mode == ModelMode::Decode) n += "context:" + std::to_string(row.length);
  if (row.mode == ModelMode::Train) n += "seq:" + std::to_string(row.length) + "/batch:" + std::to_string(row.batch);
  if (row.bf16) n += "/tables:bf16";
  if (row.kv_bf16) n += "/kv:bf16";
  return n + "/threads:" + std::to_string(row.threads);
}

double model_flops_per_token(const ModelShape& m, const ModelRow& row, bool memoryformer) {
  const double s = double(row.length), d = double(m.d);
  const double block = memoryformer ? mf::memoryformer_block_flops_paper(s, d, m.tau) : mf::transformer_block_flops_paper(s, d);
  const double forward = double(m.layers) * block / s + d * double(m.vocab);
  return row.mode == ModelMode::Train ? 3.0 * forward : forward;
}

namespace {
std::vector<int> thread_counts() {
#if defined(MEMORYFORMER_USE_OPENMP) && MEMORYFORMER_USE_OPENMP
  return {1, 2};
#else
  return {1};
#endif
}
}  // namespace

ModelGrid default_model_grid() {
  ModelGrid g;
  for (int t : thread_counts()) {
    g.rows.push_back({ModelMode::Prefill, 1024, 1, t});
    g.rows.push_back({ModelMode::Prefill, 2048, 1, t});
    g.rows.push_back({ModelMode::Decode, 1024, 1, t});
    g.rows.push_back({ModelMode::Train, 256, 8, t});
    if (MFBENCH_FROZEN_MODEL) {
      g.rows.push_back({ModelMode::Prefill, 1024, 1, t, true});
      g.rows.push_back({ModelMode::Decode, 1024, 1, t, true});
      g.rows.push_back({ModelMode::Decode, 1024, 1, t, true, true});
    }
  }
  return g;
}

ModelGrid smoke_model_grid() {
  ModelGrid g;
  g.shape = {.d = 64, .layers = 2, .heads = 1, .tau = 8, .vocab = 256};
  for (int t : thread_counts()) {
    g.rows.push_back({ModelMode::Prefill, 32, 1, t});
    g.rows.push_back({ModelMode::Decode, 32, 1, t});
    g.rows.push_back({ModelMode::Train, 16, 2, t});
    if (MFBENCH_FROZEN_MODEL) {
      g.rows.push_back({ModelMode::Decode, 32, 1, t, true});
      g.rows.push_back({ModelMode::Decode, 32, 1, t, true, true});
    }
  }
  g.min_time = 0.005;
  return g;
}

std::vector<std::string> register_model_benchmarks(const ModelGrid& g) {
  std::vector<std::string> names;
  for (const auto& row : g.rows) {
    names.push_back(model_benchmark_name(row));
    auto* b = benchmark::RegisterBenchmark(names.back().c_str(), [m = g.shape, row, peak = g.peak_memory](
                                                                     benchmark::State& st) { bm_model_paired(st, m, row, peak); });
    b->Unit(benchmark::kMillisecond)->MinTime(g.min_time);
    if (g.repetitions > 1) b->Repetitions(g.repetitions);
    if (row.threads > 1) b->UseRealTime();
  }
  return names;
}

bool model_peak_child(int argc, char** argv, int& exit_code) {
  if (argc != 2 || std::strncmp(argv[1], kPeakFlag, std::strlen(kPeakFlag)) != 0) return false;
  // kind,mode,kv,length,batch,d,layers,heads,tau,vocab
  std::vector<std::string> f;
  std::stringstream in(argv[1] + std::strlen(kPeakFlag));
  for (std::string item; std::getline(in, item, ',');) f.push_back(item);
  exit_code = 2;
  if (f.size() != 10) return true;
  ModelRow row;
  row.bf16 = f[0] == "mf_bf16";
  row.mode = f[1] == "decode" ? ModelMode::Decode : (f[1] == "train" ? ModelMode::Train : ModelMode::Prefill);
  row.kv_bf16 = f[2] == "kv_bf16";
  row.length = std::atoll(f[3].c_str());
  row.batch = std::atoll(f[4].c_str());
  ModelShape m{.d = std::atoll(f[5].c_str()), .layers = std::atoll(f[6].c_str()), .heads = std::atoll(f[7].c_str()),
               .tau = std::atoi(f[8].c_str()), .vocab = std::atoll(f[9].c_str())};
  try {
    exit_code = f[0] == "dense" ? run_peak_child<DenseLM>(m, row) : run_peak_child<MfLM>(m, row);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", argv[1], e.what());
    exit_code = 1;
  }
  return true;
}

}  // namespace mfbench
