// SPDX-License-Identifier: MIT
// Tests of LanguageModel (model.hpp): finite-difference gradients through the whole model (MemoryFormer and dense
// baseline), causality, the loss against a hand-written cross-entropy, KV-cache decoding, thread-count independence,
// and model checkpoints (bitwise round trip, optimizer state, config mismatch, corrupt files).

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <unistd.h>

#include <memoryformer/io/model_checkpoint.hpp>
#include <memoryformer/model.hpp>
#include <memoryformer/optim/adamw.hpp>
#include <memoryformer/testing/gradcheck.hpp>

#include "support/test_helpers.hpp"

#if defined(MEMORYFORMER_USE_OPENMP)
#include <omp.h>
#endif

namespace mf = memoryformer;
using mf::Index;

namespace {

using memoryformer::testing_support::random_tokens;

mf::MemoryFormerLM<double>::Config tiny_memoryformer_config() {
  mf::MemoryFormerLM<double>::Config c;
  c.vocab = 11;
  c.layers = 2;
  c.block.d = 8;
  c.block.heads = 2;
  c.block.rotary_dims = 2;
  c.block.tau = 4;
  c.block.expand_bits = 1;
  c.head_bias = true;
  return c;
}

mf::TransformerLM<double>::Config tiny_transformer_config() {
  mf::TransformerLM<double>::Config c;
  c.vocab = 11;
  c.layers = 2;
  c.block.d = 8;
  c.block.heads = 2;
  c.block.rotary_dims = 2;
  c.block.ffn_hidden = 12;
  return c;
}

/// Every bucket code of every Memory Layer in the cache (Q/K/V share one hash per block).
template <class Cache>
std::vector<std::int32_t> all_codes(const Cache& cache) {
  std::vector<std::int32_t> codes;
  if constexpr (requires { cache.blocks[0].hash.codes; }) {
    for (const auto& b : cache.blocks) {
      codes.insert(codes.end(), b.hash.codes.begin(), b.hash.codes.end());
      codes.insert(codes.end(), b.memory.hash1.codes.begin(), b.memory.hash1.codes.end());
      codes.insert(codes.end(), b.memory.hash2.codes.begin(), b.memory.hash2.codes.end());
    }
  }
  return codes;
}

/// Central differences of the mean loss against the analytic gradient of every parameter tensor.
template <class Model>
void check_model_gradient(Model& model, mf::GradCheckOptions options = {}) {
  const Index batch = 2, seq = 5;  // seq odd and not a multiple of anything in the model
  const auto tokens = random_tokens(batch * seq, model.vocab(), 7);
  const auto targets = random_tokens(batch * seq, model.vocab(), 8);
  typename Model::Cache cache;
  model.zero_grad();
  model.forward_loss(tokens, targets, batch, seq, cache);
  model.backward(cache);
  auto loss = [&] { return double(model.forward_loss(tokens, targets, batch, seq, cache)); };
  auto codes = [&] { return all_codes(cache); };
  Index checked = 0;
  for (const auto& p : model.parameters()) {
    std::vector<double> analytic(p.grad.begin(), p.grad.end());
    const auto r = mf::check_gradient(p.value, analytic, loss, codes, options);
    EXPECT_LE(r.relative_error, 1e-6) << p.name << ": max abs error " << r.max_abs_error << " at " << r.worst_index;
    EXPECT_GT(r.checked, 0) << p.name;
    checked += r.checked;
    double norm = 0;
    for (double g : analytic) norm += g * g;
    // Every tensor must actually receive gradient, or the check above proves nothing for it.
    EXPECT_GT(norm, 0.0) << p.name << " has an all-zero gradient";
  }
  EXPECT_GT(checked, 1000);
}

std::vector<float> flat_parameters(std::vector<mf::ParameterView<float>> params) {
  std::vector<float> out;
  for (const auto& p : params) out.insert(out.end(), p.value.begin(), p.value.end());
  return out;
}

mf::MemoryFormerLM<float>::Config small_float_config() {
  mf::MemoryFormerLM<float>::Config c;
  c.vocab = 256;
  c.layers = 2;
  c.block.d = 16;
  c.block.heads = 2;
  c.block.tau = 4;
  return c;
}

std::filesystem::path model_temp_path(const std::string& name) {
  return std::filesystem::temp_directory_path() /
         ("memoryformer_model_test_" + std::to_string(::getpid()) + "_" + name);
}

std::vector<char> read_all(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::vector<char>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void write_all(const std::filesystem::path& p, const std::vector<char>& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
}

}  // namespace

TEST(LanguageModel, MemoryFormerGradientMatchesFiniteDifferences) {
  mf::MemoryFormerLM<double> model(tiny_memoryformer_config(), 3);
  check_model_gradient(model);
}

TEST(LanguageModel, TransformerGradientMatchesFiniteDifferences) {
  mf::TransformerLM<double> model(tiny_transformer_config(), 3);
  // Default init biases are 0 and LayerNorm shifts 0: perturb every parameter so no gradient path is degenerate,
  // and enough that attention is far from uniform (else the Q/K gradients are ~1e-4 and drown in rounding noise).
  mf::Rng rng(5);
  for (auto& p : model.parameters())
    for (auto& v : p.value) v += 0.3 * rng.normal();
  // The dense model is smooth everywhere: a larger step cuts the loss's rounding noise (~1e-16/eps) tenfold.
  mf::GradCheckOptions options;
  options.eps = 1e-5;
  check_model_gradient(model, options);
}

TEST(LanguageModel, LossIsTheMeanCrossEntropyOfTheLogits) {
  mf::MemoryFormerLM<double> model(tiny_memoryformer_config(), 4);
  const Index batch = 3, seq = 4;
  const auto tokens = random_tokens(batch * seq, 11, 1);
  const auto targets = random_tokens(batch * seq, 11, 2);
  mf::MemoryFormerLM<double>::Cache cache;
  const double loss = model.forward_loss(tokens, targets, batch, seq, cache);
  const mf::Matrix<double>& logits = cache.logits;
  ASSERT_EQ(logits.rows(), batch * seq);
  ASSERT_EQ(logits.cols(), 11);
  double expected = 0.0;
  for (Index r = 0; r < logits.rows(); ++r) {
    double sum = 0.0;
    for (Index v = 0; v < logits.cols(); ++v) sum += std::exp(logits(r, v));
    expected += std::log(sum) - logits(r, targets[std::size_t(r)]);
  }
  expected /= double(logits.rows());
  EXPECT_NEAR(loss, expected, 1e-12);
  // An untrained model is close to uniform over the vocabulary.
  EXPECT_NEAR(loss, std::log(11.0), 0.5);
}

TEST(LanguageModel, IsCausalAndSequencesAreIndependent) {
  mf::MemoryFormerLM<double> model(tiny_memoryformer_config(), 5);
  const Index batch = 2, seq = 6;
  auto tokens = random_tokens(batch * seq, 11, 3);
  mf::MemoryFormerLM<double>::Cache cache;
  const mf::Matrix<double> before = model.forward(tokens, batch, seq, cache);
  const Index changed = 3;  // position 3 of sequence 0
  tokens[std::size_t(changed)] = (tokens[std::size_t(changed)] + 1) % 11;
  const mf::Matrix<double> after = model.forward(tokens, batch, seq, cache);
  for (Index r = 0; r < batch * seq; ++r) {
    const bool may_change = r >= changed && r < seq;  // later positions of the same sequence
    if (!may_change) {
      EXPECT_EQ(before.row(r), after.row(r)) << "row " << r;
    } else {
      EXPECT_NE(before.row(r), after.row(r)) << "row " << r;
    }
  }
}

TEST(LanguageModel, DecodeMatchesFullForward) {
  mf::MemoryFormerLM<double> model(tiny_memoryformer_config(), 6);
  const Index batch = 2, seq = 7;
  const auto tokens = random_tokens(batch * seq, 11, 4);
  mf::MemoryFormerLM<double>::Cache cache;
  const mf::Matrix<double> full = model.forward(tokens, batch, seq, cache);
  auto state = model.make_decode_state(batch, seq);
  // A prompt of 3 tokens per sequence in one call, then one token at a time.
  const Index prompt = 3;
  std::vector<std::int32_t> first;
  for (Index b = 0; b < batch; ++b)
    for (Index t = 0; t < prompt; ++t) first.push_back(tokens[std::size_t(b * seq + t)]);
  mf::Matrix<double> logits(batch * prompt, 11);
  model.forward_decode(logits, first, state);
  for (Index b = 0; b < batch; ++b)
    for (Index t = 0; t < prompt; ++t)
      for (Index v = 0; v < 11; ++v) EXPECT_NEAR(logits(b * prompt + t, v), full(b * seq + t, v), 1e-10);
  mf::Matrix<double> one(batch, 11);
  for (Index t = prompt; t < seq; ++t) {
    std::vector<std::int32_t> next;
    for (Index b = 0; b < batch; ++b) next.push_back(tokens[std::size_t(b * seq + t)]);
    model.forward_decode(one, next, state);
    for (Index b = 0; b < batch; ++b)
      for (Index v = 0; v < 11; ++v) EXPECT_NEAR(one(b, v), full(b * seq + t, v), 1e-10) << "t " << t;
  }
  EXPECT_EQ(state.length(), seq);
  std::vector<std::int32_t> more(std::size_t(batch), 0);
  EXPECT_THROW(model.forward_decode(one, more, state), mf::CapacityError);
  // A state whose later caches differ from the first (shorter, or another batch) is refused before any cache
  // changes: no block appends the tokens and then sees a later block refuse them.
  for (const auto& replacement : {mf::KVCache<double>(batch, 1, model.d()), mf::KVCache<double>(1, seq, model.d())}) {
    auto mixed = model.make_decode_state(batch, seq);
    mixed.kv.back() = replacement;
    EXPECT_THROW(model.forward_decode(one, more, mixed), mf::StateError);
    EXPECT_EQ(mixed.kv.front().length(), 0);
  }
}

TEST(LanguageModel, TransformerDecodeMatchesFullForward) {
  mf::TransformerLM<double> model(tiny_transformer_config(), 6);
  const Index batch = 1, seq = 5;
  const auto tokens = random_tokens(seq, 11, 9);
  mf::TransformerLM<double>::Cache cache;
  const mf::Matrix<double> full = model.forward(tokens, batch, seq, cache);
  auto state = model.make_decode_state(batch, seq);
  mf::Matrix<double> one(1, 11);
  for (Index t = 0; t < seq; ++t) {
    model.forward_decode(one, std::span<const std::int32_t>(tokens).subspan(std::size_t(t), 1), state);
    for (Index v = 0; v < 11; ++v) EXPECT_NEAR(one(0, v), full(t, v), 1e-10);
  }
}

TEST(LanguageModel, DecodeWithBf16CachesIsCloseToFloatCaches) {
  mf::MemoryFormerLM<float> model(tiny_memoryformer_config(), 6);
  const Index batch = 2, seq = 6;
  const auto tokens = random_tokens(batch * seq, 11, 4);
  auto f32 = model.make_decode_state(batch, seq);
  auto bf16 = model.make_decode_state(batch, seq, mf::StorageType::BF16);
  for (const auto& kv : bf16.kv) EXPECT_EQ(kv.storage(), mf::StorageType::BF16);
  mf::Matrix<float> a(batch, 11), b(batch, 11);
  double largest_difference = 0.0;
  for (Index t = 0; t < seq; ++t) {
    std::vector<std::int32_t> next;
    for (Index s = 0; s < batch; ++s) next.push_back(tokens[std::size_t(s * seq + t)]);
    model.forward_decode(a, next, f32);
    model.forward_decode(b, next, bf16);
    largest_difference = std::max(largest_difference, double((a - b).cwiseAbs().maxCoeff()));
    // Keys and values rounded to 8 significant bits: logits move by a small fraction of their spread.
    EXPECT_LE((a - b).cwiseAbs().maxCoeff(), 2e-2f * a.cwiseAbs().maxCoeff()) << "t " << t;
  }
  EXPECT_GT(largest_difference, 0.0) << "the bf16 caches decoded exactly like the float ones";
  mf::MemoryFormerLM<double> wide(tiny_memoryformer_config(), 6);
  EXPECT_THROW(wide.make_decode_state(1, 4, mf::StorageType::BF16), mf::ConfigError);
}

TEST(LanguageModel, RejectsBadArguments) {
  mf::MemoryFormerLM<double> model(tiny_memoryformer_config(), 1);
  mf::MemoryFormerLM<double>::Cache cache;
  const auto tokens = random_tokens(6, 11, 1);
  EXPECT_THROW(model.forward(tokens, 2, 4, cache), mf::ShapeError);
  EXPECT_THROW(model.forward(tokens, 0, 6, cache), mf::ConfigError);
  EXPECT_THROW(model.backward(cache), mf::StateError);
  model.forward(tokens, 2, 3, cache);
  EXPECT_THROW(model.backward(cache), mf::StateError);  // forward without a loss
  auto bad = tokens;
  bad[2] = 11;
  EXPECT_THROW(model.forward(bad, 2, 3, cache), std::invalid_argument);
  EXPECT_THROW(model.forward_loss(tokens, bad, 2, 3, cache), std::invalid_argument);
  auto config = tiny_memoryformer_config();
  config.layers = 0;
  EXPECT_THROW(mf::MemoryFormerLM<double>(config, 1), mf::ConfigError);
  config = tiny_memoryformer_config();
  config.block.d = 10;  // not a multiple of tau = 4
  EXPECT_THROW(mf::MemoryFormerLM<double>(config, 1), mf::ConfigError);
}

TEST(LanguageModel, ParameterCountsAndNames) {
  mf::MemoryFormerLM<double> model(tiny_memoryformer_config(), 1);
  Index total = 0, tables = 0;
  for (const auto& p : model.parameters()) {
    total += Index(p.value.size());
    if (p.kind == mf::ParameterKind::Table) tables += Index(p.value.size());
  }
  EXPECT_EQ(model.num_parameters(), total);
  EXPECT_EQ(model.num_table_parameters(), tables);
  // Q, K, V: 2 tables of 16 rows × 8; ML1: 2 × 16 × 10; ML2: 2 tables of 32 rows × 8; per block, 2 blocks.
  EXPECT_EQ(tables, 2 * (3 * 2 * 16 * 8 + 2 * 16 * 10 + 2 * 32 * 8));
  const auto params = model.parameters();
  EXPECT_EQ(params.front().name, "embedding.weight");
  EXPECT_EQ(params.back().name, "head.bias");
  mf::TransformerLM<double> dense(tiny_transformer_config(), 1);
  EXPECT_EQ(dense.num_table_parameters(), 0);
}

TEST(LanguageModel, ResultsDoNotDependOnThreadCount) {
#if !defined(MEMORYFORMER_USE_OPENMP)
  GTEST_SKIP() << "built without MEMORYFORMER_USE_OPENMP: one thread only";
#else
  auto run = [](int threads) {
    omp_set_num_threads(threads);
    mf::MemoryFormerLM<float> model(small_float_config(), 2);
    const Index batch = 4, seq = 33;
    const auto tokens = random_tokens(batch * seq, 256, 1);
    const auto targets = random_tokens(batch * seq, 256, 2);
    mf::MemoryFormerLM<float>::Cache cache;
    model.forward_loss(tokens, targets, batch, seq, cache);
    model.backward(cache);
    std::vector<float> out(cache.logits.data(), cache.logits.data() + cache.logits.size());
    for (const auto& p : model.parameters()) out.insert(out.end(), p.grad.begin(), p.grad.end());
    return out;
  };
  const int saved = omp_get_max_threads();
  const auto one = run(1);
  const auto two = run(2);
  const auto three = run(3);
  omp_set_num_threads(saved);
  ASSERT_EQ(one.size(), two.size());
  EXPECT_EQ(0, std::memcmp(one.data(), two.data(), one.size() * sizeof(float)));
  EXPECT_EQ(0, std::memcmp(one.data(), three.data(), one.size() * sizeof(float)));
#endif
}

TEST(ModelCheckpoint, ConfigEntriesRoundTrip) {
  mf::MemoryFormerLM<double> model(tiny_memoryformer_config(), 1);
  const auto config = mf::MemoryFormerLM<double>::config_from_entries(model.config_entries());
  mf::MemoryFormerLM<double> rebuilt(config, 2);
  EXPECT_EQ(rebuilt.config_entries(), model.config_entries());
  EXPECT_EQ(rebuilt.num_parameters(), model.num_parameters());
  EXPECT_THROW(mf::TransformerLM<double>::config_from_entries(model.config_entries()), mf::FormatError);
  auto entries = model.config_entries();
  entries.erase(entries.begin() + 3);
  EXPECT_THROW(mf::MemoryFormerLM<double>::config_from_entries(entries), mf::FormatError);
}

TEST(ModelCheckpoint, RoundTripGivesBitwiseIdenticalForward) {
  const auto path = model_temp_path("roundtrip.ckpt");
  mf::MemoryFormerLM<float> a(small_float_config(), 11);
  mf::MemoryFormerLM<float> b(small_float_config(), 12);  // other seed: different parameters
  mf::save_model(path, a);
  EXPECT_NE(flat_parameters(a.parameters()), flat_parameters(b.parameters()));
  const auto config = mf::load_model(path, b);
  EXPECT_EQ(flat_parameters(a.parameters()), flat_parameters(b.parameters()));
  const auto tokens = random_tokens(2 * 9, 256, 3);
  mf::MemoryFormerLM<float>::Cache ca, cb;
  const mf::Matrix<float> la = a.forward(tokens, 2, 9, ca);
  const mf::Matrix<float> lb = b.forward(tokens, 2, 9, cb);
  ASSERT_EQ(la.size(), lb.size());
  EXPECT_EQ(0, std::memcmp(la.data(), lb.data(), std::size_t(la.size()) * sizeof(float)));
  bool found = false;
  for (const auto& [k, v] : config) found = found || (k == "model.kind" && v == "memoryformer");
  EXPECT_TRUE(found);
  std::filesystem::remove(path);
}

TEST(ModelCheckpoint, OptimizerStateRoundTripGivesTheSameNextStep) {
  const auto path = model_temp_path("optimizer.ckpt");
  const Index batch = 2, seq = 8;
  auto train_step = [&](mf::MemoryFormerLM<float>& m, mf::AdamW<float>& opt, std::uint64_t data) {
    mf::MemoryFormerLM<float>::Cache cache;
    m.zero_grad();
    m.forward_loss(random_tokens(batch * seq, 256, data), random_tokens(batch * seq, 256, data + 1000), batch, seq,
                   cache);
    m.backward(cache);
    opt.step(1e-2);
  };
  mf::AdamWOptions options;
  options.sparse_update = mf::SparseUpdate::RowSparse;
  mf::MemoryFormerLM<float> a(small_float_config(), 1);
  mf::AdamW<float> opt_a(a.parameters(), options);
  for (std::uint64_t s = 0; s < 3; ++s) train_step(a, opt_a, s);
  mf::save_model(path, a, &opt_a, {{"note", "three steps"}});

  mf::MemoryFormerLM<float> b(small_float_config(), 2);
  mf::AdamW<float> opt_b(b.parameters(), options);
  const auto config = mf::load_model(path, b, &opt_b);
  EXPECT_EQ(opt_b.steps(), 3u);
  train_step(a, opt_a, 3);
  train_step(b, opt_b, 3);
  EXPECT_EQ(flat_parameters(a.parameters()), flat_parameters(b.parameters()));

  // A checkpoint saved without optimizer state cannot restore one.
  mf::save_model(path, a);
  mf::AdamW<float> opt_c(b.parameters(), options);
  EXPECT_THROW(mf::load_model(path, b, &opt_c), mf::FormatError);
  std::filesystem::remove(path);
}

TEST(ModelCheckpoint, RejectsAMismatchingModel) {
  const auto path = model_temp_path("mismatch.ckpt");
  mf::MemoryFormerLM<float> a(small_float_config(), 1);
  mf::save_model(path, a);

  auto other = small_float_config();
  other.block.tau = 8;
  mf::MemoryFormerLM<float> wrong_tau(other, 1);
  const auto before = flat_parameters(wrong_tau.parameters());
  try {
    mf::load_model(path, wrong_tau);
    FAIL() << "loaded a tau = 4 checkpoint into a tau = 8 model";
  } catch (const mf::FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("block.tau=4"), std::string::npos) << e.what();
  }
  EXPECT_EQ(before, flat_parameters(wrong_tau.parameters()));  // all or nothing

  other = small_float_config();
  other.layers = 3;
  mf::MemoryFormerLM<float> deeper(other, 1);
  EXPECT_THROW(mf::load_model(path, deeper), mf::FormatError);

  mf::TransformerLM<float>::Config dense_config;
  dense_config.vocab = 256;
  dense_config.layers = 2;
  dense_config.block.d = 16;
  dense_config.block.heads = 2;
  mf::TransformerLM<float> dense(dense_config, 1);
  try {
    mf::load_model(path, dense);
    FAIL() << "loaded a MemoryFormer checkpoint into the dense model";
  } catch (const mf::FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("'memoryformer' model"), std::string::npos) << e.what();
  }

  mf::MemoryFormerLM<double>::Config double_config;
  double_config.layers = 2;
  double_config.block = small_float_config().block;
  mf::MemoryFormerLM<double> as_double(double_config, 1);
  EXPECT_THROW(mf::load_model(path, as_double), mf::FormatError);  // f32 file, f64 model
  std::filesystem::remove(path);
}

TEST(ModelCheckpoint, RejectsCorruptFilesCleanly) {
  const auto path = model_temp_path("corrupt.ckpt");
  const auto bad_path = model_temp_path("corrupt_variant.ckpt");
  auto config = small_float_config();
  config.layers = 1;
  mf::MemoryFormerLM<float> a(config, 1);
  mf::AdamW<float> opt(a.parameters());
  mf::save_model(path, a, &opt);
  const std::vector<char> good = read_all(path);
  ASSERT_GT(good.size(), 1000u);

  mf::MemoryFormerLM<float> b(config, 2);
  mf::AdamW<float> opt_b(b.parameters());
  const auto before = flat_parameters(b.parameters());
  int variants = 0;
  auto expect_rejected = [&](const std::vector<char>& bytes, const std::string& what) {
    write_all(bad_path, bytes);
    EXPECT_THROW(mf::load_model(bad_path, b, &opt_b), mf::FormatError) << what;
    ++variants;
  };
  // Truncations, including inside the header, the directory, the data and the trailing checksum.
  for (std::size_t len : {std::size_t(0), std::size_t(3), std::size_t(39), std::size_t(200), good.size() / 2,
                          good.size() - 9, good.size() - 1})
    expect_rejected(std::vector<char>(good.begin(), good.begin() + std::ptrdiff_t(len)), "truncated to " + std::to_string(len));
  // Single flipped bytes spread over the whole file.
  const std::size_t stride = good.size() / 150 + 1;
  for (std::size_t i = 0; i < good.size(); i += stride) {
    auto bytes = good;
    bytes[i] = char(bytes[i] ^ 0x5A);
    expect_rejected(bytes, "byte " + std::to_string(i) + " flipped");
  }
  // Wrong magic and an appended byte.
  auto bytes = good;
  bytes[0] = 'X';
  expect_rejected(bytes, "magic");
  bytes = good;
  bytes.push_back('\0');
  expect_rejected(bytes, "trailing byte");
  EXPECT_GT(variants, 150);
  EXPECT_EQ(before, flat_parameters(b.parameters()));  // nothing was loaded from any variant
  EXPECT_EQ(opt_b.steps(), 0u);
  std::filesystem::remove(path);
  std::filesystem::remove(bad_path);
}
