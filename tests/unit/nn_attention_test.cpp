// SPDX-License-Identifier: MIT
// Tests of nn/attention.hpp: forward against explicit loops, the tiled kernels against the straightforward reference
// (detail/attention_reference.hpp) in forward, backward and decode, finite-difference gradients, KV-cache decoding
// equal to the full forward (with rotary offsets), the same bits for any thread count, the cache's size, shape and
// config errors.
#include <memoryformer/detail/attention_reference.hpp>
#include <memoryformer/detail/half.hpp>
#include <memoryformer/nn/attention.hpp>
#include <memoryformer/nn/rope.hpp>
#include <memoryformer/random.hpp>
#include <memoryformer/testing/gradcheck.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "../support/test_helpers.hpp"

#include "support/thread_setting.hpp"

namespace mf = memoryformer;
using namespace memoryformer::testing_support;

namespace {

/// max |a − b| / max |b|: the error relative to the size of the reference result.
template <class Scalar>
double relative_error(const mf::Matrix<Scalar>& a, const mf::Matrix<Scalar>& b) {
  const double scale = std::max(double(b.cwiseAbs().maxCoeff()), std::numeric_limits<double>::min());
  return double((a - b).cwiseAbs().maxCoeff()) / scale;
}

/// Rows [pos, pos + t) of every sequence of a batch-major [batch·seq, d] matrix, as [batch·t, d].
template <class Scalar>
mf::Matrix<Scalar> token_slice(const mf::Matrix<Scalar>& x, mf::Index batch, mf::Index seq, mf::Index pos, mf::Index t) {
  mf::Matrix<Scalar> out(batch * t, x.cols());
  for (mf::Index b = 0; b < batch; ++b) out.middleRows(b * t, t) = x.middleRows(b * seq + pos, t);
  return out;
}

/// x with every entry rounded to bfloat16 (nearest even) and widened back: what a BF16 KVCache stores.
mf::Matrix<float> rounded_to_bf16(const mf::Matrix<float>& x) {
  return x.unaryExpr([](float f) { return mf::detail::bf16_to_float(mf::detail::float_to_bf16(f)); });
}

/// Decodes the batch-major sequences of q, k, v through a cache of `storage`, t_steps tokens per call; returns
/// every step's output stacked as [batch·Σt, d] (step after step).
std::vector<mf::Matrix<float>> decode_steps(const mf::Matrix<float>& q, const mf::Matrix<float>& k,
                                            const mf::Matrix<float>& v, mf::Index batch, mf::Index seq,
                                            mf::Index heads, std::initializer_list<mf::Index> t_steps,
                                            mf::StorageType storage) {
  mf::KVCache<float> kv(batch, seq, q.cols(), storage);
  std::vector<mf::Matrix<float>> outs;
  mf::Index pos = 0;
  for (const mf::Index t : t_steps) {
    mf::Matrix<float> out(batch * t, q.cols());
    mf::attention_decode<float>(out, token_slice(q, batch, seq, pos, t), token_slice(k, batch, seq, pos, t),
                                token_slice(v, batch, seq, pos, t), kv, heads);
    outs.push_back(out);
    pos += t;
  }
  return outs;
}

using memoryformer::testing_support::ThreadSetting;

/// The tiled attention against detail::reference_attention_* on one shape, forward, backward and decode (whole
/// sequences token by token, and in chunks of 3): all within `tolerance` relative error. The reference runs in
/// double on the same (rounded) inputs, so a float result is measured against the exact answer, not against a
/// second float evaluation with rounding errors of its own.
template <class Scalar>
void expect_matches_reference(mf::Index batch, mf::Index seq, mf::Index heads, mf::Index dh, bool rotary,
                              double tolerance, std::uint64_t seed) {
  using R = double;
  const mf::Index d = heads * dh, rows = batch * seq;
  const std::string label = "batch " + std::to_string(batch) + ", seq " + std::to_string(seq) + ", heads " +
                            std::to_string(heads) + ", dh " + std::to_string(dh) + (rotary ? ", rotary" : "");
  mf::Matrix<Scalar> q = random_matrix<Scalar>(rows, d, seed, 1.5), k = random_matrix<Scalar>(rows, d, seed + 1, 1.5);
  const mf::Matrix<Scalar> v = random_matrix<Scalar>(rows, d, seed + 2), dctx = random_matrix<Scalar>(rows, d, seed + 3);
  if (rotary) {
    const mf::Rotary<Scalar> rope(d, heads, dh - dh % 2);
    rope.forward(q, q, batch, seq);
    rope.forward(k, k, batch, seq);
  }
  const mf::Matrix<R> qr = q.template cast<R>(), kr = k.template cast<R>(), vr = v.template cast<R>(),
                      dctxr = dctx.template cast<R>();
  auto error = [](const mf::Matrix<Scalar>& a, const mf::Matrix<R>& b) {
    return relative_error<R>(a.template cast<R>(), b);
  };
  mf::Matrix<Scalar> ctx(rows, d);
  mf::Matrix<R> ref_ctx(rows, d);
  mf::AttentionCache<Scalar> cache;
  mf::detail::ReferenceAttentionCache<R> ref_cache;
  mf::attention_forward<Scalar>(ctx, q, k, v, batch, seq, heads, cache);
  mf::detail::reference_attention_forward<R>(ref_ctx, qr, kr, vr, batch, seq, heads, ref_cache);
  EXPECT_LE(error(ctx, ref_ctx), tolerance) << "forward, " << label;

  mf::Matrix<Scalar> dq(rows, d), dk(rows, d), dv(rows, d);
  mf::Matrix<R> rdq(rows, d), rdk(rows, d), rdv(rows, d);
  mf::attention_backward<Scalar>(dq, dk, dv, q, k, v, dctx, cache);
  mf::detail::reference_attention_backward<R>(rdq, rdk, rdv, qr, kr, vr, dctxr, ref_cache);
  EXPECT_LE(error(dv, rdv), tolerance) << "dv, " << label;
  if (seq > 2) {
    EXPECT_LE(error(dq, rdq), tolerance) << "dq, " << label;
    EXPECT_LE(error(dk, rdk), tolerance) << "dk, " << label;
  } else {
    // seq ≤ 2: with one or two keys per row, dS = P ⊙ (dP − D) is a difference of nearly equal numbers (for one
    // key exactly zero: P = exp(S − lse) ≈ 1 and D = dctx·ctx ≈ dctx·v), so dq and dk are small against the values
    // they come from and float's rounding of P shows in them (up to 5e-5 of their own size in this grid): their
    // error is measured against the size of dv, a gradient of the same inputs without that cancellation.
    const double size = std::max({double(rdv.cwiseAbs().maxCoeff()), double(rdq.cwiseAbs().maxCoeff()),
                                  double(rdk.cwiseAbs().maxCoeff())});
    EXPECT_LE(double((dq.template cast<R>() - rdq).cwiseAbs().maxCoeff()), tolerance * size) << "dq, " << label;
    EXPECT_LE(double((dk.template cast<R>() - rdk).cwiseAbs().maxCoeff()), tolerance * size) << "dk, " << label;
  }

  // Decode, the (already rotated) tokens appended one at a time, then three at a time: the rows of the forward.
  for (const mf::Index chunk : {mf::Index(1), mf::Index(3)}) {
    mf::KVCache<Scalar> kv(batch, seq, d);
    mf::KVCache<R> ref_kv(batch, seq, d);
    for (mf::Index pos = 0; pos < seq; pos += chunk) {
      const mf::Index t = std::min(chunk, seq - pos);
      const auto qs = token_slice(q, batch, seq, pos, t), ks = token_slice(k, batch, seq, pos, t),
                 vs = token_slice(v, batch, seq, pos, t);
      mf::Matrix<Scalar> out(batch * t, d);
      mf::Matrix<R> ref_out(batch * t, d);
      mf::attention_decode<Scalar>(out, qs, ks, vs, kv, heads);
      mf::detail::reference_attention_decode<R>(ref_out, qs.template cast<R>(), ks.template cast<R>(),
                                                vs.template cast<R>(), ref_kv, heads);
      EXPECT_LE(error(out, ref_out), tolerance) << "decode by " << chunk << " at " << pos << ", " << label;
      EXPECT_LE(error(out, token_slice(ref_ctx, batch, seq, pos, t)), tolerance)
          << "decode by " << chunk << " against the forward at " << pos << ", " << label;
    }
    EXPECT_EQ(kv.length(), seq);
  }
}

// Explicit loops: for every sequence, head and query, scores over keys j ≤ i, softmax, weighted sum of values.
// lse, if given, receives log Σ_j exp(score) of every (b, h, i) in that order.
mf::Matrix<double> naive_attention(const mf::Matrix<double>& q, const mf::Matrix<double>& k, const mf::Matrix<double>& v,
                                   mf::Index batch, mf::Index seq, mf::Index heads, std::vector<double>* lse = nullptr) {
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
        if (lse) lse->push_back(std::log(z));
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
  std::vector<double> lse;
  const auto expect = naive_attention(q, k, v, batch, seq, heads, &lse);
  EXPECT_LE((ctx - expect).cwiseAbs().maxCoeff(), 1e-13);
  // The cache: the output and one log-sum-exp per (sequence, head, query), nothing of size seq².
  EXPECT_EQ(cache.out, ctx);
  ASSERT_EQ(cache.lse.rows(), batch * heads);
  ASSERT_EQ(cache.lse.cols(), seq);
  for (mf::Index r = 0; r < cache.lse.rows(); ++r)
    for (mf::Index i = 0; i < seq; ++i) EXPECT_NEAR(cache.lse(r, i), lse[size_t(r * seq + i)], 1e-13);
  EXPECT_EQ(cache.bytes(), sizeof(double) * size_t(batch * seq * (d + heads)));
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
  // seq 70 and 130 cross the 64-row tiles (a diagonal tile, a tile below it, a partial last tile).
  for (const Case c : {Case{1, 1, 3, 1}, Case{2, 7, 10, 2}, Case{1, 3, 9, 3}, Case{3, 2, 5, 1}, Case{1, 70, 4, 2},
                       Case{1, 130, 2, 1}}) {
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

TEST(NnAttention, OutputsMayAliasInputsOrShareOneBuffer) {
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
  // dq, dk and dv side by side in one [N, 3d] buffer share no element, in any order of the blocks.
  mf::Matrix<double> fused(rows, 3 * d);  // [N, 3d]
  mf::attention_backward(fused.middleCols(2 * d, d), fused.middleCols(0, d), fused.middleCols(d, d), q, k, v, dctx,
                         cache);
  EXPECT_EQ(mf::Matrix<double>(fused.middleCols(2 * d, d)), dq);
  EXPECT_EQ(mf::Matrix<double>(fused.middleCols(0, d)), dk);
  EXPECT_EQ(mf::Matrix<double>(fused.middleCols(d, d)), dv);
  mf::detail::ReferenceAttentionCache<double> reference_cache;
  mf::detail::reference_attention_forward<double>(ctx, q, k, v, batch, seq, heads, reference_cache);
  mf::Matrix<double> reference_fused(rows, 3 * d);  // [N, 3d]
  mf::detail::reference_attention_backward<double>(reference_fused.middleCols(0, d), reference_fused.middleCols(d, d),
                                                   reference_fused.middleCols(2 * d, d), q, k, v, dctx,
                                                   reference_cache);
  EXPECT_LT((reference_fused.middleCols(0, d) - dq).cwiseAbs().maxCoeff(), 1e-12);
  // Blocks that do share elements are refused: one column apart, and the last column of a row beside the first of
  // the next (a block that wraps past the row stride).
  expect_throw_with([&] {
    mf::attention_backward(fused.middleCols(0, d), fused.middleCols(d - 1, d), fused.middleCols(2 * d, d), q, k, v,
                           dctx, cache);
  }, "dq, dk and dv must not overlap");
  mf::Matrix<double> wide(rows + 1, 3 * d);
  const mf::MatrixRef<double> wrapped(Eigen::Map<mf::Matrix<double>, 0, Eigen::OuterStride<>>(
      wide.data() + 3 * d - 1, rows, d, Eigen::OuterStride<>(3 * d)));  // starts at a row's last column
  EXPECT_THROW(mf::attention_backward(wide.middleRows(1, rows).middleCols(0, d), wrapped,
                                      wide.middleRows(0, rows).middleCols(d, d), q, k, v, dctx, cache),
               mf::ValueError);
}

TEST(NnAttention, ScoresThatAreNotFiniteAreANonFiniteError) {
  // Finite inputs whose products q·k exceed float's range, and a NaN input: the softmax of such a row is not defined.
  const mf::Index seq = 3, d = 16;
  mf::Matrix<float> q = mf::Matrix<float>::Constant(seq, d, 1e20f), k = q;
  const mf::Matrix<float> v = mf::Matrix<float>::Constant(seq, d, 0.5f);
  k.row(1) *= -1.0f;
  mf::Matrix<float> ctx = mf::Matrix<float>::Zero(seq, d);
  mf::AttentionCache<float> cache;
  expect_throw_with([&] { mf::attention_forward<float>(ctx, q, k, v, 1, seq, 1, cache); },
                    "attention_forward: the scores or outputs of query 0 of sequence 0, head 0 are not finite");
  EXPECT_EQ(ctx, mf::Matrix<float>::Zero(seq, d));  // not written
  mf::Matrix<float> dq(seq, d), dk(seq, d), dv(seq, d);
  EXPECT_THROW(mf::attention_backward<float>(dq, dk, dv, q, k, v, ctx, cache), mf::StateError);
  q.setConstant(0.25f);
  k.setConstant(0.25f);
  q(2, 3) = std::numeric_limits<float>::quiet_NaN();
  expect_throw_with([&] { mf::attention_forward<float>(ctx, q, k, v, 1, seq, 1, cache); },
                    "the scores or outputs of query 2 of sequence 0, head 0 are not finite");
  EXPECT_THROW(mf::attention_forward<float>(ctx, q, k, v, 1, seq, 1, cache), mf::NonFiniteError);
  // A value that is not finite leaves the scores finite and the outputs of the rows that see it not. Rows of the same
  // tile that do not see it may be named instead: a tile product multiplies their masked entries (zeros) by it.
  q(2, 3) = 0.25f;
  mf::Matrix<float> v_nan = v;
  v_nan(1, 5) = std::numeric_limits<float>::quiet_NaN();
  expect_throw_with([&] { mf::attention_forward<float>(ctx, q, k, v_nan, 1, seq, 1, cache); },
                    "of sequence 0, head 0 are not finite");
  EXPECT_EQ(ctx, mf::Matrix<float>::Zero(seq, d));
  // Finite values whose weighted sum exceeds float's range: with q = 0 every key weighs 1, and query 2 sums three
  // values of max/2 (query 1 sums two: exactly max).
  const mf::Matrix<float> zero = mf::Matrix<float>::Zero(seq, d);
  const mf::Matrix<float> v_large = mf::Matrix<float>::Constant(seq, d, std::numeric_limits<float>::max() / 2);
  expect_throw_with([&] { mf::attention_forward<float>(ctx, zero, zero, v_large, 1, seq, 1, cache); },
                    "the scores or outputs of query 2 of sequence 0, head 0 are not finite");
  EXPECT_EQ(ctx, mf::Matrix<float>::Zero(seq, d));
  mf::attention_forward<float>(ctx, q, k, v, 1, seq, 1, cache);  // the same cache works again
  EXPECT_TRUE(ctx.isApproxToConstant(0.5f));
}

template <class Scalar>
void expect_decode_refuses_what_is_not_finite(mf::StorageType storage) {
  // Two sequences, 4 heads of 16; 5 tokens cached, then t new ones: t = 1 and 3 fold the cache in place on a vector
  // path, t = 7 goes through query tiles. Sequence 1's last new token has, in head 2, products q·k beyond the type's
  // range, or a NaN value; the call throws naming them and leaves ctx_new and the cache as they were.
  const mf::Index batch = 2, d = 64, heads = 4, cached = 5;
  for (const mf::Index t : {1, 3, 7}) {
    for (const bool nan_value : {false, true}) {
      mf::KVCache<Scalar> kv(batch, 16, d, storage);
      const mf::Matrix<Scalar> x0 = random_matrix<Scalar>(batch * cached, d, 40);
      mf::Matrix<Scalar> out0(batch * cached, d);
      mf::attention_decode<Scalar>(out0, x0, x0, x0, kv, heads);
      mf::Matrix<Scalar> q = random_matrix<Scalar>(batch * t, d, 41), k = q, v = q;
      const mf::Index token = t > 1 ? t - 1 : 0, row = t + token;  // sequence 1's last new token
      if (nan_value) {
        v(row, 2 * 16 + 3) = std::numeric_limits<Scalar>::quiet_NaN();
      } else {
        q.row(row).segment(2 * 16, 16).setConstant(std::numeric_limits<Scalar>::max() / 2);
        k.row(row).segment(2 * 16, 16).setConstant(std::numeric_limits<Scalar>::max() / 2);
      }
      const mf::Matrix<Scalar> before = mf::Matrix<Scalar>::Constant(batch * t, d, Scalar(7));
      mf::Matrix<Scalar> ctx = before;
      // A NaN value may be named at an earlier new token of the same query tile (see the forward's test above).
      const std::string site = (nan_value ? std::string() : "new token " + std::to_string(token)) +
                               " of sequence 1, head 2 are not finite";
      SCOPED_TRACE(std::string(mf::storage_type_name(storage)) + ", t = " + std::to_string(t) +
                   (nan_value ? ", NaN value" : ", products beyond range"));
      expect_throw_with([&] { mf::attention_decode<Scalar>(ctx, q, k, v, kv, heads); }, site);
      EXPECT_THROW(mf::attention_decode<Scalar>(ctx, q, k, v, kv, heads), mf::NonFiniteError);
      EXPECT_EQ(ctx, before) << site;
      EXPECT_EQ(kv.length(), cached) << site;
      const mf::Matrix<Scalar> fine = random_matrix<Scalar>(batch * t, d, 42);
      mf::attention_decode<Scalar>(ctx, fine, fine, fine, kv, heads);  // the cache takes the next tokens
      EXPECT_EQ(kv.length(), cached + t);
      EXPECT_TRUE(ctx.allFinite());
    }
  }
}

TEST(NnAttention, DecodeRefusesScoresOrOutputsThatAreNotFinite) {
  expect_decode_refuses_what_is_not_finite<float>(mf::StorageType::F32);
  expect_decode_refuses_what_is_not_finite<float>(mf::StorageType::BF16);
  expect_decode_refuses_what_is_not_finite<double>(mf::StorageType::F32);
}

TEST(NnAttention, RowsTimesWidthThatOverflowsIsAConfigError) {
  // [2^40, 2^24] views whose rows all read one buffer (row stride 0): batch·seq fits an Index, batch·seq·d does not.
  const mf::Index rows = mf::Index(1) << 40, d = mf::Index(1) << 24;
  std::vector<float> row(static_cast<std::size_t>(d), 0.5f);
  const Eigen::Map<mf::Matrix<float>, 0, Eigen::OuterStride<>> view(row.data(), rows, d, Eigen::OuterStride<>(0));
  mf::AttentionCache<float> cache;
  EXPECT_THROW(mf::attention_forward<float>(view, view, view, view, rows, 1, 1, cache), mf::ConfigError);
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
  // q, k or v in the storage of the cache being filled (its own output fed back in) is refused before anything is
  // written; another cache may read it.
  const mf::Matrix<double> out = cache.out;
  expect_throw_with([&] { mf::attention_forward(ctx, cache.out, k, v, 2, 7, 2, cache); },
                    "q, k and v must not share storage with the cache being filled");
  EXPECT_THROW(mf::attention_forward(ctx, q, k, cache.out, 2, 7, 2, cache), mf::ValueError);
  EXPECT_EQ(cache.out, out);
  EXPECT_EQ(cache.batch, 2);
  mf::AttentionCache<double> next;
  mf::Matrix<double> fed_back(14, 10), expected(14, 10);
  mf::attention_forward(fed_back, cache.out, cache.out, cache.out, 2, 7, 2, next);
  mf::attention_forward(expected, out, out, out, 2, 7, 2, next);
  EXPECT_EQ(fed_back, expected);
  mf::attention_forward(ctx, q, k, v, 2, 7, 2, cache);
  // The cache's fields are public: counts whose products overflow are a StateError, not a wrapped comparison.
  mf::AttentionCache<double> forged = cache;
  forged.batch = (mf::Index(1) << 62) + 1;
  forged.seq = 4;
  EXPECT_THROW(mf::attention_backward(dq, dk, dv, q, k, v, ctx, forged), mf::StateError);
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

// Every combination of seq, heads, batch and rotary on or off.
TEST(NnAttention, TiledMatchesReferenceDouble) {
  std::uint64_t seed = 100;
  for (const mf::Index seq : {1, 2, 7, 63, 64, 65, 129})
    for (const mf::Index heads : {1, 3, 8})
      for (const mf::Index batch : {1, 2, 3})
        for (const bool rotary : {false, true})
          expect_matches_reference<double>(batch, seq, heads, 8, rotary, 1e-12, seed += 10);
  // Head widths that are not a multiple of the vector width, and the benchmark's dh = 64.
  expect_matches_reference<double>(2, 65, 2, 5, true, 1e-12, 500);
  expect_matches_reference<double>(1, 129, 2, 64, false, 1e-12, 510);
}

TEST(NnAttention, TiledMatchesReferenceFloat) {
  std::uint64_t seed = 200;
  for (const mf::Index seq : {1, 2, 7, 63, 64, 65, 129})
    for (const mf::Index heads : {1, 3, 8})
      for (const mf::Index batch : {1, 2, 3})
        for (const bool rotary : {false, true})
          expect_matches_reference<float>(batch, seq, heads, 16, rotary, 2e-5, seed += 10);
  expect_matches_reference<float>(2, 65, 2, 5, true, 2e-5, 600);
  expect_matches_reference<float>(1, 129, 2, 64, true, 2e-5, 610);
  expect_matches_reference<float>(3, 64, 8, 64, false, 2e-5, 620);
}

TEST(NnAttention, DecodeSplitOverKeyBlocksMatchesForward) {
  // A cache longer than one key block (256 keys): a prefill of 250 tokens (query tiles, no split); 13 tokens (one
  // query tile, more rows than the in-place decode takes) across the first key block's end, so some rows see none
  // of the second block; 337 more through the cache (query tiles); single tokens and a pair, each split over three
  // key blocks and merged; 37 tokens (one tile, not a whole number of vectors) over three key blocks.
  const mf::Index batch = 2, seq = 640, heads = 2, d = 32, rows = batch * seq;
  for (const bool use_float : {false, true}) {
    auto run = [&]<class Scalar>(Scalar, double tolerance) {
      const auto q = random_matrix<Scalar>(rows, d, 71, 2.0), k = random_matrix<Scalar>(rows, d, 72, 2.0),
                 v = random_matrix<Scalar>(rows, d, 73);
      mf::Matrix<Scalar> ref(rows, d);
      mf::detail::ReferenceAttentionCache<Scalar> ref_cache;
      mf::detail::reference_attention_forward<Scalar>(ref, q, k, v, batch, seq, heads, ref_cache);
      mf::KVCache<Scalar> kv(batch, seq, d);
      mf::Index pos = 0;
      for (const mf::Index t : {250, 13, 337, 1, 2, 37}) {
        mf::Matrix<Scalar> out(batch * t, d);
        mf::attention_decode<Scalar>(out, token_slice(q, batch, seq, pos, t), token_slice(k, batch, seq, pos, t),
                                     token_slice(v, batch, seq, pos, t), kv, heads);
        EXPECT_LE(relative_error(out, token_slice(ref, batch, seq, pos, t)), tolerance) << "t = " << t;
        pos += t;
      }
    };
    if (use_float) run(0.0f, 2e-5); else run(0.0, 1e-12);
  }
}

TEST(NnAttention, DecodeWithBf16CacheEqualsFloatCacheOfRoundedKeysAndValues) {
  // The steps of DecodeSplitOverKeyBlocksMatchesForward and one more single token: query tiles, one tile across a
  // key block's start (rows whose positions, relative to that block, are negative), single tokens and a pair split
  // over key blocks; dh = 16 (vector path on AVX-512 and AVX2) and dh = 10 (Eigen's products).
  for (const mf::Index d : {32, 20}) {
    const mf::Index batch = 2, seq = 641, heads = 2, rows = batch * seq;
    const auto q = random_matrix<float>(rows, d, 171, 2.0), k = random_matrix<float>(rows, d, 172, 2.0),
               v = random_matrix<float>(rows, d, 173);
    const auto bf16 = decode_steps(q, k, v, batch, seq, heads, {250, 13, 337, 1, 2, 1, 37}, mf::StorageType::BF16);
    const auto rounded = decode_steps(q, rounded_to_bf16(k), rounded_to_bf16(v), batch, seq, heads,
                                      {250, 13, 337, 1, 2, 1, 37}, mf::StorageType::F32);
    const auto exact = decode_steps(q, k, v, batch, seq, heads, {250, 13, 337, 1, 2, 1, 37}, mf::StorageType::F32);
    for (size_t i = 0; i < bf16.size(); ++i) {
      // Same float arithmetic on the same widened values; only the order of Eigen's summation may differ.
      EXPECT_LE(relative_error(bf16[i], rounded[i]), 1e-6) << "d = " << d << ", step " << i;
      // bfloat16 keeps 8 significant bits: keys and values each off by ≤ 2^-9 relative, so a score moves by up to
      // 2^-9·scale·Σ_c |q_c k_c| (≈ 0.03 for these queries and keys of spread 2) and the output by about as much.
      EXPECT_LE(relative_error(bf16[i], exact[i]), 3e-2) << "d = " << d << ", step " << i;
      EXPECT_GT(relative_error(bf16[i], exact[i]), 0.0) << "the keys and values were not rounded";
    }
  }
}

TEST(NnAttention, Bf16CacheStorageIsCheckedAndHalvesTheBytes) {
  mf::KVCache<float> f32(2, 8, 12), bf16(2, 8, 12, mf::StorageType::BF16);
  EXPECT_EQ(f32.storage(), mf::StorageType::F32);
  EXPECT_EQ(bf16.storage(), mf::StorageType::BF16);
  EXPECT_EQ(f32.bytes_per_token(), 2 * 12 * sizeof(float));
  EXPECT_EQ(bf16.bytes_per_token(), 2 * 12 * sizeof(std::uint16_t));
  EXPECT_EQ(mf::KVCache<double>(1, 2, 3).bytes_per_token(), 2 * 3 * sizeof(double));
  expect_throw_with([] { mf::KVCache<double>(1, 4, 8, mf::StorageType::BF16); },
                    "KVCache: storage bf16 needs KVCache<float>");
  EXPECT_THROW(mf::KVCache<double>(1, 4, 8, mf::StorageType::BF16), mf::ConfigError);
  EXPECT_THROW(mf::KVCache<float>(1, 4, 8, mf::StorageType::F16), mf::ConfigError);
  // The decode's errors are those of a float cache: shape, heads, overflow (nothing appended).
  mf::KVCache<float> kv(1, 3, 4, mf::StorageType::BF16);
  mf::Matrix<float> x = random_matrix<float>(2, 4, 5), out(2, 4);
  mf::attention_decode<float>(out, x, x, x, kv, 2);
  EXPECT_THROW(mf::attention_decode<float>(out, x, x, x, kv, 2), std::length_error);
  EXPECT_EQ(kv.length(), 2);
  EXPECT_THROW(mf::attention_decode<float>(out.topRows(1), x.topRows(1), x.topRows(1), x.topRows(1), kv, 3),
               mf::ConfigError);
}

TEST(NnAttention, LongSequenceTrainsWithLinearCache) {
  // seq = 4096: the s × s probabilities of one head would take 64 MiB in float; the cache holds s·(d + heads).
  const mf::Index seq = 4096, d = 16, heads = 2;
  const auto q = random_matrix<float>(seq, d, 81), k = random_matrix<float>(seq, d, 82),
             v = random_matrix<float>(seq, d, 83), dctx = random_matrix<float>(seq, d, 84);
  mf::Matrix<float> ctx(seq, d), dq(seq, d), dk(seq, d), dv(seq, d);
  mf::AttentionCache<float> cache;
  mf::attention_forward<float>(ctx, q, k, v, 1, seq, heads, cache);
  EXPECT_EQ(cache.bytes(), sizeof(float) * size_t(seq * (d + heads)));
  mf::attention_backward<float>(dq, dk, dv, q, k, v, dctx, cache);
  EXPECT_TRUE(ctx.allFinite() && dq.allFinite() && dk.allFinite() && dv.allFinite());
  // Row 0 attends only to itself; the last row's output is a convex combination of the values.
  EXPECT_LE((ctx.row(0) - v.row(0)).cwiseAbs().maxCoeff(), 1e-6f);
  EXPECT_LE(ctx.row(seq - 1).cwiseAbs().maxCoeff(), v.cwiseAbs().maxCoeff());
  // The gradient of Σ dctx ⊙ ctx with respect to v sums to Σ_i dctx_i (each row of P sums to 1).
  EXPECT_NEAR(dv.cast<double>().sum(), dctx.cast<double>().sum(), 1e-3 * double(seq));
}

#if defined(MEMORYFORMER_USE_OPENMP)
TEST(NnAttention, ThreadCountDoesNotChangeBits) {
  // 3 sequences × 2 heads × 3 query tiles (forward), 6 (sequence, head) items (backward), a prefill through the
  // cache, and decodes of 37 tokens (one query tile) and of 2 tokens, each over 3 key blocks.
  const mf::Index batch = 3, seq = 150, heads = 2, d = 32, rows = batch * seq;
  const auto q = random_matrix<float>(rows, d, 91, 2.0), k = random_matrix<float>(rows, d, 92, 2.0),
             v = random_matrix<float>(rows, d, 93), dctx = random_matrix<float>(rows, d, 94);
  const mf::Index long_seq = 700;
  const auto q2 = random_matrix<float>(long_seq, d, 95), k2 = random_matrix<float>(long_seq, d, 96),
             v2 = random_matrix<float>(long_seq, d, 97);
  std::vector<mf::Matrix<float>> results[7];
  ThreadSetting setting;
  for (const int threads : {1, 2, 3}) {
    setting.set(threads);
    mf::Matrix<float> ctx(rows, d), dq(rows, d), dk(rows, d), dv(rows, d);
    mf::AttentionCache<float> cache;
    mf::attention_forward<float>(ctx, q, k, v, batch, seq, heads, cache);
    mf::attention_backward<float>(dq, dk, dv, q, k, v, dctx, cache);
    mf::KVCache<float> kv(1, long_seq, d);
    const mf::Index first = long_seq - 39;
    mf::Matrix<float> prefill(first, d), tile(37, d), step(2, d);
    mf::attention_decode<float>(prefill, q2.topRows(first), k2.topRows(first), v2.topRows(first), kv, heads);
    mf::attention_decode<float>(tile, q2.middleRows(first, 37), k2.middleRows(first, 37), v2.middleRows(first, 37),
                                kv, heads);
    mf::attention_decode<float>(step, q2.bottomRows(2), k2.bottomRows(2), v2.bottomRows(2), kv, heads);
    for (int i = 0; const auto* m : {&ctx, &dq, &dk, &dv, &prefill, &tile, &step}) results[i++].push_back(*m);
  }
  const char* names[] = {"ctx", "dq", "dk", "dv", "decode prefill", "decode tile", "decode step"};
  for (int i = 0; i < 7; ++i)
    for (size_t t = 1; t < results[i].size(); ++t)
      EXPECT_TRUE(results[i][t] == results[i][0]) << names[i] << ", " << t + 1 << " threads against 1";
}
#endif

#if defined(MEMORYFORMER_USE_OPENMP)
// One (sequence, head) item through Eigen's products (double; float with a head width off the vector width): the
// kernel then runs outside an OpenMP region, where Eigen would otherwise split the products by its thread count.
TEST(NnAttention, OneItemThroughEigenHasTheSameBitsForAnyThreadCount) {
  const auto run = [](auto zero, mf::Index seq, mf::Index d) {
    using S = decltype(zero);
    const auto q = random_matrix<S>(seq, d, 71), k = random_matrix<S>(seq, d, 72), v = random_matrix<S>(seq, d, 73),
               dctx = random_matrix<S>(seq, d, 74);
    std::vector<mf::Matrix<S>> results[5];
    ThreadSetting setting;
    for (const int threads : {1, 2}) {
      setting.set(threads);
      mf::Matrix<S> ctx(seq, d), dq(seq, d), dk(seq, d), dv(seq, d), decoded(seq, d);
      mf::AttentionCache<S> cache;
      mf::attention_forward<S>(ctx, q, k, v, 1, seq, 1, cache);
      mf::attention_backward<S>(dq, dk, dv, q, k, v, dctx, cache);
      mf::KVCache<S> kv(1, seq, d);
      mf::attention_decode<S>(decoded, q, k, v, kv, 1);
      for (int i = 0; const auto* m : {&ctx, &dq, &dk, &dv, &decoded}) results[i++].push_back(*m);
    }
    const char* names[] = {"ctx", "dq", "dk", "dv", "decode"};
    for (int i = 0; i < 5; ++i)
      EXPECT_TRUE(results[i][1] == results[i][0]) << names[i] << ", d = " << d << ": 2 threads against 1";
  };
  run(0.0, 64, 1024);
  run(0.0f, 64, 1004);
}

TEST(NnAttention, Bf16CacheDecodeHasTheSameBitsForAnyThreadCount) {
  const mf::Index batch = 2, seq = 700, heads = 2, d = 32, rows = batch * seq;
  const auto q = random_matrix<float>(rows, d, 191, 2.0), k = random_matrix<float>(rows, d, 192, 2.0),
             v = random_matrix<float>(rows, d, 193);
  std::vector<std::vector<mf::Matrix<float>>> results;
  ThreadSetting setting;
  for (const int threads : {1, 2, 3}) {
    setting.set(threads);
    results.push_back(decode_steps(q, k, v, batch, seq, heads, {597, 1, 2, 37}, mf::StorageType::BF16));
  }
  for (size_t t = 1; t < results.size(); ++t)
    for (size_t i = 0; i < results[0].size(); ++i)
      EXPECT_TRUE(results[t][i] == results[0][i]) << "step " << i << ", " << t + 1 << " threads against 1";
}
#endif

TEST(NnAttention, CacheFromOtherShapesIsRejected) {
  const auto q = random_matrix(12, 8, 1), k = random_matrix(12, 8, 2), v = random_matrix(12, 8, 3);
  mf::Matrix<double> ctx(12, 8), dq(12, 8), dk(12, 8), dv(12, 8);
  mf::AttentionCache<double> cache;
  mf::attention_forward(ctx, q, k, v, 2, 6, 2, cache);
  // The same rows with d = 4 (heads still divide it): the cache holds d = 8.
  const auto q4 = random_matrix(12, 4, 4);
  mf::Matrix<double> g4(12, 4), h4(12, 4), i4(12, 4);
  expect_throw_with([&] { mf::attention_backward(g4, h4, i4, q4, q4, q4, q4, cache); },
                    "attention_backward: the cache holds d = 8 features, q has 4");
  EXPECT_THROW(mf::attention_backward(g4, h4, i4, q4, q4, q4, q4, cache), mf::StateError);
  // A forward rejected by its checks leaves the cache as it was.
  EXPECT_THROW(mf::attention_forward(ctx, q, k, v, 2, 6, 3, cache), mf::ConfigError);
  EXPECT_NO_THROW(mf::attention_backward(dq, dk, dv, q, k, v, ctx, cache));
  const mf::Index huge = std::numeric_limits<mf::Index>::max() / 2;
  expect_throw_with([&] { mf::attention_forward(ctx, q, k, v, 4, huge, 2, cache); }, "overflows");
  EXPECT_THROW(mf::attention_forward(ctx, q, k, v, 4, huge, 2, cache), mf::ConfigError);
}
