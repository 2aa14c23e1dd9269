// SPDX-License-Identifier: MIT
// Tests of nn/rope.hpp: GPT-NeoX rotate-half values, offsets, relative-position property, gradients, errors.
#include <memoryformer/nn/rope.hpp>
#include <memoryformer/random.hpp>
#include <memoryformer/testing/gradcheck.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "../support/test_helpers.hpp"

namespace mf = memoryformer;
using namespace memoryformer::testing_support;

namespace {




/// Positions of batch-major rows: row b·seq + t of every sequence is at offset + t.
std::vector<double> sequence_positions(mf::Index batch, mf::Index seq, mf::Index offset) {
  std::vector<double> pos;
  for (mf::Index b = 0; b < batch; ++b)
    for (mf::Index t = 0; t < seq; ++t) pos.push_back(double(offset + t));
  return pos;
}

// GPT-NeoX written as in its PyTorch code: emb = cat(freqs, freqs); rotate_half(r) = cat(−r2, r1);
// out = r·cos(emb) + rotate_half(r)·sin(emb), on the first R dims of each head.
mf::Matrix<double> neox_reference(const mf::Matrix<double>& x, mf::Index heads, mf::Index R, std::vector<double> pos,
                                  double base = 10000.0) {
  const mf::Index hd = x.cols() / heads, half = R / 2;
  mf::Matrix<double> out = x;
  for (mf::Index n = 0; n < x.rows(); ++n)
    for (mf::Index h = 0; h < heads; ++h) {
      std::vector<double> r(static_cast<size_t>(R)), rot(static_cast<size_t>(R)), emb(static_cast<size_t>(R));
      for (mf::Index j = 0; j < R; ++j) r[size_t(j)] = x(n, h * hd + j);
      for (mf::Index j = 0; j < half; ++j) {
        const double inv_freq = 1.0 / std::pow(base, double(2 * j) / double(R));
        emb[size_t(j)] = emb[size_t(j + half)] = pos[size_t(n)] * inv_freq;
        rot[size_t(j)] = -r[size_t(j + half)];
        rot[size_t(j + half)] = r[size_t(j)];
      }
      for (mf::Index j = 0; j < R; ++j)
        out(n, h * hd + j) = r[size_t(j)] * std::cos(emb[size_t(j)]) + rot[size_t(j)] * std::sin(emb[size_t(j)]);
    }
  return out;
}

}  // namespace

TEST(NnRope, KnownValues) {
  mf::Rotary<double> rope(2, 1, 2);
  mf::Matrix<double> x(2, 2), y(2, 2);
  x << 1, 0,  //
      0.5, 2;
  rope.forward(y, x, 1, 2);  // positions 0 and 1; inv_freq_0 = 1
  EXPECT_DOUBLE_EQ(y(0, 0), 1.0);
  EXPECT_DOUBLE_EQ(y(0, 1), 0.0);
  EXPECT_NEAR(y(1, 0), 0.5 * std::cos(1.0) - 2 * std::sin(1.0), 1e-15);
  EXPECT_NEAR(y(1, 1), 2 * std::cos(1.0) + 0.5 * std::sin(1.0), 1e-15);
}

TEST(NnRope, MatchesNeoxReferenceWithBatchHeadsAndTail) {
  // d = 30, 3 heads of 10, rotary on the first 4 of each head, 2 sequences of 7, offset 5.
  const mf::Index batch = 2, seq = 7, d = 30, heads = 3, R = 4, offset = 5;
  mf::Rotary<double> rope(d, heads, R);
  const auto x = random_matrix(batch * seq, d, 1);
  mf::Matrix<double> y(batch * seq, d);
  rope.forward(y, x, batch, seq, offset);
  const auto expect = neox_reference(x, heads, R, sequence_positions(batch, seq, offset));
  EXPECT_LE((y - expect).cwiseAbs().maxCoeff(), 1e-13);
  // Non-rotary dims pass through untouched.
  for (mf::Index h = 0; h < heads; ++h) EXPECT_EQ(y.middleCols(h * 10 + R, 10 - R), x.middleCols(h * 10 + R, 10 - R));
}

TEST(NnRope, HalvesLongerThanOnePieceMatchTheReferenceInPlace) {
  // Rotations of 2·8, 2·19 and 2·32 dims: the rows are rotated in pieces of 8 pairs, so these cover one piece (the
  // models' default: a quarter of a 64-wide head), whole pieces followed by a partial one, and whole pieces only; in
  // place as the blocks call it, and out of place.
  for (const mf::Index R : {mf::Index(16), mf::Index(38), mf::Index(64)}) {
    const mf::Index batch = 2, seq = 5, heads = 2, d = heads * 70, offset = 3;
    mf::Rotary<double> rope(d, heads, R);
    const auto x = random_matrix(batch * seq, d, 9);
    const auto expect = neox_reference(x, heads, R, sequence_positions(batch, seq, offset));
    mf::Matrix<double> y(batch * seq, d), z = x;
    rope.forward(y, x, batch, seq, offset);
    rope.forward(z, z, batch, seq, offset);
    EXPECT_LE((y - expect).cwiseAbs().maxCoeff(), 1e-13) << "R = " << R;
    EXPECT_EQ(z, y) << "R = " << R;
    rope.backward(z, z, batch, seq, offset);
    EXPECT_LE((z - x).cwiseAbs().maxCoeff(), 1e-13) << "R = " << R;
  }
}

TEST(NnRope, FullHeadRotationAndExplicitPositions) {
  mf::Rotary<double> rope(12, 2, 6, 500.0);
  const auto x = random_matrix(4, 12, 2);
  const std::vector<mf::Index> positions{0, 9, 3, 1000};
  mf::Matrix<double> y(4, 12);
  rope.forward(y, x, positions);
  const auto expect = neox_reference(x, 2, 6, {0, 9, 3, 1000}, 500.0);
  EXPECT_LE((y - expect).cwiseAbs().maxCoeff(), 1e-12);
  // Sequence form with offset = explicit positions.
  mf::Matrix<double> a(4, 12), b(4, 12);
  rope.forward(a, x, 2, 2, 7);
  const std::vector<mf::Index> same{7, 8, 7, 8};
  rope.forward(b, x, same);
  EXPECT_EQ(a, b);
}

TEST(NnRope, ZeroRotaryDimsIsIdentity) {
  mf::Rotary<double> rope(6, 2, 0);
  const auto x = random_matrix(3, 6, 3);
  mf::Matrix<double> y(3, 6);
  rope.forward(y, x, 1, 3);
  EXPECT_EQ(y, x);
}

TEST(NnRope, DotProductDependsOnlyOnRelativePosition) {
  mf::Rotary<double> rope(8, 1, 8);
  const auto q = random_matrix(1, 8, 4), k = random_matrix(1, 8, 5);
  mf::Matrix<double> q1(1, 8), k1(1, 8), q2(1, 8), k2(1, 8);
  rope.forward(q1, q, 1, 1, 10);
  rope.forward(k1, k, 1, 1, 7);
  rope.forward(q2, q, 1, 1, 103);
  rope.forward(k2, k, 1, 1, 100);
  EXPECT_NEAR(q1.row(0).dot(k1.row(0)), q2.row(0).dot(k2.row(0)), 1e-12);
  EXPECT_GT(std::abs(q1.row(0).dot(k1.row(0)) - q.row(0).dot(k.row(0))), 1e-6);
}

TEST(NnRope, BackwardIsInverseAndMatchesFiniteDifferences) {
  struct Case {
    mf::Index batch, seq, d, heads, R, offset;
  };
  for (const Case c : {Case{1, 1, 6, 1, 2, 0}, Case{2, 3, 14, 2, 4, 3}, Case{1, 7, 10, 1, 10, 0}}) {
    mf::Rotary<double> rope(c.d, c.heads, c.R);
    const mf::Index rows = c.batch * c.seq;
    auto x = random_matrix(rows, c.d, 6);
    const auto dy = random_matrix(rows, c.d, 7);
    mf::Matrix<double> y(rows, c.d), dx(rows, c.d), back(rows, c.d);
    rope.forward(y, x, c.batch, c.seq, c.offset);
    rope.backward(back, y, c.batch, c.seq, c.offset);
    EXPECT_LE((back - x).cwiseAbs().maxCoeff(), 1e-14);
    rope.backward(dx, dy, c.batch, c.seq, c.offset);
    auto loss = [&] {
      rope.forward(y, x, c.batch, c.seq, c.offset);
      return (dy.array() * y.array()).sum();
    };
    const auto r = mf::check_gradient(span_of(x), cspan_of(dx), loss);
    EXPECT_LE(r.relative_error, 1e-6) << "seq = " << c.seq << ", d = " << c.d;
    // Explicit-position backward agrees.
    std::vector<mf::Index> pos;
    for (mf::Index b = 0; b < c.batch; ++b)
      for (mf::Index t = 0; t < c.seq; ++t) pos.push_back(c.offset + t);
    mf::Matrix<double> dx2(rows, c.d);
    rope.backward(dx2, dy, pos);
    EXPECT_EQ(dx2, dx);
  }
}

TEST(NnRope, InPlaceAndFloat) {
  mf::Rotary<double> rope(12, 3, 4);
  mf::Rotary<float> ropef(12, 3, 4);
  const auto x = random_matrix(6, 12, 8);
  mf::Matrix<double> y(6, 12), z = x;
  rope.forward(y, x, 2, 3, 11);
  rope.forward(z, z, 2, 3, 11);
  EXPECT_EQ(z, y);
  mf::Matrix<float> xf = x.cast<float>(), yf(6, 12);
  ropef.forward(yf, xf, 2, 3, 11);
  EXPECT_LE((yf.cast<double>() - y).cwiseAbs().maxCoeff(), 1e-5);
}

TEST(NnRope, FloatPiecesMatchTheReference) {
  // Float, as the models run it: 4 heads of 64 with 8 pairs per head (one whole piece, the models' default) and 19
  // (two pieces and a remainder), in place and out of place, against the double reference; backward undoes forward.
  for (const mf::Index R : {mf::Index(16), mf::Index(38)}) {
    const mf::Index batch = 2, seq = 9, heads = 4, d = heads * 64, offset = 5;
    mf::Rotary<float> rope(d, heads, R);
    const auto x = random_matrix(batch * seq, d, 12);
    const auto expect = neox_reference(x, heads, R, sequence_positions(batch, seq, offset));
    const mf::Matrix<float> xf = x.cast<float>();
    mf::Matrix<float> y(batch * seq, d), z = xf;
    rope.forward(y, xf, batch, seq, offset);
    rope.forward(z, z, batch, seq, offset);
    EXPECT_LE((y.cast<double>() - expect).cwiseAbs().maxCoeff(), 1e-5) << "R = " << R;
    EXPECT_EQ(z, y) << "R = " << R;
    rope.backward(z, z, batch, seq, offset);
    EXPECT_LE((z - xf).cwiseAbs().maxCoeff(), 1e-5f) << "R = " << R;
  }
}

TEST(NnRope, BadConfigAndShapesThrow) {
  expect_throw_with([] { mf::Rotary<double>(16, 2, 3); }, "rotary_dims = 3 must be even");
  EXPECT_THROW(mf::Rotary<double>(16, 2, 3), mf::ConfigError);
  expect_throw_with([] { mf::Rotary<double>(10, 3, 2); }, "d = 10 is not divisible by heads = 3");
  expect_throw_with([] { mf::Rotary<double>(16, 2, 10); }, "rotary_dims = 10 must be in [0, head_dim = 8]");
  EXPECT_THROW(mf::Rotary<double>(16, 0, 2), mf::ConfigError);
  mf::Rotary<double> rope(16, 2, 4);
  mf::Matrix<double> x(6, 16), y(6, 16), bad(6, 15);
  expect_throw_with([&] { rope.forward(y, x, 2, 4); },
                    "Rotary::forward: x is (6, 16), expected (batch·seq, d) with batch = 2, seq = 4 = (8, 16)");
  EXPECT_THROW(rope.forward(y, x, 2, 4), mf::ShapeError);
  expect_throw_with([&] { rope.forward(bad, x, 2, 3); }, "y is (6, 15), expected (6, 16)");
  expect_throw_with([&] { rope.backward(y, bad, 2, 3); }, "Rotary::backward: dy is (6, 15)");
  EXPECT_THROW(rope.forward(y, x, 2, 3, -1), mf::ConfigError);
  const std::vector<mf::Index> short_pos{0, 1, 2};
  EXPECT_THROW(rope.forward(y, x, short_pos), mf::ShapeError);
  const std::vector<mf::Index> neg{0, 1, 2, -4, 0, 0};
  expect_throw_with([&] { rope.forward(y, x, neg); }, "positions[3] = -4");
  // Positions at the top of the index range: no overflow, a clear error for the sequence form, exact angles for the
  // positions form.
  const mf::Index top = std::numeric_limits<mf::Index>::max();
  expect_throw_with([&] { rope.forward(y, x, 2, 3, top); }, "position_offset + seq");
  EXPECT_THROW(rope.forward(y, x, 2, 3, top), mf::ConfigError);
  const std::vector<mf::Index> huge{top, 0, 1, 2, 3, top - 1};
  rope.forward(y, x, huge);
  EXPECT_TRUE(y.allFinite());
}

// forward and backward are const: several threads may share one object while its angle cache grows.
TEST(NnRope, ThreadsShareOneObjectWhileItsCacheGrows) {
  const mf::Rotary<float> shared(16, 2, 8);
  const auto run = [&](mf::Index seq, int repeats) {
    mf::Matrix<float> x = mf::Matrix<float>::Ones(seq, 16), y(seq, 16), expected(seq, 16);
    mf::Rotary<float>(16, 2, 8).forward(expected, x, 1, seq);
    bool same = true;
    for (int r = 0; r < repeats; ++r) {
      shared.forward(y, x, 1, seq);
      same = same && y == expected;
    }
    return same;
  };
  bool short_same = false, long_same = true;
  std::thread a([&] { short_same = run(30, 200); });
  std::thread b([&] {
    for (mf::Index seq = 64; seq <= 8192; seq *= 2) long_same = run(seq, 1) && long_same;
  });
  a.join();
  b.join();
  EXPECT_TRUE(short_same);
  EXPECT_TRUE(long_same);
}

TEST(NnRope, CachedAnglesGiveTheBitsOfAFreshObject) {
  // One object reused across calls that grow its angle cache (and the positions path, and a position past the
  // cache's limit) must give exactly what a fresh object gives for each call.
  mf::Rotary<float> reused(16, 2, 6);
  mf::Rng rng(3);
  struct Call {
    mf::Index batch, seq, offset;
  };
  for (const Call c : {Call{2, 4, 0}, Call{1, 8, 60}, Call{3, 5, 2}, Call{1, 3, 200}, Call{1, 2, 70000}}) {
    mf::Matrix<float> x(c.batch * c.seq, 16);
    rng.fill_normal(std::span<float>(x.data(), size_t(x.size())), 0.0, 1.0);
    mf::Matrix<float> a(x.rows(), 16), b(x.rows(), 16), da(x.rows(), 16), db(x.rows(), 16);
    mf::Rotary<float> fresh(16, 2, 6);
    reused.forward(a, x, c.batch, c.seq, c.offset);
    fresh.forward(b, x, c.batch, c.seq, c.offset);
    EXPECT_EQ(a, b) << "offset " << c.offset;
    mf::Rotary<float> fresh2(16, 2, 6);
    reused.backward(da, x, c.batch, c.seq, c.offset);
    fresh2.backward(db, x, c.batch, c.seq, c.offset);
    EXPECT_EQ(da, db) << "offset " << c.offset;
    std::vector<mf::Index> positions;
    for (mf::Index n = 0; n < x.rows(); ++n) positions.push_back(c.offset + n % c.seq);
    mf::Matrix<float> p(x.rows(), 16);
    reused.forward(p, x, positions);
    EXPECT_EQ(p, a) << "positions path, offset " << c.offset;
  }
}
