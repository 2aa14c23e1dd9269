// SPDX-License-Identifier: MIT
// Tests of the training pieces: byte-level TextDataset, the Trainer's schedule, one Trainer step against a
// hand-computed AdamW update (dense, no-decay and row-sparse tables), a short run whose loss must fall, exact resume
// from a checkpoint, and the callbacks.

#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <numbers>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <memoryformer/io/model_checkpoint.hpp>
#include <memoryformer/model.hpp>
#include <memoryformer/train/callbacks.hpp>
#include <memoryformer/train/text_data.hpp>
#include <memoryformer/train/trainer.hpp>

namespace mf = memoryformer;
using mf::Index;

namespace {

/// A small text with structure a tiny model can learn in a few dozen steps.
std::string patterned_text(std::size_t bytes) {
  static const char* words[] = {"the cat sat on the mat. ", "a dog ran to the park. ", "we saw the red sun. ",
                                "she read a good book. ", "they ate the warm bread. "};
  std::string s;
  mf::Rng rng(42);
  while (s.size() < bytes) s += words[rng.uniform_index(5)];
  s.resize(bytes);
  return s;
}

mf::MemoryFormerLM<double>::Config tiny_double_lm_config() {
  mf::MemoryFormerLM<double>::Config c;
  c.layers = 1;
  c.block.d = 8;
  c.block.heads = 2;
  c.block.tau = 4;
  c.block.expand_bits = 1;
  return c;
}

mf::MemoryFormerLM<float>::Config small_lm_config() {
  mf::MemoryFormerLM<float>::Config c;
  c.layers = 2;
  c.block.d = 32;
  c.block.heads = 2;
  c.block.tau = 4;
  return c;
}

std::vector<float> flat_values(const std::vector<mf::ParameterView<float>>& params) {
  std::vector<float> out;
  for (const auto& p : params) out.insert(out.end(), p.value.begin(), p.value.end());
  return out;
}

std::filesystem::path train_temp_path(const std::string& name) {
  return std::filesystem::temp_directory_path() /
         ("memoryformer_train_test_" + std::to_string(::getpid()) + "_" + name);
}

}  // namespace

// ------------------------------------------------------------------------------------------------ text data

TEST(TextData, BytesRoundTrip) {
  const std::string text = std::string("A\xff\x00z", 4) + "\xc3\xa9";  // any bytes, including 0, 255 and UTF-8
  const auto tokens = mf::encode_bytes(text);
  EXPECT_EQ(tokens, (std::vector<std::int32_t>{65, 255, 0, 122, 195, 169}));
  EXPECT_EQ(mf::decode_bytes(tokens), text);
  EXPECT_THROW(mf::decode_bytes(std::vector<std::int32_t>{1, 256}), std::invalid_argument);
}

TEST(TextData, UnigramEntropy) {
  EXPECT_DOUBLE_EQ(mf::unigram_entropy_bits(mf::encode_bytes("aaaa")), 0.0);
  EXPECT_DOUBLE_EQ(mf::unigram_entropy_bits(mf::encode_bytes("abab")), 1.0);
  // H(3/4, 1/4) = −(3/4)·log2(3/4) − (1/4)·log2(1/4)
  EXPECT_NEAR(mf::unigram_entropy_bits(mf::encode_bytes("aaab")), 0.75 * std::log2(4.0 / 3.0) + 0.25 * 2.0, 1e-15);
  EXPECT_NEAR(mf::unigram_entropy_bits(mf::encode_bytes("abcdefgh")), 3.0, 1e-15);
}

TEST(TextData, SplitIsTrainPrefixAndValidationSuffix) {
  std::string text;
  for (int i = 0; i < 1000; ++i) text += char('a' + i % 26);
  const mf::TextDataset data(text, 0.25);
  ASSERT_EQ(data.train().size(), 750u);
  ASSERT_EQ(data.validation().size(), 250u);
  EXPECT_EQ(data.train()[0], 'a');
  EXPECT_EQ(data.validation()[0], 'a' + 750 % 26);
  EXPECT_EQ(data.validation()[249], 'a' + 999 % 26);
  EXPECT_THROW(mf::TextDataset(text, 1.0), mf::ConfigError);
  EXPECT_THROW(mf::TextDataset(text, -0.1), mf::ConfigError);
  EXPECT_THROW(mf::TextDataset("", 0.1), mf::ConfigError);
}

TEST(TextData, TrainingWindowsAreContiguousShiftedAndSeeded) {
  std::string text;
  for (int i = 0; i < 5000; ++i) text += char(i % 251);  // position recoverable from the byte (mod 251)
  const mf::TextDataset data(text, 0.1);
  mf::TokenBatch a, b;
  mf::Rng r1(9), r2(9), r3(10);
  data.sample_train(a, 6, 17, r1);
  data.sample_train(b, 6, 17, r2);
  EXPECT_EQ(a.inputs, b.inputs);  // same seed, same windows
  data.sample_train(b, 6, 17, r3);
  EXPECT_NE(a.inputs, b.inputs);
  ASSERT_EQ(a.inputs.size(), 6u * 17u);
  for (Index s = 0; s < 6; ++s)
    for (Index t = 0; t < 17; ++t) {
      const std::size_t i = std::size_t(s * 17 + t);
      if (t + 1 < 17) {
        EXPECT_EQ(a.targets[i], a.inputs[i + 1]);  // targets are the inputs shifted by one
      }
      EXPECT_EQ((a.inputs[i] + 1) % 251, a.targets[i]);           // and contiguous in the text
    }
  // Every window lies inside the training split: [0, 4500).
  const std::string train_text(text.begin(), text.begin() + 4500);
  for (int k = 0; k < 200; ++k) {
    data.sample_train(a, 1, 17, r1);
    const std::string w = mf::decode_bytes(a.inputs) + char(a.targets.back());
    EXPECT_NE(train_text.find(w), std::string::npos);
  }
  EXPECT_THROW(data.sample_train(a, 1, 4500, r1), mf::ConfigError);  // needs seq + 1 tokens
}

TEST(TextData, ValidationWindowsAreFixedNonOverlappingAndInRange) {
  const mf::TextDataset data(patterned_text(20000), 0.1);  // 2000 validation tokens
  const auto all = data.validation_windows(64);
  ASSERT_EQ(all.size(), std::size_t((2000 - 1) / 64));
  for (std::size_t i = 0; i < all.size(); ++i) EXPECT_EQ(all[i], Index(i) * 64);
  const auto some = data.validation_windows(64, 5);
  ASSERT_EQ(some.size(), 5u);
  for (std::size_t i = 1; i < some.size(); ++i) EXPECT_GE(some[i] - some[i - 1], 64);
  EXPECT_LE(some.back() + 64 + 1, 2000);
  mf::TokenBatch b;
  data.validation_batch(b, some, 3, 4, 64);  // only 2 windows left from index 3
  EXPECT_EQ(b.batch, 2);
  const auto val = data.validation();
  for (Index t = 0; t < 64; ++t) {
    EXPECT_EQ(b.inputs[std::size_t(t)], val[std::size_t(some[3] + t)]);
    EXPECT_EQ(b.targets[std::size_t(64 + t)], val[std::size_t(some[4] + t + 1)]);
  }
  EXPECT_THROW(data.validation_windows(2000), mf::ConfigError);
  EXPECT_THROW(data.validation_windows(64, -1), mf::ConfigError);
}

// ------------------------------------------------------------------------------------------------ schedule

TEST(Trainer, ScheduleIsWarmupThenCosineToOnePercent) {
  mf::TrainerOptions o;
  o.steps = 1000;
  o.lr = 3e-3;
  const auto s = o.schedule();
  EXPECT_EQ(s.warmup_steps, 10);  // 1% of the steps
  EXPECT_DOUBLE_EQ(s.lr_min, 3e-5);
  EXPECT_DOUBLE_EQ(s(0), 3e-3 / 10);
  EXPECT_DOUBLE_EQ(s(4), 3e-3 * 5 / 10);
  EXPECT_DOUBLE_EQ(s(9), 3e-3);
  EXPECT_DOUBLE_EQ(s(999), 3e-5);
  // Half-way through the decay (u − W = 495 of 990): the midpoint of lr and lr_min.
  EXPECT_NEAR(s(504), 3e-5 + (3e-3 - 3e-5) * 0.5 * (1.0 + std::cos(std::numbers::pi * 495.0 / 990.0)), 1e-18);
  EXPECT_NEAR(s(504), (3e-3 + 3e-5) / 2, 1e-15);
  o.steps = 10;  // 1% of 10 rounds to 0: at least one warm-up step
  EXPECT_EQ(o.schedule().warmup_steps, 1);
  EXPECT_DOUBLE_EQ(o.schedule()(0), 3e-3);
}

// --------------------------------------------------------------------------------------- one optimizer step

TEST(Trainer, OneStepIsTheHandComputedAdamWUpdate) {
  const mf::TextDataset data(patterned_text(4000), 0.1);
  mf::TrainerOptions o;
  o.steps = 100;
  o.batch = 3;
  o.seq = 9;
  o.lr = 0.01;
  o.warmup_ratio = 0.0;  // at least 1 step: step 0 gets the full lr
  o.clip_norm = 0.0;
  o.eval_every = 0;
  o.adamw.lr_multipliers.table = 3.0;

  // The reference gradient: the same model (same seed) on the batch of step 0.
  mf::MemoryFormerLM<double> reference(tiny_double_lm_config(), 5);
  mf::MemoryFormerLM<double> model(tiny_double_lm_config(), 5);
  mf::Trainer<mf::MemoryFormerLM<double>> trainer(model, data, o);
  mf::TokenBatch batch;
  trainer.batch_of_step(batch, 0);
  mf::MemoryFormerLM<double>::Cache cache;
  reference.zero_grad();
  reference.forward_loss(batch.inputs, batch.targets, batch.batch, batch.seq, cache);
  reference.backward(cache);

  const auto info = trainer.step();
  EXPECT_EQ(info.step, 1);
  EXPECT_DOUBLE_EQ(info.lr, 0.01);

  // AdamW at t = 1 from zero moments: m̂ = g, v̂ = g², so θ1 = θ0 − η·(λ·θ0 + g / (|g| + eps)), with
  // η = lr · multiplier(kind) and λ = 0.1 except for biases and norms (λ = 0).
  const auto before = reference.parameters();
  const auto after = model.parameters();
  ASSERT_EQ(before.size(), after.size());
  int tables_checked = 0, untouched_rows = 0;
  for (std::size_t i = 0; i < before.size(); ++i) {
    const auto& p0 = before[i];
    const auto& p1 = after[i];
    const bool decay = p0.kind != mf::ParameterKind::Bias && p0.kind != mf::ParameterKind::Norm;
    const double lambda = decay ? 0.1 : 0.0;
    const double eta = 0.01 * (p0.kind == mf::ParameterKind::Table ? 3.0 : 1.0);
    const bool sparse = p0.kind == mf::ParameterKind::Table || p0.kind == mf::ParameterKind::Embedding;
    for (std::size_t j = 0; j < p0.value.size(); ++j) {
      const std::size_t row = sparse ? j / std::size_t(p0.row_size) : 0;
      const bool touched = !sparse || (*p0.touched_rows)[row] != 0;
      const double th = p0.value[j], g = p0.grad[j];
      if (!touched) {
        // RowSparse (the Trainer's default): untouched rows of tables and the embedding do not move at all.
        EXPECT_EQ(p1.value[j], th) << p0.name << "[" << j << "]";
        ++untouched_rows;
        continue;
      }
      const double expected = th - eta * (lambda * th + g / (std::abs(g) + 1e-8));
      EXPECT_NEAR(p1.value[j], expected, 1e-12) << p0.name << "[" << j << "]";
    }
    if (p0.kind == mf::ParameterKind::Table) ++tables_checked;
  }
  EXPECT_EQ(tables_checked, 5);  // Q, K, V, ML1, ML2
  EXPECT_GT(untouched_rows, 0);
}

TEST(Trainer, ClippingScalesTheGradientToTheThreshold) {
  const mf::TextDataset data(patterned_text(4000), 0.1);
  mf::TrainerOptions o;
  o.steps = 10;
  o.batch = 2;
  o.seq = 8;
  o.clip_norm = 1e-3;  // far below the natural norm: every step is clipped
  o.eval_every = 0;
  mf::MemoryFormerLM<double> model(tiny_double_lm_config(), 1);
  mf::MemoryFormerLM<double> reference(tiny_double_lm_config(), 1);
  mf::Trainer<mf::MemoryFormerLM<double>> trainer(model, data, o);
  // The reference: the gradient of step 0 clipped by clip_grad_norm, then AdamW::step.
  mf::TokenBatch batch;
  trainer.batch_of_step(batch, 0);
  mf::MemoryFormerLM<double>::Cache cache;
  reference.zero_grad();
  reference.forward_loss(batch.inputs, batch.targets, batch.batch, batch.seq, cache);
  reference.backward(cache);
  const auto ref_params = reference.parameters();
  const double ref_norm = mf::clip_grad_norm(ref_params, 1e-3);
  EXPECT_NEAR(mf::global_grad_norm(ref_params), 1e-3, 1e-12);  // clip_grad_norm left the clipped gradient
  mf::AdamW<double> ref_opt(ref_params, o.adamw);
  ref_opt.step(trainer.learning_rate(0));

  const auto info = trainer.step();
  EXPECT_NEAR(info.grad_norm, ref_norm, 1e-12 * ref_norm);
  const auto params = model.parameters();
  for (std::size_t i = 0; i < params.size(); ++i) {
    for (std::size_t j = 0; j < params[i].value.size(); ++j)
      ASSERT_NEAR(params[i].value[j], ref_params[i].value[j], 1e-12) << params[i].name << "[" << j << "]";
    // The fused step consumed the gradient: zero everywhere, no touched rows left.
    for (double g : params[i].grad) ASSERT_EQ(g, 0.0) << params[i].name;
    if (params[i].touched_rows != nullptr) {
      for (auto f : *params[i].touched_rows) ASSERT_EQ(f, 0) << params[i].name;
      ASSERT_TRUE(params[i].touched_list == nullptr || params[i].touched_list->empty()) << params[i].name;
    }
  }
}

TEST(Trainer, AccumulatedMicroBatchesEqualOneLargeBatch) {
  const mf::TextDataset data(patterned_text(20000), 0.1);
  mf::TrainerOptions o;
  o.steps = 20;
  o.seq = 16;
  o.eval_every = 0;
  o.clip_norm = 0.5;
  mf::TrainerOptions big = o, split = o;
  big.batch = 8;
  big.accumulate = 1;
  split.batch = 2;
  split.accumulate = 4;
  mf::MemoryFormerLM<double> a(tiny_double_lm_config(), 3), b(tiny_double_lm_config(), 3);
  mf::Trainer<mf::MemoryFormerLM<double>> ta(a, data, big), tb(b, data, split);
  mf::TokenBatch ba, bb;
  ta.batch_of_step(ba, 4);
  tb.batch_of_step(bb, 4);
  EXPECT_EQ(ba.inputs, bb.inputs);  // the same sequences per step
  EXPECT_EQ(bb.batch, 8);
  double first_loss = 0.0;
  for (int i = 0; i < 3; ++i) {
    const auto ia = ta.step(), ib = tb.step();
    if (i == 0) first_loss = ia.loss;
    EXPECT_NEAR(ia.loss, ib.loss, 1e-12 * ia.loss);
    EXPECT_NEAR(ia.grad_norm, ib.grad_norm, 1e-10 * ia.grad_norm);
    EXPECT_EQ(ia.tokens, ib.tokens);
  }
  const auto pa = a.parameters(), pb = b.parameters();
  double worst = 0.0;
  for (std::size_t i = 0; i < pa.size(); ++i)
    for (std::size_t j = 0; j < pa[i].value.size(); ++j)
      worst = std::max(worst, std::abs(pa[i].value[j] - pb[i].value[j]));
  EXPECT_LT(worst, 1e-9);
  // Not trivially: a step on the first micro-batch alone has another loss.
  mf::TrainerOptions one = o;
  one.batch = 2;
  mf::MemoryFormerLM<double> c(tiny_double_lm_config(), 3);
  mf::Trainer<mf::MemoryFormerLM<double>> tc(c, data, one);
  EXPECT_GT(std::abs(tc.step().loss - first_loss), 1e-6);
}

TEST(Trainer, RejectsBadAccumulate) {
  const mf::TextDataset data(patterned_text(4000), 0.1);
  mf::MemoryFormerLM<double> model(tiny_double_lm_config(), 1);
  for (const Index bad : {Index(0), Index(-1), Index(-5)}) {
    mf::TrainerOptions o;
    o.accumulate = bad;
    EXPECT_THROW((mf::Trainer<mf::MemoryFormerLM<double>>(model, data, o)), mf::ConfigError) << bad;
  }
  mf::TrainerOptions o;
  o.batch = Index(1) << 40;
  o.accumulate = Index(1) << 40;
  EXPECT_THROW(o.validate(), mf::ConfigError);
  // The tokens per step, batch · accumulate · seq, must fit too (a wrapped count would size the batch buffers).
  mf::TrainerOptions wide;
  wide.batch = Index(1) << 62;
  wide.seq = 4;
  EXPECT_THROW(wide.validate(), mf::ConfigError);
  mf::TokenBatch batch;
  mf::Rng rng(1);
  EXPECT_THROW(data.sample_train(batch, Index(1) << 62, 4, rng), mf::ConfigError);
}

TEST(GradientBookkeeping, TouchedListsMatchFlagsAndZeroGradClearsEverything) {
  // Real layers: the embedding and the tables keep lists of exactly their flagged rows; zero_grad, visiting only
  // those, leaves the whole gradient buffers zero.
  const mf::TextDataset data(patterned_text(4000), 0.1);
  mf::MemoryFormerLM<float> model(small_lm_config(), 4);
  mf::TokenBatch batch;
  mf::TrainerOptions o;
  o.batch = 3;
  o.seq = 12;
  mf::Trainer<mf::MemoryFormerLM<float>> trainer(model, data, o);
  mf::MemoryFormerLM<float>::Cache cache;
  model.zero_grad();
  for (Index step = 0; step < 2; ++step) {  // two backward passes accumulate into the same lists
    trainer.batch_of_step(batch, step);
    model.forward_loss(batch.inputs, batch.targets, batch.batch, batch.seq, cache);
    model.backward(cache);
  }
  int sparse = 0;
  for (const auto& p : model.parameters()) {
    if (p.touched_rows == nullptr) continue;
    ++sparse;
    ASSERT_NE(p.touched_list, nullptr) << p.name;
    std::vector<std::uint8_t> listed(p.touched_rows->size(), 0);
    for (Index r : *p.touched_list) {
      ASSERT_EQ(listed[std::size_t(r)], 0) << p.name << ": row " << r << " listed twice";
      listed[std::size_t(r)] = 1;
    }
    EXPECT_EQ(listed, *p.touched_rows) << p.name;
    EXPECT_GT(p.touched_list->size(), 0u) << p.name;
    const std::size_t row = std::size_t(p.row_size);
    for (std::size_t r = 0; r < listed.size(); ++r) {
      if (listed[r]) continue;
      for (std::size_t j = 0; j < row; ++j) ASSERT_EQ(p.grad[r * row + j], 0.0f) << p.name << " row " << r;
    }
  }
  EXPECT_EQ(sparse, 1 + 2 * 5);  // the embedding and five tables per block
  model.zero_grad();
  for (const auto& p : model.parameters()) {
    for (float g : p.grad) ASSERT_EQ(g, 0.0f) << p.name;
    if (p.touched_rows == nullptr) continue;
    for (auto f : *p.touched_rows) ASSERT_EQ(f, 0) << p.name;
    EXPECT_TRUE(p.touched_list->empty()) << p.name;
  }
}

TEST(Trainer, NonFiniteLossStopsBeforeTheUpdate) {
  const mf::TextDataset data(patterned_text(4000), 0.1);
  mf::TrainerOptions o;
  o.steps = 10;
  o.batch = 2;
  o.seq = 8;
  mf::MemoryFormerLM<double> model(tiny_double_lm_config(), 1);
  mf::Trainer<mf::MemoryFormerLM<double>> trainer(model, data, o);
  model.head().weight()(0, 0) = std::numeric_limits<double>::quiet_NaN();
  EXPECT_THROW(trainer.step(), mf::NonFiniteError);
  EXPECT_EQ(trainer.step_count(), 0);
  EXPECT_EQ(trainer.optimizer().steps(), 0u);
}

// ------------------------------------------------------------------------------------------ training runs

TEST(Trainer, ShortRunLossFalls) {
  const std::string text = patterned_text(30000);
  const mf::TextDataset data(text, 0.1);
  mf::TrainerOptions o;
  o.steps = 120;
  o.batch = 8;
  o.seq = 32;
  o.lr = 1e-2;
  o.eval_every = 40;
  o.eval_windows = 16;
  mf::MemoryFormerLM<float> model(small_lm_config(), 3);
  mf::Trainer<mf::MemoryFormerLM<float>> trainer(model, data, o);
  const auto initial = trainer.evaluate();
  mf::TrainingHistory history;
  trainer.on_step(std::ref(history));
  trainer.on_eval(std::ref(history));
  const auto result = trainer.run();
  EXPECT_EQ(result.steps, 120);
  EXPECT_EQ(history.steps.size(), 120u);
  ASSERT_EQ(history.evals.size(), 3u);  // steps 40, 80 and the final one
  EXPECT_EQ(history.evals.back().step, 120);
  EXPECT_NEAR(initial.loss, std::log(256.0), 0.3);
  const double unigram_nats = mf::unigram_entropy_bits(data.tokens()) * std::numbers::ln2;
  EXPECT_LT(result.validation.loss, initial.loss - 2.0);
  EXPECT_LT(result.validation.loss, unigram_nats - 0.3) << "unigram " << unigram_nats;
  EXPECT_LT(history.evals[2].loss, history.evals[0].loss);
  EXPECT_NEAR(result.validation.bits_per_byte, result.validation.loss / std::numbers::ln2, 1e-12);
  EXPECT_LT(result.train_loss, history.steps.front().loss);
}

TEST(Trainer, DenseBaselineTrainsToo) {
  const mf::TextDataset data(patterned_text(30000), 0.1);
  mf::TrainerOptions o;
  o.steps = 80;
  o.batch = 8;
  o.seq = 32;
  o.lr = 3e-3;
  o.eval_every = 0;
  o.eval_windows = 16;
  mf::TransformerLM<float>::Config c;
  c.layers = 2;
  c.block.d = 32;
  c.block.heads = 2;
  mf::TransformerLM<float> model(c, 3);
  mf::Trainer<mf::TransformerLM<float>> trainer(model, data, o);
  const auto initial = trainer.evaluate();
  const auto result = trainer.run();
  EXPECT_LT(result.validation.loss, initial.loss - 2.0);
}

TEST(Trainer, ResumeContinuesExactlyLikeTheUninterruptedRun) {
  const auto path = train_temp_path("resume.ckpt");
  const mf::TextDataset data(patterned_text(20000), 0.1);
  mf::TrainerOptions o;
  o.steps = 8;
  o.batch = 4;
  o.seq = 16;
  o.eval_every = 0;
  o.eval_windows = 4;
  o.data_seed = 77;

  mf::MemoryFormerLM<float> a(small_lm_config(), 1);
  mf::Trainer<mf::MemoryFormerLM<float>> ta(a, data, o);
  for (int i = 0; i < 5; ++i) ta.step();
  ta.save_checkpoint(path);
  std::vector<double> losses_a;
  for (int i = 0; i < 3; ++i) losses_a.push_back(ta.step().loss);

  mf::MemoryFormerLM<float> b(small_lm_config(), 2);  // another init: everything must come from the checkpoint
  mf::Trainer<mf::MemoryFormerLM<float>> tb(b, data, o);
  EXPECT_EQ(tb.resume(path), 5);
  std::vector<double> losses_b;
  for (int i = 0; i < 3; ++i) losses_b.push_back(tb.step().loss);
  EXPECT_EQ(losses_a, losses_b);
  EXPECT_EQ(flat_values(a.parameters()), flat_values(b.parameters()));
  EXPECT_EQ(tb.step_count(), 8);

  // Another data seed would draw other batches: refused.
  o.data_seed = 78;
  mf::MemoryFormerLM<float> c(small_lm_config(), 2);
  mf::Trainer<mf::MemoryFormerLM<float>> tc(c, data, o);
  EXPECT_THROW(tc.resume(path), mf::FormatError);
  EXPECT_EQ(tc.step_count(), 0);
  std::filesystem::remove(path);
}

TEST(Trainer, RunSavesCheckpointsAndStopsOnRequest) {
  const auto path = train_temp_path("run.ckpt");
  const mf::TextDataset data(patterned_text(20000), 0.1);
  mf::TrainerOptions o;
  o.steps = 10;
  o.batch = 2;
  o.seq = 16;
  o.eval_every = 0;
  o.eval_windows = 2;
  o.checkpoint_path = path;
  o.checkpoint_every = 3;
  mf::MemoryFormerLM<float> model(small_lm_config(), 1);
  mf::Trainer<mf::MemoryFormerLM<float>> trainer(model, data, o);
  std::vector<Index> saved;
  trainer.on_checkpoint([&](const std::filesystem::path&, Index step) { saved.push_back(step); });
  // A budget callback fed synthetic elapsed times: stops after step 7.
  mf::TimeBudget budget(trainer, 7.0);
  trainer.on_step([&](const mf::StepInfo& s) {
    mf::StepInfo fake = s;
    fake.elapsed_seconds = double(s.step);
    budget(fake);
  });
  const auto result = trainer.run();
  EXPECT_TRUE(result.stopped_early);
  EXPECT_EQ(result.steps, 7);
  EXPECT_EQ(saved, (std::vector<Index>{3, 6, 7}));  // every 3 steps, and at the end
  mf::MemoryFormerLM<float> copy(small_lm_config(), 9);
  mf::load_model(path, copy);
  EXPECT_EQ(flat_values(copy.parameters()), flat_values(model.parameters()));
  std::filesystem::remove(path);
}

// ------------------------------------------------------------------------------------------------ callbacks

TEST(Callbacks, ProgressBarAndPrinters) {
  std::ostringstream out;
  mf::ProgressBar bar(out, 10);
  mf::StepInfo s;
  s.step = 5;
  s.total_steps = 10;
  s.loss = 1.23456;
  s.lr = 3e-3;
  s.tokens_per_second = 12345.4;
  s.eta_seconds = 125;
  EXPECT_EQ(bar.line(s), "[#####.....]     5/10 loss 1.2346 lr 3.0e-03 12,345 tok/s ETA 2m05s ");
  bar(s);
  EXPECT_EQ(out.str(), "\r" + bar.line(s));
  std::ostringstream eval_out;
  mf::EvalPrinter printer(eval_out);
  mf::EvalInfo e;
  e.step = 10;
  e.loss = std::numbers::ln2;
  e.bits_per_byte = 1.0;
  e.tokens = 64;
  printer(e);
  EXPECT_EQ(eval_out.str(), "\nstep 10: val loss 0.6931 nats, 1.0000 bits/byte (64 tokens, 0.0s)\n");
  EXPECT_EQ(mf::format_duration(3725), "1h02m");
  EXPECT_EQ(mf::format_duration(12.34), "12.3s");
}

TEST(Trainer, KeptPackedTablesTrainBitForBitAsPerCallPacking) {
  const mf::TextDataset data(patterned_text(20000), 0.1);
  mf::TrainerOptions o;
  o.steps = 6;
  o.batch = 4;
  o.seq = 16;  // 64 tokens per forward: past the threshold from which prefill reads the kept copy (τ = 4)
  o.accumulate = 2;
  o.eval_every = 0;
  o.eval_windows = 4;
  mf::TrainerOptions per_call = o;
  per_call.packed_tables = false;
  mf::MemoryFormerLM<float> a(small_lm_config(), 9), b(small_lm_config(), 9);
  mf::Trainer<mf::MemoryFormerLM<float>> kept(a, data, o), packing(b, data, per_call);
  const bool simd = mf::best_isa() != mf::Isa::Scalar;
  EXPECT_EQ(a.block(0).q().packed_tables_current(), simd);  // the Trainer asked for the copy
  EXPECT_FALSE(b.block(0).q().packed_tables_current());
  for (int i = 0; i < 4; ++i) EXPECT_EQ(kept.step().loss, packing.step().loss) << "step " << i;
  EXPECT_EQ(a.block(1).memory_block().ml2().packed_tables_current(), simd);  // kept current by every step
  EXPECT_EQ(kept.evaluate().loss, packing.evaluate().loss);
  EXPECT_EQ(flat_values(a.parameters()), flat_values(b.parameters()));
}

TEST(Trainer, OptimizerWalksDenselyTouchedListsInRowOrderWithTheSameUpdates) {
  // A list covering many rows is walked by scanning the flags (row order), a short one in list order: either way each
  // touched row gets the update a flags-only view (no list) gives it, and nothing else changes.
  const std::vector<mf::Index> order = {50, 3, 17, 63, 0, 9, 33, 41, 12, 5, 28, 60, 1, 2, 44, 47};
  for (const std::size_t touched : {std::size_t(4), std::size_t(16)}) {
    std::vector<float> value(64 * 3), grad(value.size(), 0.0f);
    mf::Rng rng = mf::Rng::stream(4, 0);
    rng.fill_normal(std::span<float>(value), 0.0, 1.0);
    std::vector<std::uint8_t> flags(64, 0);
    std::vector<mf::Index> list(order.begin(), order.begin() + std::ptrdiff_t(touched));
    for (mf::Index r : list) {
      flags[std::size_t(r)] = 1;
      for (int j = 0; j < 3; ++j) grad[std::size_t(r * 3 + j)] = float(rng.normal(0.0, 1.0));
    }
    std::vector<float> value2 = value, grad2 = grad, before = value;
    std::vector<std::uint8_t> flags2 = flags;
    mf::AdamWOptions options;
    options.sparse_update = mf::SparseUpdate::RowSparse;
    mf::AdamW<float> listed({{"t", {64, 3}, value, grad, mf::ParameterKind::Table, 3, &flags, &list}}, options);
    mf::AdamW<float> flagged({{"t", {64, 3}, value2, grad2, mf::ParameterKind::Table, 3, &flags2, nullptr}}, options);
    EXPECT_NEAR(listed.step_fused(1e-2, 0.0), flagged.step_fused(1e-2, 0.0), 1e-12) << touched;
    EXPECT_EQ(value, value2) << touched;
    EXPECT_NE(value, before) << touched;
    EXPECT_TRUE(list.empty());
    EXPECT_EQ(flags, std::vector<std::uint8_t>(64, 0));
  }
}
