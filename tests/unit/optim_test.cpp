// SPDX-License-Identifier: MIT
// Tests of optim/: AdamW (dense and row-sparse, weight-decay exclusions, lr groups, state export/import), SGD,
// global-norm clipping and the cosine schedule, each against values written out by hand in the test.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numbers>
#include <string>
#include <vector>

#include "memoryformer/io/checkpoint.hpp"
#include "memoryformer/optim/adamw.hpp"
#include "memoryformer/optim/clip.hpp"
#include "memoryformer/optim/schedule.hpp"
#include "memoryformer/optim/sgd.hpp"
#include "memoryformer/random.hpp"

#if defined(MEMORYFORMER_USE_OPENMP)
#include <omp.h>
#endif

namespace mf = memoryformer;
using mf::ParameterKind;

namespace {

/// Storage for one parameter and the view an optimiser sees.
template <class S>
struct Param {
  std::string name;
  std::vector<mf::Index> shape;
  std::vector<S> value, grad;
  ParameterKind kind = ParameterKind::Dense;
  mf::Index row_size = 0;
  std::vector<std::uint8_t> touched;
  bool use_touched = false;

  mf::ParameterView<S> view() {
    return {name, shape, value, grad, kind, row_size, use_touched ? &touched : nullptr};
  }
};

/// A parameter without touched-row flags (the view's touched_rows is nullptr).
template <class S>
Param<S> param(std::string name, std::vector<mf::Index> shape, std::vector<S> value, std::vector<S> grad,
               ParameterKind kind = ParameterKind::Dense, mf::Index row_size = 0) {
  Param<S> p;
  p.name = std::move(name);
  p.shape = std::move(shape);
  p.value = std::move(value);
  p.grad = std::move(grad);
  p.kind = kind;
  p.row_size = row_size;
  return p;
}

/// A parameter whose view carries the flags `touched`.
template <class S>
Param<S> param(std::string name, std::vector<mf::Index> shape, std::vector<S> value, std::vector<S> grad,
               ParameterKind kind, mf::Index row_size, std::vector<std::uint8_t> touched) {
  Param<S> p = param(std::move(name), std::move(shape), std::move(value), std::move(grad), kind, row_size);
  p.touched = std::move(touched);
  p.use_touched = true;
  return p;
}

template <class S>
std::vector<mf::ParameterView<S>> views(std::vector<Param<S>>& ps) {
  std::vector<mf::ParameterView<S>> v;
  for (auto& p : ps) v.push_back(p.view());
  return v;
}

constexpr double b1 = 0.9, b2 = 0.95, eps = 1e-8, wd = 0.1;

/// One scalar AdamW update written out: returns the new θ and updates (m, v) in place; t is the 1-based count.
double adamw_reference(double theta, double g, double& m, double& v, double t, double lr, double lambda) {
  m = b1 * m + (1 - b1) * g;
  v = b2 * v + (1 - b2) * g * g;
  const double mhat = m / (1 - std::pow(b1, t));
  const double vhat = v / (1 - std::pow(b2, t));
  return theta - lr * lambda * theta - lr * mhat / (std::sqrt(vhat) + eps);
}

void expect_bits_equal(const std::vector<double>& a, const std::vector<double>& b, const char* what) {
  ASSERT_EQ(a.size(), b.size());
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(double)), 0) << what;
}

}  // namespace

TEST(AdamW, OneStepMatchesTheFormulaWrittenOut) {
  std::vector<Param<double>> ps(1);
  ps[0] = param<double>("w", {2, 2}, {0.5, -1.0, 2.0, 0.0}, {0.2, 0.3, -4.0, 1e-3}, ParameterKind::Dense);
  mf::AdamW<double> opt(views(ps));
  opt.step(0.01);
  // Step 1: m = 0.1·g, v = 0.05·g², m̂ = g, v̂ = g², so θ ← θ − lr·(0.1·θ + g/(|g| + 1e-8)).
  EXPECT_NEAR(ps[0].value[0], 0.5 - 0.01 * (0.1 * 0.5 + 0.2 / (0.2 + 1e-8)), 1e-16);
  EXPECT_NEAR(ps[0].value[0], 0.4895000005, 1e-15);  // the same number by hand
  EXPECT_NEAR(ps[0].value[1], -1.0 - 0.01 * (0.1 * -1.0 + 0.3 / (0.3 + 1e-8)), 1e-16);
  EXPECT_NEAR(ps[0].value[2], 2.0 - 0.01 * (0.1 * 2.0 - 4.0 / (4.0 + 1e-8)), 1e-16);
  EXPECT_NEAR(ps[0].value[3], 0.0 - 0.01 * (1e-3 / (1e-3 + 1e-8)), 1e-16);
  EXPECT_EQ(opt.steps(), 1u);
  // Exported moments.
  const auto st = opt.state_tensors();
  ASSERT_EQ(st.size(), 3u);
  EXPECT_EQ(st[0].name, "adamw.step");
  EXPECT_EQ(st[0].values[0], 1.0);
  EXPECT_EQ(st[1].name, "adamw.m.w");
  EXPECT_EQ(st[1].shape, (std::vector<mf::Index>{2, 2}));
  EXPECT_NEAR(st[1].values[2], 0.1 * -4.0, 1e-15);
  EXPECT_EQ(st[2].name, "adamw.v.w");
  EXPECT_NEAR(st[2].values[2], 0.05 * 16.0, 1e-15);
}

TEST(AdamW, ThreeStepsMatchTheReferenceWithGroupsAndDecayExclusions) {
  // Dense weight (decayed, ×1), bias (not decayed, ×2), norm (not decayed), table (decayed, ×3) in Dense mode.
  std::vector<Param<double>> ps(4);
  ps[0] = param<double>("dense", {3}, {0.3, -0.7, 1.1}, {0, 0, 0}, ParameterKind::Dense);
  ps[1] = param<double>("bias", {2}, {0.05, -0.02}, {0, 0}, ParameterKind::Bias);
  ps[2] = param<double>("norm", {2}, {1.0, 0.9}, {0, 0}, ParameterKind::Norm);
  ps[3] = param<double>("table", {2, 2}, {0.01, -0.03, 0.2, 0.0}, {0, 0, 0, 0}, ParameterKind::Table, 2);
  mf::AdamWOptions o;
  o.lr_multipliers.bias = 2.0;
  o.lr_multipliers.table = 3.0;
  mf::AdamW<double> opt(views(ps), o);
  const double grads[3][11] = {
      {0.1, -0.2, 0.3, 0.5, -0.5, 0.01, 0.02, 1.0, -1.0, 0.0, 0.25},
      {-0.3, 0.1, 0.0, 0.4, 0.6, -0.03, 0.0, 0.5, 0.5, 0.0, -0.25},
      {0.2, 0.2, -0.1, -0.1, 0.1, 0.02, -0.02, 0.0, 2.0, 0.0, 0.1},
  };
  const double lrs[3] = {1e-3, 3e-3, 2e-3};
  const double mult[4] = {1.0, 2.0, 1.0, 3.0};
  const double lambda[4] = {wd, 0.0, 0.0, wd};
  // Reference state, element by element.
  std::vector<double> theta, m(11, 0.0), v(11, 0.0);
  for (auto& p : ps) theta.insert(theta.end(), p.value.begin(), p.value.end());
  const int owner[11] = {0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 3};
  for (int t = 1; t <= 3; ++t) {
    int k = 0;
    for (auto& p : ps)
      for (auto& g : p.grad) g = grads[t - 1][k++];
    opt.step(lrs[t - 1]);
    for (int i = 0; i < 11; ++i)
      theta[std::size_t(i)] = adamw_reference(theta[std::size_t(i)], grads[t - 1][i], m[std::size_t(i)],
                                              v[std::size_t(i)], t, lrs[t - 1] * mult[owner[i]], lambda[owner[i]]);
  }
  int k = 0;
  for (auto& p : ps)
    for (double x : p.value) {
      EXPECT_NEAR(x, theta[std::size_t(k)], 1e-15 * (1 + std::abs(theta[std::size_t(k)]))) << "element " << k;
      ++k;
    }
  // The zero gradient of table element 9 still moved it by decay only (m = v = 0): θ·(1 − 3·lr·λ) per step.
  EXPECT_NEAR(ps[3].value[2], 0.2 * (1 - 3e-3 * 0.1) * (1 - 9e-3 * 0.1) * (1 - 6e-3 * 0.1), 1e-15);
}

TEST(AdamW, WeightDecayIsExcludedForBiasAndNorm) {
  std::vector<Param<double>> ps(5);
  const std::vector<double> init = {0.5, -2.0};
  ps[0] = param<double>("t", {1, 2}, init, {0, 0}, ParameterKind::Table, 2);
  ps[1] = param<double>("d", {2}, init, {0, 0}, ParameterKind::Dense);
  ps[2] = param<double>("e", {1, 2}, init, {0, 0}, ParameterKind::Embedding, 2);
  ps[3] = param<double>("b", {2}, init, {0, 0}, ParameterKind::Bias);
  ps[4] = param<double>("n", {2}, init, {0, 0}, ParameterKind::Norm);
  mf::AdamW<double> opt(views(ps));
  opt.step(0.5);  // zero gradients: only the decay term η·λ·θ can move a parameter
  for (int i = 0; i < 3; ++i) {
    EXPECT_DOUBLE_EQ(ps[std::size_t(i)].value[0], 0.5 - 0.5 * 0.1 * 0.5) << ps[std::size_t(i)].name;
    EXPECT_DOUBLE_EQ(ps[std::size_t(i)].value[1], -2.0 - 0.5 * 0.1 * -2.0) << ps[std::size_t(i)].name;
  }
  expect_bits_equal(ps[3].value, init, "bias must not decay");
  expect_bits_equal(ps[4].value, init, "norm must not decay");
}

TEST(AdamW, RowSparseUpdatesOnlyTouchedRowsWithPerRowCounts) {
  // Table [4 rows, 3] in RowSparse mode, plus a dense weight that keeps the global count.
  std::vector<Param<double>> ps(2);
  ps[0] = param<double>("tab", {4, 3}, {}, std::vector<double>(12), ParameterKind::Table, 3, std::vector<std::uint8_t>(4));
  for (int i = 0; i < 12; ++i) ps[0].value.push_back(0.1 * (i + 1) * (i % 2 ? -1 : 1));
  ps[1] = param<double>("w", {2}, {1.0, -1.0}, {0, 0}, ParameterKind::Dense);
  mf::AdamWOptions o;
  o.sparse_update = mf::SparseUpdate::RowSparse;
  o.lr_multipliers.table = 3.0;
  mf::AdamW<double> opt(views(ps), o);

  const std::vector<std::vector<int>> touched = {{0, 2}, {2, 3}, {0}};
  const double lr = 0.01;
  // Reference: each row is an independent AdamW that only sees its touched steps.
  std::vector<double> theta = ps[0].value, m(12, 0.0), v(12, 0.0);
  std::vector<int> count(4, 0);
  std::vector<double> w = ps[1].value, wm(2, 0.0), wv(2, 0.0);
  for (int t = 1; t <= 3; ++t) {
    std::fill(ps[0].touched.begin(), ps[0].touched.end(), std::uint8_t(0));
    std::fill(ps[0].grad.begin(), ps[0].grad.end(), 0.0);
    for (int r : touched[std::size_t(t - 1)]) {
      ps[0].touched[std::size_t(r)] = 1;
      for (int c = 0; c < 3; ++c) ps[0].grad[std::size_t(3 * r + c)] = 0.05 * (t + c) - 0.02 * r;
    }
    ps[1].grad = {0.3 * t, -0.1};
    const auto before_value = ps[0].value;
    auto st = opt.state_tensors();
    const std::vector<double> before_m(st[1].values.begin(), st[1].values.end());
    const std::vector<double> before_v(st[2].values.begin(), st[2].values.end());

    opt.step(lr);

    for (int r = 0; r < 4; ++r) {
      const bool hit = ps[0].touched[std::size_t(r)] != 0;
      if (hit) ++count[std::size_t(r)];
      for (int c = 0; c < 3; ++c) {
        const std::size_t i = std::size_t(3 * r + c);
        if (!hit) {
          // Untouched: value and moments bit-identical.
          EXPECT_EQ(std::memcmp(&ps[0].value[i], &before_value[i], sizeof(double)), 0) << "row " << r << " step " << t;
          EXPECT_EQ(std::memcmp(&st[1].values[i], &before_m[i], sizeof(double)), 0);
          EXPECT_EQ(std::memcmp(&st[2].values[i], &before_v[i], sizeof(double)), 0);
          continue;
        }
        theta[i] = adamw_reference(theta[i], ps[0].grad[i], m[i], v[i], count[std::size_t(r)], 3 * lr, wd);
        EXPECT_NEAR(ps[0].value[i], theta[i], 1e-15) << "row " << r << " step " << t;
      }
    }
    for (std::size_t i = 0; i < 2; ++i) {
      w[i] = adamw_reference(w[i], ps[1].grad[i], wm[i], wv[i], t, lr, wd);
      EXPECT_NEAR(ps[1].value[i], w[i], 1e-15) << "dense step " << t;
    }
  }
  // Row 2 was touched at global steps 1 and 2, row 3 only at step 2: its single update is a full first Adam step,
  // |Δθ| = η·(λ·θ·sign + 1) up to eps, not the smaller step a global count (t = 2) would give.
  const auto st = opt.state_tensors();
  ASSERT_EQ(st.size(), 6u);
  EXPECT_EQ(st[3].name, "adamw.row_step.tab");
  EXPECT_EQ(st[3].shape, (std::vector<mf::Index>{4}));
  EXPECT_EQ(std::vector<double>(st[3].values.begin(), st[3].values.end()), (std::vector<double>{2, 0, 2, 1}));
  EXPECT_EQ(st[0].values[0], 3.0);
  const double theta9 = -1.0;  // element 9 = row 3, col 0: initial 0.1 · 10 · (−1)
  const double g9 = 0.05 * 2 - 0.02 * 3;
  EXPECT_NEAR(ps[0].value[9], theta9 - 0.03 * (0.1 * theta9 + g9 / (std::abs(g9) + 1e-8)), 1e-15);
  // Row 1 was never touched: still the initial values.
  for (int c = 0; c < 3; ++c) EXPECT_EQ(ps[0].value[std::size_t(3 + c)], 0.1 * (3 + c + 1) * ((3 + c) % 2 ? -1 : 1));
}

TEST(AdamW, RowSparseWithEveryRowTouchedEqualsDenseBitwise) {
  auto make = [] {
    std::vector<Param<double>> ps(2);
    ps[0] = param<double>("tab", {3, 2}, {0.1, -0.2, 0.3, -0.4, 0.5, -0.6}, std::vector<double>(6), ParameterKind::Table, 2);
    ps[1] = param<double>("emb", {2, 2}, {1, 2, 3, 4}, std::vector<double>(4), ParameterKind::Embedding, 2);
    return ps;
  };
  auto a = make(), b = make();
  mf::AdamWOptions dense, sparse;
  sparse.sparse_update = mf::SparseUpdate::RowSparse;
  mf::AdamW<double> oa(views(a), dense), ob(views(b), sparse);  // touched_rows == nullptr: every row touched
  for (int t = 0; t < 3; ++t) {
    for (auto* ps : {&a, &b})
      for (auto& p : *ps)
        for (std::size_t i = 0; i < p.grad.size(); ++i) p.grad[i] = std::sin(double(t * 7 + int(i)));
    oa.step(0.01);
    ob.step(0.01);
  }
  expect_bits_equal(a[0].value, b[0].value, "table");
  expect_bits_equal(a[1].value, b[1].value, "embedding");
}

TEST(AdamW, DenseModeIgnoresTouchedFlags) {
  std::vector<Param<double>> ps(1);
  ps[0] = param<double>("tab", {2, 1}, {1.0, 1.0}, {0.5, 0.0}, ParameterKind::Table, 1, {1, 0});
  mf::AdamW<double> opt(views(ps));
  opt.step(0.1);
  EXPECT_NEAR(ps[0].value[0], 1.0 - 0.1 * (0.1 + 0.5 / (0.5 + 1e-8)), 1e-15);
  EXPECT_DOUBLE_EQ(ps[0].value[1], 1.0 - 0.1 * 0.1);  // untouched row still decays in Dense mode
}

TEST(AdamW, FloatTracksTheDoubleFormula) {
  std::vector<Param<float>> ps(1);
  ps[0] = param<float>("w", {3}, {0.5f, -0.25f, 2.0f}, {0, 0, 0}, ParameterKind::Dense);
  mf::AdamW<float> opt(views(ps));
  std::vector<double> theta = {0.5, -0.25, 2.0}, m(3, 0.0), v(3, 0.0);
  for (int t = 1; t <= 3; ++t) {
    const std::vector<double> g = {0.1 * t, -0.3, 1.0 / t};
    for (std::size_t i = 0; i < 3; ++i) ps[0].grad[i] = float(g[i]);
    opt.step(0.01);
    for (std::size_t i = 0; i < 3; ++i) theta[i] = adamw_reference(theta[i], double(float(g[i])), m[i], v[i], t, 0.01, wd);
  }
  for (std::size_t i = 0; i < 3; ++i) EXPECT_NEAR(ps[0].value[i], theta[i], 2e-6 * std::abs(theta[i]));
}

TEST(AdamW, StateRoundTripsThroughACheckpointAndResumesBitwise) {
  auto make = [] {
    std::vector<Param<float>> ps(2);
    ps[0] = param<float>("tab", {3, 2}, {0.1f, -0.2f, 0.3f, -0.4f, 0.5f, -0.6f}, std::vector<float>(6),
                         ParameterKind::Table, 2, std::vector<std::uint8_t>(3));
    ps[1] = param<float>("b", {2}, {0.01f, 0.02f}, std::vector<float>(2), ParameterKind::Bias);
    return ps;
  };
  auto set_grads = [](std::vector<Param<float>>& ps, int t) {
    for (std::size_t r = 0; r < 3; ++r) ps[0].touched[r] = std::uint8_t((r + std::size_t(t)) % 2);
    for (std::size_t i = 0; i < 6; ++i) ps[0].grad[i] = ps[0].touched[i / 2] ? float(std::cos(double(t + int(i)))) : 0.0f;
    ps[1].grad = {0.1f * float(t), -0.2f};
  };
  mf::AdamWOptions o;
  o.sparse_update = mf::SparseUpdate::RowSparse;
  auto a = make();
  mf::AdamW<float> oa(views(a), o);
  for (int t = 0; t < 2; ++t) {
    set_grads(a, t);
    oa.step(0.01);
  }
  mf::Checkpoint ck;
  for (const auto& s : oa.state_tensors()) ck.add_tensor(s.name, s.shape, s.values);
  for (auto& p : a) ck.add_tensor(p.name, p.shape, p.value);
  const mf::Checkpoint back = mf::parse_checkpoint(mf::serialize_checkpoint(ck));

  auto b = make();
  for (auto& p : b) back.copy_tensor(p.name, p.value);
  mf::AdamW<float> ob(views(b), o);
  ob.load_state([&](const std::string& name, const std::vector<mf::Index>& shape, std::span<float> out) {
    back.copy_tensor(name, shape, out);
  });
  EXPECT_EQ(ob.steps(), 2u);
  set_grads(a, 2);
  set_grads(b, 2);
  oa.step(0.01);
  ob.step(0.01);
  for (std::size_t k = 0; k < 2; ++k)
    EXPECT_EQ(std::memcmp(a[k].value.data(), b[k].value.data(), a[k].value.size() * sizeof(float)), 0) << a[k].name;

  // Invalid loaded counts are refused and leave a fresh optimiser.
  mf::Checkpoint bad = back;
  auto& step_tensor = bad.tensors[0];
  ASSERT_EQ(step_tensor.name, "adamw.step");
  const float half = 1.5f;
  std::memcpy(step_tensor.bytes.data(), &half, sizeof(float));
  auto fill = [&](const std::string& name, const std::vector<mf::Index>& shape, std::span<float> out) {
    bad.copy_tensor(name, shape, out);
  };
  EXPECT_THROW(ob.load_state(fill), mf::FormatError);
  EXPECT_EQ(ob.steps(), 0u);
  for (const auto& s : ob.state_tensors())
    for (float x : s.values) EXPECT_EQ(x, 0.0f) << s.name;
  // A missing tensor too.
  mf::Checkpoint missing = back;
  missing.tensors.erase(missing.tensors.begin() + 1);
  EXPECT_THROW(ob.load_state([&](const std::string& name, const std::vector<mf::Index>& shape,
                                 std::span<float> out) { missing.copy_tensor(name, shape, out); }),
               mf::FormatError);
  EXPECT_EQ(ob.steps(), 0u);
}

TEST(AdamW, RejectsBadConfigurationAndShapes) {
  std::vector<Param<double>> ps(1);
  ps[0] = param<double>("t", {2, 3}, std::vector<double>(6), std::vector<double>(6), ParameterKind::Table, 4);
  mf::AdamWOptions o;
  o.beta1 = 1.0;
  EXPECT_THROW(mf::AdamW<double>(views(ps), o), mf::ConfigError);
  o = {};
  o.eps = 0.0;
  EXPECT_THROW(mf::AdamW<double>(views(ps), o), mf::ConfigError);
  o = {};
  o.lr_multipliers.norm = -1.0;
  EXPECT_THROW(mf::AdamW<double>(views(ps), o), mf::ConfigError);
  o = {};
  o.sparse_update = mf::SparseUpdate::RowSparse;
  EXPECT_THROW(mf::AdamW<double>(views(ps), o), mf::ConfigError);  // row_size 4 does not divide 6
  ps[0].row_size = 3;  // 2 rows
  ps[0].touched = {1, 1};
  ps[0].use_touched = true;
  mf::AdamW<double> opt(views(ps), o);
  const auto before = ps[0].value;
  EXPECT_THROW(opt.step(-1.0), mf::ConfigError);
  EXPECT_THROW(opt.step(std::numeric_limits<double>::quiet_NaN()), mf::ConfigError);
  ps[0].touched.resize(1);  // the view points at this vector: now one flag short
  EXPECT_THROW(opt.step(0.1), mf::ShapeError);
  EXPECT_EQ(ps[0].value, before);
  EXPECT_EQ(opt.steps(), 0u);
  // A touched list naming a row past the end is refused before anything reads or writes through it.
  ps[0].touched = {1, 1};
  std::vector<mf::Index> list{1, 7};
  auto listed = views(ps);
  listed[0].touched_list = &list;
  mf::AdamW<double> with_list(listed, o);
  for (const bool fused : {false, true}) {
    try {
      fused ? (void)with_list.step_fused(0.1, 1.0) : with_list.step(0.1);
      ADD_FAILURE() << "no exception";
    } catch (const mf::ShapeError& e) {
      EXPECT_NE(std::string(e.what()).find("lists touched row 7, outside [0, 2)"), std::string::npos) << e.what();
    }
  }
  EXPECT_EQ(ps[0].value, before);
  std::vector<Param<double>> dup(2);
  dup[0] = param<double>("x", {1}, {0.0}, {0.0});
  dup[1] = param<double>("x", {1}, {0.0}, {0.0});
  EXPECT_THROW(mf::AdamW<double>(views(dup)), mf::ConfigError);
  std::vector<Param<double>> mis(1);
  mis[0] = param<double>("x", {2}, {0.0, 1.0}, {0.0});
  EXPECT_THROW(mf::AdamW<double>(views(mis)), mf::ShapeError);
}

TEST(SGD, UpdateMatchesTheFormulaWithDecayOnlyWhereItApplies) {
  std::vector<Param<double>> ps(2);
  ps[0] = param<double>("w", {2}, {1.0, -2.0}, {0.5, 0.25}, ParameterKind::Dense);
  ps[1] = param<double>("b", {2}, {1.0, -2.0}, {0.5, 0.25}, ParameterKind::Bias);
  mf::SGD<double> plain(views(ps));
  plain.step(0.1);
  EXPECT_DOUBLE_EQ(ps[0].value[0], 1.0 - 0.1 * 0.5);
  EXPECT_DOUBLE_EQ(ps[0].value[1], -2.0 - 0.1 * 0.25);
  mf::SGD<double> decayed(views(ps), {.weight_decay = 0.5});
  ps[0].value = {1.0, -2.0};
  ps[1].value = {1.0, -2.0};
  decayed.step(0.1);
  EXPECT_DOUBLE_EQ(ps[0].value[0], 1.0 - 0.1 * (0.5 + 0.5 * 1.0));    // 0.9
  EXPECT_DOUBLE_EQ(ps[0].value[1], -2.0 - 0.1 * (0.25 + 0.5 * -2.0));  // -1.925
  EXPECT_DOUBLE_EQ(ps[1].value[0], 1.0 - 0.1 * 0.5);                  // bias: no decay
  EXPECT_DOUBLE_EQ(ps[1].value[1], -2.0 - 0.1 * 0.25);
  EXPECT_THROW(decayed.step(-0.1), mf::ConfigError);
  EXPECT_THROW(mf::SGD<double>(views(ps), {.weight_decay = -1.0}), mf::ConfigError);
}

TEST(Clip, NormAndScalingMatchAHandComputation) {
  std::vector<Param<float>> ps(2);
  ps[0] = param<float>("a", {2}, {0, 0}, {3.0f, 0.0f}, ParameterKind::Dense);
  ps[1] = param<float>("b", {1}, {0}, {4.0f}, ParameterKind::Bias);
  // ‖g‖ = sqrt(3² + 0² + 4²) = 5.
  EXPECT_EQ(mf::global_grad_norm(views(ps)), 5.0);
  EXPECT_EQ(mf::clip_grad_norm(views(ps), 10.0), 5.0);  // below the threshold: unchanged
  EXPECT_EQ(ps[0].grad, (std::vector<float>{3.0f, 0.0f}));
  EXPECT_EQ(mf::clip_grad_norm(views(ps), 1.0), 5.0);  // returns the pre-clip norm
  EXPECT_FLOAT_EQ(ps[0].grad[0], 0.6f);                 // 3 · 1/5
  EXPECT_EQ(ps[0].grad[1], 0.0f);
  EXPECT_FLOAT_EQ(ps[1].grad[0], 0.8f);                 // 4 · 1/5
  EXPECT_NEAR(mf::global_grad_norm(views(ps)), 1.0, 1e-7);

  // Less round numbers: g = (0.1, -0.2, 0.3), (1.5): Σg² = 0.01 + 0.04 + 0.09 + 2.25 = 2.39.
  std::vector<Param<double>> qs(2);
  qs[0] = param<double>("a", {3}, {0, 0, 0}, {0.1, -0.2, 0.3});
  qs[1] = param<double>("b", {1}, {0}, {1.5});
  const double norm = mf::clip_grad_norm(views(qs), 0.5);
  EXPECT_NEAR(norm, std::sqrt(2.39), 1e-15);
  EXPECT_NEAR(qs[0].grad[1], -0.2 * 0.5 / std::sqrt(2.39), 1e-16);
  EXPECT_NEAR(qs[1].grad[0], 1.5 * 0.5 / std::sqrt(2.39), 1e-15);

  // Non-finite gradient: norm reported, nothing scaled.
  qs[0].grad = {std::numeric_limits<double>::quiet_NaN(), 1.0, 1.0};
  EXPECT_TRUE(std::isnan(mf::clip_grad_norm(views(qs), 0.5)));
  EXPECT_EQ(qs[0].grad[1], 1.0);
  EXPECT_THROW(mf::clip_grad_norm(views(qs), 0.0), mf::ConfigError);
}

TEST(Clip, TouchedRowFlagsLimitTheWorkNotTheResult) {
  std::vector<Param<double>> ps(1);
  ps[0] = param<double>("tab", {3, 2}, std::vector<double>(6), {1.0, 2.0, 0.0, 0.0, 2.0, 4.0}, ParameterKind::Table,
                        2, {1, 0, 1});
  // Σg² = 1 + 4 + 4 + 16 = 25.
  EXPECT_EQ(mf::clip_grad_norm(views(ps), 2.5), 5.0);
  EXPECT_EQ(ps[0].grad, (std::vector<double>{0.5, 1.0, 0.0, 0.0, 1.0, 2.0}));
  ps[0].touched = {1, 0};
  EXPECT_THROW(mf::global_grad_norm(views(ps)), mf::ShapeError);
}

TEST(Clip, EveryElementCountsWhateverTheLengthAndTheRowWidth) {
  // Gradients in multiples of 1/4 up to 3/4: every square and every partial sum is exact in double, so the norm
  // pass must give Σg² exactly, whatever the lanes, the tails (lengths around multiples of the lane count) and the
  // pieces (a parameter longer than one piece) it is cut into.
  auto grad_value = [](std::size_t i) { return float(int(i % 7) - 3) * 0.25f; };
  for (const std::size_t n : {std::size_t(1), std::size_t(7), std::size_t(31), std::size_t(32), std::size_t(33),
                              std::size_t(65), std::size_t(100003)}) {
    std::vector<float> g(n);
    double expected = 0.0;
    for (std::size_t i = 0; i < n; ++i) {
      g[i] = grad_value(i + n);
      expected += double(g[i]) * double(g[i]);
    }
    std::vector<Param<float>> ps(1);
    ps[0] = param<float>("a", {mf::Index(n)}, std::vector<float>(n), g);
    EXPECT_EQ(mf::global_grad_norm(views(ps)), std::sqrt(expected)) << n;
  }
  // A table of rows of 37 with every third row untouched (and zero), long enough for several pieces of rows.
  const std::size_t rows = 2000, width = 37;
  std::vector<float> g(rows * width, 0.0f);
  std::vector<std::uint8_t> flags(rows, 0);
  double expected = 0.0;
  for (std::size_t r = 0; r < rows; ++r) {
    if (r % 3 == 2) continue;
    flags[r] = 1;
    for (std::size_t c = 0; c < width; ++c) {
      g[r * width + c] = grad_value(r * width + c);
      expected += double(g[r * width + c]) * double(g[r * width + c]);
    }
  }
  std::vector<Param<float>> ts(1);
  ts[0] = param<float>("tab", {mf::Index(rows), mf::Index(width)}, std::vector<float>(rows * width), g,
                       ParameterKind::Table, mf::Index(width), flags);
  EXPECT_EQ(mf::global_grad_norm(views(ts)), std::sqrt(expected));
}

TEST(Schedule, ValuesAtStartEndOfWarmupMidpointAndEnd) {
  const auto s = mf::CosineSchedule::paper(3e-3, 1000);
  EXPECT_EQ(s.warmup_steps, 10);
  EXPECT_DOUBLE_EQ(s.lr_min, 3e-5);
  EXPECT_DOUBLE_EQ(s(0), 3e-3 / 10);  // first warm-up step
  EXPECT_DOUBLE_EQ(s(4), 3e-3 * 5 / 10);
  EXPECT_EQ(s(9), 3e-3);              // last warm-up step: exactly lr_max
  // First decay step, u = 11: lr_min + (lr_max − lr_min)·(1 + cos(π·1/990))/2.
  EXPECT_DOUBLE_EQ(s(10), 3e-5 + (3e-3 - 3e-5) * (1 + std::cos(std::numbers::pi / 990)) / 2);
  // Midpoint of the decay: u − W = 495 of 990, cos(π/2) = 0, so (lr_max + lr_min)/2.
  EXPECT_NEAR(s(504), (3e-3 + 3e-5) / 2, 1e-18);
  EXPECT_EQ(s(999), 3e-5);   // last step: exactly lr_min
  EXPECT_EQ(s(5000), 3e-5);  // past the end
  EXPECT_EQ(s(std::numeric_limits<std::int64_t>::max()), 3e-5);  // without overflowing step + 1
  EXPECT_EQ(mf::cosine_lr(9, 2.0, 0.0, 10, 10), 2.0);  // warm-up over the whole run: its last step at lr_max
  double prev = s(9);
  for (std::int64_t k = 10; k < 1000; ++k) {
    EXPECT_LE(s(k), prev) << k;
    prev = s(k);
  }
  // No warm-up, and a run shorter than 100 steps (warm-up 1 step).
  EXPECT_EQ(mf::cosine_lr(0, 1.0, 0.0, 0, 3), 0.5 * (1 + std::cos(std::numbers::pi / 3)));
  EXPECT_EQ(mf::CosineSchedule::paper(1.0, 50).warmup_steps, 1);
  EXPECT_EQ(mf::CosineSchedule::paper(1.0, 50)(0), 1.0);
  EXPECT_THROW(s(-1), mf::ConfigError);
  EXPECT_THROW(mf::cosine_lr(0, 1.0, 2.0, 0, 10), mf::ConfigError);
  EXPECT_THROW(mf::cosine_lr(0, 1.0, 0.0, 11, 10), mf::ConfigError);
  EXPECT_THROW(mf::cosine_lr(0, 1.0, 0.0, 0, 0), mf::ConfigError);
}

// ------------------------------------------------------------------------------ fused, threaded AdamW and clipping

namespace {

/// The previous AdamW, kept verbatim as the reference of the fused one: sequential, double per element (no explicit
/// fma), per-row counts in RowSparse mode, touched rows read from the flags.
template <class Scalar>
class PreviousAdamW {
 public:
  PreviousAdamW(std::vector<mf::ParameterView<Scalar>> params, mf::AdamWOptions options)
      : params_(std::move(params)), options_(options) {
    for (const auto& p : params_) {
      State s;
      s.m.assign(p.value.size(), Scalar(0));
      s.v.assign(p.value.size(), Scalar(0));
      if (row_sparse(p)) s.row_steps.assign(p.value.size() / std::size_t(p.row_size), Scalar(0));
      state_.push_back(std::move(s));
    }
  }
  void step(double lr) {
    step_ += Scalar(1);
    const double t = double(step_);
    for (std::size_t i = 0; i < params_.size(); ++i) {
      const auto& p = params_[i];
      auto& s = state_[i];
      const double eta = lr * options_.lr_multipliers(p.kind);
      const double lambda = mf::decays(p.kind) ? options_.weight_decay : 0.0;
      if (!row_sparse(p)) {
        update_range(p, s, 0, p.value.size(), t, eta, lambda);
        continue;
      }
      const std::size_t row = std::size_t(p.row_size);
      for (std::size_t r = 0; r < s.row_steps.size(); ++r) {
        if (p.touched_rows != nullptr && (*p.touched_rows)[r] == 0) continue;
        s.row_steps[r] += Scalar(1);
        update_range(p, s, r * row, (r + 1) * row, double(s.row_steps[r]), eta, lambda);
      }
    }
  }
  /// The previous clip_grad_norm: one sequential sum in memory order over the flagged rows.
  static double clip(const std::vector<mf::ParameterView<Scalar>>& params, double max_norm) {
    double sum = 0.0;
    auto ranges = [](const mf::ParameterView<Scalar>& p, auto&& f) {
      if (p.touched_rows == nullptr || p.row_size <= 0) return f(std::size_t(0), p.grad.size());
      const std::size_t row = std::size_t(p.row_size);
      for (std::size_t r = 0; r < p.grad.size() / row; ++r)
        if ((*p.touched_rows)[r] != 0) f(r * row, (r + 1) * row);
    };
    for (const auto& p : params)
      ranges(p, [&](std::size_t b, std::size_t e) {
        for (std::size_t i = b; i < e; ++i) sum += double(p.grad[i]) * double(p.grad[i]);
      });
    const double norm = std::sqrt(sum);
    if (max_norm <= 0.0 || norm <= max_norm) return norm;
    const double scale = max_norm / norm;
    for (const auto& p : params)
      ranges(p, [&](std::size_t b, std::size_t e) {
        for (std::size_t i = b; i < e; ++i) p.grad[i] = Scalar(double(p.grad[i]) * scale);
      });
    return norm;
  }

 private:
  struct State {
    std::vector<Scalar> m, v, row_steps;
  };
  bool row_sparse(const mf::ParameterView<Scalar>& p) const {
    return options_.sparse_update == mf::SparseUpdate::RowSparse &&
           (p.kind == ParameterKind::Table || p.kind == ParameterKind::Embedding);
  }
  void update_range(const mf::ParameterView<Scalar>& p, State& s, std::size_t begin, std::size_t end, double t,
                    double eta, double lambda) const {
    const double b1_ = options_.beta1, b2_ = options_.beta2, eps_ = options_.eps;
    const double bc1 = 1.0 - std::pow(b1_, t);
    const double bc2 = 1.0 - std::pow(b2_, t);
    Scalar* theta = p.value.data();
    const Scalar* grad = p.grad.data();
    for (std::size_t i = begin; i < end; ++i) {
      const double g = double(grad[i]);
      const double m = b1_ * double(s.m[i]) + (1.0 - b1_) * g;
      const double v = b2_ * double(s.v[i]) + (1.0 - b2_) * g * g;
      s.m[i] = Scalar(m);
      s.v[i] = Scalar(v);
      const double th = double(theta[i]);
      theta[i] = Scalar(th - eta * (lambda * th + (m / bc1) / (std::sqrt(v / bc2) + eps_)));
    }
  }
  std::vector<mf::ParameterView<Scalar>> params_;
  mf::AdamWOptions options_;
  Scalar step_ = Scalar(0);
  std::vector<State> state_;
};

/// A float model's worth of parameters of every kind, with touched flags and lists on the sparse ones.
struct FloatModel {
  std::vector<Param<float>> ps;
  std::vector<std::vector<mf::Index>> lists;  // one per parameter (used by the sparse ones)

  explicit FloatModel(std::uint64_t seed) {
    mf::Rng rng(seed);
    auto make = [&](std::string name, std::vector<mf::Index> shape, ParameterKind kind, mf::Index row) {
      std::size_t n = 1;
      for (auto d : shape) n *= std::size_t(d);
      Param<float> p = param<float>(std::move(name), std::move(shape), std::vector<float>(n), std::vector<float>(n, 0.0f),
                                    kind, row);
      rng.fill_normal(std::span<float>(p.value), 0.0, 0.5);
      if (row > 0) {
        p.touched.assign(n / std::size_t(row), 0);
        p.use_touched = true;
      }
      ps.push_back(std::move(p));
    };
    make("dense", {37, 45}, ParameterKind::Dense, 0);  // 1665: not a multiple of 8, tails exercised
    make("bias", {45}, ParameterKind::Bias, 0);
    make("norm", {45}, ParameterKind::Norm, 0);
    make("tables", {3, 64, 40}, ParameterKind::Table, 40);
    make("embedding", {50, 13}, ParameterKind::Embedding, 13);
    make("big", {200, 200}, ParameterKind::Dense, 0);  // two pieces
    lists.resize(ps.size());
  }

  /// Views with (list = true) or without the touched lists.
  std::vector<mf::ParameterView<float>> views_of(bool list) {
    std::vector<mf::ParameterView<float>> v;
    for (std::size_t i = 0; i < ps.size(); ++i) {
      auto view = ps[i].view();
      if (list && ps[i].use_touched) view.touched_list = &lists[i];
      v.push_back(view);
    }
    return v;
  }

  /// Gradients of step `t`: normal values on dense kinds, on a random subset of rows of the sparse ones (flagged
  /// and listed in a scrambled order), zero elsewhere.
  void fill_gradients(std::uint64_t t, double scale) {
    mf::Rng rng = mf::Rng::stream(99, t);
    for (std::size_t i = 0; i < ps.size(); ++i) {
      auto& p = ps[i];
      std::fill(p.grad.begin(), p.grad.end(), 0.0f);
      if (!p.use_touched) {
        rng.fill_normal(std::span<float>(p.grad), 0.0, scale);
        continue;
      }
      std::fill(p.touched.begin(), p.touched.end(), std::uint8_t(0));
      lists[i].clear();
      const std::size_t rows = p.touched.size(), row = std::size_t(p.row_size);
      for (std::size_t k = 0; k < rows / 3; ++k) {
        const std::size_t r = std::size_t(rng.uniform_index(rows));
        if (!p.touched[r]) {
          p.touched[r] = 1;
          lists[i].push_back(mf::Index(r));
        }
        rng.fill_normal(std::span<float>(p.grad).subspan(r * row, row), 0.0, scale);
      }
    }
  }
};

mf::AdamWOptions row_sparse_options() {
  mf::AdamWOptions o;
  o.sparse_update = mf::SparseUpdate::RowSparse;
  return o;
}

/// max |a − b| / max |b|: relative to the tensor's scale, because an element that decays through zero has no
/// meaningful relative error of its own (one rounding of its moments changes its sign-crossing step).
double max_relative_difference(const std::vector<float>& a, const std::vector<float>& b) {
  double worst = 0.0, scale = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    worst = std::max(worst, std::abs(double(a[i]) - double(b[i])));
    scale = std::max(scale, std::abs(double(b[i])));
  }
  return worst / std::max(scale, 1e-30);
}

}  // namespace

TEST(AdamWFused, EqualsThePreviousClipAndStepWithin1e6After100FloatSteps) {
  for (const auto mode : {mf::SparseUpdate::Dense, mf::SparseUpdate::RowSparse}) {
    for (const double max_norm : {0.0, 5.0}) {
      SCOPED_TRACE(std::string(mode == mf::SparseUpdate::Dense ? "Dense" : "RowSparse") + " max_norm " +
                   std::to_string(max_norm));
      FloatModel fused(3), previous(3);
      mf::AdamWOptions o;
      o.sparse_update = mode;
      o.lr_multipliers.table = 3.0;
      mf::AdamW<float> opt(fused.views_of(true), o);
      PreviousAdamW<float> ref(previous.views_of(false), o);
      int clipped = 0;
      for (std::uint64_t t = 0; t < 100; ++t) {
        const double grad_scale = t % 3 == 0 ? 1.0 : 0.05;  // clipped on some steps only
        fused.fill_gradients(t, grad_scale);
        previous.fill_gradients(t, grad_scale);
        const double lr = 1e-3 * (1.0 + double(t % 7));
        const double ref_norm = PreviousAdamW<float>::clip(previous.views_of(false), max_norm);
        ref.step(lr);
        const double norm = opt.step_fused(lr, max_norm);
        clipped += max_norm > 0.0 && ref_norm > max_norm;
        ASSERT_NEAR(norm, ref_norm, 1e-12 * ref_norm);
        // The fused step leaves the gradients zero and the touched rows cleared.
        for (std::size_t i = 0; i < fused.ps.size(); ++i) {
          for (float g : fused.ps[i].grad) {
            ASSERT_EQ(g, 0.0f) << fused.ps[i].name;
          }
          for (auto f : fused.ps[i].touched) {
            ASSERT_EQ(f, 0) << fused.ps[i].name;
          }
          ASSERT_TRUE(fused.lists[i].empty());
        }
      }
      if (max_norm > 0.0) {
        EXPECT_GT(clipped, 10);
      }
      EXPECT_EQ(opt.steps(), 100u);
      for (std::size_t i = 0; i < fused.ps.size(); ++i)
        EXPECT_LE(max_relative_difference(fused.ps[i].value, previous.ps[i].value), 1e-6) << fused.ps[i].name;
    }
  }
}

TEST(AdamWFused, StepWithoutClippingMatchesStepFusedBitwiseAndKeepsGradients) {
  FloatModel a(5), b(5);
  mf::AdamW<float> oa(a.views_of(true), row_sparse_options());
  mf::AdamW<float> ob(b.views_of(false), row_sparse_options());
  for (std::uint64_t t = 0; t < 5; ++t) {
    a.fill_gradients(t, 1.0);
    b.fill_gradients(t, 1.0);
    oa.step_fused(1e-2, 0.0);  // listed rows
    const auto grads = b.ps[0].grad;
    ob.step(1e-2);             // flagged rows, gradients kept
    EXPECT_EQ(b.ps[0].grad, grads);
  }
  for (std::size_t i = 0; i < a.ps.size(); ++i) EXPECT_EQ(a.ps[i].value, b.ps[i].value) << a.ps[i].name;
}

TEST(AdamWFused, SimdKernelEqualsScalarKernelBitwise) {
  for (const bool scaled : {false, true}) {
    mf::Rng rng(7);
    const std::size_t n = 1003;
    std::vector<float> theta(n), grad(n), m(n), v(n);
    rng.fill_normal(std::span<float>(theta), 0.0, 1.0);
    rng.fill_normal(std::span<float>(grad), 0.0, 1.0);
    rng.fill_normal(std::span<float>(m), 0.0, 0.1);
    for (auto& x : v) x = float(rng.uniform() * 0.01);
    std::vector<std::uint16_t> m16(n), v16(n);
    for (std::size_t i = 0; i < n; ++i) {
      m16[i] = mf::detail::float_to_bf16(m[i]);
      v16[i] = mf::detail::float_to_bf16(v[i]);
    }
    mf::detail::adamw::Coefficients c;
    c.b1 = 0.9;
    c.b2 = 0.95;
    c.one_minus_b1 = 1 - c.b1;
    c.one_minus_b2 = 1 - c.b2;
    c.bc1 = 1 - std::pow(0.9, 3.0);
    c.bc2 = 1 - std::pow(0.95, 3.0);
    c.eps = 1e-8;
    c.eta = 3e-3;
    c.lambda = 0.1;
    c.scale = scaled ? 0.3 : 1.0;
    c.scaled = scaled;
    auto t1 = theta, g1 = grad, m1 = m, v1 = v, t2 = theta, g2 = grad, m2 = m, v2 = v;
    mf::detail::adamw::update(t1.data(), g1.data(), m1.data(), v1.data(), n, c, true, true);
    mf::detail::adamw::update(t2.data(), g2.data(), m2.data(), v2.data(), n, c, true, false);
    EXPECT_EQ(t1, t2);
    EXPECT_EQ(m1, m2);
    EXPECT_EQ(v1, v2);
    EXPECT_EQ(g1, std::vector<float>(n, 0.0f));
    EXPECT_EQ(g2, std::vector<float>(n, 0.0f));
    auto t3 = theta, g3 = grad, t4 = theta, g4 = grad;
    auto m3 = m16, v3 = v16, m4 = m16, v4 = v16;
    mf::detail::adamw::update(t3.data(), g3.data(), m3.data(), v3.data(), n, c, false, true);
    mf::detail::adamw::update(t4.data(), g4.data(), m4.data(), v4.data(), n, c, false, false);
    EXPECT_EQ(t3, t4);
    EXPECT_EQ(m3, m4);
    EXPECT_EQ(v3, v4);
    EXPECT_EQ(g3, grad);
    EXPECT_NE(t3, theta);
  }
#if defined(__AVX512F__) && defined(__AVX512VL__)
  EXPECT_TRUE(mf::detail::adamw::has_simd_update<float>());  // the comparison above did take both kernels
#endif
}

#if defined(MEMORYFORMER_USE_OPENMP)
namespace {
class OmpThreads {
 public:
  explicit OmpThreads(int n) : saved_(omp_get_max_threads()) { omp_set_num_threads(n); }
  ~OmpThreads() { omp_set_num_threads(saved_); }
  OmpThreads(const OmpThreads&) = delete;
  OmpThreads& operator=(const OmpThreads&) = delete;

 private:
  int saved_;
};
}  // namespace

TEST(AdamWFused, ThreadCountDoesNotChangeBits) {
  for (const auto moments : {mf::MomentStorage::Native, mf::MomentStorage::BFloat16}) {
    std::vector<std::vector<float>> results;
    std::vector<double> norms;
    for (const int threads : {1, 2, 3}) {
      OmpThreads setting(threads);
      FloatModel model(11);
      mf::AdamWOptions o;
      o.sparse_update = mf::SparseUpdate::RowSparse;
      o.moments = moments;
      mf::AdamW<float> opt(model.views_of(true), o);
      std::vector<float> out;
      for (std::uint64_t t = 0; t < 6; ++t) {
        model.fill_gradients(t, t % 2 ? 2.0 : 0.1);
        norms.push_back(mf::global_grad_norm(model.views_of(t % 2 == 0)));
        norms.push_back(opt.step_fused(1e-2, 3.0));
      }
      for (auto& p : model.ps) out.insert(out.end(), p.value.begin(), p.value.end());
      for (auto& s : opt.state_tensors()) out.insert(out.end(), s.values.begin(), s.values.end());
      results.push_back(std::move(out));
    }
    EXPECT_EQ(results[0], results[1]);
    EXPECT_EQ(results[0], results[2]);
    const std::size_t per_run = norms.size() / 3;
    for (std::size_t i = 0; i < per_run; ++i) {
      EXPECT_EQ(norms[i], norms[per_run + i]) << i;
      EXPECT_EQ(norms[i], norms[2 * per_run + i]) << i;
    }
  }
}
#endif

TEST(AdamWFused, UntouchedRowsStayBitIdenticalAndListedRowsMove) {
  FloatModel model(13);
  mf::AdamW<float> opt(model.views_of(true), row_sparse_options());
  const auto before = model.ps[3].value;  // tables [3·64 rows, 40]
  model.fill_gradients(0, 1.0);
  const auto touched = model.ps[3].touched;
  opt.step_fused(1e-2, 0.0);
  int moved = 0, kept = 0;
  for (std::size_t r = 0; r < touched.size(); ++r)
    for (std::size_t j = 0; j < 40; ++j) {
      const std::size_t i = r * 40 + j;
      if (touched[r]) {
        moved += model.ps[3].value[i] != before[i];
      } else {
        ASSERT_EQ(std::memcmp(&model.ps[3].value[i], &before[i], sizeof(float)), 0) << "row " << r;
        ++kept;
      }
    }
  EXPECT_GT(moved, 0);
  EXPECT_GT(kept, 0);
}

TEST(AdamWFused, NonFiniteNormChangesNothing) {
  FloatModel model(17);
  mf::AdamW<float> opt(model.views_of(true), row_sparse_options());
  model.fill_gradients(0, 1.0);
  model.ps[0].grad[5] = std::numeric_limits<float>::infinity();
  const auto values = model.ps[0].value;
  const auto grads = model.ps[0].grad;
  EXPECT_TRUE(std::isinf(opt.step_fused(1e-2, 1.0)));
  EXPECT_EQ(opt.steps(), 0u);
  EXPECT_EQ(model.ps[0].value, values);
  EXPECT_EQ(model.ps[0].grad, grads);
  EXPECT_FALSE(model.lists[3].empty());
  EXPECT_THROW(opt.step_fused(1e-2, -1.0), mf::ConfigError);
  EXPECT_THROW(opt.step_fused(-1.0, 1.0), mf::ConfigError);
  EXPECT_THROW(opt.step_fused(1e-2, std::numeric_limits<double>::quiet_NaN()), mf::ConfigError);
}

TEST(AdamWFused, Bf16MomentsTrackFloatMomentsAndRoundTripThroughACheckpoint) {
  FloatModel a(19), b(19), c(19);
  mf::AdamWOptions o;
  o.sparse_update = mf::SparseUpdate::RowSparse;
  o.moments = mf::MomentStorage::BFloat16;
  mf::AdamWOptions of = o;
  of.moments = mf::MomentStorage::Native;
  mf::AdamW<float> oa(a.views_of(true), o), oc(c.views_of(true), of);
  for (std::uint64_t t = 0; t < 20; ++t) {
    a.fill_gradients(t, 1.0);
    c.fill_gradients(t, 1.0);
    oa.step_fused(1e-3, 1.0);
    oc.step_fused(1e-3, 1.0);
  }
  // bfloat16 moments (8 significant bits) move the parameters by nearly the same steps as float moments.
  for (std::size_t i = 0; i < a.ps.size(); ++i) {
    double worst = 0.0;
    for (std::size_t j = 0; j < a.ps[i].value.size(); ++j)
      worst = std::max(worst, std::abs(double(a.ps[i].value[j]) - double(c.ps[i].value[j])));
    EXPECT_LT(worst, 20 * 1e-3 * 0.02) << a.ps[i].name;  // 20 steps of at most ~lr each, within 2 %
  }
  // Saved under the float names and shapes, expanded exactly.
  mf::Checkpoint ck;
  const auto st = oa.state_tensors();
  const auto st_float = oc.state_tensors();
  ASSERT_EQ(st.size(), st_float.size());
  for (std::size_t i = 0; i < st.size(); ++i) {
    EXPECT_EQ(st[i].name, st_float[i].name);
    EXPECT_EQ(st[i].shape, st_float[i].shape);
    if (st[i].name.rfind("adamw.m.", 0) == 0 || st[i].name.rfind("adamw.v.", 0) == 0) {
      for (float x : st[i].values) EXPECT_EQ(mf::detail::bf16_to_float(mf::detail::float_to_bf16(x)), x);
    }
    ck.add_tensor(st[i].name, st[i].shape, st[i].values);
  }
  const mf::Checkpoint back = mf::parse_checkpoint(mf::serialize_checkpoint(ck));
  b.ps = a.ps;  // same parameters
  mf::AdamW<float> ob(b.views_of(true), o);
  ob.load_state([&](const std::string& name, const std::vector<mf::Index>& shape, std::span<float> out) {
    back.copy_tensor(name, shape, out);
  });
  EXPECT_EQ(ob.steps(), 20u);
  // Resumed: the next steps are bitwise those of the uninterrupted optimiser.
  for (std::uint64_t t = 20; t < 23; ++t) {
    a.fill_gradients(t, 1.0);
    b.fill_gradients(t, 1.0);
    oa.step_fused(1e-3, 1.0);
    ob.step_fused(1e-3, 1.0);
  }
  for (std::size_t i = 0; i < a.ps.size(); ++i) EXPECT_EQ(a.ps[i].value, b.ps[i].value) << a.ps[i].name;
  // A float-moment optimiser loads the bf16 checkpoint too (same names and shapes).
  mf::AdamW<float> od(c.views_of(true), of);
  EXPECT_NO_THROW(od.load_state([&](const std::string& name, const std::vector<mf::Index>& shape,
                                    std::span<float> out) { back.copy_tensor(name, shape, out); }));
}
