// SPDX-License-Identifier: MIT
// Tests of nn/rms_norm.hpp: eps placement, forward against explicit loops, finite-difference gradients, errors.
#include <memoryformer/nn/rms_norm.hpp>
#include <memoryformer/random.hpp>
#include <memoryformer/testing/gradcheck.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <span>
#include <string>

#include "../support/test_helpers.hpp"

namespace mf = memoryformer;
using namespace memoryformer::testing_support;

TEST(NnRMSNorm, ForwardMatchesExplicitLoops) {
  mf::RMSNorm<double> norm(7);
  norm.scale() = random_matrix(7, 1, 3);
  const auto x = random_matrix(4, 7, 1);
  mf::Matrix<double> y(4, 7);
  mf::RMSNormCache<double> cache;
  norm.forward(y, x, cache);
  for (mf::Index n = 0; n < 4; ++n) {
    double ss = 0;
    for (mf::Index j = 0; j < 7; ++j) ss += x(n, j) * x(n, j);
    const double rms = std::sqrt(ss / 7);
    EXPECT_NEAR(cache.rms(n), rms, 1e-14);
    for (mf::Index j = 0; j < 7; ++j) EXPECT_NEAR(y(n, j), x(n, j) / (rms + 1e-8) * norm.scale()(j), 1e-13);
  }
}

TEST(NnRMSNorm, EpsIsAddedToTheRms) {
  // A constant row c = 1e-8 has rms 1e-8: the authors' form gives c/(c + eps) = 0.5; eps inside the root would
  // give 1e-8/sqrt(1e-16 + 1e-8) ≈ 1e-4.
  mf::RMSNorm<double> norm(3);
  mf::Matrix<double> x = mf::Matrix<double>::Constant(1, 3, 1e-8), y(1, 3);
  mf::RMSNormCache<double> cache;
  norm.forward(y, x, cache);
  for (mf::Index j = 0; j < 3; ++j) EXPECT_NEAR(y(0, j), 0.5, 1e-12);
  mf::Matrix<double> x2(1, 2), y2(1, 2);
  x2 << 3, -4;  // rms = sqrt(12.5)
  mf::RMSNorm<double> norm2(2, 0.5);
  norm2.forward(y2, x2, cache);
  EXPECT_NEAR(y2(0, 0), 3 / (std::sqrt(12.5) + 0.5), 1e-15);
  EXPECT_NEAR(y2(0, 1), -4 / (std::sqrt(12.5) + 0.5), 1e-15);
}

TEST(NnRMSNorm, GradientsMatchFiniteDifferences) {
  for (mf::Index rows : {1, 3}) {
    mf::RMSNorm<double> norm(7);
    norm.scale() = random_matrix(7, 1, 5);
    auto x = random_matrix(rows, 7, 6);
    const auto dy = random_matrix(rows, 7, 7);
    mf::Matrix<double> y(rows, 7), dx(rows, 7);
    mf::RMSNormCache<double> cache;
    auto loss = [&] {
      mf::RMSNormCache<double> c;
      norm.forward(y, x, c);
      return (dy.array() * y.array()).sum();
    };
    norm.forward(y, x, cache);
    norm.backward(dx, x, dy, cache);
    const mf::Vector<double> dg = norm.dscale();
    auto r = mf::check_gradient(span_of(x), cspan_of(dx), loss);
    EXPECT_LE(r.relative_error, 1e-6) << "x, rows = " << rows;
    r = mf::check_gradient(span_of(norm.scale()), cspan_of(dg), loss);
    EXPECT_LE(r.relative_error, 1e-6) << "scale, rows = " << rows;
    EXPECT_EQ(r.checked, 7);
  }
}

TEST(NnRMSNorm, ZeroRowHasFiniteGradient) {
  mf::RMSNorm<double> norm(4);
  norm.scale() << 1, 2, 3, 4;
  mf::Matrix<double> x = mf::Matrix<double>::Zero(1, 4), y(1, 4), dx(1, 4), dy(1, 4);
  dy << 1, -1, 0.5, 2;
  mf::RMSNormCache<double> cache;
  norm.forward(y, x, cache);
  norm.backward(dx, x, dy, cache);
  // d/dx_j of x_j g_j/(|x|/2 + eps) at x = 0 is g_j/eps.
  for (mf::Index j = 0; j < 4; ++j) EXPECT_NEAR(dx(0, j), dy(0, j) * norm.scale()(j) / 1e-8, 1e-3);
  EXPECT_EQ(norm.dscale().cwiseAbs().maxCoeff(), 0.0);
}

TEST(NnRMSNorm, InPlaceMatchesOutOfPlaceAndAccumulates) {
  mf::RMSNorm<double> norm(5);
  norm.scale() = random_matrix(5, 1, 9);
  const auto x = random_matrix(3, 5, 1);
  const auto dy = random_matrix(3, 5, 2);
  mf::Matrix<double> y(3, 5), dx(3, 5);
  mf::RMSNormCache<double> cache;
  norm.forward(y, x, cache);
  norm.backward(dx, x, dy, cache);
  const mf::Vector<double> once = norm.dscale();
  mf::Matrix<double> inplace = x;
  norm.forward(inplace, inplace, cache);
  EXPECT_EQ(inplace, y);
  mf::Matrix<double> g = dy;
  norm.backward(g, x, g, cache);
  EXPECT_EQ(g, dx);
  EXPECT_TRUE(norm.dscale().isApprox(2 * once));
  norm.zero_grad();
  EXPECT_EQ(norm.dscale().cwiseAbs().maxCoeff(), 0.0);
}

TEST(NnRMSNorm, ParametersAndInit) {
  mf::RMSNorm<float> norm(6);
  EXPECT_EQ(norm.scale(), mf::Vector<float>::Ones(6));
  auto p = norm.parameters("blocks.1.norm2");
  ASSERT_EQ(p.size(), 1u);
  EXPECT_EQ(p[0].name, "blocks.1.norm2.scale");
  EXPECT_EQ(p[0].kind, mf::ParameterKind::Norm);
  EXPECT_EQ(p[0].shape, (std::vector<mf::Index>{6}));
  EXPECT_EQ(p[0].value.data(), norm.scale().data());
  EXPECT_EQ(p[0].grad.data(), norm.dscale().data());
}

TEST(NnRMSNorm, BadShapesThrow) {
  mf::RMSNorm<double> norm(4);
  mf::Matrix<double> x(2, 5), y(2, 4), x4(2, 4), y3(3, 4);
  mf::RMSNormCache<double> cache;
  expect_throw_with([&] { norm.forward(y, x, cache); }, "RMSNorm::forward: x is (2, 5), expected (N, 4)");
  EXPECT_THROW(norm.forward(y3, x4, cache), mf::ShapeError);
  expect_throw_with([&] { norm.forward(y3, x4, cache); }, "y is (3, 4), expected (2, 4)");
  mf::Matrix<double> dx(2, 4), dy(2, 3);
  expect_throw_with([&] { norm.backward(dx, x4, dy, cache); }, "RMSNorm::backward: dy is (2, 3)");
  mf::Matrix<double> dy4(2, 4);
  EXPECT_THROW(norm.backward(dx, x4, dy4, cache), mf::StateError);  // cache never filled
  EXPECT_THROW(mf::RMSNorm<double>(0), mf::ConfigError);
  expect_throw_with([] { mf::RMSNorm<double>(3, -1.0); }, "eps");
}
