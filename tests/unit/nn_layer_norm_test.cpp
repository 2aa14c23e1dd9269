// SPDX-License-Identifier: MIT
// Tests of nn/layer_norm.hpp: known values, forward against explicit loops, finite-difference gradients, errors.
#include <memoryformer/nn/layer_norm.hpp>
#include <memoryformer/random.hpp>
#include <memoryformer/testing/gradcheck.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <span>
#include <string>

#include "../support/test_helpers.hpp"

namespace mf = memoryformer;
using namespace memoryformer::testing_support;

namespace {

mf::Matrix<double> random_matrix_with_mean(mf::Index rows, mf::Index cols, std::uint64_t seed, double mean = 0.0) {
  mf::Rng rng(seed);
  mf::Matrix<double> m(rows, cols);
  rng.fill_normal(std::span<double>(m.data(), size_t(m.size())), mean, 1.0);
  return m;
}



}  // namespace

TEST(NnLayerNorm, KnownValues) {
  mf::LayerNorm<double> norm(4);
  mf::Matrix<double> x(1, 4), y(1, 4);
  x << 1, 2, 3, 4;  // mean 2.5, biased variance 1.25
  mf::LayerNormCache<double> cache;
  norm.forward(y, x, cache);
  const double rstd = 1 / std::sqrt(1.25 + 1e-5);
  EXPECT_DOUBLE_EQ(cache.mean(0), 2.5);
  EXPECT_NEAR(cache.rstd(0), rstd, 1e-15);
  EXPECT_NEAR(y(0, 0), -1.5 * rstd, 1e-15);
  EXPECT_NEAR(y(0, 3), 1.5 * rstd, 1e-15);
}

TEST(NnLayerNorm, ForwardMatchesExplicitLoops) {
  mf::LayerNorm<double> norm(7);
  norm.gamma() = random_matrix_with_mean(7, 1, 3);
  norm.beta() = random_matrix_with_mean(7, 1, 4);
  const auto x = random_matrix_with_mean(5, 7, 1, 100.0);  // a large mean: the variance must not cancel
  mf::Matrix<double> y(5, 7);
  mf::LayerNormCache<double> cache;
  norm.forward(y, x, cache);
  for (mf::Index n = 0; n < 5; ++n) {
    double mean = 0, var = 0;
    for (mf::Index j = 0; j < 7; ++j) mean += x(n, j) / 7;
    for (mf::Index j = 0; j < 7; ++j) var += (x(n, j) - mean) * (x(n, j) - mean) / 7;
    for (mf::Index j = 0; j < 7; ++j)
      EXPECT_NEAR(y(n, j), (x(n, j) - mean) / std::sqrt(var + 1e-5) * norm.gamma()(j) + norm.beta()(j), 1e-12);
  }
}

TEST(NnLayerNorm, GradientsMatchFiniteDifferences) {
  for (mf::Index rows : {1, 4}) {
    for (mf::Index d : {1, 7}) {
      mf::LayerNorm<double> norm(d);
      norm.gamma() = random_matrix_with_mean(d, 1, 5);
      norm.beta() = random_matrix_with_mean(d, 1, 6);
      auto x = random_matrix_with_mean(rows, d, 7);
      const auto dy = random_matrix_with_mean(rows, d, 8);
      mf::Matrix<double> y(rows, d), dx(rows, d);
      mf::LayerNormCache<double> cache;
      auto loss = [&] {
        mf::LayerNormCache<double> c;
        norm.forward(y, x, c);
        return (dy.array() * y.array()).sum();
      };
      norm.forward(y, x, cache);
      norm.backward(dx, x, dy, cache);
      const mf::Vector<double> dg = norm.dgamma(), db = norm.dbeta();
      auto r = mf::check_gradient(span_of(x), cspan_of(dx), loss);
      if (d == 1) {
        // y = β whatever x: dx is 0 mathematically, and only rounding (e.g. an FMA in γ·dy − mean(γ·dy)) is left,
        // so the relative error is meaningless; bound the absolute one.
        EXPECT_LE(r.max_abs_error, 1e-10) << "x, rows = " << rows;
        EXPECT_LE(dx.cwiseAbs().maxCoeff(), 1e-10);
      } else {
        EXPECT_LE(r.relative_error, 1e-6) << "x, rows = " << rows << ", d = " << d;
      }
      r = mf::check_gradient(span_of(norm.gamma()), cspan_of(dg), loss);
      EXPECT_LE(r.relative_error, 1e-6) << "gamma, rows = " << rows << ", d = " << d;
      r = mf::check_gradient(span_of(norm.beta()), cspan_of(db), loss);
      EXPECT_LE(r.relative_error, 1e-6) << "beta, rows = " << rows << ", d = " << d;
    }
  }
}

TEST(NnLayerNorm, InPlaceMatchesOutOfPlaceAndAccumulates) {
  mf::LayerNorm<double> norm(6);
  norm.gamma() = random_matrix_with_mean(6, 1, 9);
  const auto x = random_matrix_with_mean(3, 6, 1);
  const auto dy = random_matrix_with_mean(3, 6, 2);
  mf::Matrix<double> y(3, 6), dx(3, 6);
  mf::LayerNormCache<double> cache;
  norm.forward(y, x, cache);
  norm.backward(dx, x, dy, cache);
  const mf::Vector<double> g1 = norm.dgamma(), b1 = norm.dbeta();
  EXPECT_TRUE(b1.isApprox(dy.colwise().sum().transpose()));
  mf::Matrix<double> inplace = x;
  norm.forward(inplace, inplace, cache);
  EXPECT_EQ(inplace, y);
  mf::Matrix<double> g = dy;
  norm.backward(g, x, g, cache);
  EXPECT_EQ(g, dx);
  EXPECT_TRUE(norm.dgamma().isApprox(2 * g1));
  EXPECT_TRUE(norm.dbeta().isApprox(2 * b1));
  norm.zero_grad();
  EXPECT_EQ(norm.dgamma().cwiseAbs().maxCoeff() + norm.dbeta().cwiseAbs().maxCoeff(), 0.0);
}

TEST(NnLayerNorm, FloatMatchesDouble) {
  mf::LayerNorm<double> nd(33);
  mf::LayerNorm<float> nf(33);
  const auto x = random_matrix_with_mean(4, 33, 3, 5.0);
  const mf::Matrix<float> xf = x.cast<float>();
  mf::Matrix<double> yd(4, 33);
  mf::Matrix<float> yf(4, 33);
  mf::LayerNormCache<double> cd;
  mf::LayerNormCache<float> cf;
  nd.forward(yd, x, cd);
  nf.forward(yf, xf, cf);
  EXPECT_LE((yf.cast<double>() - yd).cwiseAbs().maxCoeff(), 1e-5);
}

TEST(NnLayerNorm, ParametersAndInit) {
  mf::LayerNorm<double> norm(3);
  EXPECT_EQ(norm.gamma(), mf::Vector<double>::Ones(3));
  EXPECT_EQ(norm.beta(), mf::Vector<double>::Zero(3));
  auto p = norm.parameters("blocks.0.ffn.ln");
  ASSERT_EQ(p.size(), 2u);
  EXPECT_EQ(p[0].name, "blocks.0.ffn.ln.gamma");
  EXPECT_EQ(p[1].name, "blocks.0.ffn.ln.beta");
  EXPECT_EQ(p[0].kind, mf::ParameterKind::Norm);
  EXPECT_EQ(p[1].kind, mf::ParameterKind::Norm);
  EXPECT_EQ(p[1].value.data(), norm.beta().data());
  EXPECT_EQ(p[1].grad.data(), norm.dbeta().data());
}

TEST(NnLayerNorm, BadShapesThrow) {
  mf::LayerNorm<double> norm(4);
  mf::Matrix<double> x(2, 3), y(2, 4), x4(2, 4), dx(1, 4), dy(2, 4);
  mf::LayerNormCache<double> cache;
  expect_throw_with([&] { norm.forward(y, x, cache); }, "LayerNorm::forward: x is (2, 3), expected (N, 4)");
  EXPECT_THROW(norm.forward(y, x, cache), mf::ShapeError);
  norm.forward(y, x4, cache);
  expect_throw_with([&] { norm.backward(dx, x4, dy, cache); }, "LayerNorm::backward: dx is (1, 4), expected (2, 4)");
  mf::Matrix<double> x5(5, 4), dx5(5, 4), dy5(5, 4);
  EXPECT_THROW(norm.backward(dx5, x5, dy5, cache), mf::StateError);  // cache is from a 2-row x
  EXPECT_THROW(mf::LayerNorm<double>(-1), mf::ConfigError);
  EXPECT_THROW(mf::LayerNorm<double>(4, 0.0), mf::ConfigError);
}
