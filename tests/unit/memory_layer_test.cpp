// SPDX-License-Identifier: MIT
// MemoryLayer: finite-difference gradients (double, bucket flips skipped), accumulation semantics, shared hashes,
// tensor inputs, initialisation, determinism, and the errors bad input must raise.
#include <cmath>
#include <set>
#include <thread>

#include <gtest/gtest.h>

#include <memoryformer/memory_layer.hpp>
#include <memoryformer/testing/gradcheck.hpp>

#include "../support/test_helpers.hpp"

#if defined(MEMORYFORMER_USE_OPENMP)
#include <omp.h>
#endif

namespace mf = memoryformer;
using namespace memoryformer::testing_support;

namespace {

struct GradCase {
  mf::Index rows, d_in, d_out;
  int tau;
  mf::ScoreKind score;
  double temperature;
  bool bias;
};

class MemoryLayerGradient : public ::testing::TestWithParam<GradCase> {};

TEST_P(MemoryLayerGradient, MatchesFiniteDifferences) {
  const GradCase c = GetParam();
  mf::MemoryLayerConfig config{.d_in = c.d_in, .d_out = c.d_out, .tau = c.tau, .score = c.score,
                               .temperature = c.temperature, .bias = c.bias, .table_init_std = 0.5,
                               .bias_init_std = 0.5};
  mf::MemoryLayer<double> layer(config, 42);
  mf::Matrix<double> x = random_matrix<double>(c.rows, c.d_in, 1);
  const mf::Matrix<double> dy = random_matrix<double>(c.rows, c.d_out, 2);
  mf::HashResult<double> cache;
  mf::Matrix<double> y(c.rows, c.d_out), dx(c.rows, c.d_in);
  layer.forward(y, x, cache);
  layer.backward(dx, x, dy, cache);

  // L = Σ dy ⊙ y; the codes of the current x tell the checker when ±eps moved a bucket.
  mf::HashResult<double> probe;
  auto loss = [&] {
    mf::Matrix<double> out(c.rows, c.d_out);
    layer.forward(out, x, probe);
    return (out.array() * dy.array()).sum();
  };
  auto codes = [&] { return probe.codes; };
  const auto rx = mf::check_gradient(span_of(x), cspan_of(dx), loss, codes);
  EXPECT_LE(rx.relative_error, 1e-6) << "dx: worst index " << rx.worst_index << ", abs " << rx.max_abs_error;
  EXPECT_GT(rx.checked, rx.skipped) << "most coordinates must be checkable";

  // Tables: every element of every row that was hit (the others have zero gradient, checked separately).
  auto values = layer.tables().values();
  const auto dtables = layer.dtables().values();
  std::set<mf::Index> hit_rows;
  for (mf::Index n = 0; n < c.rows; ++n)
    for (mf::Index k = 0; k < layer.num_tables(); ++k) hit_rows.insert(k * config.rows_per_table() + cache.code(n, k));
  double diff_sq = 0, sum_sq = 0;
  const double eps = 1e-6;
  for (mf::Index row : hit_rows)
    for (mf::Index j = 0; j < c.d_out; ++j) {
      double& v = values[size_t(row * c.d_out + j)];
      const double saved = v;
      v = saved + eps;
      const double plus = loss();
      v = saved - eps;
      const double minus = loss();
      v = saved;
      const double numeric = (plus - minus) / (2 * eps), analytic = dtables[size_t(row * c.d_out + j)];
      diff_sq += (numeric - analytic) * (numeric - analytic);
      sum_sq += (numeric + analytic) * (numeric + analytic);
    }
  EXPECT_LE(std::sqrt(diff_sq / sum_sq), 1e-6) << "dtables";
  for (mf::Index row = 0; row < layer.tables().num_rows(); ++row) {
    if (hit_rows.count(row)) {
      EXPECT_TRUE(layer.touched_rows()[size_t(row)]);
      continue;
    }
    EXPECT_FALSE(layer.touched_rows()[size_t(row)]) << "row " << row;
    for (mf::Index j = 0; j < c.d_out; ++j) ASSERT_EQ(dtables[size_t(row * c.d_out + j)], 0.0) << "row " << row;
  }

  if (c.bias) {
    mf::Matrix<double> bias = layer.bias().transpose();
    const mf::Matrix<double> dbias = layer.dbias().transpose();
    auto bias_loss = [&] {
      layer.bias() = bias.transpose();
      return loss();
    };
    const auto rb = mf::check_gradient(span_of(bias), cspan_of(dbias), bias_loss);
    EXPECT_LE(rb.relative_error, 1e-6) << "dbias";
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, MemoryLayerGradient,
    ::testing::Values(GradCase{3, 32, 24, 4, mf::ScoreKind::L1, 1.0, true},
                      GradCase{1, 16, 1, 16, mf::ScoreKind::L1, 1.0, true},      // τ = 16, d_out = 1, N = 1
                      GradCase{5, 7, 3, 1, mf::ScoreKind::Paper, 0.5, false},    // τ = 1, paper score
                      GradCase{4, 30, 5, 6, mf::ScoreKind::Paper, 2.0, true},
                      GradCase{2, 20, 9, 10, mf::ScoreKind::L1, 1.0, false},
                      GradCase{1, 16, 4, 16, mf::ScoreKind::Paper, 1.0, true}),  // τ = 16, paper score
    [](const auto& info) { return "case" + std::to_string(info.index); });

TEST(MemoryLayer, ForwardMatchesExplicitFormula) {
  const mf::MemoryLayerConfig config{.d_in = 12, .d_out = 5, .tau = 3, .score = mf::ScoreKind::Paper, .temperature = 0.8};
  const mf::MemoryLayer<double> layer(config, 9);
  const mf::Matrix<double> x = random_matrix<double>(4, 12, 3);
  mf::HashResult<double> cache;
  const mf::Matrix<double> y = layer.forward(x, cache);
  for (mf::Index n = 0; n < 4; ++n) {
    Eigen::VectorXd expected = layer.bias();
    for (mf::Index k = 0; k < 4; ++k) {
      int code = 0;
      double s = 1;
      for (int j = 0; j < 3; ++j) {
        const double z = x(n, 3 * k + j);
        code = 2 * code + (z >= 0 ? 1 : 0);
        s *= 1 / (1 + std::exp(-2 * std::abs(z) / 0.8));
      }
      for (mf::Index o = 0; o < 5; ++o) expected(o) += s * layer.tables().row(k, code)[o];
    }
    for (mf::Index o = 0; o < 5; ++o) EXPECT_NEAR(y(n, o), expected(o), 1e-12);
  }
}

TEST(MemoryLayer, GradientsAccumulateUntilZeroGrad) {
  mf::MemoryLayer<double> layer({.d_in = 16, .d_out = 8, .tau = 4}, 1);
  const mf::Matrix<double> x = random_matrix<double>(6, 16, 2), dy = random_matrix<double>(6, 8, 3);
  mf::HashResult<double> cache;
  mf::Matrix<double> y(6, 8), dx(6, 16), dx2(6, 16);
  layer.forward(y, x, cache);
  layer.backward(dx, x, dy, cache);
  const mf::Matrix<double> once = layer.dtables().as_matrix();
  const Eigen::VectorXd dbias_once = layer.dbias();
  layer.backward(dx2, x, dy, cache);
  EXPECT_TRUE(layer.dtables().as_matrix().isApprox(2 * once));
  EXPECT_TRUE(layer.dbias().isApprox(2 * dbias_once));
  EXPECT_EQ(dx, dx2) << "input gradients are overwritten, not accumulated";
  layer.zero_grad();
  EXPECT_EQ(layer.dtables().as_matrix().cwiseAbs().maxCoeff(), 0.0);
  EXPECT_EQ(layer.dbias().cwiseAbs().maxCoeff(), 0.0);
  for (auto t : layer.touched_rows()) EXPECT_EQ(t, 0);
}

// Once every row is flagged, later backwards skip the search for new rows: they must still add into every row, and a
// zero_grad must start the list afresh.
TEST(MemoryLayer, AccumulatesIntoEveryRowOnceAllRowsAreTouched) {
  const mf::MemoryLayerConfig config{.d_in = 8, .d_out = 16, .tau = 2};  // 4 tables of 4 rows
  mf::MemoryLayer<float> layer(config, 1), first(config, 1), second(config, 1);
  const mf::Matrix<float> x = random_matrix<float>(64, 8, 2);
  const mf::Matrix<float> dy1 = random_matrix<float>(64, 16, 3), dy2 = random_matrix<float>(64, 16, 4);
  mf::HashResult<float> cache;
  mf::Matrix<float> y(64, 16), dx(64, 8);
  layer.forward(y, x, cache);
  layer.backward(dx, x, dy1, cache);
  ASSERT_EQ(layer.touched_list().size(), std::size_t(16)) << "64 random inputs touch all 16 rows";
  layer.backward(dx, x, dy2, cache);
  first.backward(dx, x, dy1, cache);
  second.backward(dx, x, dy2, cache);
  EXPECT_EQ(layer.dtables().as_matrix(), first.dtables().as_matrix() + second.dtables().as_matrix());
  std::vector<mf::Index> listed = layer.touched_list();
  std::sort(listed.begin(), listed.end());
  EXPECT_EQ(std::unique(listed.begin(), listed.end()), listed.end()) << "each row listed once";
  layer.zero_grad();
  mf::HashResult<float> one;
  mf::Matrix<float> y1(1, 16), dx1(1, 8);
  layer.forward(y1, x.topRows(1), one);
  layer.backward(dx1, x.topRows(1), dy1.topRows(1), one);
  EXPECT_EQ(layer.touched_list().size(), std::size_t(4)) << "one input touches one row per table";
}

TEST(MemoryLayer, SharedHashGivesTheSameResultsAsSeparateLayers) {
  // Q and K read one hash of x: the summed score gradients through one SignHasher::backward equal the sum of
  // the two layers' own dx.
  const mf::MemoryLayerConfig config{.d_in = 24, .d_out = 10, .tau = 4};
  mf::MemoryLayer<double> q(config, 1), k(config, 2);
  const mf::Matrix<double> x = random_matrix<double>(5, 24, 4), dq = random_matrix<double>(5, 10, 5),
                           dk = random_matrix<double>(5, 10, 6);
  mf::HashResult<double> own, shared = q.hasher().hash(x);
  mf::Matrix<double> y_own(5, 10), y_shared(5, 10), dx_q(5, 24), dx_k(5, 24), dx_shared(5, 24);
  q.forward(y_own, x, own);
  q.forward_hashed(y_shared, shared);
  EXPECT_EQ(y_own, y_shared);
  q.backward(dx_q, x, dq, own);
  k.backward(dx_k, x, dk, own);
  mf::Matrix<double> dscores = mf::Matrix<double>::Zero(5, 6);
  q.backward_hashed(dscores, dq, shared);
  k.backward_hashed(dscores, dk, shared);
  q.hasher().backward(dx_shared, x, shared, dscores);
  EXPECT_TRUE(dx_shared.isApprox(dx_q + dx_k, 1e-12));
}

TEST(MemoryLayer, TensorInputsOfRankTwoAndThree) {
  const mf::MemoryLayer<float> layer({.d_in = 16, .d_out = 6, .tau = 8}, 3);
  mf::Tensor<float, 3> x(2, 3, 16);
  x.setRandom();
  mf::HashResult<float> cache;
  const mf::Tensor<float, 3> y = layer.forward(x, cache);
  ASSERT_EQ(y.dimension(0), 2);
  ASSERT_EQ(y.dimension(1), 3);
  ASSERT_EQ(y.dimension(2), 6);
  const mf::Matrix<float> xm = mf::ConstMatrixMap<float>(x.data(), 6, 16);
  const mf::Matrix<float> ym = layer.forward(xm, cache);
  for (mf::Index i = 0; i < ym.size(); ++i) EXPECT_EQ(y.data()[i], ym.data()[i]);
  // A user's own buffer through TensorMap, without copying.
  std::vector<float> buffer(size_t(x.size()));
  std::copy(x.data(), x.data() + x.size(), buffer.begin());
  mf::TensorMap<float, 2> view(buffer.data(), 6, 16);
  mf::Matrix<float> y2(6, 6);
  layer.forward(y2, mf::as_matrix(view), cache);
  EXPECT_EQ(y2, ym);
}

TEST(MemoryLayer, SeededInitialisationIsReproducibleAndHasTheAuthorsScale) {
  const mf::MemoryLayerConfig config{.d_in = 64, .d_out = 64, .tau = 8};
  const mf::MemoryLayer<float> a(config, 5), b(config, 5), c(config, 6);
  EXPECT_TRUE(std::equal(a.tables().values().begin(), a.tables().values().end(), b.tables().values().begin()));
  EXPECT_FALSE(std::equal(a.tables().values().begin(), a.tables().values().end(), c.tables().values().begin()));
  const auto& t = a.tables().as_matrix();
  const double mean = t.cast<double>().mean();
  const double stddev = std::sqrt((t.cast<double>().array() - mean).square().mean());
  EXPECT_NEAR(mean, 0.0, 1e-3);
  EXPECT_NEAR(stddev, 0.02, 0.02 * 0.02);
  EXPECT_LT(a.bias().cwiseAbs().maxCoeff(), 0.001 * 6);
  EXPECT_EQ(a.num_parameters(), 8 * 256 * 64 + 64);
}

TEST(MemoryLayer, ConstForwardIsSafeFromSeveralThreads) {
  const mf::MemoryLayer<float> layer({.d_in = 64, .d_out = 32, .tau = 8}, 1);
  const mf::Matrix<float> x1 = random_matrix<float>(50, 64, 1), x2 = random_matrix<float>(50, 64, 2);
  mf::HashResult<float> c1, c2;
  const mf::Matrix<float> serial1 = layer.forward(x1, c1), serial2 = layer.forward(x2, c2);
  mf::Matrix<float> par1, par2;
  std::thread t1([&] {
    mf::HashResult<float> c;
    for (int i = 0; i < 20; ++i) par1 = layer.forward(x1, c);
  });
  std::thread t2([&] {
    mf::HashResult<float> c;
    for (int i = 0; i < 20; ++i) par2 = layer.forward(x2, c);
  });
  t1.join();
  t2.join();
  EXPECT_EQ(par1, serial1);
  EXPECT_EQ(par2, serial2);
}

#if defined(MEMORYFORMER_USE_OPENMP)
TEST(MemoryLayer, ResultsAreBitwiseIdenticalForAnyThreadCount) {
  const mf::MemoryLayerConfig config{.d_in = 64, .d_out = 48, .tau = 8};
  const mf::Matrix<float> x = random_matrix<float>(300, 64, 1), dy = random_matrix<float>(300, 48, 2);
  auto run = [&](int threads) {
    omp_set_num_threads(threads);
    mf::MemoryLayer<float> layer(config, 7);
    mf::HashResult<float> cache;
    mf::Matrix<float> y(300, 48), dx(300, 64);
    layer.forward(y, x, cache);
    layer.backward(dx, x, dy, cache);
    return std::make_tuple(y, dx, mf::Matrix<float>(layer.dtables().as_matrix()));
  };
  const auto one = run(1), two = run(2);
  EXPECT_EQ(std::get<0>(one), std::get<0>(two));
  EXPECT_EQ(std::get<1>(one), std::get<1>(two));
  EXPECT_EQ(std::get<2>(one), std::get<2>(two));
}
#endif

TEST(MemoryLayer, RejectsBadConfigurations) {
  EXPECT_THROW(mf::MemoryLayer<float>({.d_in = 30, .d_out = 4, .tau = 8}, 0), mf::ConfigError);
  EXPECT_NE(error_of([] { mf::MemoryLayer<float>({.d_in = 30, .d_out = 4, .tau = 8}, 0); }).find("d_in = 30"),
            std::string::npos);
  EXPECT_THROW(mf::MemoryLayer<float>({.d_in = 32, .d_out = 4, .tau = 0}, 0), mf::ConfigError);
  EXPECT_THROW(mf::MemoryLayer<float>({.d_in = 34, .d_out = 4, .tau = 17}, 0), mf::ConfigError);
  EXPECT_NE(error_of([] { mf::MemoryLayer<float>({.d_in = 34, .d_out = 4, .tau = 17}, 0); }).find("tau = 17"),
            std::string::npos);
  EXPECT_THROW(mf::MemoryLayer<float>({.d_in = 32, .d_out = 0, .tau = 4}, 0), mf::ConfigError);
  EXPECT_THROW(mf::MemoryLayer<float>({.d_in = 32, .d_out = 4, .tau = 4, .score = mf::ScoreKind::Paper,
                                       .temperature = 0.0}, 0),
               mf::ConfigError);
  EXPECT_THROW(mf::MemoryLayer<float>({.d_in = 32, .d_out = 4, .tau = 4, .temperature = -1.0}, 0), mf::ConfigError);
  EXPECT_THROW(mf::MemoryLayer<float>({.d_in = 32, .d_out = 4, .tau = 4, .temperature = std::nan("")}, 0),
               mf::ConfigError);
  EXPECT_THROW(mf::parse_score_kind("softmax"), mf::ConfigError);
}

TEST(MemoryLayer, RejectsBadShapesAndValuesWithClearMessages) {
  mf::MemoryLayer<float> layer({.d_in = 32, .d_out = 24, .tau = 4}, 0);
  mf::HashResult<float> cache;
  const std::string wrong_x = error_of([&] { layer.forward(mf::Matrix<float>::Zero(6, 30), cache); });
  EXPECT_EQ(wrong_x, "MemoryLayer::forward: x is (6, 30), expected (N, 32) = (N, K·τ) with K = 8, τ = 4");

  mf::Matrix<float> x = random_matrix<float>(6, 32, 1), y(6, 24), dx(6, 32);
  mf::Matrix<float> wrong_y(5, 24);
  EXPECT_THROW(layer.forward(wrong_y, x, cache), mf::ShapeError);

  // Backward before forward.
  mf::HashResult<float> empty;
  const std::string before = error_of([&] { layer.backward(dx, x, mf::Matrix<float>::Zero(6, 24), empty); });
  EXPECT_NE(before.find("call forward"), std::string::npos) << before;
  EXPECT_THROW(layer.backward(dx, x, mf::Matrix<float>::Zero(6, 24), empty), mf::StateError);

  layer.forward(y, x, cache);
  const std::string wrong_dy = error_of([&] { layer.backward(dx, x, mf::Matrix<float>::Zero(6, 23), cache); });
  EXPECT_NE(wrong_dy.find("dy is (6, 23), expected (6, 24)"), std::string::npos) << wrong_dy;
  EXPECT_THROW(layer.backward(dx, x.topRows(5), mf::Matrix<float>::Zero(5, 24), cache), mf::ShapeError);

  // NaN and Inf are rejected, naming the position.
  mf::Matrix<float> bad = x;
  bad(2, 7) = std::numeric_limits<float>::quiet_NaN();
  const std::string nan_msg = error_of([&] { layer.forward(y, bad, cache); });
  EXPECT_NE(nan_msg.find("at (2, 7)"), std::string::npos) << nan_msg;
  EXPECT_THROW(layer.forward(y, bad, cache), mf::NonFiniteError);
  bad(2, 7) = std::numeric_limits<float>::infinity();
  EXPECT_THROW(layer.forward(y, bad, cache), mf::NonFiniteError);
  layer.forward(y, x, cache);
  mf::Matrix<float> dy = mf::Matrix<float>::Zero(6, 24);
  dy(5, 23) = -std::numeric_limits<float>::infinity();
  EXPECT_THROW(layer.backward(dx, x, dy, cache), mf::NonFiniteError);
  // The scan's vector lanes (element 3) and its tail (element 143 of 144) both name the position.
  const std::string tail_msg = error_of([&] { layer.backward(dx, x, dy, cache); });
  EXPECT_NE(tail_msg.find("at (5, 23)"), std::string::npos) << tail_msg;
  dy(5, 23) = 0.0f;
  dy(0, 3) = std::numeric_limits<float>::quiet_NaN();
  const std::string lane_msg = error_of([&] { layer.backward(dx, x, dy, cache); });
  EXPECT_NE(lane_msg.find("at (0, 3)"), std::string::npos) << lane_msg;

  // A hash made with another τ cannot feed this layer.
  const mf::SignHasher<float> other({8, mf::ScoreKind::L1, 1.0});
  EXPECT_THROW(layer.forward_hashed(y, other.hash(x)), mf::ShapeError);
}

TEST(BucketTable, LayoutAndCheckedAccess) {
  mf::BucketTable<float> t(3, 2, 5);
  EXPECT_EQ(t.num_rows(), 12);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(t.data()) % 64, 0u);
  t.row(2, 3)[4] = 7.0f;
  EXPECT_EQ(t.data()[(2 * 4 + 3) * 5 + 4], 7.0f);
  EXPECT_EQ(t.row_checked(2, 3)(4), 7.0f);
  EXPECT_THROW(t.row_checked(3, 0), std::out_of_range);
  EXPECT_THROW(t.row_checked(0, 4), std::out_of_range);
  EXPECT_THROW(mf::BucketTable<float>(1, 17, 1), mf::ConfigError);
}

TEST(BucketHitCounter, CountsEveryLookup) {
  mf::BucketHitCounter counter(2, 2);
  const std::vector<std::int32_t> codes = {0, 3, 0, 1, 2, 3};  // [3 tokens, 2 tables]
  counter.record(codes);
  EXPECT_EQ(std::vector<std::uint64_t>(counter.counts(0).begin(), counter.counts(0).end()),
            (std::vector<std::uint64_t>{2, 0, 1, 0}));
  EXPECT_EQ(std::vector<std::uint64_t>(counter.counts(1).begin(), counter.counts(1).end()),
            (std::vector<std::uint64_t>{0, 1, 0, 2}));
  EXPECT_THROW(counter.record(std::vector<std::int32_t>{1, 2, 3}), mf::ShapeError);
  EXPECT_THROW(counter.record(std::vector<std::int32_t>{4, 0}), std::out_of_range);
}

}  // namespace
