// SPDX-License-Identifier: MIT
// generate: loads a checkpoint written by train_lm (MemoryFormer or dense baseline) and samples text from it with
// the KV cache: the prompt in one decoding call, then one token at a time, with temperature, top-k and a seed.
//
//   generate --checkpoint FILE [--prompt TEXT] [--tokens N] [--temperature T] [--top-k K] [--seed S]
//            [--storage fp32|bf16|fp16|train] [--kv-cache fp32|bf16]
//
// A MemoryFormer model decodes through a FrozenLanguageModel whose tables are packed to --storage (bf16 by default);
// --storage train decodes through the training model's float32 tables instead, for comparison.

#include "common/arg_reader.hpp"
#include <algorithm>
#include <charconv>
#include <chrono>
#include <new>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <numeric>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <memoryformer/io/model_checkpoint.hpp>
#include <memoryformer/frozen_model.hpp>
#include <memoryformer/model.hpp>
#include <memoryformer/train/text_data.hpp>
#include <memoryformer/train/trainer.hpp>

#include "data/default_text.hpp"

namespace mf = memoryformer;
using mf::Index;

namespace {

struct Args {
  std::string checkpoint;
  std::string prompt = "CHAPTER";
  Index tokens = 400;
  double temperature = 0.8;
  Index top_k = 0;  // 0: no top-k filter
  std::uint64_t seed = 1;
  Index context = 0;  // 0: the training seq recorded in the checkpoint ("train.seq"), else unlimited
  bool smoke = false;
  std::string storage = "bf16";  // fp32, bf16, fp16 (frozen tables) or train (the training model)
  bool storage_given = false;
  std::string kv_cache = "bf16";  // keys and values of the KV cache: fp32 or bf16
};

const char* usage =
    "usage: generate --checkpoint FILE [options]\n"
    "  --checkpoint FILE  a checkpoint written by train_lm --save (either model kind)\n"
    "  --prompt TEXT      text to continue (default \"CHAPTER\")\n"
    "  --tokens N         bytes to generate (default 400)\n"
    "  --temperature T    softmax temperature; 0 = always the most likely byte (default 0.8)\n"
    "  --top-k K          sample only among the K most likely bytes, 0 = all (default 0)\n"
    "  --seed N           sampling seed, 0 to 2^64 - 1 (default 1)\n"
    "  --context N        tokens the model sees at once (default: the training seq stored in the checkpoint); when\n"
    "                     the KV cache is full, it restarts from the last N/2 tokens (rotary positions past the\n"
    "                     training length were never trained)\n"
    "  --storage S        tables to decode from: fp32, bf16 (default) or fp16 packed tables of a frozen model, or\n"
    "                     train (the training model's float32 tables); a dense model always uses its weights\n"
    "  --kv-cache S       keys and values cached as bf16 (default: half the bytes each new token reads) or fp32\n"
    "  --smoke            train a tiny model for a few seconds, save it, reload it and sample (what ctest runs)\n";

[[noreturn]] void fail(const std::string& msg) { memoryformer_examples::ArgReader(0, nullptr, "generate").fail(msg); }

Args parse(int argc, char** argv) {
  Args a;
  const memoryformer_examples::ArgReader args(argc, argv, "generate");
  auto value = [&](int& i) { return args.value(i); };
  auto number = [&](int& i) { return args.number(i, /*allow_negative=*/false); };
  // Counts are integers checked against their range: no double-to-integer conversion of an arbitrary value.
  auto count = [&](int& i) { return Index(args.integer(i, 0, Index(1) << 40)); };
  for (int i = 1; i < argc; ++i) {
    const std::string f = argv[i];
    if (f == "--help" || f == "-h") {
      std::cout << usage;
      std::exit(0);
    } else if (f == "--checkpoint") a.checkpoint = value(i);
    else if (f == "--prompt") a.prompt = value(i);
    else if (f == "--tokens") a.tokens = count(i);
    else if (f == "--temperature") a.temperature = number(i);
    else if (f == "--top-k") a.top_k = count(i);
    else if (f == "--seed") a.seed = args.seed(i);
    else if (f == "--context") a.context = count(i);
    else if (f == "--storage") {
      a.storage = value(i);
      a.storage_given = true;
    }
    else if (f == "--kv-cache") a.kv_cache = value(i);
    else if (f == "--smoke") a.smoke = true;
    else fail("unknown option '" + f + "'");
  }
  if (a.smoke) a.tokens = std::min<Index>(a.tokens, 120);
  if (a.checkpoint.empty() && !a.smoke) fail("--checkpoint is required");
  if (a.storage != "fp32" && a.storage != "bf16" && a.storage != "fp16" && a.storage != "train")
    fail("--storage is '" + a.storage + "', expected fp32, bf16, fp16 or train");
  if (a.kv_cache != "fp32" && a.kv_cache != "bf16") fail("--kv-cache is '" + a.kv_cache + "', expected fp32 or bf16");
  if (a.prompt.empty()) fail("--prompt must not be empty (the model needs at least one byte to continue)");
  return a;
}

/// Draws a byte from logits: softmax(logits / T) restricted to the top_k largest (all when 0); T = 0 is argmax.
int sample(const float* logits, Index vocab, double temperature, Index top_k, mf::Rng& rng) {
  std::vector<int> order(static_cast<std::size_t>(vocab));
  std::iota(order.begin(), order.end(), 0);
  // Ties broken by id, so a seed gives the same text everywhere.
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return logits[a] > logits[b]; });
  if (temperature == 0.0) return order[0];
  const std::size_t keep = top_k > 0 ? std::min<std::size_t>(std::size_t(top_k), order.size()) : order.size();
  std::vector<double> p(keep);
  const double top = logits[order[0]];
  double sum = 0;
  for (std::size_t i = 0; i < keep; ++i) sum += p[i] = std::exp((double(logits[order[i]]) - top) / temperature);
  double u = rng.uniform() * sum;
  for (std::size_t i = 0; i < keep; ++i) {
    u -= p[i];
    if (u < 0) return order[i];
  }
  return order[keep - 1];
}

/// Samples a.tokens bytes after the prompt from `model` (a LanguageModel or a FrozenLanguageModel).
template <class Decoder>
int sample_text(const Args& a, const Decoder& model, const mf::Checkpoint& ckpt, const std::string& origin);

template <class Model>
int generate(const Args& a, const mf::Checkpoint& ckpt, const std::string& origin) {
  Model model(Model::config_from_entries(ckpt.config, origin), 0);
  mf::load_model(ckpt, model, nullptr, origin);
  std::cerr << "generate: " << model.kind() << " model, d=" << model.d() << ", " << model.layers() << " layers, "
            << model.num_parameters() << " parameters, from " << origin << "\n";
  if constexpr (std::is_same_v<Model, mf::MemoryFormerLM<float>>) {
    if (a.storage != "train") {
      const mf::StorageType storage = a.storage == "fp32"   ? mf::StorageType::F32
                                      : a.storage == "fp16" ? mf::StorageType::F16
                                                            : mf::StorageType::BF16;
      const mf::FrozenLanguageModel frozen(model, storage);
      std::cerr << "generate: decoding through " << a.storage << " tables (" << frozen.table_bytes() / 1024
                << " KiB packed)\n";
      return sample_text(a, frozen, ckpt, origin);
    }
  } else if (a.storage_given && a.storage != "train") {
    throw std::runtime_error("--storage " + a.storage + ": a " + std::string(model.kind()) +
                             " model has no Memory Layer tables to pack; use --storage train (or leave it out)");
  }
  return sample_text(a, model, ckpt, origin);
}

template <class Decoder>
int sample_text(const Args& a, const Decoder& model, const mf::Checkpoint& ckpt, const std::string& origin) {
  Index context = a.context;
  if (context == 0) {
    const std::string* seq = ckpt.find_config("train.seq");
    if (seq != nullptr) {
      Index v = 0;
      const auto r = std::from_chars(seq->data(), seq->data() + seq->size(), v);
      if (seq->empty() || r.ec != std::errc() || r.ptr != seq->data() + seq->size() || v < 1)
        throw mf::FormatError(origin + ": config key 'train.seq' is '" + *seq +
                              "', expected a positive integer (or give --context)");
      context = v;
    } else {
      context = Index(a.prompt.size()) + a.tokens;
    }
  }
  context = std::max<Index>(context, 2);
  std::vector<std::int32_t> tokens = mf::encode_bytes(a.prompt);
  auto state = model.make_decode_state(1, context, a.kv_cache == "bf16" ? mf::StorageType::BF16 : mf::StorageType::F32);
  mf::Rng rng(a.seed);
  mf::Matrix<float> logits;
  // Feeds the last min(n, context) tokens of `tokens` into a fresh cache; returns the logits of the last one.
  auto restart = [&](Index n) {
    n = std::min<Index>({n, Index(tokens.size()), context});
    state.clear();
    logits.resize(n, model.vocab());
    model.forward_decode(logits, std::span<const std::int32_t>(tokens).last(std::size_t(n)), state);
    return logits.row(n - 1).data();
  };
  const auto t0 = std::chrono::steady_clock::now();
  int token = sample(restart(context), model.vocab(), a.temperature, a.top_k, rng);
  mf::Matrix<float> next(1, model.vocab());
  for (Index i = 0; i < a.tokens; ++i) {
    tokens.push_back(token);
    if (i + 1 == a.tokens) break;
    const float* row = nullptr;
    if (state.length() == context) {
      row = restart(context / 2);  // cache full: continue from the last half
    } else {
      const std::int32_t id = token;
      model.forward_decode(next, std::span<const std::int32_t>(&id, 1), state);
      row = next.data();
    }
    token = sample(row, model.vocab(), a.temperature, a.top_k, rng);
  }
  const std::string out = mf::decode_bytes(tokens);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::cout << out << std::endl;
  char buf[128];
  std::snprintf(buf, sizeof(buf), "generate: %ld bytes in %.2f s (%.0f bytes/s with the KV cache)\n", long(a.tokens),
                seconds, double(a.tokens) / std::max(seconds, 1e-9));
  std::cerr << buf;
  return 0;
}

/// --smoke: a tiny MemoryFormer trained for a moment on the built-in text, saved where ctest runs us.
std::string make_smoke_checkpoint() {
  const std::string path = "generate_smoke.ckpt";
  const mf::TextDataset data(memoryformer_examples::default_text(60000), 0.1);
  mf::MemoryFormerLM<float>::Config c;
  c.layers = 2;
  c.block.d = 32;
  c.block.heads = 2;
  c.block.tau = 4;
  mf::MemoryFormerLM<float> model(c, 1);
  mf::TrainerOptions o;
  o.steps = 150;
  o.batch = 8;
  o.seq = 32;
  o.lr = 1e-2;
  o.eval_every = 0;
  o.eval_windows = 4;
  o.checkpoint_path = path;
  mf::Trainer<mf::MemoryFormerLM<float>> trainer(model, data, o);
  const auto r = trainer.run();
  std::cerr << "generate --smoke: trained a tiny model for " << r.steps << " steps (validation loss "
            << r.validation.loss << " nats), saved '" << path << "'\n";
  return path;
}

}  // namespace

int main(int argc, char** argv) {
  std::string request = "parsing the arguments";  // what was being built when memory ran out
  try {
    Args a = parse(argc, argv);
    request = "loading the checkpoint '" + a.checkpoint + "' and building its model (--context " +
              std::to_string(a.context) + ", --tokens " + std::to_string(a.tokens) + ")";
    if (a.smoke && a.checkpoint.empty()) a.checkpoint = make_smoke_checkpoint();
    const mf::Checkpoint ckpt = mf::load_checkpoint(a.checkpoint);
    const std::string origin = "'" + a.checkpoint + "'";
    const std::string kind = mf::checkpoint_model_kind(ckpt, origin);
    if (kind == "memoryformer") return generate<mf::MemoryFormerLM<float>>(a, ckpt, origin);
    if (kind == "transformer") return generate<mf::TransformerLM<float>>(a, ckpt, origin);
    throw std::runtime_error(origin + " holds a '" + kind + "' model, which this example does not know");
  } catch (const std::bad_alloc&) {
    std::cerr << "generate: out of memory while " << request << "; ask for less\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "generate: " << e.what() << "\n";
    return 1;
  }
}
