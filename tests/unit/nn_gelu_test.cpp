// SPDX-License-Identifier: MIT
// Tests of nn/gelu.hpp: known values of the erf form, finite-difference gradient, in-place use, errors.
#include <memoryformer/nn/gelu.hpp>
#include <memoryformer/random.hpp>
#include <memoryformer/testing/gradcheck.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <span>
#include <string>

#include "../support/test_helpers.hpp"

namespace mf = memoryformer;
using namespace memoryformer::testing_support;

TEST(NnGelu, KnownValues) {
  mf::Matrix<double> x(1, 6), y(1, 6);
  x << 0.0, 1.0, -1.0, 2.0, -3.0, 0.5;
  mf::gelu_forward(y, x);
  // Φ values from tables of the standard normal CDF: Φ(1) = 0.8413447460685429, Φ(2) = 0.9772498680518208,
  // Φ(−3) = 0.0013498980316301, Φ(0.5) = 0.6914624612740131.
  EXPECT_EQ(y(0, 0), 0.0);
  EXPECT_NEAR(y(0, 1), 0.8413447460685429, 1e-15);
  EXPECT_NEAR(y(0, 2), -1.0 * (1 - 0.8413447460685429), 1e-15);
  EXPECT_NEAR(y(0, 3), 2.0 * 0.9772498680518208, 1e-15);
  EXPECT_NEAR(y(0, 4), -3.0 * 0.0013498980316301, 1e-15);
  EXPECT_NEAR(y(0, 5), 0.5 * 0.6914624612740131, 1e-15);
  // Not the tanh approximation: at x = 1 that gives 0.8411919906082768.
  EXPECT_GT(std::abs(y(0, 1) - 0.8411919906082768), 1e-5);
}

TEST(NnGelu, ForwardMatchesErfcForm) {
  const auto x = random_matrix(3, 7, 1, 2.0);
  mf::Matrix<double> y(3, 7);
  mf::gelu_forward(y, x);
  for (mf::Index i = 0; i < 3; ++i)
    for (mf::Index j = 0; j < 7; ++j)
      EXPECT_NEAR(y(i, j), 0.5 * x(i, j) * std::erfc(-x(i, j) / std::sqrt(2.0)), 1e-14);
}

TEST(NnGelu, GradientMatchesFiniteDifferences) {
  for (mf::Index rows : {1, 3}) {
    auto x = random_matrix(rows, 7, 2, 1.5);
    const auto dy = random_matrix(rows, 7, 3);
    mf::Matrix<double> y(rows, 7), dx(rows, 7);
    mf::gelu_backward(dx, x, dy);
    auto loss = [&] {
      mf::gelu_forward(y, x);
      return (dy.array() * y.array()).sum();
    };
    const auto r = mf::check_gradient(span_of(x), cspan_of(dx), loss);
    EXPECT_LE(r.relative_error, 1e-6) << "rows = " << rows;
    EXPECT_EQ(r.checked, rows * 7);
  }
  // GeLU'(0) = 1/2.
  mf::Matrix<double> z = mf::Matrix<double>::Zero(1, 1), one = mf::Matrix<double>::Ones(1, 1), g(1, 1);
  mf::gelu_backward(g, z, one);
  EXPECT_DOUBLE_EQ(g(0, 0), 0.5);
}

TEST(NnGelu, InPlaceBlocksAndFloat) {
  const auto x = random_matrix(4, 5, 4);
  mf::Matrix<double> y(4, 5);
  mf::gelu_forward(y, x);
  mf::Matrix<double> z = x;
  mf::gelu_forward(z, z);
  EXPECT_EQ(z, y);
  mf::Matrix<double> top(2, 5);
  mf::gelu_forward(top, x.topRows(2));  // any dense expression as input
  EXPECT_EQ(top, y.topRows(2));
  mf::Matrix<double> part = mf::Matrix<double>::Zero(4, 5);
  mf::gelu_forward(part.middleRows(1, 2), x.middleRows(1, 2));  // a block as output
  EXPECT_EQ(part.middleRows(1, 2), y.middleRows(1, 2));
  EXPECT_EQ(part.row(0).cwiseAbs().sum(), 0.0);
  const mf::Matrix<float> xf = x.cast<float>();
  mf::Matrix<float> yf(4, 5);
  mf::gelu_forward(yf, xf);
  EXPECT_LE((yf.cast<double>() - y).cwiseAbs().maxCoeff(), 1e-6);
}

TEST(NnGelu, BadShapesThrow) {
  mf::Matrix<double> x(2, 3), y(3, 2), dy(2, 4), dx(2, 3);
  EXPECT_THROW(mf::gelu_forward(y, x), mf::ShapeError);
  try {
    mf::gelu_forward(y, x);
  } catch (const mf::ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("gelu_forward: y is (3, 2), expected (2, 3)"), std::string::npos) << e.what();
  }
  try {
    mf::gelu_backward(dx, x, dy);
    ADD_FAILURE() << "no throw";
  } catch (const mf::ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("gelu_backward: dy is (2, 4), expected (2, 3)"), std::string::npos) << e.what();
  }
}
