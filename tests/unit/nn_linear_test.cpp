// SPDX-License-Identifier: MIT
// Tests of nn/linear.hpp: forward against explicit loops, finite-difference gradients, accumulation, shape errors.
#include <memoryformer/nn/linear.hpp>
#include <memoryformer/testing/gradcheck.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <span>
#include <string>

#include "../support/test_helpers.hpp"

namespace mf = memoryformer;
using namespace memoryformer::testing_support;

TEST(NnLinear, ForwardMatchesExplicitLoops) {
  mf::Linear<double> layer(5, 3, true, 7u, 0.5);
  layer.bias() << 0.25, -1.0, 2.0;
  const auto x = random_matrix(4, 5, 11);
  mf::Matrix<double> y(4, 3);
  layer.forward(y, x);
  for (mf::Index n = 0; n < 4; ++n)
    for (mf::Index o = 0; o < 3; ++o) {
      double expect = layer.bias()(o);
      for (mf::Index i = 0; i < 5; ++i) expect += x(n, i) * layer.weight()(i, o);
      EXPECT_NEAR(y(n, o), expect, 1e-13);
    }
}

TEST(NnLinear, ForwardKnownValuesWithoutBias) {
  mf::Linear<double> layer(2, 2, false, 1u);
  layer.weight() << 1, 2, 3, 4;
  mf::Matrix<double> x(1, 2), y(1, 2);
  x << 1, -1;
  layer.forward(y, x);
  EXPECT_DOUBLE_EQ(y(0, 0), -2.0);
  EXPECT_DOUBLE_EQ(y(0, 1), -2.0);
  EXPECT_EQ(layer.parameters("head").size(), 1u);
}

TEST(NnLinear, GradientsMatchFiniteDifferences) {
  for (mf::Index n : {1, 3}) {
    mf::Linear<double> layer(5, 7, true, 3u, 0.3);
    mf::Rng(9).fill_normal(std::span<double>(layer.bias().data(), 7), 0.0, 0.5);
    auto x = random_matrix(n, 5, 21);
    const auto dy = random_matrix(n, 7, 22);
    mf::Matrix<double> y(n, 7), dx(n, 5);
    auto loss = [&] {
      layer.forward(y, x);
      return (dy.array() * y.array()).sum();
    };
    layer.zero_grad();
    layer.forward(y, x);
    layer.backward(dx, x, dy);
    const mf::Matrix<double> dw = layer.dweight();
    const mf::Vector<double> db = layer.dbias();
    auto r = mf::check_gradient(span_of(x), cspan_of(dx), loss);
    EXPECT_LE(r.relative_error, 1e-6) << "x, N = " << n;
    EXPECT_EQ(r.checked, n * 5);
    r = mf::check_gradient(span_of(layer.weight()), cspan_of(dw), loss);
    EXPECT_LE(r.relative_error, 1e-6) << "W, N = " << n;
    r = mf::check_gradient(span_of(layer.bias()), cspan_of(db), loss);
    EXPECT_LE(r.relative_error, 1e-6) << "b, N = " << n;
  }
}

TEST(NnLinear, BackwardClosedFormAndAccumulation) {
  mf::Linear<double> layer(3, 2, true, 5u, 1.0);
  const auto x = random_matrix(4, 3, 1);
  const auto dy = random_matrix(4, 2, 2);
  mf::Matrix<double> dx(4, 3);
  layer.backward(dx, x, dy);
  layer.backward(dx, x, dy);
  for (mf::Index i = 0; i < 3; ++i)
    for (mf::Index o = 0; o < 2; ++o) {
      double g = 0;
      for (mf::Index n = 0; n < 4; ++n) g += x(n, i) * dy(n, o);
      EXPECT_NEAR(layer.dweight()(i, o), 2 * g, 1e-12);
    }
  for (mf::Index o = 0; o < 2; ++o) EXPECT_NEAR(layer.dbias()(o), 2 * (dy(0, o) + dy(1, o) + dy(2, o) + dy(3, o)), 1e-12);
  for (mf::Index n = 0; n < 4; ++n)
    for (mf::Index i = 0; i < 3; ++i)
      EXPECT_NEAR(dx(n, i), dy(n, 0) * layer.weight()(i, 0) + dy(n, 1) * layer.weight()(i, 1), 1e-12);
  layer.zero_grad();
  EXPECT_EQ(layer.dweight().cwiseAbs().maxCoeff(), 0.0);
  EXPECT_EQ(layer.dbias().cwiseAbs().maxCoeff(), 0.0);
}

TEST(NnLinear, BackwardMayOverwriteItsInput) {
  mf::Linear<double> a(4, 4, true, 5u, 1.0), b(4, 4, true, 5u, 1.0);
  auto x = random_matrix(3, 4, 1);
  const auto dy = random_matrix(3, 4, 2);
  mf::Matrix<double> dx(3, 4);
  a.backward(dx, x, dy);
  b.backward(x, x, dy);  // dx written into x's storage
  EXPECT_TRUE(x.isApprox(dx));
  EXPECT_TRUE(a.dweight().isApprox(b.dweight()));
}

TEST(NnLinear, ParametersNamesKindsAndViews) {
  mf::Linear<double> layer(3, 2, true, 5u);
  auto params = layer.parameters("blocks.0.head");
  ASSERT_EQ(params.size(), 2u);
  EXPECT_EQ(params[0].name, "blocks.0.head.weight");
  EXPECT_EQ(params[0].kind, mf::ParameterKind::Dense);
  EXPECT_EQ(params[0].shape, (std::vector<mf::Index>{3, 2}));
  EXPECT_EQ(params[0].value.data(), layer.weight().data());
  EXPECT_EQ(params[0].grad.data(), layer.dweight().data());
  EXPECT_EQ(params[1].name, "blocks.0.head.bias");
  EXPECT_EQ(params[1].kind, mf::ParameterKind::Bias);
  EXPECT_EQ(params[1].value.size(), 2u);
  EXPECT_EQ(layer.parameters()[0].name, "weight");
}

TEST(NnLinear, InitIsSeededAndScaled) {
  mf::Linear<double> a(64, 50, true, 42u, 0.02), b(64, 50, true, 42u, 0.02);
  EXPECT_EQ(a.weight(), b.weight());
  const double mean = a.weight().mean();
  const double sd = std::sqrt((a.weight().array() - mean).square().mean());
  EXPECT_NEAR(sd, 0.02, 0.002);
  EXPECT_EQ(a.bias().cwiseAbs().maxCoeff(), 0.0);
  mf::Rng rng(42);
  mf::Linear<double> c(64, 50, false, rng, 0.02);
  EXPECT_EQ(a.weight(), c.weight());
}

TEST(NnLinear, FloatMatchesDouble) {
  mf::Linear<double> d(9, 6, true, 3u, 0.3);
  mf::Linear<float> f(9, 6, true, 3u, 0.3);
  d.bias().setConstant(0.1);
  f.bias().setConstant(0.1f);
  const auto x = random_matrix(5, 9, 8);
  const mf::Matrix<float> xf = x.cast<float>();
  mf::Matrix<double> yd(5, 6);
  mf::Matrix<float> yf(5, 6);
  d.forward(yd, x);
  f.forward(yf, xf);
  EXPECT_LE((yf.cast<double>() - yd).cwiseAbs().maxCoeff(), 1e-5);
}

TEST(NnLinear, BadShapesAndConfigThrow) {
  mf::Linear<double> layer(4, 3, true, 1u);
  mf::Matrix<double> x(2, 5), y(2, 3), x4(2, 4), y_bad(3, 3), dx(2, 4), dy(2, 2);
  expect_throw_with([&] { layer.forward(y, x); }, "Linear::forward: x is (2, 5), expected (N, d_in) = (N, 4)");
  EXPECT_THROW(layer.forward(y, x), mf::ShapeError);
  expect_throw_with([&] { layer.forward(y_bad, x4); }, "y is (3, 3), expected (N, d_out) = (2, 3)");
  expect_throw_with([&] { layer.backward(dx, x4, dy); }, "Linear::backward: dy is (2, 2)");
  EXPECT_THROW(layer.backward(dx, x4, dy), mf::ShapeError);
  mf::Matrix<double> dx_bad(2, 3);
  mf::Matrix<double> dy_ok(2, 3);
  expect_throw_with([&] { layer.backward(dx_bad, x4, dy_ok); }, "dx is (2, 3)");
  EXPECT_THROW((mf::Linear<double>(0, 3, true, 1u)), mf::ConfigError);
  expect_throw_with([] { mf::Linear<double>(3, -2, true, 1u); }, "d_out = -2");
  mf::Linear<double> square(3, 3, false, 1u);
  mf::Matrix<double> z(2, 3), dz(2, 3);
  EXPECT_THROW(square.forward(z, z), std::invalid_argument);
  EXPECT_THROW(square.backward(dz, z, dz), std::invalid_argument);
}
