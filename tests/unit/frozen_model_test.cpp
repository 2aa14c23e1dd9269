// SPDX-License-Identifier: MIT
// Tests of the inference-only model (frozen_memory_block.hpp, frozen_memoryformer_block.hpp, frozen_model.hpp):
// logits against the training model for float32 (same bits), bfloat16 and float16 tables (within the documented
// tolerance), KV-cache decoding against the frozen prefill, thread-count independence, and refused inputs.

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <vector>

#include <memoryformer/frozen_model.hpp>
#include <memoryformer/train/trainer.hpp>

#include "support/test_helpers.hpp"
#include "support/thread_setting.hpp"

namespace mf = memoryformer;
using mf::Index;

namespace {

using memoryformer::testing_support::random_tokens;
using memoryformer::testing_support::same_bits;
using memoryformer::testing_support::ThreadSetting;

mf::MemoryFormerLM<float>::Config config(bool variants = false) {
  mf::MemoryFormerLM<float>::Config c;
  c.vocab = 64;
  c.layers = 2;
  c.block.d = 32;
  c.block.heads = 2;
  c.block.tau = 4;
  c.head_bias = true;
  if (variants) {
    c.block.gelu = true;
    c.block.output_projection = true;
    c.block.norm = mf::NormKind::Layer;
  }
  return c;
}

/// max |a − b| / max |b|: the error relative to the logits' scale.
double relative_max_diff(const mf::Matrix<float>& a, const mf::Matrix<float>& b) {
  return double((a - b).cwiseAbs().maxCoeff()) / double(b.cwiseAbs().maxCoeff());
}


}  // namespace

TEST(FrozenLanguageModel, Float32TablesGiveTheTrainingModelsBits) {
  for (const bool variants : {false, true}) {
    mf::MemoryFormerLM<float> model(config(variants), 3);
    const Index batch = 3, seq = 20;
    const auto tokens = random_tokens(batch * seq, 64, 1);
    mf::MemoryFormerLM<float>::Cache cache;
    const mf::Matrix<float> trained = model.forward(tokens, batch, seq, cache);
    for (const auto layout : {mf::FrozenLayout::Both, mf::FrozenLayout::Panels, mf::FrozenLayout::Rows}) {
      const mf::FrozenLanguageModel frozen(model, mf::StorageType::F32, layout);
      EXPECT_EQ(frozen.storage(), mf::StorageType::F32);
      EXPECT_TRUE(same_bits(frozen.forward(tokens, batch, seq), trained))
          << "variants " << variants << ", max relative difference " << relative_max_diff(frozen.forward(tokens, batch, seq), trained);
    }
  }
}

/// Per-row max |a − b| relative to max |b|, sorted.
std::vector<double> sorted_row_errors(const mf::Matrix<float>& a, const mf::Matrix<float>& b) {
  std::vector<double> rows;
  const double scale = double(b.cwiseAbs().maxCoeff());
  for (Index r = 0; r < a.rows(); ++r) rows.push_back(double((a.row(r) - b.row(r)).cwiseAbs().maxCoeff()) / scale);
  std::sort(rows.begin(), rows.end());
  return rows;
}

// The tolerances are the documented accuracy of packed tables (FrozenLanguageModel's comment). A rounded table value
// can flip the sign of a later hash input and so pick another table row: the worst rows differ by a sizeable part
// of the logits' scale, the typical (median) row by the rounding alone. Measured on these models: bf16 max 0.28 and
// 0.53, median 0.026 and 0.041; fp16 max 0.11 and 0.05, median 2.8e-4 and 2.5e-4.
TEST(FrozenLanguageModel, HalfPrecisionTablesStayWithinTheDocumentedTolerance) {
  for (const bool variants : {false, true}) {
    mf::MemoryFormerLM<float> model(config(variants), 4);
    const Index batch = 2, seq = 24;
    const auto tokens = random_tokens(batch * seq, 64, 2);
    mf::MemoryFormerLM<float>::Cache cache;
    const mf::Matrix<float> trained = model.forward(tokens, batch, seq, cache);
    const auto bf16 = sorted_row_errors(mf::freeze(model, mf::StorageType::BF16).forward(tokens, batch, seq), trained);
    const auto f16 = sorted_row_errors(mf::freeze(model, mf::StorageType::F16).forward(tokens, batch, seq), trained);
    const std::size_t median = bf16.size() / 2;
    EXPECT_LE(bf16.back(), 0.7) << "variants " << variants;
    EXPECT_LE(bf16[median], 0.06) << "variants " << variants;
    EXPECT_LE(f16.back(), 0.15) << "variants " << variants;
    EXPECT_LE(f16[median], 5e-4) << "variants " << variants;
    // Rounding the tables must change something (else the checks above prove nothing), and fp16's 11-bit
    // significand must beat bf16's 8 bits.
    EXPECT_GT(f16[median], 0.0);
    EXPECT_LT(f16[median], bf16[median]);
  }
}

TEST(FrozenLanguageModel, DecodingMatchesTheFrozenPrefill) {
  for (const auto storage : {mf::StorageType::F32, mf::StorageType::BF16}) {
    mf::MemoryFormerLM<float> model(config(true), 5);
    const mf::FrozenLanguageModel frozen(model, storage);
    const Index batch = 2, seq = 9, prompt = 4;
    const auto tokens = random_tokens(batch * seq, 64, 3);
    const mf::Matrix<float> full = frozen.forward(tokens, batch, seq);
    auto state = frozen.make_decode_state(batch, seq);
    std::vector<std::int32_t> first;
    for (Index b = 0; b < batch; ++b)
      for (Index t = 0; t < prompt; ++t) first.push_back(tokens[std::size_t(b * seq + t)]);
    mf::Matrix<float> logits(batch * prompt, 64);
    frozen.forward_decode(logits, first, state);
    const float scale = full.cwiseAbs().maxCoeff();
    for (Index b = 0; b < batch; ++b)
      for (Index t = 0; t < prompt; ++t)
        for (Index v = 0; v < 64; ++v)
          EXPECT_NEAR(logits(b * prompt + t, v), full(b * seq + t, v), 1e-5f * scale) << "b " << b << " t " << t;
    mf::Matrix<float> one(batch, 64);
    for (Index t = prompt; t < seq; ++t) {
      std::vector<std::int32_t> next;
      for (Index b = 0; b < batch; ++b) next.push_back(tokens[std::size_t(b * seq + t)]);
      frozen.forward_decode(one, next, state);
      for (Index b = 0; b < batch; ++b)
        for (Index v = 0; v < 64; ++v) EXPECT_NEAR(one(b, v), full(b * seq + t, v), 1e-5f * scale) << "t " << t;
    }
    EXPECT_EQ(state.length(), seq);
    // Past the cache: refused, state unchanged.
    std::vector<std::int32_t> more(std::size_t(batch), 0);
    EXPECT_THROW(frozen.forward_decode(one, more, state), std::length_error);
    EXPECT_EQ(state.length(), seq);
    state.clear();
    EXPECT_EQ(state.length(), 0);
  }
}

TEST(FrozenLanguageModel, Float32DecodingGivesTheTrainingModelsDecodeBits) {
  mf::MemoryFormerLM<float> model(config(), 6);
  const mf::FrozenLanguageModel frozen(model, mf::StorageType::F32);
  const auto tokens = random_tokens(2 * 5, 64, 4);
  auto trained_state = model.make_decode_state(2, 5);
  auto frozen_state = frozen.make_decode_state(2, 5);
  mf::Matrix<float> a(2 * 5, 64), b(2 * 5, 64);
  model.forward_decode(a, tokens, trained_state);
  frozen.forward_decode(b, tokens, frozen_state);
  EXPECT_TRUE(same_bits(a, b));
}

// A bfloat16 KV cache rounds the cached keys and values as bfloat16 tables round the table values, so its logits
// move as those of HalfPrecisionTablesStayWithinTheDocumentedTolerance do (the same bounds), and decode through the
// frozen model gives the training model's bits with the same cache.
TEST(FrozenLanguageModel, Bfloat16KvCacheDecodesLikeTheTrainingModelsAndNearThePrefill) {
  mf::MemoryFormerLM<float> model(config(), 7);
  const mf::FrozenLanguageModel frozen(model, mf::StorageType::F32);
  const Index batch = 2, seq = 24;
  const auto tokens = random_tokens(batch * seq, 64, 5);
  const mf::Matrix<float> full = frozen.forward(tokens, batch, seq);
  auto trained_state = model.make_decode_state(batch, seq, mf::StorageType::BF16);
  auto frozen_state = frozen.make_decode_state(batch, seq, mf::StorageType::BF16);
  EXPECT_EQ(frozen_state.kv.front().storage(), mf::StorageType::BF16);
  EXPECT_EQ(frozen_state.kv.front().bytes_per_token(), 2 * 32 * sizeof(std::uint16_t));
  mf::Matrix<float> decoded(batch * seq, 64), a(batch, 64), b(batch, 64);
  for (Index t = 0; t < seq; ++t) {  // one token of each sequence per call: the decode kernel's in-place rows
    std::vector<std::int32_t> next;
    for (Index s = 0; s < batch; ++s) next.push_back(tokens[std::size_t(s * seq + t)]);
    model.forward_decode(a, next, trained_state);
    frozen.forward_decode(b, next, frozen_state);
    EXPECT_TRUE(same_bits(a, b)) << "t " << t;
    for (Index s = 0; s < batch; ++s) decoded.row(s * seq + t) = b.row(s);
  }
  const auto errors = sorted_row_errors(decoded, full);
  EXPECT_LE(errors.back(), 0.7);
  EXPECT_LE(errors[errors.size() / 2], 0.06);
  EXPECT_GT(errors.back(), 0.0) << "the cache did not round";
}

TEST(FrozenLanguageModel, ResultsDoNotDependOnThreadCount) {
  mf::Matrix<float> logits[3], decoded[3];
  mf::MemoryFormerLM<float>::Config c = config();
  c.block.d = 64;
  c.vocab = 256;
  mf::MemoryFormerLM<float> model(c, 7);
  const mf::FrozenLanguageModel frozen(model, mf::StorageType::BF16);
  const Index batch = 4, seq = 80;
  const auto tokens = random_tokens(batch * seq, 256, 5);
  ThreadSetting threads;
  for (int n = 1; n <= 3; ++n) {
    threads.set(n);
    logits[n - 1] = frozen.forward(tokens, batch, seq);
    auto state = frozen.make_decode_state(batch, seq);
    decoded[n - 1].resize(batch * seq, 256);
    frozen.forward_decode(decoded[n - 1], tokens, state);
  }
  EXPECT_TRUE(same_bits(logits[0], logits[1]));
  EXPECT_TRUE(same_bits(logits[0], logits[2]));
  EXPECT_TRUE(same_bits(decoded[0], decoded[1]));
  EXPECT_TRUE(same_bits(decoded[0], decoded[2]));
}

// A frozen model cannot be trained: it has no backward, so a Trainer of it does not compile (with a message).
static_assert(mf::TrainableModel<mf::MemoryFormerLM<float>>);
static_assert(mf::TrainableModel<mf::TransformerLM<double>>);
static_assert(!mf::TrainableModel<mf::FrozenLanguageModel>);

TEST(FrozenLanguageModel, RefusesBadInput) {
  mf::MemoryFormerLM<float> model(config(), 8);
  const mf::FrozenLanguageModel frozen(model, mf::StorageType::BF16);
  const auto tokens = random_tokens(6, 64, 6);
  EXPECT_THROW(frozen.forward(tokens, 2, 4), mf::ShapeError);
  EXPECT_THROW(frozen.forward(tokens, 0, 6), mf::ConfigError);
  auto bad = tokens;
  bad[2] = 64;
  EXPECT_THROW(frozen.forward(bad, 2, 3), mf::ValueError);
  // batch·seq that overflows, or that the tokens do not match, is refused before anything is allocated.
  const Index huge = (Index(1) << 62) + 1;
  EXPECT_THROW(frozen.forward(tokens, huge, 4), mf::ConfigError);
  EXPECT_THROW(frozen.forward(tokens, 1, Index(1) << 40), mf::ShapeError);
  mf::Matrix<float> wrong(6, 63);
  EXPECT_THROW(frozen.forward(wrong, tokens, 2, 3), mf::ShapeError);
  auto state = frozen.make_decode_state(2, 4);
  mf::Matrix<float> one(2, 64);
  EXPECT_THROW(frozen.forward_decode(one, std::span<const std::int32_t>(tokens).first(3), state), mf::ShapeError);
  EXPECT_THROW(frozen.forward_decode(one, std::span<const std::int32_t>(bad).subspan(1, 2), state), mf::ValueError);
  EXPECT_EQ(state.length(), 0);
  mf::FrozenLanguageModel::DecodeState empty;
  EXPECT_THROW(frozen.forward_decode(one, std::span<const std::int32_t>(tokens).first(2), empty), mf::StateError);
  // A decode past max_seq, and a state whose later caches differ from the first (a shorter or narrower one), are
  // refused before any cache changes.
  auto full = frozen.make_decode_state(2, 1);
  mf::Matrix<float> two(4, 64);
  EXPECT_THROW(frozen.forward_decode(two, std::span<const std::int32_t>(tokens).first(4), full), mf::CapacityError);
  for (const auto& replacement : {mf::KVCache<float>(2, 2, 32), mf::KVCache<float>(1, 4, 32)}) {
    auto mixed = frozen.make_decode_state(2, 4);
    mixed.kv[1] = replacement;
    EXPECT_THROW(frozen.forward_decode(two, std::span<const std::int32_t>(tokens).first(4), mixed), mf::StateError);
    EXPECT_EQ(mixed.kv[0].length(), 0);
  }
  EXPECT_THROW(frozen.make_decode_state(0, 4), mf::ConfigError);

  // The dense baseline has no tables to freeze.
  mf::TransformerLM<float>::Config dense;
  dense.vocab = 16;
  dense.layers = 1;
  dense.block.d = 8;
  dense.block.heads = 2;
  mf::TransformerLM<float> transformer(dense, 1);
  EXPECT_THROW(mf::FrozenLanguageModel(transformer, mf::StorageType::BF16), mf::ConfigError);
  // Tables beyond float16's range are refused by name, not turned into infinities.
  mf::MemoryFormerLM<float> big(config(), 9);
  big.block(0).q().tables().values()[3] = 1e6f;
  EXPECT_THROW(mf::FrozenLanguageModel(big, mf::StorageType::F16), mf::ConfigError);
  EXPECT_NO_THROW(mf::FrozenLanguageModel(big, mf::StorageType::BF16));
  // A model whose width does not split into its heads cannot even be built.
  auto odd = config();
  odd.block.heads = 3;
  EXPECT_THROW(mf::MemoryFormerLM<float>(odd, 1), mf::ConfigError);
}
