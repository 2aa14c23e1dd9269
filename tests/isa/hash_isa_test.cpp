// SPDX-License-Identifier: MIT
// Hashing on every compiled ISA path. This file is built three times (AVX-512, AVX2, scalar-only flags; the
// executable's MEMORYFORMER_TEST_ISA says which), so the default path of each build is checked against
// independent double-precision formulas, and every path compiled into a build against the scalar path:
// identical codes, scores within a few ulp.
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <gtest/gtest.h>

#include <memoryformer/hash.hpp>
#include <memoryformer/memory_layer.hpp>
#include <memoryformer/random.hpp>

namespace mf = memoryformer;

namespace {

#ifndef MEMORYFORMER_TEST_ISA
#define MEMORYFORMER_TEST_ISA "unspecified"
#endif

/// Distance in units in the last place between two finite floats of the same sign region.
std::int64_t ulp_distance(float a, float b) {
  auto key = [](float f) {
    const auto i = std::bit_cast<std::int32_t>(f);
    return i < 0 ? std::int64_t(std::numeric_limits<std::int32_t>::min()) - i : std::int64_t(i);
  };
  return std::abs(key(a) - key(b));
}

/// Design §1.2 and §1.4 written out in double, independent of the library's kernels.
struct NaiveHash {
  std::vector<std::int32_t> codes;
  std::vector<double> scores;
};
NaiveHash naive_hash(const mf::Matrix<float>& x, int tau, bool l1, double t) {
  NaiveHash out;
  const mf::Index K = x.cols() / tau;
  for (mf::Index n = 0; n < x.rows(); ++n)
    for (mf::Index k = 0; k < K; ++k) {
      std::int32_t code = 0;
      double a = 0, p = 1;
      for (int j = 0; j < tau; ++j) {
        const double z = x(n, k * tau + j);
        if (z >= 0) code |= 1 << (tau - 1 - j);
        a += std::abs(z);
        p *= 1.0 / (1.0 + std::exp(-2.0 * std::abs(z) / (l1 ? 1.0 : t)));
      }
      out.codes.push_back(code);
      out.scores.push_back(l1 ? a * p : p);
    }
  return out;
}

mf::Matrix<float> random_input(mf::Index rows, mf::Index cols, std::uint64_t seed, double stddev = 1.0) {
  mf::Rng rng(seed);
  mf::Matrix<float> x(rows, cols);
  for (mf::Index i = 0; i < x.size(); ++i) x.data()[i] = float(rng.normal(0.0, stddev));
  // Exact zeros and negative zeros: both must hash to bit 1.
  if (x.size() > 3) {
    x.data()[1] = 0.0f;
    x.data()[2] = -0.0f;
  }
  return x;
}

TEST(HashIsa, BuildReportsItsPath) {
  const std::string expected = MEMORYFORMER_TEST_ISA;
  if (expected == "unspecified") GTEST_SKIP() << "built outside the ISA matrix";
  EXPECT_EQ(std::string(mf::isa_name(mf::best_isa())), expected);
}

TEST(HashIsa, CodesAreMostSignificantBitFirstAndZeroIsOne) {
  mf::Matrix<float> x(1, 8);
  x << 1.0f, -1.0f, 0.0f, -0.0f, /* chunk 1: */ -2.0f, -3.0f, -4.0f, 5.0f;
  const mf::SignHasher<float> hasher({4, mf::ScoreKind::L1, 1.0});
  const auto h = hasher.hash(x);
  EXPECT_EQ(h.code(0, 0), 0b1011);  // 1, -1, 0, -0 → 1 0 1 1
  EXPECT_EQ(h.code(0, 1), 0b0001);
}

class HashIsaByTau : public ::testing::TestWithParam<int> {};

TEST_P(HashIsaByTau, DefaultPathMatchesDoubleFormulas) {
  const int tau = GetParam();
  for (bool l1 : {true, false}) {
    const double t = l1 ? 1.0 : 0.7;
    // 37 rows so row blocks and vector tails are exercised; K = 19 chunks crosses 256-element blocks for τ ≥ 14.
    const mf::Matrix<float> x = random_input(37, 19 * tau, 7 + tau);
    const mf::SignHasher<float> hasher({tau, l1 ? mf::ScoreKind::L1 : mf::ScoreKind::Paper, t});
    const auto h = hasher.hash(x);
    const auto ref = naive_hash(x, tau, l1, t);
    for (size_t i = 0; i < ref.codes.size(); ++i) {
      ASSERT_EQ(h.codes[i], ref.codes[i]) << "tau " << tau << " element " << i;
      // float accumulation of τ terms: a few ulp per term
      ASSERT_NEAR(h.scores.data()[i], ref.scores[i], 4e-7 * tau * std::max(1.0, std::abs(ref.scores[i])))
          << "tau " << tau << " l1 " << l1 << " element " << i;
    }
  }
}

TEST_P(HashIsaByTau, EveryCompiledPathMatchesScalar) {
  const int tau = GetParam();
  for (mf::Isa isa : {mf::Isa::Avx2, mf::Isa::Avx512}) {
    if (!mf::isa_available(isa)) continue;
    for (bool l1 : {true, false}) {
      // 37 chunks per row: two blocks of 16 for the transposed AVX-512 path (every τ; on AVX2, τ = 8: four
      // blocks of 8), then a tail of 5 through the per-ISA exponentials and the scalar stage; 23 rows hashed as one
      // long row: 53 blocks (AVX-512: 26 two-block steps and one single block) and a tail of 3.
      constexpr mf::Index chunks = 37;
      mf::Matrix<float> x = random_input(23, chunks * tau, 100 + tau, l1 ? 1.0 : 3.0);
      // A row past the exponentials' clamp (|z| > max_abs: 43 for l1, 22 for paper at t = 0.5) and a row just
      // below it, whose chunks sum past it for l1 (8 × 10 > 43): the blocks holding them take the clamped path
      // (for paper, row 9 stays on the unclamped one), the others the unclamped one.
      x.row(4) *= 40.0f;
      x.row(9).setConstant(l1 ? 10.0f : 20.0f);
      x(15, 2) = -1e4f;
      const mf::SignHasher<float> hasher({tau, l1 ? mf::ScoreKind::L1 : mf::ScoreKind::Paper, 0.5});
      const auto scalar = hasher.hash(x, mf::Isa::Scalar);
      // Contiguous rows are hashed as one long row (blocks then straddle rows); the same rows inside a wider
      // matrix are hashed row by row, each with its own tail: both against scalar.
      mf::Matrix<float> wide = mf::Matrix<float>::Zero(x.rows(), x.cols() + 3);
      wide.leftCols(x.cols()) = x;
      const auto simd = hasher.hash(x, isa);
      const auto strided = hasher.hash(wide.leftCols(x.cols()), isa);
      for (const auto* h : {&simd, &strided}) {
        ASSERT_EQ(scalar.codes, h->codes) << mf::isa_name(isa);
        for (mf::Index i = 0; i < scalar.scores.size(); ++i)
          ASSERT_LE(ulp_distance(scalar.scores.data()[i], h->scores.data()[i]), 4)
              << mf::isa_name(isa) << " tau " << tau << " element " << i << ": " << scalar.scores.data()[i] << " vs "
              << h->scores.data()[i] << (h == &strided ? " (strided rows)" : "");
      }
      // The backward of every path against scalar too: contiguous rows as one long row (input, dx and score
      // gradients all contiguous), and row by row (the input and dx inside wider matrices).
      mf::Matrix<float> ds = random_input(23, chunks, 5), dx_scalar(23, chunks * tau), dx_simd(23, chunks * tau);
      mf::Matrix<float> dx_wide = mf::Matrix<float>::Zero(x.rows(), x.cols() + 5);
      hasher.backward(dx_scalar, x, scalar, ds, mf::Isa::Scalar);
      hasher.backward(dx_simd, x, simd, ds, isa);
      hasher.backward(dx_wide.leftCols(x.cols()), wide.leftCols(x.cols()), strided, ds, isa);
      mf::Matrix<float> dx_strided = dx_wide.leftCols(x.cols());
      for (const auto* dx : {&dx_simd, &dx_strided})
        for (mf::Index i = 0; i < dx_scalar.size(); ++i)
          ASSERT_NEAR(dx_scalar.data()[i], dx->data()[i], 1e-6f * std::max(1.0f, std::abs(dx_scalar.data()[i])))
              << mf::isa_name(isa) << " dx element " << i << (dx == &dx_strided ? " (strided rows)" : "");
      ASSERT_TRUE((dx_wide.rightCols(5).array() == 0.0f).all()) << "the backward wrote past a strided row";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Tau, HashIsaByTau, ::testing::Range(1, 17));

TEST(HashIsa, FastExp2ErrorBound) {
  // Dense sweep of the domain the scores use: 2^t for t in [-126, 0] in steps of 1e-4, so every table slot and
  // both ends of each slot's interval. Bound: 2^-22 relative (≈ 2 ulp).
  double worst = 0;
  for (int i = 0; i <= 1260000; ++i) {
    const float t = -float(i) * 1e-4f;
    const double exact = std::exp2(double(t));
    const double rel = std::abs(double(mf::detail::fast_exp2_of_product(t, 1.0f)) - exact) / exact;
    worst = std::max(worst, rel);
  }
  EXPECT_LE(worst, 0x1.0p-22) << "worst relative error " << worst;
  // Exact powers of two come out exact, down to the smallest normal float.
  for (int k = 0; k <= 126; ++k)
    ASSERT_EQ(mf::detail::fast_exp2_of_product(-float(k), 1.0f), std::ldexp(1.0f, -k)) << k;
}

TEST(HashIsa, FastExpIsBitIdenticalOnEveryPath) {
  // exp(neg_scale·|z|) through exp_of_abs: the SIMD paths against the scalar one, bit for bit, over the whole
  // domain and past the clamp of |z|, with ±inf and NaN, and a vector tail (1003 is not a multiple of 8 or 16).
  std::vector<float> z(1003), e_simd(z.size()), e_scalar(z.size());
  for (size_t i = 0; i < z.size(); ++i) z[i] = float(i) * 0.0917f * (i % 2 ? 1.0f : -1.0f);
  z[5] = std::numeric_limits<float>::infinity();
  z[6] = -std::numeric_limits<float>::infinity();
  z[7] = std::numeric_limits<float>::quiet_NaN();
  z[8] = -0.0f;
  auto same = [](float a, float b) {
    return std::isnan(a) ? std::isnan(b) : std::bit_cast<std::uint32_t>(a) == std::bit_cast<std::uint32_t>(b);
  };
  for (const float neg_scale : {-1.0f, -2.0f, -2.0f / 0.7f}) {
    const mf::detail::ExpArgument<float> arg(neg_scale);
    mf::detail::exp_of_abs<mf::Isa::Scalar>(e_scalar.data(), z.data(), mf::Index(z.size()), arg);
    EXPECT_TRUE(std::isnan(e_scalar[7]));
    EXPECT_EQ(e_scalar[8], 1.0f);
    for (size_t i = 0; i < z.size(); ++i) {  // against exp in double (the argument's rounding dominates)
      if (std::isnan(z[i])) continue;
      // Past the clamp, exp(neg_scale·max_abs) ≈ 2^-125: still a normal float.
      const double abs_z = std::min(std::abs(double(z[i])), double(arg.max_abs));
      const double exact = std::exp(double(neg_scale) * abs_z);
      ASSERT_GE(e_scalar[i], std::numeric_limits<float>::min()) << i;
      ASSERT_NEAR(e_scalar[i], exact, exact * (0x1.0p-22 + 0x1.0p-23 * std::abs(std::log(exact)))) << i;
    }
    for (mf::Isa isa : {mf::Isa::Avx2, mf::Isa::Avx512}) {
      if (!mf::isa_available(isa)) continue;
      if (isa == mf::Isa::Avx512) {
#if defined(MEMORYFORMER_HAVE_AVX512)
        mf::detail::exp_of_abs<mf::Isa::Avx512>(e_simd.data(), z.data(), mf::Index(z.size()), arg);
#endif
      } else {
#if defined(MEMORYFORMER_HAVE_AVX2)
        mf::detail::exp_of_abs<mf::Isa::Avx2>(e_simd.data(), z.data(), mf::Index(z.size()), arg);
#endif
      }
      for (size_t i = 0; i < z.size(); ++i)
        ASSERT_TRUE(same(e_simd[i], e_scalar[i]))
            << mf::isa_name(isa) << " element " << i << " z " << z[i] << ": " << e_simd[i] << " vs " << e_scalar[i];
    }
  }
}

TEST(HashIsa, NonFiniteInputIsRejectedByEveryScoreOnEveryPath) {
  // The exponentials clamp |z|, so neither score may rely on them to see an infinity; the transposed paths (τ = 8:
  // blocks of 16 chunks on AVX-512, 8 on AVX2), the tails and the scalar stage 2 each get one.
  for (mf::Isa isa : {mf::Isa::Scalar, mf::Isa::Avx2, mf::Isa::Avx512}) {
    if (!mf::isa_available(isa)) continue;
    for (const auto score : {mf::ScoreKind::L1, mf::ScoreKind::Paper}) {
      const mf::SignHasher<float> hasher({8, score, 1.0});
      for (const float bad : {std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                              std::numeric_limits<float>::quiet_NaN()}) {
        for (const mf::Index col : {mf::Index(3), mf::Index(16 * 8 + 5)}) {  // a transposed chunk, a tail chunk
          mf::Matrix<float> x = random_input(3, 18 * 8, 9);
          ASSERT_NO_THROW(hasher.hash(x, isa));
          x(1, col) = bad;
          EXPECT_THROW(hasher.hash(x, isa), mf::NonFiniteError)
              << mf::isa_name(isa) << " " << mf::score_kind_name(score) << " " << bad << " at column " << col;
        }
      }
    }
  }
}

TEST(HashIsa, LargeInputsSaturateWithoutOverflow) {
  mf::Matrix<float> x(1, 8);
  x << 80.0f, -90.0f, 1e6f, -1e-30f, 0.0f, 1e-45f, -200.0f, 3.0f;
  const mf::SignHasher<float> hasher({8, mf::ScoreKind::L1, 1.0});
  const auto h = hasher.hash(x);
  EXPECT_TRUE(std::isfinite(h.scores(0, 0)));
  EXPECT_EQ(h.code(0, 0), 0b10101101);  // 1 0 1 0 1 1 0 1
}

TEST(HashIsa, MemoryLayerForwardMatchesNaiveLookup) {
  // The whole layer on this build's default path against an explicit loop.
  const mf::MemoryLayerConfig config{.d_in = 48, .d_out = 19, .tau = 6};
  const mf::MemoryLayer<float> layer(config, 3);
  const mf::Matrix<float> x = random_input(9, 48, 11);
  mf::HashResult<float> cache;
  const mf::Matrix<float> y = layer.forward(x, cache);
  const auto ref = naive_hash(x, 6, true, 1.0);
  for (mf::Index n = 0; n < 9; ++n)
    for (mf::Index o = 0; o < 19; ++o) {
      double expected = layer.bias()(o);
      for (mf::Index k = 0; k < 8; ++k)
        expected += ref.scores[size_t(n * 8 + k)] * layer.tables().row(k, ref.codes[size_t(n * 8 + k)])[o];
      ASSERT_NEAR(y(n, o), expected, 1e-5) << n << ", " << o;
    }
}

}  // namespace
