// SPDX-License-Identifier: MIT
// Tests of nn/cross_entropy.hpp: known losses, naive formula, stability, finite-difference gradient, bad targets.
#include <memoryformer/nn/cross_entropy.hpp>
#include <memoryformer/random.hpp>
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

TEST(NnCrossEntropy, KnownValues) {
  mf::CrossEntropyCache<double> cache;
  mf::Matrix<double> uniform = mf::Matrix<double>::Zero(1, 2);
  const std::vector<std::int32_t> t0{0};
  EXPECT_NEAR(mf::cross_entropy_forward(uniform, t0, cache), std::log(2.0), 1e-15);
  mf::Matrix<double> x(2, 3);
  x << 1, 2, 3,  //
      1000, 0, -1000;  // stable: naive exp(1000) overflows
  const std::vector<std::int32_t> t{2, 1};
  const double row0 = -std::log(std::exp(3.0) / (std::exp(1.0) + std::exp(2.0) + std::exp(3.0)));
  const double row1 = 1000.0;
  EXPECT_NEAR(mf::cross_entropy_forward(x, t, cache), (row0 + row1) / 2, 1e-12);
  EXPECT_NEAR(cache.logsumexp(1), 1000.0, 1e-12);
}

TEST(NnCrossEntropy, ForwardMatchesNaiveFormula) {
  const auto logits = random_matrix(5, 7, 1, 2.0);
  const std::vector<std::int32_t> targets{0, 6, 3, 3, 1};
  mf::CrossEntropyCache<double> cache;
  const double loss = mf::cross_entropy_forward<double>(logits, targets, cache);
  double expect = 0;
  for (mf::Index n = 0; n < 5; ++n) {
    double z = 0;
    for (mf::Index v = 0; v < 7; ++v) z += std::exp(logits(n, v));
    expect += -std::log(std::exp(logits(n, targets[size_t(n)])) / z);
  }
  EXPECT_NEAR(loss, expect / 5, 1e-14);
}

TEST(NnCrossEntropy, GradientMatchesFiniteDifferences) {
  for (mf::Index rows : {1, 5}) {
    auto logits = random_matrix(rows, 7, 2, 1.5);
    std::vector<std::int32_t> targets;
    for (mf::Index n = 0; n < rows; ++n) targets.push_back(std::int32_t((3 * n + 2) % 7));
    mf::CrossEntropyCache<double> cache;
    mf::Matrix<double> dlogits(rows, 7);
    mf::cross_entropy_forward<double>(logits, targets, cache);
    const double dloss = 0.75;
    mf::cross_entropy_backward<double>(dlogits, logits, targets, cache, dloss);
    auto loss = [&] {
      mf::CrossEntropyCache<double> c;
      return dloss * mf::cross_entropy_forward<double>(logits, targets, c);
    };
    const auto r = mf::check_gradient(span_of(logits), cspan_of(dlogits), loss);
    EXPECT_LE(r.relative_error, 1e-6) << "rows = " << rows;
    // Each row of (softmax − onehot) sums to 0.
    for (mf::Index n = 0; n < rows; ++n) EXPECT_NEAR(dlogits.row(n).sum(), 0.0, 1e-15);
  }
}

TEST(NnCrossEntropy, InPlaceBackwardAndFloat) {
  auto logits = random_matrix(3, 5, 3);
  const std::vector<std::int32_t> targets{4, 0, 2};
  mf::CrossEntropyCache<double> cache;
  mf::Matrix<double> dlogits(3, 5);
  const double loss = mf::cross_entropy_forward<double>(logits, targets, cache);
  mf::cross_entropy_backward<double>(dlogits, logits, targets, cache);
  mf::Matrix<double> in_place = logits;
  mf::cross_entropy_backward(in_place, in_place, targets, cache);
  EXPECT_EQ(in_place, dlogits);
  const mf::Matrix<float> lf = logits.cast<float>();
  mf::CrossEntropyCache<float> cf;
  EXPECT_NEAR(mf::cross_entropy_forward<float>(lf, targets, cf), loss, 1e-6);
}

// float runs the library's vectorised exponential (whole vectors and a tail for V = 37 and 300, only a tail for
// V = 5): loss and gradient stay within float rounding of the double computation, also in place.
TEST(NnCrossEntropy, FloatMatchesDoubleAcrossVectorWidths) {
  for (const mf::Index vocab : {mf::Index(5), mf::Index(37), mf::Index(300)}) {
    const mf::Index rows = 6;
    const mf::Matrix<double> logits = 4.0 * random_matrix(rows, vocab, 11);
    std::vector<std::int32_t> targets;
    for (mf::Index n = 0; n < rows; ++n) targets.push_back(std::int32_t((n * 7) % vocab));
    mf::CrossEntropyCache<double> cd;
    const double loss = mf::cross_entropy_forward<double>(logits, targets, cd);
    mf::Matrix<double> dd(rows, vocab);
    mf::cross_entropy_backward<double>(dd, logits, targets, cd, 2.0);
    mf::Matrix<float> lf = logits.cast<float>();
    mf::CrossEntropyCache<float> cf;
    EXPECT_NEAR(mf::cross_entropy_forward<float>(lf, targets, cf), loss, 2e-6 * std::abs(loss)) << "V = " << vocab;
    mf::Matrix<float> df(rows, vocab);
    mf::cross_entropy_backward<float>(df, lf, targets, cf, 2.0f);
    EXPECT_LE((df.cast<double>() - dd).cwiseAbs().maxCoeff(), 1e-6) << "V = " << vocab;
    mf::cross_entropy_backward<float>(lf, lf, targets, cf, 2.0f);
    EXPECT_EQ(lf, df) << "in place, V = " << vocab;
  }
}

TEST(NnCrossEntropy, BadTargetsAndShapesThrow) {
  mf::Matrix<double> logits = random_matrix(3, 7, 4), dlogits(3, 7);
  mf::CrossEntropyCache<double> cache;
  const std::vector<std::int32_t> too_big{0, 1, 7}, negative{-1, 0, 0}, short_targets{0, 1};
  expect_throw_with([&] { mf::cross_entropy_forward<double>(logits, too_big, cache); },
                    "cross_entropy_forward: target of row 2 is 7, outside [0, V = 7)");
  expect_throw_with([&] { mf::cross_entropy_forward<double>(logits, negative, cache); }, "target of row 0 is -1");
  try {
    mf::cross_entropy_forward<double>(logits, too_big, cache);
  } catch (const mf::ShapeError&) {
    ADD_FAILURE() << "a bad target value is not a shape error";
  } catch (const std::invalid_argument&) {
  }
  expect_throw_with([&] { mf::cross_entropy_forward<double>(logits, short_targets, cache); },
                    "targets has 2 entries, expected one per row of logits = 3");
  EXPECT_THROW(mf::cross_entropy_forward<double>(logits, short_targets, cache), mf::ShapeError);
  mf::Matrix<double> empty(0, 7);
  const std::vector<std::int32_t> none;
  EXPECT_THROW(mf::cross_entropy_forward<double>(empty, none, cache), mf::ShapeError);
  const std::vector<std::int32_t> ok{0, 1, 2};
  EXPECT_THROW(mf::cross_entropy_backward<double>(dlogits, logits, ok, cache), mf::StateError);
  mf::cross_entropy_forward<double>(logits, ok, cache);
  mf::Matrix<double> wrong(3, 6);
  expect_throw_with([&] { mf::cross_entropy_backward<double>(wrong, logits, ok, cache); },
                    "cross_entropy_backward: dlogits is (3, 6), expected (3, 7)");
  expect_throw_with([&] { mf::cross_entropy_backward<double>(dlogits, logits, too_big, cache); }, "target of row 2 is 7");
}
