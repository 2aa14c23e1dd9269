// SPDX-License-Identifier: MIT
// Tests of nn/attention.hpp: forward against explicit loops, finite-difference gradients, KV-cache decoding equal to
// the full forward (with rotary offsets), shape and config errors.
#include <memoryformer/nn/attention.hpp>
#include <memoryformer/nn/rope.hpp>
#include <memoryformer/random.hpp>
#include <memoryformer/testing/gradcheck.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "../support/test_helpers.hpp"

namespace mf = memoryformer;
using namespace memoryformer::testing_support;

namespace {




// Explicit loops: for every sequence, head and query, scores over keys j ≤ i, softmax, weighted sum of values.
mf::Matrix<double> naive_attention(const mf::Matrix<double>& q, const mf::Matrix<double>& k, const mf::Matrix<double>& v,
                                   mf::Index batch, mf::Index seq, mf::Index heads, std::vector<double>* probs = nullptr) {
  const mf::Index d = q.cols(), dh = d / heads;
  mf::Matrix<double> ctx = mf::Matrix<double>::Zero(batch * seq, d);
  for (mf::Index b = 0; b < batch; ++b)
    for (mf::Index h = 0; h < heads; ++h)
      for (mf::Index i = 0; i < seq; ++i) {
        std::vector<double> w(size_t(seq), 0.0);
        double z = 0;
        for (mf::Index j = 0; j <= i; ++j) {
          double s = 0;
          for (mf::Index c = 0; c < dh; ++c) s += q(b * seq + i, h * dh + c) * k(b * seq + j, h * dh + c);
          w[size_t(j)] = std::exp(s / std::sqrt(double(dh)));
          z += w[size_t(j)];
        }
        for (mf::Index j = 0; j <= i; ++j) {
          w[size_t(j)] /= z;
          for (mf::Index c = 0; c < dh; ++c) ctx(b * seq + i, h * dh + c) += w[size_t(j)] * v(b * seq + j, h * dh + c);
        }
        if (probs) probs->insert(probs->end(), w.begin(), w.end());
      }
  return ctx;
}

}  // namespace

TEST(NnAttention, ForwardMatchesExplicitLoops) {
  const mf::Index batch = 2, seq = 5, d = 12, heads = 3;
  const auto q = random_matrix(batch * seq, d, 1), k = random_matrix(batch * seq, d, 2), v = random_matrix(batch * seq, d, 3);
  mf::Matrix<double> ctx(batch * seq, d);
  mf::AttentionCache<double> cache;
  mf::attention_forward(ctx, q, k, v, batch, seq, heads, cache);
  std::vector<double> probs;
  const auto expect = naive_attention(q, k, v, batch, seq, heads, &probs);
  EXPECT_LE((ctx - expect).cwiseAbs().maxCoeff(), 1e-13);
  ASSERT_EQ(cache.probs.rows(), batch * heads * seq);
  ASSERT_EQ(cache.probs.cols(), seq);
  for (mf::Index r = 0; r < cache.probs.rows(); ++r)
    for (mf::Index j = 0; j < seq; ++j) EXPECT_NEAR(cache.probs(r, j), probs[size_t(r * seq + j)], 1e-14);
}

TEST(NnAttention, FirstTokenAttendsOnlyToItself) {
  // Causality: ctx of token 0 is v of token 0, whatever the scores; changing later tokens leaves earlier ctx alone.
  const mf::Index seq = 4, d = 6;
  auto q = random_matrix(seq, d, 4), k = random_matrix(seq, d, 5), v = random_matrix(seq, d, 6);
  mf::Matrix<double> ctx(seq, d), ctx2(seq, d);
  mf::AttentionCache<double> cache;
  mf::attention_forward(ctx, q, k, v, 1, seq, 2, cache);
  EXPECT_LE((ctx.row(0) - v.row(0)).cwiseAbs().maxCoeff(), 1e-15);
  k.row(3).setConstant(9.0);
  v.row(3).setConstant(-9.0);
  mf::attention_forward(ctx2, q, k, v, 1, seq, 2, cache);
  EXPECT_EQ(ctx.topRows(3), ctx2.topRows(3));
  EXPECT_NE(ctx.row(3), ctx2.row(3));
}

TEST(NnAttention, GradientsMatchFiniteDifferences) {
  struct Case {
    mf::Index batch, seq, d, heads;
  };
  for (const Case c : {Case{1, 1, 3, 1}, Case{2, 7, 10, 2}, Case{1, 3, 9, 3}, Case{3, 2, 5, 1}}) {
    const mf::Index rows = c.batch * c.seq;
    auto q = random_matrix(rows, c.d, 7), k = random_matrix(rows, c.d, 8), v = random_matrix(rows, c.d, 9);
    const auto dctx = random_matrix(rows, c.d, 10);
    mf::Matrix<double> ctx(rows, c.d), dq(rows, c.d), dk(rows, c.d), dv(rows, c.d);
    mf::AttentionCache<double> cache;
    mf::attention_forward(ctx, q, k, v, c.batch, c.seq, c.heads, cache);
    mf::attention_backward(dq, dk, dv, q, k, v, dctx, cache);
    auto loss = [&] {
      mf::AttentionCache<double> tmp;
      mf::attention_forward(ctx, q, k, v, c.batch, c.seq, c.heads, tmp);
      return (dctx.array() * ctx.array()).sum();
    };
    const std::string label = "batch " + std::to_string(c.batch) + ", seq " + std::to_string(c.seq) + ", d " +
                              std::to_string(c.d) + ", heads " + std::to_string(c.heads);
    auto r = mf::check_gradient(span_of(q), cspan_of(dq), loss);
    EXPECT_LE(r.relative_error, 1e-6) << "q, " << label;
    r = mf::check_gradient(span_of(k), cspan_of(dk), loss);
    // seq = 1: softmax over one key is constant, dq = dk = 0 exactly (the relative error is then absolute).
    EXPECT_LE(r.relative_error, 1e-6) << "k, " << label;
    r = mf::check_gradient(span_of(v), cspan_of(dv), loss);
    EXPECT_LE(r.relative_error, 1e-6) << "v, " << label;
    EXPECT_EQ(r.checked, rows * c.d);
  }
}

TEST(NnAttention, OutputsMayAliasInputs) {
  const mf::Index batch = 2, seq = 3, d = 8, heads = 2, rows = batch * seq;
  const auto q = random_matrix(rows, d, 11), k = random_matrix(rows, d, 12), v = random_matrix(rows, d, 13);
  const auto dctx = random_matrix(rows, d, 14);
  mf::Matrix<double> ctx(rows, d), dq(rows, d), dk(rows, d), dv(rows, d);
  mf::AttentionCache<double> cache;
  mf::attention_forward(ctx, q, k, v, batch, seq, heads, cache);
  mf::attention_backward(dq, dk, dv, q, k, v, dctx, cache);
  mf::Matrix<double> qq = q;
  mf::attention_forward(qq, qq, k, v, batch, seq, heads, cache);
  EXPECT_EQ(qq, ctx);
  mf::Matrix<double> a = q, b = k, c = v;  // gradients written over their own inputs
  mf::attention_forward(ctx, q, k, v, batch, seq, heads, cache);
  mf::attention_backward(a, b, c, a, b, c, dctx, cache);
  EXPECT_EQ(a, dq);
  EXPECT_EQ(b, dk);
  EXPECT_EQ(c, dv);
}

TEST(NnAttention, DecodeTokenByTokenEqualsFullForwardWithRotary) {
  const mf::Index batch = 2, seq = 7, d = 10, heads = 2, rows = batch * seq;
  mf::Rotary<double> rope(d, heads, 4);
  const auto q = random_matrix(rows, d, 21), k = random_matrix(rows, d, 22), v = random_matrix(rows, d, 23);
  mf::Matrix<double> qr(rows, d), kr(rows, d), ctx(rows, d);
  rope.forward(qr, q, batch, seq);
  rope.forward(kr, k, batch, seq);
  mf::AttentionCache<double> cache;
  mf::attention_forward(ctx, qr, kr, v, batch, seq, heads, cache);

  // One token per step, as an autoregressive decoder does.
  mf::KVCache<double> kv(batch, seq, d);
  mf::Matrix<double> qs(batch, d), ks(batch, d), vs(batch, d), out(batch, d);
  for (mf::Index t = 0; t < seq; ++t) {
    for (mf::Index b = 0; b < batch; ++b) {
      qs.row(b) = q.row(b * seq + t);
      ks.row(b) = k.row(b * seq + t);
      vs.row(b) = v.row(b * seq + t);
    }
    rope.forward(qs, qs, batch, 1, kv.length());
    rope.forward(ks, ks, batch, 1, kv.length());
    mf::attention_decode(out, qs, ks, vs, kv, heads);
    for (mf::Index b = 0; b < batch; ++b)
      EXPECT_LE((out.row(b) - ctx.row(b * seq + t)).cwiseAbs().maxCoeff(), 1e-12) << "t = " << t << ", b = " << b;
  }
  EXPECT_EQ(kv.length(), seq);

  // Chunks of 3, 1 and 3 tokens (prefill then decode) give the same rows.
  kv.clear();
  mf::Index pos = 0;
  for (mf::Index chunk : {3, 1, 3}) {
    mf::Matrix<double> qc(batch * chunk, d), kc(batch * chunk, d), vc(batch * chunk, d), oc(batch * chunk, d);
    for (mf::Index b = 0; b < batch; ++b) {
      qc.middleRows(b * chunk, chunk) = q.middleRows(b * seq + pos, chunk);
      kc.middleRows(b * chunk, chunk) = k.middleRows(b * seq + pos, chunk);
      vc.middleRows(b * chunk, chunk) = v.middleRows(b * seq + pos, chunk);
    }
    rope.forward(qc, qc, batch, chunk, pos);
    rope.forward(kc, kc, batch, chunk, pos);
    mf::attention_decode(oc, qc, kc, vc, kv, heads);
    for (mf::Index b = 0; b < batch; ++b)
      EXPECT_LE((oc.middleRows(b * chunk, chunk) - ctx.middleRows(b * seq + pos, chunk)).cwiseAbs().maxCoeff(), 1e-12)
          << "chunk at " << pos << ", b = " << b;
    pos += chunk;
  }
}

TEST(NnAttention, DecodeOverflowThrowsAndLeavesCacheUnchanged) {
  mf::KVCache<double> kv(1, 3, 4);
  mf::Matrix<double> x = random_matrix(2, 4, 30), out(2, 4);
  mf::attention_decode(out, x, x, x, kv, 2);
  EXPECT_EQ(kv.length(), 2);
  EXPECT_THROW(mf::attention_decode(out, x, x, x, kv, 2), std::length_error);
  expect_throw_with([&] { mf::attention_decode(out, x, x, x, kv, 2); },
                    "appending 2 token(s) per sequence to 2 cached would make 4 > max_seq = 3");
  EXPECT_EQ(kv.length(), 2);
  mf::Matrix<double> one = random_matrix(1, 4, 31), out1(1, 4);
  mf::attention_decode(out1, one, one, one, kv, 2);
  EXPECT_EQ(kv.length(), 3);
}

TEST(NnAttention, FloatMatchesDouble) {
  const mf::Index batch = 2, seq = 6, d = 12, heads = 3, rows = batch * seq;
  const auto q = random_matrix(rows, d, 41), k = random_matrix(rows, d, 42), v = random_matrix(rows, d, 43);
  mf::Matrix<double> ctx(rows, d);
  mf::AttentionCache<double> cache;
  mf::attention_forward(ctx, q, k, v, batch, seq, heads, cache);
  mf::Matrix<float> qf = q.cast<float>(), kf = k.cast<float>(), vf = v.cast<float>(), cf(rows, d);
  mf::AttentionCache<float> cachef;
  mf::attention_forward(cf, qf, kf, vf, batch, seq, heads, cachef);
  EXPECT_LE((cf.cast<double>() - ctx).cwiseAbs().maxCoeff(), 1e-5);
}

TEST(NnAttention, BadShapesAndConfigThrow) {
  mf::Matrix<double> q(14, 10), k(14, 10), v(14, 10), ctx(14, 10), short_k(6, 10);
  mf::AttentionCache<double> cache;
  expect_throw_with([&] { mf::attention_forward(ctx, q, k, v, 2, 7, 3, cache); }, "d = 10 is not divisible by heads = 3");
  EXPECT_THROW(mf::attention_forward(ctx, q, k, v, 2, 7, 3, cache), mf::ConfigError);
  EXPECT_THROW(mf::attention_forward(ctx, q, k, v, 2, 7, 0, cache), mf::ConfigError);
  expect_throw_with([&] { mf::attention_forward(ctx, q, short_k, v, 2, 7, 2, cache); },
                    "attention_forward: k is (6, 10), expected (batch·seq, d) = (14, 10) with batch = 2, seq = 7");
  EXPECT_THROW(mf::attention_forward(ctx, q, short_k, v, 2, 7, 2, cache), mf::ShapeError);
  expect_throw_with([&] { mf::attention_forward(ctx, q, k, v, 2, 6, 2, cache); }, "q is (14, 10), expected");
  EXPECT_THROW(mf::attention_forward(ctx, q, k, v, 0, 7, 2, cache), mf::ConfigError);

  mf::Matrix<double> dq(14, 10), dk(14, 10), dv(14, 10);
  mf::AttentionCache<double> empty;
  EXPECT_THROW(mf::attention_backward(dq, dk, dv, q, k, v, ctx, empty), mf::StateError);
  q.setRandom();
  k.setRandom();
  v.setRandom();
  mf::attention_forward(ctx, q, k, v, 2, 7, 2, cache);
  mf::Matrix<double> bad(14, 9);
  expect_throw_with([&] { mf::attention_backward(dq, dk, bad, q, k, v, ctx, cache); }, "attention_backward: dv is (14, 9)");
  EXPECT_THROW(mf::attention_backward(dq, dq, dv, q, k, v, ctx, cache), std::invalid_argument);
  mf::Matrix<double> q7(7, 10);
  EXPECT_THROW(mf::attention_backward(dq, dk, dv, q7, k, v, ctx, cache), mf::ShapeError);

  mf::KVCache<double> kv(2, 8, 10);
  mf::Matrix<double> three(3, 10), two(2, 10), out2(2, 10), two9(2, 9);
  expect_throw_with([&] { mf::attention_decode(out2, three, three, three, kv, 2); },
                    "attention_decode: q_new is (3, 10), expected (batch·t, d) = (2·t, 10)");
  EXPECT_THROW(mf::attention_decode(out2, three, three, three, kv, 2), mf::ShapeError);
  expect_throw_with([&] { mf::attention_decode(out2, two, two9, two, kv, 2); }, "k_new is (2, 9)");
  EXPECT_THROW(mf::attention_decode(out2, two, two, two, kv, 4), mf::ConfigError);
  EXPECT_EQ(kv.length(), 0);  // nothing appended by the failed calls
}
