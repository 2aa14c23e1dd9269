// SPDX-License-Identifier: MIT
// train_lm: trains a byte-level MemoryFormer language model (or, with --model transformer, the dense baseline of the
// same width, depth and heads) on a text file or the built-in text, with a progress bar, periodic validation,
// checkpoints, resume and a --json summary (design §3 model and training recipe, §4 FLOPs).
//
//   train_lm [--text FILE] [--model memoryformer|transformer] [--steps N] [--json] ...   (train_lm --help)
//   mpirun -np R train_lm ... [--table-parallel]     (built with MEMORYFORMER_MPI: distributed training, design §11)

#include "common/arg_reader.hpp"
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <memory>
#include <numbers>
#include <optional>
#include <span>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include <memoryformer/distributed/communicator.hpp>
#include <memoryformer/distributed/self_communicator.hpp>
#include <memoryformer/distributed/table_sharding.hpp>
#include <memoryformer/flops.hpp>
#include <memoryformer/io/atomic_file.hpp>
#include <memoryformer/model.hpp>
#include <memoryformer/train/callbacks.hpp>
#include <memoryformer/train/text_data.hpp>
#include <memoryformer/train/trainer.hpp>

#include "data/default_text.hpp"

#if defined(MEMORYFORMER_USE_MPI)
#include <memoryformer/distributed/mpi_communicator.hpp>

#include "common/mpi_environment.hpp"
#endif

namespace mf = memoryformer;
using mf::Index;

namespace {

struct Args {
  std::string model = "memoryformer";
  std::string text_path;            // empty: the built-in text
  std::size_t text_bytes = 1000000; // size of the built-in text
  std::string write_default_text;
  Index d = 256, layers = 4, heads = 4, seq = 128, batch = 16, steps = 300, accumulate = 1;
  int tau = 8, expand_bits = 2;
  std::optional<double> lr;         // default: 3e-3 MemoryFormer, 1e-3 dense (design §3: 3× the dense rate)
  double table_lr_mult = 1.0;
  double min_lr_ratio = 0.01, warmup_ratio = 0.01, clip = 1.0, weight_decay = 0.1;
  std::string sparse_update = "row";
  Index eval_every = 50, eval_windows = 64, final_eval_windows = 256;
  double val_fraction = 0.1;
  std::uint64_t seed = 1, data_seed = 1;
  std::string save, resume;
  Index save_every = 0;
  int threads = 0;                  // 0: leave OpenMP's default
  double max_seconds = 0;           // 0: no budget
  bool json = false, quiet = false, profile = false, smoke = false, eigen_threads = false, bf16_moments = false;
  bool table_parallel = false;
};

const char* usage =
    "usage: train_lm [options]\n"
    "  --model memoryformer|transformer  the paper's model (default) or the dense baseline of the same d/layers/heads\n"
    "  --text FILE            train on FILE (any bytes; byte-level tokens). Default: the built-in English text\n"
    "  --text-bytes N         size of the built-in text (default 1000000)\n"
    "  --write-default-text FILE   write the built-in text to FILE and exit\n"
    "  --d N --layers N --heads N --tau N --expand-bits N   model shape (default 256, 4, 4, 8, 2)\n"
    "  --seq N --batch N --steps N      tokens per sequence, sequences per micro-batch, steps (default 128, 16, 300)\n"
    "  --accumulate N         micro-batches of --batch sequences per optimiser step, gradients averaged (default 1)\n"
    "  --lr X                 peak learning rate (default 3e-3 memoryformer, 1e-3 transformer)\n"
    "  --table-lr-mult X      learning-rate multiplier of bucket tables (lr group; default 1)\n"
    "  --min-lr-ratio X --warmup-ratio X   cosine decay to lr·X; warm-up share of the steps (default 0.01, 0.01)\n"
    "  --clip X               global gradient-norm clip, 0 = off (default 1)\n"
    "  --weight-decay X       AdamW decoupled weight decay, not on biases and norms (default 0.1)\n"
    "  --sparse-update row|dense   AdamW on tables/embedding: only touched rows (default) or every row\n"
    "  --bf16-moments         store AdamW's moments as bfloat16 (parameters stay float32; checkpoints unchanged)\n"
    "  --eval-every N --eval-windows N   validate every N steps on N windows (default 50, 64)\n"
    "  --final-eval-windows N windows of the final validation, 0 = the whole split (default 256)\n"
    "  --val-fraction X       share of the text held out at its end for validation (default 0.1)\n"
    "  --seed N --data-seed N initialisation and batch-sampling seeds, 0 to 2^64 - 1 (default 1, 1)\n"
    "  --save FILE [--save-every N]   write checkpoints (model + AdamW state + step) atomically\n"
    "  --resume FILE          continue a run saved with --save (same data options)\n"
    "  --threads N            OpenMP threads (builds with MEMORYFORMER_USE_OPENMP; results do not depend on N)\n"
    "  --eigen-threads        also let Eigen thread the dense products (faster dense parts; results then depend\n"
    "                         on the thread count by float rounding)\n"
    "  --max-seconds S        stop once training has taken S seconds (the schedule is not shortened)\n"
    "  --profile              time the parts of a training step (steady state, after warm-up steps) and exit\n"
    "  --table-parallel       under mpirun: split every Memory Layer's tables over the ranks (default: each rank\n"
    "                         holds the whole model; either way each --batch is split evenly over the ranks)\n"
    "  --json                 print the final metrics as one JSON object on stdout\n"
    "  --quiet                no progress output\n"
    "  --smoke                tiny sizes, a few seconds (what ctest runs)\n";

[[noreturn]] void fail(const std::string& msg) { memoryformer_examples::ArgReader(0, nullptr, "train_lm").fail(msg); }

Args parse(int argc, char** argv) {
  Args a;
  const memoryformer_examples::ArgReader args(argc, argv, "train_lm");
  auto value = [&](int& i) { return args.value(i); };
  auto integer = [&](int& i) { return Index(args.integer(i)); };
  // Values stored in an int are range-checked as such: 4294967300 must not become 4.
  auto small = [&](int& i) { return int(args.integer(i, 0, std::numeric_limits<int>::max())); };
  auto real = [&](int& i) { return args.number(i, /*allow_negative=*/true); };
  for (int i = 1; i < argc; ++i) {
    const std::string f = argv[i];
    if (f == "--help" || f == "-h") {
      std::cout << usage;
      std::exit(0);
    } else if (f == "--model") a.model = value(i);
    else if (f == "--text") a.text_path = value(i);
    else if (f == "--text-bytes") a.text_bytes = std::size_t(integer(i));
    else if (f == "--write-default-text") a.write_default_text = value(i);
    else if (f == "--d") a.d = integer(i);
    else if (f == "--layers") a.layers = integer(i);
    else if (f == "--heads") a.heads = integer(i);
    else if (f == "--tau") a.tau = small(i);
    else if (f == "--expand-bits") a.expand_bits = small(i);
    else if (f == "--seq") a.seq = integer(i);
    else if (f == "--batch") a.batch = integer(i);
    else if (f == "--steps") a.steps = integer(i);
    else if (f == "--accumulate") a.accumulate = integer(i);
    else if (f == "--bf16-moments") a.bf16_moments = true;
    else if (f == "--lr") a.lr = real(i);
    else if (f == "--table-lr-mult") a.table_lr_mult = real(i);
    else if (f == "--min-lr-ratio") a.min_lr_ratio = real(i);
    else if (f == "--warmup-ratio") a.warmup_ratio = real(i);
    else if (f == "--clip") a.clip = real(i);
    else if (f == "--weight-decay") a.weight_decay = real(i);
    else if (f == "--sparse-update") a.sparse_update = value(i);
    else if (f == "--eval-every") a.eval_every = integer(i);
    else if (f == "--eval-windows") a.eval_windows = integer(i);
    else if (f == "--final-eval-windows") a.final_eval_windows = integer(i);
    else if (f == "--val-fraction") a.val_fraction = real(i);
    else if (f == "--seed") a.seed = args.seed(i);
    else if (f == "--data-seed") a.data_seed = args.seed(i);
    else if (f == "--save") a.save = value(i);
    else if (f == "--save-every") a.save_every = integer(i);
    else if (f == "--resume") a.resume = value(i);
    else if (f == "--threads") a.threads = small(i);
    else if (f == "--max-seconds") a.max_seconds = args.number(i, /*allow_negative=*/false);
    else if (f == "--profile") a.profile = true;
    else if (f == "--json") a.json = true;
    else if (f == "--quiet") a.quiet = true;
    else if (f == "--smoke") a.smoke = true;
    else if (f == "--eigen-threads") a.eigen_threads = true;
    else if (f == "--table-parallel") a.table_parallel = true;
    else fail("unknown option '" + f + "'");
  }
  if (a.model != "memoryformer" && a.model != "transformer")
    fail("--model must be memoryformer or transformer, got '" + a.model + "'");
  if (a.accumulate < 1) fail("--accumulate must be ≥ 1, got " + std::to_string(a.accumulate));
#if !defined(MEMORYFORMER_USE_MPI)
  if (a.table_parallel) fail("--table-parallel needs a build with MPI (configure with -DMEMORYFORMER_MPI=ON)");
#endif
  if (a.table_parallel && a.model != "memoryformer") fail("--table-parallel needs --model memoryformer (tables)");
  if (a.sparse_update != "row" && a.sparse_update != "dense")
    fail("--sparse-update must be row or dense, got '" + a.sparse_update + "'");
  if (a.smoke) {
    // Tiny everything: ctest runs this, and it must finish in seconds on any machine.
    a.d = 32;
    a.layers = 2;
    a.heads = 2;
    a.tau = 4;
    a.seq = 32;
    a.batch = 8;
    a.steps = 80;
    a.eval_every = 40;
    a.eval_windows = 4;
    a.final_eval_windows = 8;
    if (a.text_path.empty()) a.text_bytes = 60000;
  }
  return a;
}

/// JSON string literal (escapes quotes, backslashes and control characters).
std::string json_string(std::string_view s) {
  std::string out = "\"";
  for (const char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", c);
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

std::string json_number(double v) {
  if (!std::isfinite(v)) return "null";
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.6g", v);
  return buf;
}

/// Fails (naming the path) unless a file can be created at `path`: its directory exists and is writable, and the
/// path is not a directory. Checked before training so that a long run does not end with an unsaved model.
void check_writable(const std::string& path) {
  namespace fs = std::filesystem;
  const fs::path p(path);
  std::error_code ec;
  if (fs::is_directory(p, ec)) fail("--save '" + path + "' is a directory, not a file path");
  const fs::path dir = p.has_parent_path() ? p.parent_path() : fs::path(".");
  if (!fs::is_directory(dir, ec)) fail("--save '" + path + "': the directory '" + dir.string() + "' does not exist");
  // Writability: create and remove a probe file beside the target (the checkpoint itself is written atomically
  // through a temporary file in the same directory).
  const fs::path probe = dir / (".train_lm_write_probe_" + std::to_string(std::uint64_t(
                                                               std::chrono::steady_clock::now().time_since_epoch().count())));
  {
    std::ofstream f(probe, std::ios::binary);
    if (!f) fail("--save '" + path + "': the directory '" + dir.string() + "' is not writable");
  }
  fs::remove(probe, ec);
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

/// Times the parts of training steps in the steady state — after `warmup` untimed steps, which fault in the
/// optimiser state and the scratch buffers — and, inside forward and backward, one block, to show what dominates at
/// this size. A step is what the Trainer does: zero_grad, forward+loss and backward on each of the `accumulate`
/// micro-batches, then AdamW::step_fused (norm, clip, update and gradient zeroing; the update also refreshes the
/// tables' prefill copy, TrainerOptions::packed_tables).
template <class Model>
void profile(Model& model, const mf::TextDataset& data, const mf::TrainerOptions& options, std::ostream& out) {
  using Clock = std::chrono::steady_clock;
  auto params = model.parameters();
  mf::AdamW<float> opt(params, options.adamw);
  if (options.packed_tables) model.tables_changed();  // as the Trainer does: prefill reads a kept packed copy
  mf::TokenBatch batch;
  typename Model::Cache cache;
  const int warmup = 3, reps = 5;
  const Index micro = options.batch, parts = options.accumulate;
  double t_zero = 0, t_fwd = 0, t_bwd = 0, t_norm = 0, t_opt = 0;
  for (int r = 0; r < warmup + reps; ++r) {
    mf::Rng rng = mf::Rng::stream(options.data_seed, std::uint64_t(r));
    data.sample_train(batch, micro * parts, options.seq, rng);
    auto t = Clock::now();
    model.zero_grad();
    const double z = seconds_since(t);
    double f = 0, b = 0;
    for (Index part = 0; part < parts; ++part) {
      const auto first = std::size_t(part * micro * options.seq), count = std::size_t(micro * options.seq);
      t = Clock::now();
      model.forward_loss(std::span<const std::int32_t>(batch.inputs).subspan(first, count),
                         std::span<const std::int32_t>(batch.targets).subspan(first, count), micro, options.seq,
                         cache);
      f += seconds_since(t);
      t = Clock::now();
      model.backward(cache, 1.0f / float(parts));
      b += seconds_since(t);
    }
    // The norm pass alone (read-only), for the breakdown: step_fused runs it again.
    t = Clock::now();
    (void)mf::global_grad_norm(params);
    const double nm = seconds_since(t);
    t = Clock::now();
    opt.step_fused(1e-3, options.clip_norm);
    if (options.packed_tables) model.keep_tables_packed();
    const double o = seconds_since(t);
    if (r < warmup) continue;
    t_zero += z / reps;
    t_fwd += f / reps;
    t_bwd += b / reps;
    t_norm += nm / reps;
    t_opt += o / reps;
  }
  // One block alone on the same activations (the last micro-batch's).
  const Index n = micro * options.seq;
  auto& block = model.block(0);
  typename Model::BlockType::Cache bc;
  mf::Matrix<float> y(n, model.d()), dx(n, model.d());
  const mf::Matrix<float>& x = cache.x[0];
  mf::Matrix<float> dy = mf::Matrix<float>::Constant(n, model.d(), 1e-3f);
  double t_block_f = 0, t_block_b = 0;
  for (int r = -1; r < reps; ++r) {  // r = -1 fills the new cache untimed; each backward starts from zero_grad
    model.zero_grad();
    auto t = Clock::now();
    block.forward(y, x, micro, options.seq, bc);
    const double f = seconds_since(t);
    t = Clock::now();
    block.backward(dx, x, dy, bc);
    const double b = seconds_since(t);
    if (r < 0) continue;
    t_block_f += f / reps;
    t_block_b += b / reps;
  }
  model.zero_grad();
  const double total = t_zero + t_fwd + t_bwd + t_opt;
  const Index tokens = n * parts;
  char buf[1024];
  std::snprintf(buf, sizeof(buf),
                "profile (steady state: %d warm-up steps untimed, then the mean of %d steps; %ld tokens per step = "
                "%ld micro-batch(es) x %ld sequences x %ld tokens):\n"
                "  zero_grad      %8.1f ms  (%4.1f%%)\n"
                "  forward+loss   %8.1f ms  (%4.1f%%)   one block forward  %7.1f ms (x %ld blocks x %ld)\n"
                "  backward       %8.1f ms  (%4.1f%%)   one block backward %7.1f ms (x %ld blocks x %ld)\n"
                "  optimizer      %8.1f ms  (%4.1f%%)   norm, clip, AdamW, gradient zeroing, packed copy "
                "(step_fused); its\n"
                "                                          norm pass alone: %.1f ms\n"
                "  total          %8.1f ms  -> %.0f tokens/s\n",
                warmup, reps, long(tokens), long(parts), long(micro), long(options.seq), t_zero * 1e3,
                100 * t_zero / total, t_fwd * 1e3, 100 * t_fwd / total, t_block_f * 1e3, long(model.layers()),
                long(parts), t_bwd * 1e3, 100 * t_bwd / total, t_block_b * 1e3, long(model.layers()), long(parts),
                t_opt * 1e3, 100 * t_opt / total, t_norm * 1e3, total * 1e3, double(tokens) / total);
  out << buf;
}

template <class Model>
int train(const Args& a, typename Model::Config config, const std::string& text, const std::string& text_name,
          mf::Communicator& comm) {
  const mf::TextDataset data(text, a.val_fraction);

  mf::TrainerOptions o;
  o.steps = a.steps;
  o.batch = a.batch;
  o.accumulate = a.accumulate;
  o.seq = a.seq;
  o.lr = a.lr ? *a.lr : (a.model == "memoryformer" ? 3e-3 : 1e-3);
  o.lr_min_ratio = a.min_lr_ratio;
  o.warmup_ratio = a.warmup_ratio;
  o.clip_norm = a.clip;
  o.adamw.weight_decay = a.weight_decay;
  o.adamw.lr_multipliers.table = a.table_lr_mult;
  o.adamw.sparse_update = a.sparse_update == "row" ? mf::SparseUpdate::RowSparse : mf::SparseUpdate::Dense;
  o.adamw.moments = a.bf16_moments ? mf::MomentStorage::BFloat16 : mf::MomentStorage::Native;
  o.eval_every = a.eval_every;
  o.eval_windows = a.eval_windows;
  o.data_seed = a.data_seed;
  if (!a.save.empty()) {
    o.checkpoint_path = a.save;
    o.checkpoint_every = a.save_every;
  }
  // Before the sizes are printed or used (--profile runs the steps without a Trainer), and before the model's
  // tables are allocated and initialised, which takes seconds at the default size.
  o.validate();
  const mf::TableSharding sharding = a.table_parallel ? mf::TableSharding{&comm} : mf::TableSharding{};
  Model model(config, a.seed, sharding);
  model.set_deterministic_threads(!a.eigen_threads);

  const double unigram_bits = mf::unigram_entropy_bits(data.tokens());
  const double flops_per_token =
      a.model == "memoryformer"
          ? mf::memoryformer_model_flops_paper(double(a.layers), double(a.seq), double(a.d), a.tau) / double(a.seq)
          : mf::transformer_model_flops_paper(double(a.layers), double(a.seq), double(a.d)) / double(a.seq);
  const double table_bytes = double(model.num_table_parameters()) * double(sizeof(float));
  std::ostream& log = std::cerr;
  const bool chatty = !a.quiet && comm.rank() == 0;  // rank 0 alone speaks
  const std::string parallel = comm.size() == 1 ? "none" : (a.table_parallel ? "table" : "data");
  if (chatty) {
    char buf[512];
    std::snprintf(buf, sizeof(buf),
                  "%s: d=%ld layers=%ld heads=%ld%s, %ld parameters (%.1f MB of tables)%s, %.3g FLOPs/token (paper "
                  "convention)\ntext: %s, %zu bytes (%zu train / %zu validation), unigram entropy %.3f bits/byte\n"
                  "training: %ld steps x %ld sequences x %ld tokens, lr %.2g, %s table updates%s",
                  a.model.c_str(), long(a.d), long(a.layers), long(a.heads),
                  a.model == "memoryformer" ? (" tau=" + std::to_string(a.tau)).c_str() : "",
                  long(model.num_parameters()), table_bytes / 1e6, a.table_parallel ? " on each rank" : "",
                  flops_per_token, text_name.c_str(), text.size(),
                  data.train().size(), data.validation().size(), unigram_bits, long(a.steps),
                  long(a.batch * a.accumulate), long(a.seq), o.lr, a.sparse_update == "row" ? "row-sparse" : "dense",
                  a.accumulate > 1 ? (", " + std::to_string(a.accumulate) + " micro-batches of " +
                                      std::to_string(a.batch) + " per step").c_str()
                                   : "");
    log << buf;
#if defined(_OPENMP)
    log << ", " << omp_get_max_threads() << " OpenMP thread(s)";
#else
    log << ", 1 thread (built without OpenMP)";
#endif
    if (comm.size() > 1)
      log << "\n" << comm.size() << " ranks, " << parallel << "-parallel: each rank takes "
          << a.batch / comm.size() << " of every micro-batch's " << a.batch << " sequences";
    log << "\n";
  }

  if (a.profile) {
    if (comm.size() > 1) throw std::invalid_argument("--profile runs on one rank (without mpirun)");
    profile(model, data, o, std::cout);
    return 0;
  }

  mf::Trainer<Model> trainer(model, data, o, comm);
  if (!a.resume.empty()) {
    const Index step = trainer.resume(a.resume);
    if (chatty) log << "resumed from '" << a.resume << "' at step " << step << "\n";
  }
  const mf::EvalInfo initial = trainer.evaluate();
  if (chatty) mf::EvalPrinter(log, false)(initial);
  if (chatty) {
    trainer.on_step(mf::ProgressBar(log, 24, a.smoke ? 10 : 1));
    trainer.on_eval(mf::EvalPrinter(log));
    if (!a.save.empty())
      trainer.on_checkpoint([](const std::filesystem::path& p, Index step) {
        std::cerr << "\nsaved '" << p.string() << "' at step " << step << "\n";
      });
  }
  if (a.max_seconds > 0) trainer.on_step(mf::TimeBudget<mf::Trainer<Model>>(trainer, a.max_seconds));
  const mf::TrainResult result = trainer.run();
  const mf::EvalInfo final_eval = trainer.evaluate(a.final_eval_windows);
  if (chatty) {
    char buf[256];
    std::snprintf(buf, sizeof(buf),
                  "final: %ld steps in %s, %.0f tokens/s; train loss %.4f; validation %.4f nats = %.4f bits/byte "
                  "(%ld tokens; unigram entropy %.4f bits/byte)%s\n",
                  long(result.steps), mf::format_duration(result.seconds).c_str(), result.tokens_per_second,
                  result.train_loss, final_eval.loss, final_eval.bits_per_byte, long(final_eval.tokens), unigram_bits,
                  result.stopped_early ? " [stopped by --max-seconds]" : "");
    log << buf;
  }

  if (a.smoke && !a.save.empty()) {
    // The checkpoint written at the end must resume to the same step count.
    Model copy(config, a.seed + 1, sharding);
    mf::Trainer<Model> again(copy, data, o, comm);
    if (again.resume(a.save) != result.steps) throw std::runtime_error("smoke: resume gave another step count");
    if (chatty) log << "smoke: checkpoint '" << a.save << "' resumes at step " << result.steps << "\n";
  }

  if (a.json && comm.rank() == 0) {
    int threads = 1;
#if defined(_OPENMP)
    threads = omp_get_max_threads();
#endif
    std::ostringstream js;
    js << "{\"model\": " << json_string(a.model) << ", \"steps\": " << result.steps
       << ", \"train_loss\": " << json_number(result.train_loss) << ", \"val_loss\": " << json_number(final_eval.loss)
       << ", \"val_bits_per_byte\": " << json_number(final_eval.bits_per_byte)
       << ", \"initial_val_loss\": " << json_number(initial.loss)
       << ", \"unigram_bits_per_byte\": " << json_number(unigram_bits)
       << ", \"tokens_per_second\": " << json_number(result.tokens_per_second)
       << ", \"train_seconds\": " << json_number(result.seconds)
       << ", \"flops_per_token\": " << json_number(flops_per_token)
       << ", \"flops_convention\": \"paper: multiply-adds of the blocks incl. attention at seq, embedding and head "
          "excluded, forward\""
       << ", \"parameters\": " << model.num_parameters() << ", \"table_bytes\": " << json_number(table_bytes)
       << ", \"d\": " << a.d << ", \"layers\": " << a.layers << ", \"heads\": " << a.heads;
    if (a.model == "memoryformer") js << ", \"tau\": " << a.tau << ", \"expand_bits\": " << a.expand_bits;
    js << ", \"seq\": " << a.seq << ", \"batch\": " << a.batch << ", \"accumulate\": " << a.accumulate
       << ", \"sequences_per_step\": " << a.batch * a.accumulate
       << ", \"bf16_moments\": " << (a.bf16_moments ? "true" : "false") << ", \"lr\": " << json_number(o.lr)
       << ", \"val_tokens\": " << final_eval.tokens << ", \"text\": " << json_string(text_name)
       << ", \"text_bytes\": " << text.size() << ", \"threads\": " << threads
       << ", \"eigen_threads\": " << (a.eigen_threads ? "true" : "false")
       << ", \"stopped_early\": " << (result.stopped_early ? "true" : "false") << ", \"ranks\": " << comm.size()
       << ", \"parallel\": " << json_string(parallel) << "}";
    std::cout << js.str() << std::endl;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
#if defined(MEMORYFORMER_USE_MPI)
  const memoryformer_examples::MpiEnvironment mpi(argc, argv);
  // With several ranks this ends the whole job: the other ranks may be waiting for this one in an exchange.
  auto failed = [&](const std::string& message) { return mpi.fail("train_lm", message); };
#else
  auto failed = [](const std::string& message) {
    std::cerr << "\ntrain_lm: " << message << "\n";
    return 1;
  };
#endif
  std::string request = "parsing the arguments";  // what was being built when memory ran out
  try {
#if defined(MEMORYFORMER_USE_MPI)
    mf::MpiCommunicator comm;
#else
    mf::SelfCommunicator comm;
#endif
    Args a = parse(argc, argv);
    if (!a.write_default_text.empty()) {
      const std::string text = memoryformer_examples::default_text(a.text_bytes);
      // A file is replaced atomically; a target that exists and is not a regular file (a symlink, /dev/stdout, a
      // pipe) is written through, as a plain stream would.
      std::error_code ec;
      const std::filesystem::file_status target = std::filesystem::symlink_status(a.write_default_text, ec);
      if (std::filesystem::exists(target) && !std::filesystem::is_regular_file(target)) {
        std::ofstream out(a.write_default_text, std::ios::binary);
        out.write(text.data(), std::streamsize(text.size()));
        out.close();  // the flush can fail too (a full device)
        // A failed write is a runtime error (status 1), like the atomic write's, not a usage error (status 2).
        if (!out) throw mf::IoError("cannot write '" + a.write_default_text + "'");
      } else {
        mf::write_file_atomically(a.write_default_text, text);
      }
      std::cerr << "wrote " << text.size() << " bytes of the built-in text to '" << a.write_default_text << "'\n";
      return 0;
    }
#if defined(_OPENMP)
    if (a.threads > 0) omp_set_num_threads(a.threads);
#else
    if (a.threads > 1) std::cerr << "train_lm: built without OpenMP, --threads " << a.threads << " is ignored\n";
#endif
    std::string text, text_name;
    if (a.text_path.empty()) {
      text = memoryformer_examples::default_text(a.text_bytes);
      text_name = "built-in (The Valley Chronicle)";
    } else {
      request = "reading --text '" + a.text_path + "'";
      text = mf::read_text_file(a.text_path);
      text_name = a.text_path;
    }
    if (a.smoke && a.save.empty()) a.save = "train_lm_smoke.ckpt";
    if (!a.save.empty()) check_writable(a.save);
    request = "building a " + a.model + " model of d = " + std::to_string(a.d) + ", " + std::to_string(a.layers) +
              " layers, tau = " + std::to_string(a.tau) + " and its training data (batch = " +
              std::to_string(a.batch) + " × seq = " + std::to_string(a.seq) + " tokens, " + std::to_string(text.size()) +
              " bytes of text)";
    if (a.model == "memoryformer") {
      mf::MemoryFormerLM<float>::Config c;
      c.vocab = mf::byte_vocab;
      c.layers = a.layers;
      c.block.d = a.d;
      c.block.heads = a.heads;
      c.block.tau = a.tau;
      c.block.expand_bits = a.expand_bits;
      return train<mf::MemoryFormerLM<float>>(a, c, text, text_name, comm);
    }
    mf::TransformerLM<float>::Config c;
    c.vocab = mf::byte_vocab;
    c.layers = a.layers;
    c.block.d = a.d;
    c.block.heads = a.heads;
    return train<mf::TransformerLM<float>>(a, c, text, text_name, comm);
  } catch (const std::bad_alloc&) {
    return failed("out of memory while " + request + "; ask for less");
  } catch (const std::exception& e) {
    return failed(e.what());
  }
}
