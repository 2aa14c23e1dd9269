// SPDX-License-Identifier: MIT
// The float GeLU kernels (detail/gelu_kernels.hpp) on every compiled ISA path. This file is built three times
// (AVX-512, AVX2, scalar-only flags): the path gelu_forward and gelu_backward take (best_isa()) gives the same bits
// as the scalar path for every input class and row length, and stays within the stated bound of the double form.
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numbers>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include <memoryformer/detail/gelu_kernels.hpp>
#include <memoryformer/nn/gelu.hpp>

namespace mf = memoryformer;
namespace md = memoryformer::detail;

namespace {

#ifndef MEMORYFORMER_TEST_ISA
#define MEMORYFORMER_TEST_ISA "unspecified"
#endif

constexpr mf::Isa gelu_path = mf::best_isa();

/// Inputs of every class: a fine grid over the whole range, both sides of the branch at |x| = 1/√2·… (|z| = ½),
/// where Φ underflows, signed zeros, infinities, NaN, subnormals and the largest floats.
std::vector<float> inputs() {
  std::vector<float> x;
  for (double v = -16; v <= 16; v += 1.0 / 256) x.push_back(float(v));
  const float edge = float(0.5 * std::numbers::sqrt2);
  for (float v : {edge, -edge}) {
    x.push_back(v);
    x.push_back(std::nextafter(v, 0.0f));
    x.push_back(std::nextafter(v, 2 * v));
  }
  constexpr float inf = std::numeric_limits<float>::infinity();
  for (float v : {0.0f, -0.0f, inf, -inf, std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::denorm_min(),
                  -std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::max(),
                  -std::numeric_limits<float>::max(), 1e-20f, -1e-20f, -13.2f, -13.3f})
    x.push_back(v);
  return x;
}

bool same_bits(float a, float b) { return std::isnan(a) ? std::isnan(b) : std::bit_cast<std::uint32_t>(a) == std::bit_cast<std::uint32_t>(b); }

TEST(GeluIsa, BuildReportsItsPath) {
  const std::string expected = MEMORYFORMER_TEST_ISA;
  if (expected == "unspecified") GTEST_SKIP() << "built outside the ISA matrix";
  EXPECT_EQ(std::string(mf::isa_name(gelu_path)), expected);
}

TEST(GeluIsa, VectorPathIsBitIdenticalToScalar) {
  const std::vector<float> x = inputs();
  std::vector<float> dy(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) dy[i] = float(0.25 + 0.001 * double(i % 97));
  // Lengths that leave AVX-512 and AVX2 tails, and offsets that shift which lanes each input lands in.
  for (std::size_t n : {std::size_t(1), std::size_t(7), std::size_t(8), std::size_t(17), x.size()}) {
    for (std::size_t offset : {std::size_t(0), std::size_t(3)}) {
      const std::size_t len = std::min(n, x.size() - offset);
      std::vector<float> y_fast(len), y_scalar(len), dx_fast(len), dx_scalar(len);
      md::gelu_forward_row<gelu_path>(y_fast.data(), x.data() + offset, mf::Index(len));
      md::gelu_forward_row<mf::Isa::Scalar>(y_scalar.data(), x.data() + offset, mf::Index(len));
      md::gelu_backward_row<gelu_path>(dx_fast.data(), x.data() + offset, dy.data() + offset, mf::Index(len));
      md::gelu_backward_row<mf::Isa::Scalar>(dx_scalar.data(), x.data() + offset, dy.data() + offset, mf::Index(len));
      for (std::size_t i = 0; i < len; ++i) {
        ASSERT_TRUE(same_bits(y_fast[i], y_scalar[i])) << "x = " << x[offset + i] << ": " << y_fast[i] << " vs " << y_scalar[i];
        ASSERT_TRUE(same_bits(dx_fast[i], dx_scalar[i])) << "x = " << x[offset + i] << ": " << dx_fast[i] << " vs " << dx_scalar[i];
      }
    }
  }
}

TEST(GeluIsa, WithinItsBoundOfTheDoubleForm) {
  // Relative error of GeLU and of GeLU'(x) = Φ + x·φ (relative to Φ + |x|·φ) ≤ (x² + 4)·2^-23 for x > −12 (the
  // exponent's rounding grows with x²); below, where Φ(x) nears float's smallest normal (x ≈ −13) and then
  // underflows to 0, within 2e-5 relative plus a few smallest normals.
  const std::vector<float> x = inputs();
  std::vector<float> y(x.size()), dx(x.size()), ones(x.size(), 1.0f);
  md::gelu_forward_row<gelu_path>(y.data(), x.data(), mf::Index(x.size()));
  md::gelu_backward_row<gelu_path>(dx.data(), x.data(), ones.data(), mf::Index(x.size()));
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double v = x[i];
    if (!std::isfinite(v) || std::abs(v) > 16) continue;
    const double cdf = 0.5 * std::erfc(-v / std::numbers::sqrt2), pdf = std::exp(-0.5 * v * v) / std::sqrt(2 * std::numbers::pi);
    const double bound = (v * v + 4) * 0x1p-23;
    if (v > -12) {
      EXPECT_LE(std::abs(double(y[i]) - v * cdf), bound * std::abs(v * cdf) + std::numeric_limits<float>::denorm_min()) << "x = " << v;
      EXPECT_LE(std::abs(double(dx[i]) - (cdf + v * pdf)), bound * (cdf + std::abs(v) * pdf)) << "x = " << v;
    } else {
      const double tiny = 256 * double(std::numeric_limits<float>::min());
      EXPECT_LE(std::abs(double(y[i]) - v * cdf), 2e-5 * std::abs(v * cdf) + tiny) << "x = " << v;
      EXPECT_LE(std::abs(double(dx[i]) - (cdf + v * pdf)), 2e-5 * (cdf + std::abs(v) * pdf) + tiny) << "x = " << v;
    }
  }
  // The extremes: GeLU(x) → x for large x, → 0 for very negative x; NaN stays NaN.
  float big[3] = {std::numeric_limits<float>::max(), std::numeric_limits<float>::infinity(),
                  std::numeric_limits<float>::quiet_NaN()};
  float out[3];
  md::gelu_forward_row<gelu_path>(out, big, 3);
  EXPECT_EQ(out[0], big[0]);
  EXPECT_EQ(out[1], big[1]);
  EXPECT_TRUE(std::isnan(out[2]));
}

TEST(GeluIsa, PublicFunctionsTakeThisPath) {
  const std::vector<float> x = inputs();
  const mf::Index n = mf::Index(x.size());
  mf::Matrix<float> xm = Eigen::Map<const mf::Matrix<float>>(x.data(), 1, n), y(1, n), dx(1, n);
  mf::Matrix<float> dy = mf::Matrix<float>::Constant(1, n, 0.5f);
  mf::gelu_forward(y, xm);
  mf::gelu_backward(dx, xm, dy);
  std::vector<float> y_ref(x.size()), dx_ref(x.size());
  md::gelu_forward_row<gelu_path>(y_ref.data(), x.data(), n);
  md::gelu_backward_row<gelu_path>(dx_ref.data(), x.data(), dy.data(), n);
  for (mf::Index i = 0; i < n; ++i) {
    ASSERT_TRUE(same_bits(y(0, i), y_ref[std::size_t(i)])) << "x = " << x[std::size_t(i)];
    ASSERT_TRUE(same_bits(dx(0, i), dx_ref[std::size_t(i)])) << "x = " << x[std::size_t(i)];
  }
}

}  // namespace
