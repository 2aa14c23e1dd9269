// SPDX-License-Identifier: MIT
// Tests of nn/softmax.hpp: known values, stability for large logits, finite-difference gradient, errors.
#include <memoryformer/nn/softmax.hpp>
#include <memoryformer/random.hpp>
#include <memoryformer/testing/gradcheck.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <span>
#include <string>

#include "../support/test_helpers.hpp"

namespace mf = memoryformer;
using namespace memoryformer::testing_support;

TEST(NnSoftmax, KnownValuesAndStability) {
  mf::Matrix<double> x(3, 3), y(3, 3);
  const double inf = std::numeric_limits<double>::infinity();
  x << 1, 2, 3,            //
      1000, 1001, 1002,    // would overflow without the max shift
      0, -inf, 0;          // −∞ gets probability 0
  mf::softmax_forward(y, x);
  const double e1 = std::exp(1.0), e2 = std::exp(2.0), e3 = std::exp(3.0), z = e1 + e2 + e3;
  for (int r = 0; r < 2; ++r) {
    EXPECT_NEAR(y(r, 0), e1 / z, 1e-15);
    EXPECT_NEAR(y(r, 1), e2 / z, 1e-15);
    EXPECT_NEAR(y(r, 2), e3 / z, 1e-15);
  }
  EXPECT_DOUBLE_EQ(y(2, 0), 0.5);
  EXPECT_EQ(y(2, 1), 0.0);
  EXPECT_DOUBLE_EQ(y(2, 2), 0.5);
}

TEST(NnSoftmax, ForwardMatchesNaiveFormula) {
  const auto x = random_matrix(4, 7, 1, 2.0);
  mf::Matrix<double> y(4, 7);
  mf::softmax_forward(y, x);
  for (mf::Index i = 0; i < 4; ++i) {
    double z = 0;
    for (mf::Index j = 0; j < 7; ++j) z += std::exp(x(i, j));
    for (mf::Index j = 0; j < 7; ++j) EXPECT_NEAR(y(i, j), std::exp(x(i, j)) / z, 1e-15);
  }
}

TEST(NnSoftmax, GradientMatchesFiniteDifferences) {
  for (mf::Index rows : {1, 3}) {
    for (mf::Index cols : {1, 7}) {
      auto x = random_matrix(rows, cols, 2);
      const auto dy = random_matrix(rows, cols, 3);
      mf::Matrix<double> y(rows, cols), dx(rows, cols);
      mf::softmax_forward(y, x);
      mf::softmax_backward(dx, y, dy);
      auto loss = [&] {
        mf::softmax_forward(y, x);
        return (dy.array() * y.array()).sum();
      };
      const auto r = mf::check_gradient(span_of(x), cspan_of(dx), loss);
      EXPECT_LE(r.relative_error, 1e-6) << "rows = " << rows << ", cols = " << cols;
      // Jacobian written out: dx_j = Σ_k dy_k · y_k (δ_jk − y_j).
      mf::softmax_forward(y, x);
      for (mf::Index i = 0; i < rows; ++i)
        for (mf::Index j = 0; j < cols; ++j) {
          double g = 0;
          for (mf::Index k = 0; k < cols; ++k) g += dy(i, k) * y(i, k) * ((j == k ? 1.0 : 0.0) - y(i, j));
          EXPECT_NEAR(dx(i, j), g, 1e-14);
        }
    }
  }
}

TEST(NnSoftmax, InPlaceAndFloat) {
  const auto x = random_matrix(3, 5, 4);
  mf::Matrix<double> y(3, 5);
  mf::softmax_forward(y, x);
  mf::Matrix<double> z = x;
  mf::softmax_forward(z, z);
  EXPECT_EQ(z, y);
  const auto dy = random_matrix(3, 5, 5);
  mf::Matrix<double> dx(3, 5), g = dy;
  mf::softmax_backward(dx, y, dy);
  mf::softmax_backward(g, y, g);
  EXPECT_EQ(g, dx);
  const mf::Matrix<float> xf = x.cast<float>();
  mf::Matrix<float> yf(3, 5);
  mf::softmax_forward(yf, xf);
  EXPECT_LE((yf.cast<double>() - y).cwiseAbs().maxCoeff(), 1e-7);
}

TEST(NnSoftmax, BadShapesThrow) {
  mf::Matrix<double> x(2, 3), y(2, 4), empty(2, 0);
  try {
    mf::softmax_forward(y, x);
    ADD_FAILURE() << "no throw";
  } catch (const mf::ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("softmax_forward: y is (2, 4), expected (2, 3)"), std::string::npos) << e.what();
  }
  EXPECT_THROW(mf::softmax_forward(empty, empty), mf::ShapeError);
  mf::Matrix<double> dy(1, 3), dx(2, 3);
  EXPECT_THROW(mf::softmax_backward(dx, x, dy), mf::ShapeError);
}
