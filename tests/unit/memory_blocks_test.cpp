// SPDX-License-Identifier: MIT
// MemoryBlock and MemoryFormerBlock: finite-difference gradients of the input and of every parameter (double,
// bucket flips skipped), KV-cache decoding against the full forward, and bad input.
#include <algorithm>
#include <cmath>
#include <functional>

#include <gtest/gtest.h>

#include <memoryformer/memory_block.hpp>
#include <memoryformer/memoryformer_block.hpp>
#include <memoryformer/testing/gradcheck.hpp>

#include "../support/test_helpers.hpp"

namespace mf = memoryformer;
using namespace memoryformer::testing_support;

namespace {

/// Checks dx and every parameter of a layer by central differences of L = Σ dy ⊙ y.
/// `run` does a forward on the current x/parameters and returns the loss; `codes` returns every hash's codes.
template <class Layer>
void check_all_gradients(Layer& layer, mf::Matrix<double>& x, const mf::Matrix<double>& dx,
                         const std::function<double()>& run, const std::function<std::vector<std::int32_t>()>& codes,
                         double tolerance = 1e-6) {
  const auto rx = mf::check_gradient({x.data(), size_t(x.size())}, {dx.data(), size_t(dx.size())}, run, codes);
  EXPECT_LE(rx.relative_error, tolerance) << "dx: worst " << rx.worst_index << " abs " << rx.max_abs_error;
  EXPECT_GT(rx.checked, 0);
  for (auto& p : layer.parameters("block")) {
    const std::vector<double> analytic(p.grad.begin(), p.grad.end());
    mf::GradCheckOptions options;
    options.max_coordinates = 400;  // tables are large and mostly untouched; a strided subset plus the hit rows
    const auto r = mf::check_gradient(p.value, analytic, run, codes, options);
    // A gradient that is zero by symmetry (the K bias: softmax ignores a constant shift of every key) leaves
    // only finite-difference noise, so an absolute floor of 1e-8 accepts it.
    EXPECT_TRUE(r.relative_error <= tolerance || r.max_abs_error <= 1e-8)
        << p.name << ": relative " << r.relative_error << ", worst " << r.worst_index << " abs " << r.max_abs_error;
    if (p.kind == mf::ParameterKind::Table) {
      // Every touched row exactly (the strided subset may miss them all).
      double diff = 0, sum = 0;
      for (size_t row = 0; row < p.touched_rows->size(); ++row) {
        if (!(*p.touched_rows)[row]) continue;
        for (mf::Index j = 0; j < p.row_size; ++j) {
          double& v = p.value[row * size_t(p.row_size) + size_t(j)];
          const double saved = v, eps = 1e-6;
          v = saved + eps;
          const double plus = run();
          v = saved - eps;
          const double minus = run();
          v = saved;
          const double numeric = (plus - minus) / (2 * eps), a = analytic[row * size_t(p.row_size) + size_t(j)];
          diff += (numeric - a) * (numeric - a);
          sum += (numeric + a) * (numeric + a);
        }
      }
      EXPECT_LE(std::sqrt(diff / std::max(sum, 1e-300)), tolerance) << p.name << " touched rows";
    }
  }
}

struct BlockCase {
  bool gelu, extra_table;
  mf::ScoreKind score;
  int tau, expand_bits;
};

class MemoryBlockGradient : public ::testing::TestWithParam<BlockCase> {};

TEST_P(MemoryBlockGradient, MatchesFiniteDifferences) {
  const auto c = GetParam();
  mf::MemoryBlockConfig config{.d = 12, .tau = c.tau, .expand_bits = c.expand_bits, .gelu = c.gelu,
                               .extra_table = c.extra_table, .score = c.score, .temperature = 0.9};
  mf::MemoryBlock<double> block(config, 3);
  for (auto& p : block.parameters()) mf::Rng(7).fill_normal(p.value, 0.0, 0.5);  // larger than init: stronger signal
  mf::Matrix<double> x = random_matrix(3, 12, 1);
  const mf::Matrix<double> dy = random_matrix(3, 12, 2);
  mf::MemoryBlockCache<double> cache, probe;
  mf::Matrix<double> y(3, 12), dx(3, 12);
  block.forward(y, x, cache);
  block.backward(dx, x, dy, cache);
  auto run = [&] {
    mf::Matrix<double> out(3, 12);
    block.forward(out, x, probe);
    return (out.array() * dy.array()).sum();
  };
  auto codes = [&] {
    auto all = probe.hash1.codes;
    all.insert(all.end(), probe.hash2.codes.begin(), probe.hash2.codes.end());
    return all;
  };
  check_all_gradients(block, x, dx, run, codes);
}

INSTANTIATE_TEST_SUITE_P(Variants, MemoryBlockGradient,
                         ::testing::Values(BlockCase{false, false, mf::ScoreKind::L1, 4, 2},
                                           BlockCase{true, false, mf::ScoreKind::L1, 3, 1},
                                           BlockCase{false, true, mf::ScoreKind::Paper, 4, 0},
                                           BlockCase{true, false, mf::ScoreKind::Paper, 2, 3}),
                         [](const auto& info) { return "case" + std::to_string(info.index); });

struct FormerCase {
  mf::Index batch, seq, d, heads, rotary;
  mf::NormKind norm;
  bool output_projection;
};

class MemoryFormerBlockGradient : public ::testing::TestWithParam<FormerCase> {};

mf::MemoryFormerBlockConfig former_config(const FormerCase& c) {
  return {.d = c.d, .heads = c.heads, .rotary_dims = c.rotary, .tau = 4, .expand_bits = 1,
          .output_projection = c.output_projection, .norm = c.norm};
}

TEST_P(MemoryFormerBlockGradient, MatchesFiniteDifferences) {
  const auto c = GetParam();
  mf::MemoryFormerBlock<double> block(former_config(c), 5);
  for (auto& p : block.parameters())
    if (p.kind == mf::ParameterKind::Table) mf::Rng(11).fill_normal(p.value, 0.0, 0.3);
  const mf::Index n = c.batch * c.seq;
  mf::Matrix<double> x = random_matrix(n, c.d, 1);
  const mf::Matrix<double> dy = random_matrix(n, c.d, 2);
  mf::MemoryFormerBlockCache<double> cache, probe;
  mf::Matrix<double> y(n, c.d), dx(n, c.d);
  block.forward(y, x, c.batch, c.seq, cache);
  block.backward(dx, x, dy, cache);
  auto run = [&] {
    mf::Matrix<double> out(n, c.d);
    block.forward(out, x, c.batch, c.seq, probe);
    return (out.array() * dy.array()).sum();
  };
  auto codes = [&] {
    auto all = probe.hash.codes;
    for (const auto* h : {&probe.memory.hash1, &probe.memory.hash2}) all.insert(all.end(), h->codes.begin(), h->codes.end());
    return all;
  };
  check_all_gradients(block, x, dx, run, codes);
}

INSTANTIATE_TEST_SUITE_P(Shapes, MemoryFormerBlockGradient,
                         ::testing::Values(FormerCase{2, 3, 12, 3, 2, mf::NormKind::RMS, false},
                                           FormerCase{1, 1, 8, 1, 4, mf::NormKind::RMS, false},   // one token, one head
                                           FormerCase{1, 7, 8, 2, 2, mf::NormKind::Layer, true},  // LayerNorm, W_O
                                           FormerCase{3, 2, 16, 4, 0, mf::NormKind::RMS, true}),  // no rotary
                         [](const auto& info) { return "case" + std::to_string(info.index); });

TEST(MemoryFormerBlock, DecodingWithKVCacheEqualsFullForward) {
  for (mf::Index step : {1, 2, 3}) {
    const mf::MemoryFormerBlockConfig config{.d = 16, .heads = 2, .rotary_dims = 4, .tau = 4};
    const mf::MemoryFormerBlock<double> block(config, 9);
    const mf::Index batch = 2, seq = 6;
    const mf::Matrix<double> x = random_matrix(batch * seq, 16, 3);
    mf::MemoryFormerBlockCache<double> cache;
    mf::Matrix<double> full(batch * seq, 16);
    block.forward(full, x, batch, seq, cache);
    auto kv = block.make_kv_cache(batch, seq);
    for (mf::Index t0 = 0; t0 < seq; t0 += step) {
      const mf::Index t = std::min(step, seq - t0);
      mf::Matrix<double> x_new(batch * t, 16), y_new(batch * t, 16);
      for (mf::Index b = 0; b < batch; ++b) x_new.middleRows(b * t, t) = x.middleRows(b * seq + t0, t);
      block.forward_decode(y_new, x_new, kv);
      for (mf::Index b = 0; b < batch; ++b)
        EXPECT_LE((y_new.middleRows(b * t, t) - full.middleRows(b * seq + t0, t)).cwiseAbs().maxCoeff(), 1e-12)
            << "step " << step << " sequence " << b << " position " << t0;
    }
    EXPECT_EQ(kv.length(), seq);
    mf::Matrix<double> one(batch, 16), out(batch, 16);
    one.setZero();
    EXPECT_THROW(block.forward_decode(out, one, kv), std::length_error);
  }
}

TEST(MemoryFormerBlock, FloatBackwardAfterAnotherInputEqualsAFreshBlocksBits) {
  // Q, K and V share one sort of the hash's pairs per backward: a backward on x2 after one on x1 must not reuse x1's
  // sort. Enough tokens for the sorted SIMD kernels (where the build has them).
  const mf::MemoryFormerBlockConfig config{.d = 32, .heads = 2, .tau = 4};
  const mf::Index batch = 2, seq = 40, n = batch * seq;
  const mf::Matrix<float> x1 = random_matrix<float>(n, 32, 61), x2 = random_matrix<float>(n, 32, 62);
  const mf::Matrix<float> dy = random_matrix<float>(n, 32, 63);
  mf::MemoryFormerBlock<float> used(config, 5), fresh(config, 5);
  mf::MemoryFormerBlockCache<float> c1, c2;
  mf::Matrix<float> y(n, 32), dx_used(n, 32), dx_fresh(n, 32);
  used.forward(y, x1, batch, seq, c1);
  used.backward(dx_used, x1, dy, c1);
  used.zero_grad();
  used.forward(y, x2, batch, seq, c2);
  used.backward(dx_used, x2, dy, c2);
  fresh.forward(y, x2, batch, seq, c2);
  fresh.backward(dx_fresh, x2, dy, c2);
  EXPECT_TRUE(dx_used == dx_fresh);
  const auto a = used.parameters(), b = fresh.parameters();
  ASSERT_EQ(a.size(), b.size());
  for (std::size_t i = 0; i < a.size(); ++i)
    EXPECT_TRUE(std::equal(a[i].grad.begin(), a[i].grad.end(), b[i].grad.begin())) << a[i].name;
}

TEST(MemoryFormerBlock, RejectsBadConfigurationsAndShapes) {
  EXPECT_THROW(mf::MemoryFormerBlock<float>({.d = 30, .heads = 4, .tau = 3}, 0), mf::ConfigError);
  EXPECT_NE(error_of([] { mf::MemoryFormerBlock<float>({.d = 30, .heads = 4, .tau = 3}, 0); }).find("heads = 4"),
            std::string::npos);
  EXPECT_THROW(mf::MemoryFormerBlock<float>({.d = 36, .heads = 2, .tau = 8}, 0), mf::ConfigError);  // τ ∤ d
  EXPECT_THROW(mf::MemoryFormerBlock<float>({.d = 32, .heads = 2, .rotary_dims = 3, .tau = 4}, 0), mf::ConfigError);
  EXPECT_THROW(mf::MemoryFormerBlock<float>({.d = 32, .heads = 2, .rotary_dims = 18, .tau = 4}, 0), mf::ConfigError);
  EXPECT_THROW(mf::MemoryFormerBlock<float>({.d = 32, .heads = 2, .tau = 8, .expand_bits = 9}, 0), mf::ConfigError);
  mf::MemoryFormerBlock<float> block({.d = 32, .heads = 2, .tau = 4}, 0);
  mf::MemoryFormerBlockCache<float> cache;
  mf::Matrix<float> x = mf::Matrix<float>::Random(10, 32), y(10, 32), dx(10, 32);
  const std::string rows = error_of([&] { block.forward(y, x, 3, 3, cache); });
  EXPECT_NE(rows.find("x is (10, 32), expected (batch·seq, d) = (9, 32)"), std::string::npos) << rows;
  EXPECT_THROW(block.backward(dx, x, y, cache), mf::StateError);
  block.forward(y, x, 2, 5, cache);
  EXPECT_THROW(block.backward(dx, x, mf::Matrix<float>::Zero(10, 31), cache), mf::ShapeError);
  auto kv = block.make_kv_cache(2, 4);
  mf::Matrix<float> odd(3, 32), out(3, 32);
  odd.setZero();
  EXPECT_THROW(block.forward_decode(out, odd, kv), mf::ShapeError);  // 3 rows for 2 sequences
  // A cache of another width is named as such, not through the attention's internal buffers.
  mf::Matrix<float> two = mf::Matrix<float>::Random(2, 32), out2(2, 32);
  for (const mf::Index width : {mf::Index(31), mf::Index(16)}) {
    mf::KVCache<float> other(2, 4, width);
    const std::string message = error_of([&] { block.forward_decode(out2, two, other); });
    EXPECT_NE(message.find("MemoryFormerBlock::forward_decode: kv holds " + std::to_string(width) +
                           " features per token, expected d = 32"),
              std::string::npos)
        << message;
    EXPECT_THROW(block.forward_decode(out2, two, other), mf::ShapeError);
    EXPECT_EQ(other.length(), 0);
  }
}

TEST(MemoryFormerBlock, OwnsItsHashAndExposesPublicNorms) {
  for (const mf::NormKind kind : {mf::NormKind::RMS, mf::NormKind::Layer}) {
    mf::MemoryFormerBlock<float> block({.d = 16, .heads = 2, .tau = 4, .norm = kind}, 3);
    const mf::BlockNorm<float>& norm1 = block.norm1();
    EXPECT_EQ(norm1.kind(), kind);
    EXPECT_EQ(block.norm2().kind(), kind);
    EXPECT_EQ(norm1.rms() != nullptr, kind == mf::NormKind::RMS);
    EXPECT_EQ(norm1.layer() != nullptr, kind == mf::NormKind::Layer);
    EXPECT_NE(static_cast<const void*>(&block.hasher()), static_cast<const void*>(&block.q().hasher()));  // its own
    // The block's hash is the one Q (and K, V) would compute on the same input: the same codes and scores.
    const mf::Matrix<float> a = mf::Matrix<float>::Random(7, 16);
    mf::HashResult<float> own, q;
    block.hasher().hash(own, a);
    block.q().hasher().hash(q, a);
    EXPECT_EQ(own.codes, q.codes);
    EXPECT_TRUE(own.scores == q.scores);
  }
}

TEST(MemoryBlock, RejectsBadInput) {
  EXPECT_THROW(mf::MemoryBlock<float>({.d = 30, .tau = 4}, 0), mf::ConfigError);
  mf::MemoryBlock<float> block({.d = 32, .tau = 4}, 0);
  mf::MemoryBlockCache<float> cache;
  mf::Matrix<float> x(4, 31), y(4, 32), dx(4, 32);
  x.setZero();
  EXPECT_THROW(block.forward(y, x, cache), mf::ShapeError);
  EXPECT_THROW(block.backward(dx, mf::Matrix<float>::Zero(4, 32), y, cache), mf::StateError);
  EXPECT_EQ(block.config().hidden(), 8 * 6);
  EXPECT_EQ(block.ml2().config().tau, 6);
}

TEST(MemoryBlock, ParameterCountsMatchThePapersTable5) {
  // d = 512, τ = 8, e = 0..3: table values of ML1 + ML2, 2 bytes each (fp16), in MB (1e6): 33.6 / 52.4 / 88.1 / 157.3.
  const double expected_mb[] = {33.6, 52.4, 88.1, 157.3};
  for (int e = 0; e <= 3; ++e) {
    const mf::MemoryBlockConfig config{.d = 512, .tau = 8, .expand_bits = e};
    const double values = double(config.num_tables() * (mf::Index(1) << 8) * config.hidden() +
                                 config.num_tables() * (mf::Index(1) << config.tau2()) * 512);
    EXPECT_NEAR(values * 2 / 1e6, expected_mb[e], 0.05) << "e = " << e;
  }
}

}  // namespace
