// SPDX-License-Identifier: MIT
// The attention kernels (detail/attention_kernels.hpp) on every compiled ISA path. This file is built three times
// (AVX-512, AVX2, scalar-only flags): the exponential of a tile row is bit-identical to the scalar path and within its
// error bound of std::exp; the tile products match a double-precision product; forward, backward and decode of the
// vector path match the scalar path (Eigen's products, scalar exponential) and the reference attention.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include <memoryformer/detail/attention_kernels.hpp>
#include <memoryformer/detail/attention_reference.hpp>
#include <memoryformer/nn/attention.hpp>
#include <memoryformer/random.hpp>

#include "../support/test_helpers.hpp"

namespace mf = memoryformer;
namespace md = memoryformer::detail;
using namespace memoryformer::testing_support;

namespace {

#ifndef MEMORYFORMER_TEST_ISA
#define MEMORYFORMER_TEST_ISA "unspecified"
#endif

constexpr mf::Isa best = mf::best_isa();

/// x with every entry rounded to bfloat16 (nearest even) and widened back: what a BF16 KVCache stores.
mf::Matrix<float> rounded_to_bf16(const mf::Matrix<float>& x) {
  return x.unaryExpr([](float f) { return md::bf16_to_float(md::float_to_bf16(f)); });
}

double relative_error(const mf::Matrix<float>& a, const mf::Matrix<float>& b) {
  const double scale = std::max(double(b.cwiseAbs().maxCoeff()), std::numeric_limits<double>::min());
  return double((a - b).cwiseAbs().maxCoeff()) / scale;
}

TEST(AttentionIsa, BuildReportsItsPath) {
  const std::string expected = MEMORYFORMER_TEST_ISA;
  if (expected == "unspecified") GTEST_SKIP() << "built outside the ISA matrix";
  EXPECT_EQ(std::string(mf::isa_name(best)), expected);
}

TEST(AttentionIsa, Bf16RowWideningIsBitIdenticalToScalar) {
  // Every bit pattern class: random bits (NaN and Inf included), and lengths that leave AVX-512 and AVX2 tails.
  mf::Rng rng(11);
  for (const mf::Index n : {1, 7, 8, 9, 15, 16, 17, 24, 64, 100}) {
    std::vector<std::uint16_t> in(static_cast<size_t>(n));
    for (auto& h : in) h = std::uint16_t(rng.uniform() * 65536.0);
    in[0] = 0x7f80;  // +Inf
    std::vector<float> fast(in.size()), scalar(in.size());
    md::bf16_to_float_row<best>(fast.data(), in.data(), n);
    md::bf16_to_float_row<mf::Isa::Scalar>(scalar.data(), in.data(), n);
    for (size_t i = 0; i < in.size(); ++i) {
      EXPECT_EQ(std::bit_cast<std::uint32_t>(fast[i]), std::uint32_t(in[i]) << 16) << "n = " << n << ", i = " << i;
      EXPECT_EQ(std::bit_cast<std::uint32_t>(scalar[i]), std::uint32_t(in[i]) << 16) << "n = " << n << ", i = " << i;
    }
  }
}

TEST(AttentionIsa, ExpRowIsBitIdenticalToScalarAndWithinItsBound) {
  // Scores spread so that s·scale − shift covers [−100, 0.5]: the clamps at −87 and 0 included, and row lengths
  // that leave a tail after the last whole vector.
  mf::Rng rng(5);
  for (const mf::Index n : {1, 7, 16, 17, 64, 100}) {
    std::vector<float> s(static_cast<size_t>(n)), fast(s.size()), scalar(s.size());
    for (auto& x : s) x = float(-100.0 + 100.5 * rng.uniform());
    const float scale = 1.0f, shift = 0.0f;
    md::exp_shifted_row<best>(fast.data(), s.data(), n, scale, shift);
    md::exp_shifted_row<mf::Isa::Scalar>(scalar.data(), s.data(), n, scale, shift);
    for (mf::Index j = 0; j < n; ++j) {
      const size_t i = size_t(j);
      EXPECT_EQ(fast[i], scalar[i]) << "n = " << n << ", s = " << s[i];
      const double a = std::min(std::max(double(s[i]), -87.0), 0.0);
      const double exact = std::exp(a);
      // fast_exp.hpp's 2^-22, plus the float rounding of log2(e) and of the argument (each |a|·2^-24 in the exponent).
      const double bound = exact * (std::ldexp(1.0, -22) + (2.0 * std::abs(a) + 1.0) * std::ldexp(1.0, -24));
      EXPECT_LE(std::abs(double(fast[i]) - exact), bound) << "s = " << s[i];
    }
  }
  // In place, with a scale and a shift, and a NaN score stays NaN.
  std::vector<float> row = {0.5f, -1.0f, std::numeric_limits<float>::quiet_NaN(), 2.0f};
  md::exp_shifted_row<best>(row.data(), row.data(), 4, 0.5f, 1.0f);
  EXPECT_NEAR(row[0], std::exp(-0.75f), 1e-6f);
  EXPECT_NEAR(row[1], std::exp(-1.5f), 1e-6f);
  EXPECT_TRUE(std::isnan(row[2]));
  EXPECT_EQ(row[3], 1.0f);
}

TEST(AttentionIsa, PackedRowsAreTheTransposeOnEveryPath) {
  // Keys inside a wider row (the heads of a [count, d] matrix), counts and head sizes with and without whole
  // vector blocks; the columns past count must be zero.
  for (const mf::Index count : {1, 7, 16, 37, 64, 100})
    for (const mf::Index dh : {8, 16, 24, 64, 80}) {
      const mf::Matrix<float> all = random_matrix<float>(count, 3 * dh, 5);
      const auto K = all.middleCols(dh, dh);
      const mf::Index ld = count + 19;  // columns past count, not a whole number of vectors
      for (const mf::Isa path : {best, mf::Isa::Scalar}) {
        std::vector<float> out(std::size_t(dh * ld), std::numeric_limits<float>::quiet_NaN());
        if (path == mf::Isa::Scalar)
          md::pack_transposed_rows<mf::Isa::Scalar>(out.data(), ld, K, count);
        else
          md::pack_transposed_rows<best>(out.data(), ld, K, count);
        for (mf::Index c = 0; c < dh; ++c)
          for (mf::Index j = 0; j < ld; ++j)
            ASSERT_EQ(out[std::size_t(c * ld + j)], j < count ? K(j, c) : 0.0f)
                << mf::isa_name(path) << " count " << count << " dh " << dh << " column " << c << " key " << j;
      }
    }
}

#if defined(MEMORYFORMER_HAVE_AVX512) || defined(MEMORYFORMER_HAVE_AVX2)
TEST(AttentionIsa, TileProductMatchesDoubleProduct) {
  constexpr mf::Index w = md::VectorOps<best>::n;
  for (const mf::Index M : {1, 2, 5, 6, 7, 13, 64})
    for (const mf::Index N : {w, 3 * w, 4 * w, 5 * w})
      for (const mf::Index K : {1, 7, 64})
        for (const bool transposed : {false, true})
          for (const bool accumulate : {false, true}) {
            // A is [M, K]; stored transposed ([K, M]) it is read with the strides swapped.
            const mf::Matrix<float> a = random_matrix<float>(M, K, 1), b = random_matrix<float>(K, N, 2),
                                    c0 = random_matrix<float>(M, N, 3);
            const mf::Matrix<float> at = a.transpose();
            mf::Matrix<float> c = c0;
            if (transposed)
              md::tile_product<best>(c.data(), N, at.data(), 1, M, b.data(), N, M, N, K, accumulate);
            else
              md::tile_product<best>(c.data(), N, a.data(), K, 1, b.data(), N, M, N, K, accumulate);
            mf::Matrix<double> expect = a.cast<double>() * b.cast<double>();
            if (accumulate) expect += c0.cast<double>();
            EXPECT_LE((c.cast<double>() - expect).cwiseAbs().maxCoeff(), 1e-5 * (1.0 + double(K)))
                << "M " << M << " N " << N << " K " << K << (transposed ? " transposed" : "")
                << (accumulate ? " accumulate" : "");
          }
}
#endif

TEST(AttentionIsa, VectorPathMatchesScalarPathAndReference) {
  // dh = 64 and 16 take the vector path's tile products on AVX-512 and AVX2; dh = 12 only its exponential.
  struct Shape {
    mf::Index batch, seq, heads, dh;
  };
  // seq 600 and 300 decode over more than one key block; dh = 80 and 128 are more than one piece of 4 vectors.
  for (const Shape s : {Shape{2, 130, 2, 64}, Shape{1, 65, 3, 16}, Shape{2, 70, 2, 12}, Shape{1, 1, 1, 16},
                        Shape{1, 600, 1, 64}, Shape{1, 300, 2, 80}, Shape{1, 300, 1, 128}}) {
    const mf::Index d = s.heads * s.dh, rows = s.batch * s.seq;
    const auto q = random_matrix<float>(rows, d, 11, 1.5), k = random_matrix<float>(rows, d, 12, 1.5),
               v = random_matrix<float>(rows, d, 13), dctx = random_matrix<float>(rows, d, 14);
    const std::string label = "seq " + std::to_string(s.seq) + ", dh " + std::to_string(s.dh);
    mf::Matrix<float> ctx(rows, d), ctx_scalar(rows, d), lse, lse_scalar;
    md::flash_attention_forward<best, float>(ctx, lse, q, k, v, s.batch, s.seq, s.heads);
    md::flash_attention_forward<mf::Isa::Scalar, float>(ctx_scalar, lse_scalar, q, k, v, s.batch, s.seq, s.heads);
    EXPECT_LE(relative_error(ctx, ctx_scalar), 2e-6) << label;
    EXPECT_LE(relative_error(lse, lse_scalar), 2e-6) << label;

    mf::Matrix<float> ref(rows, d);
    md::ReferenceAttentionCache<float> ref_cache;
    md::reference_attention_forward<float>(ref, q, k, v, s.batch, s.seq, s.heads, ref_cache);
    EXPECT_LE(relative_error(ctx, ref), 2e-5) << label;

    mf::Matrix<float> g[3], g_scalar[3], g_ref[3];
    for (int i = 0; i < 3; ++i) g[i] = g_scalar[i] = g_ref[i] = mf::Matrix<float>(rows, d);
    md::flash_attention_backward<best, float>(g[0], g[1], g[2], q, k, v, dctx, ctx, lse, s.batch, s.seq, s.heads);
    md::flash_attention_backward<mf::Isa::Scalar, float>(g_scalar[0], g_scalar[1], g_scalar[2], q, k, v, dctx,
                                                         ctx_scalar, lse_scalar, s.batch, s.seq, s.heads);
    md::reference_attention_backward<float>(g_ref[0], g_ref[1], g_ref[2], q, k, v, dctx, ref_cache);
    const char* names[] = {"dq", "dk", "dv"};
    for (int i = s.seq > 1 ? 0 : 2; i < 3; ++i) {
      EXPECT_LE(relative_error(g[i], g_scalar[i]), 2e-5) << names[i] << ", " << label;
      EXPECT_LE(relative_error(g[i], g_ref[i]), 2e-5) << names[i] << " against the reference, " << label;
    }

    // Decode: a prefill of all but the last 3 tokens (query tiles), then 2 and 1 (key blocks, each row folded in
    // place on a vector path); longer sequences first take 37 of those tokens as one query tile (key blocks beyond
    // 256). On both paths, from a float cache and from a bfloat16 one.
    if (s.seq > 3) {
      const mf::Matrix<float> k_rounded = rounded_to_bf16(k), v_rounded = rounded_to_bf16(v);
      mf::Matrix<float> decoded[2][2];  // [path][float cache, bfloat16 cache]
      for (int p = 0; p < 2; ++p) {  // best path (p = 0; the scalar one in a scalar build), then scalar
        const mf::Isa path = p == 0 ? best : mf::Isa::Scalar;
        for (int c = 0; c < 2; ++c) decoded[p][c].setZero(rows, d);
        mf::KVCache<float> kv(s.batch, s.seq, d), kv_bf16(s.batch, s.seq, d, mf::StorageType::BF16),
            kv_rounded(s.batch, s.seq, d);
        mf::Index pos = 0;
        const std::vector<mf::Index> steps = s.seq > 40 ? std::vector<mf::Index>{s.seq - 40, 37, 2, 1}
                                                        : std::vector<mf::Index>{s.seq - 3, 2, 1};
        for (const mf::Index t : steps) {
          auto rows_of = [&](const mf::Matrix<float>& m) {
            mf::Matrix<float> out(s.batch * t, d);
            for (mf::Index b = 0; b < s.batch; ++b) out.middleRows(b * t, t) = m.middleRows(b * s.seq + pos, t);
            return out;
          };
          const mf::Matrix<float> qt = rows_of(q), expect = rows_of(ref);
          mf::Matrix<float> out(s.batch * t, d), out_bf16(s.batch * t, d), out_rounded(s.batch * t, d);
          const mf::Index first = kv.length();
          kv.append(rows_of(k), rows_of(v));
          kv_bf16.append(rows_of(k), rows_of(v));
          kv_rounded.append(rows_of(k_rounded), rows_of(v_rounded));
          auto keys = [&](mf::Index b) { return kv.keys(b); };
          auto values = [&](mf::Index b) { return kv.values(b); };
          auto keys_rounded = [&](mf::Index b) { return kv_rounded.keys(b); };
          auto values_rounded = [&](mf::Index b) { return kv_rounded.values(b); };
          auto keys_bf16 = [&](mf::Index b) { return kv_bf16.keys_bf16(b); };
          auto values_bf16 = [&](mf::Index b) { return kv_bf16.values_bf16(b); };
          const mf::Index length = kv.length();
          std::optional<md::DecodeSite> faults[3];  // float, rounded float and bfloat16 caches
          if (p == 1) {
            faults[0] = md::flash_attention_decode<mf::Isa::Scalar, float>(out, qt, s.batch, t, first, length, s.heads,
                                                                           keys, values);
            faults[1] = md::flash_attention_decode<mf::Isa::Scalar, float>(out_rounded, qt, s.batch, t, first, length,
                                                                           s.heads, keys_rounded, values_rounded);
            faults[2] = md::flash_attention_decode_bf16<mf::Isa::Scalar>(out_bf16, qt, s.batch, t, first, length,
                                                                         s.heads, keys_bf16, values_bf16);
          } else {
            faults[0] = md::flash_attention_decode<best, float>(out, qt, s.batch, t, first, length, s.heads, keys,
                                                                values);
            faults[1] = md::flash_attention_decode<best, float>(out_rounded, qt, s.batch, t, first, length, s.heads,
                                                                keys_rounded, values_rounded);
            faults[2] = md::flash_attention_decode_bf16<best>(out_bf16, qt, s.batch, t, first, length, s.heads,
                                                              keys_bf16, values_bf16);
          }
          // A fault would leave the output unwritten: finite inputs give none.
          for (const auto& fault : faults) EXPECT_FALSE(fault.has_value());
          const std::string step = "decode t = " + std::to_string(t) + ", " + std::string(mf::isa_name(path)) + ", " +
                                   label;
          EXPECT_LE(relative_error(out, expect), 2e-5) << step;
          // The bfloat16 cache is the float kernel on the rounded keys and values.
          EXPECT_LE(relative_error(out_bf16, out_rounded), 1e-6) << step;
          for (mf::Index b = 0; b < s.batch; ++b) {
            decoded[p][0].middleRows(b * s.seq + pos, t) = out.middleRows(b * t, t);
            decoded[p][1].middleRows(b * s.seq + pos, t) = out_bf16.middleRows(b * t, t);
          }
          pos += t;
        }
      }
      EXPECT_LE(relative_error(decoded[0][0], decoded[1][0]), 2e-5) << "decode, vector path against scalar, " << label;
      EXPECT_LE(relative_error(decoded[0][1], decoded[1][1]), 2e-5)
          << "decode from bfloat16, vector path against scalar, " << label;
    }
  }
}

TEST(AttentionIsa, RowsThatAreNotFiniteAreFoundAlikeOnEveryPath) {
  // Two query entries are NaN: only those rows' scores are not finite, on every path. Forward marks exactly their
  // log-sum-exps; decode names the first in (sequence, token, head) order, from a float and a bfloat16 cache, folded
  // in place (t = 1) and by query tiles (t = 7, whose items go head by head).
  const mf::Index batch = 2, seq = 70, heads = 2, dh = 16, d = heads * dh, rows = batch * seq;
  const mf::Matrix<float> k = random_matrix<float>(rows, d, 61), v = random_matrix<float>(rows, d, 62);
  mf::Matrix<float> q = random_matrix<float>(rows, d, 60);
  q(seq + 66, dh + 3) = std::numeric_limits<float>::quiet_NaN();  // sequence 1, query 66, head 1
  q(seq + 68, 5) = std::numeric_limits<float>::quiet_NaN();       // sequence 1, query 68, head 0
  for (const mf::Isa path : {best, mf::Isa::Scalar}) {
    SCOPED_TRACE(std::string(mf::isa_name(path)));
    mf::Matrix<float> out(rows, d), lse;
    if (path == best)
      md::flash_attention_forward<best, float>(out, lse, q, k, v, batch, seq, heads);
    else
      md::flash_attention_forward<mf::Isa::Scalar, float>(out, lse, q, k, v, batch, seq, heads);
    for (mf::Index bh = 0; bh < batch * heads; ++bh)
      for (mf::Index i = 0; i < seq; ++i)
        EXPECT_EQ(std::isfinite(lse(bh, i)), !(bh == 3 && i == 66) && !(bh == 2 && i == 68))
            << "row " << bh << ", query " << i;
    for (const mf::Index t : {1, 7}) {
      for (const mf::StorageType storage : {mf::StorageType::F32, mf::StorageType::BF16}) {
        const mf::Index first = 66 - (t - 1) / 2;  // the NaN query is new token (t − 1)/2
        mf::KVCache<float> kv(batch, seq, d, storage);
        mf::Matrix<float> keys(batch * (first + t), d), values(batch * (first + t), d), qt(batch * t, d);
        for (mf::Index b = 0; b < batch; ++b) {
          keys.middleRows(b * (first + t), first + t) = k.middleRows(b * seq, first + t);
          values.middleRows(b * (first + t), first + t) = v.middleRows(b * seq, first + t);
          qt.middleRows(b * t, t) = q.middleRows(b * seq + first, t);
        }
        kv.append(keys, values);
        mf::Matrix<float> ctx = mf::Matrix<float>::Constant(batch * t, d, 3.0f);
        std::optional<md::DecodeSite> site;
        if (storage == mf::StorageType::BF16) {
          const auto keys_of = [&](mf::Index b) { return kv.keys_bf16(b); };
          const auto values_of = [&](mf::Index b) { return kv.values_bf16(b); };
          site = path == best ? md::flash_attention_decode_bf16<best>(ctx, qt, batch, t, first, first + t, heads,
                                                                       keys_of, values_of)
                              : md::flash_attention_decode_bf16<mf::Isa::Scalar>(ctx, qt, batch, t, first,
                                                                                  first + t, heads, keys_of, values_of);
        } else {
          const auto keys_of = [&](mf::Index b) { return kv.keys(b); };
          const auto values_of = [&](mf::Index b) { return kv.values(b); };
          site = path == best ? md::flash_attention_decode<best, float>(ctx, qt, batch, t, first, first + t, heads,
                                                                        keys_of, values_of)
                              : md::flash_attention_decode<mf::Isa::Scalar, float>(ctx, qt, batch, t, first,
                                                                                   first + t, heads, keys_of,
                                                                                   values_of);
        }
        const std::string label = "t = " + std::to_string(t) + ", " + std::string(mf::storage_type_name(storage));
        ASSERT_TRUE(site.has_value()) << label;
        EXPECT_EQ(site->sequence, 1) << label;
        EXPECT_EQ(site->token, (t - 1) / 2) << label;
        EXPECT_EQ(site->head, 1) << label;
        EXPECT_TRUE((ctx.array() == 3.0f).all()) << label << ": nothing is written";
      }
    }
  }
}

}  // namespace
