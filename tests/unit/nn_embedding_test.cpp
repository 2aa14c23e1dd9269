// SPDX-License-Identifier: MIT
// Tests of nn/embedding.hpp: lookup, scatter-add with repeated ids, touched rows, gradients, bad ids.
#include <memoryformer/nn/embedding.hpp>
#include <memoryformer/testing/gradcheck.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "../support/test_helpers.hpp"

namespace mf = memoryformer;
using namespace memoryformer::testing_support;

TEST(NnEmbedding, ForwardLooksUpRows) {
  mf::Embedding<double> emb(4, 3, 1u);
  emb.weight() << 0, 1, 2,  //
      10, 11, 12,           //
      20, 21, 22,           //
      30, 31, 32;
  const std::vector<std::int32_t> tokens{3, 0, 3, 2};
  mf::Matrix<double> y(4, 3);
  emb.forward(y, tokens);
  for (mf::Index n = 0; n < 4; ++n)
    for (mf::Index c = 0; c < 3; ++c) EXPECT_EQ(y(n, c), 10.0 * tokens[size_t(n)] + double(c));
}

TEST(NnEmbedding, BackwardScatterAddsAndFlagsRows) {
  mf::Embedding<double> emb(6, 2, 1u);
  const std::vector<std::int32_t> tokens{4, 1, 4, 4};
  mf::Matrix<double> dy(4, 2);
  dy << 1, 2,  //
      3, 4,    //
      5, 6,    //
      7, 8;
  emb.backward(tokens, dy);
  EXPECT_EQ(emb.dweight()(4, 0), 13.0);
  EXPECT_EQ(emb.dweight()(4, 1), 16.0);
  EXPECT_EQ(emb.dweight()(1, 0), 3.0);
  EXPECT_EQ(emb.dweight()(1, 1), 4.0);
  EXPECT_EQ(emb.dweight().cwiseAbs().sum(), 13.0 + 16.0 + 3.0 + 4.0);
  EXPECT_EQ(emb.touched_rows(), (std::vector<std::uint8_t>{0, 1, 0, 0, 1, 0}));
  emb.backward(tokens, dy);  // accumulates
  EXPECT_EQ(emb.dweight()(4, 0), 26.0);
  emb.zero_grad();
  EXPECT_EQ(emb.dweight().cwiseAbs().maxCoeff(), 0.0);
  EXPECT_EQ(emb.touched_rows(), std::vector<std::uint8_t>(6, 0));
}

TEST(NnEmbedding, GradientMatchesFiniteDifferences) {
  for (const std::vector<std::int32_t>& tokens : {std::vector<std::int32_t>{2}, std::vector<std::int32_t>{0, 5, 2, 5, 5, 6, 0}}) {
    mf::Embedding<double> emb(7, 5, 3u, 1.0);
    const mf::Index n = mf::Index(tokens.size());
    const auto dy = random_matrix(n, 5, 4);
    mf::Matrix<double> y(n, 5);
    emb.backward(tokens, dy);
    const mf::Matrix<double> dw = emb.dweight();
    auto loss = [&] {
      emb.forward(y, tokens);
      return (dy.array() * y.array()).sum();
    };
    const auto r = mf::check_gradient(span_of(emb.weight()), cspan_of(dw), loss);
    EXPECT_LE(r.relative_error, 1e-6) << "tokens = " << n;
    EXPECT_EQ(r.checked, 35);
  }
}

TEST(NnEmbedding, ParametersExposeTouchedRows) {
  mf::Embedding<float> emb(5, 3, 9u);
  auto p = emb.parameters("tok_emb");
  ASSERT_EQ(p.size(), 1u);
  EXPECT_EQ(p[0].name, "tok_emb.weight");
  EXPECT_EQ(p[0].kind, mf::ParameterKind::Embedding);
  EXPECT_EQ(p[0].shape, (std::vector<mf::Index>{5, 3}));
  EXPECT_EQ(p[0].row_size, 3);
  EXPECT_EQ(p[0].touched_rows, &emb.touched_rows());
  EXPECT_EQ(p[0].value.data(), emb.weight().data());
  EXPECT_EQ(p[0].grad.data(), emb.dweight().data());
  const std::vector<std::int32_t> tokens{2};
  mf::Matrix<float> dy = mf::Matrix<float>::Ones(1, 3);
  emb.backward(tokens, dy);
  EXPECT_EQ((*p[0].touched_rows)[2], 1);
  EXPECT_EQ(p[0].grad[2 * 3 + 1], 1.0f);
}

TEST(NnEmbedding, InitIsSeeded) {
  mf::Embedding<double> a(40, 30, 5u, 0.02), b(40, 30, 5u, 0.02);
  EXPECT_EQ(a.weight(), b.weight());
  const double mean = a.weight().mean();
  EXPECT_NEAR(std::sqrt((a.weight().array() - mean).square().mean()), 0.02, 0.002);
  mf::Rng rng(5);
  mf::Embedding<double> c(40, 30, rng, 0.02);
  EXPECT_EQ(a.weight(), c.weight());
}

TEST(NnEmbedding, BadIdsAndShapesThrow) {
  mf::Embedding<double> emb(5, 3, 1u);
  const std::vector<std::int32_t> bad{0, 1, 5}, neg{-2};
  mf::Matrix<double> y(3, 3), dy = mf::Matrix<double>::Ones(3, 3);
  expect_throw_with([&] { emb.forward(y, bad); }, "Embedding::forward: tokens[2] = 5 is outside [0, vocab = 5)");
  EXPECT_THROW(emb.forward(y, bad), std::invalid_argument);
  mf::Matrix<double> y1(1, 3);
  expect_throw_with([&] { emb.forward(y1, neg); }, "tokens[0] = -2");
  expect_throw_with([&] { emb.backward(bad, dy); }, "Embedding::backward: tokens[2] = 5");
  EXPECT_EQ(emb.dweight().cwiseAbs().maxCoeff(), 0.0);  // nothing accumulated by the failed call
  EXPECT_EQ(emb.touched_rows(), std::vector<std::uint8_t>(5, 0));
  const std::vector<std::int32_t> ok{0, 1};
  expect_throw_with([&] { emb.forward(y, ok); }, "Embedding::forward: y is (3, 3), expected (tokens.size(), d) = (2, 3)");
  EXPECT_THROW(emb.forward(y, ok), mf::ShapeError);
  EXPECT_THROW(emb.backward(ok, dy), mf::ShapeError);
  EXPECT_THROW(mf::Embedding<double>(0, 3, 1u), mf::ConfigError);
  expect_throw_with([] { mf::Embedding<double>(3, 0, 1u); }, "d = 0");
}
