// SPDX-License-Identifier: MIT
// The Memory Layer's lookup kernels (design §1.5 forward, §1.6) on every compiled ISA path. This file is built
// three times (AVX-512, AVX2, scalar-only flags; MEMORYFORMER_TEST_ISA says which). Every fast path (token-major
// decode, column-blocked prefill, packed float32/bfloat16/float16 storage, the sorted backward) is checked against
// the scalar reference of the same build and against sums written out here in double.
//
// Tolerances (u = 2^-24, the float unit roundoff):
//  - forward: the fast paths compute b + Σ_k s_k·T_k as a chain of K fused multiply-adds, the reference as K
//    rounded products and sums in the same order; each is within (K+1)·u·(|b| + Σ|s_k·T_k|) of the exact sum, so
//    they differ by at most 2(K+1)·u·(|b| + Σ|s_k·T_k|).
//  - backward dT row: the fast path sums a row's m contributions first, then adds once; the reference adds them
//    one by one: bound 2(m+2)·u·(|dT_before| + Σ|s·dy|).
//  - dscores: the fast path splits ⟨dy, T⟩ into column slices summed in another order: bound 2·d_out·u·Σ|dy_j·T_j|.
//  - bf16 / f16 storage against float32 tables: round to nearest keeps a stored value within 2^-8 (bf16, 8
//    significant bits) / 2^-11 (f16, 11 bits; subnormals: 2^-25 absolute) of the float, so y moves by at most that
//    times Σ|s_k·T_k| (plus the float bound above).
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include <memoryformer/detail/scratch.hpp>
#include <memoryformer/frozen_memory_layer.hpp>
#include <memoryformer/memory_layer.hpp>
#include <memoryformer/random.hpp>
#include <memoryformer/table_storage.hpp>

#include "support/thread_setting.hpp"

#if defined(MEMORYFORMER_USE_OPENMP)
#include <omp.h>
#endif

namespace mf = memoryformer;

namespace {

#ifndef MEMORYFORMER_TEST_ISA
#define MEMORYFORMER_TEST_ISA "unspecified"
#endif

constexpr double u = 0x1.0p-24;

mf::Matrix<float> float_matrix(mf::Index rows, mf::Index cols, std::uint64_t seed, double stddev = 1.0) {
  mf::Rng rng(seed);
  mf::Matrix<float> m(rows, cols);
  for (mf::Index i = 0; i < m.size(); ++i) m.data()[i] = float(rng.normal(0.0, stddev));
  return m;
}

std::vector<mf::Isa> simd_paths() {
  std::vector<mf::Isa> out;
  for (mf::Isa isa : {mf::Isa::Avx2, mf::Isa::Avx512})
    if (mf::isa_available(isa)) out.push_back(isa);
  return out;
}

struct Shape {
  mf::Index d_in, d_out;
  int tau;
  mf::Index n;
  bool bias;
};

std::string name(const Shape& s) {
  return "d_in " + std::to_string(s.d_in) + " d_out " + std::to_string(s.d_out) + " tau " + std::to_string(s.tau) +
         " N " + std::to_string(s.n) + (s.bias ? " bias" : " no-bias");
}

// Token counts on both sides of the decode/prefill switches (packed panels from max(32, 2^τ/2) tokens, with a row
// copy or MemoryLayer's packed copy from max(32, 0.75·2^τ); row-major
// training tables in table order from max(256, 2^τ/2), column-blocked from max(32, 3·2^τ)); widths that are and are
// not multiples of the 16/32/64-column chunks and of the vector widths.
const Shape shapes[] = {
    {8, 1, 4, 3, true},      {12, 19, 4, 1, true},   {12, 19, 4, 70, false}, {48, 100, 6, 5, true},
    {48, 100, 6, 129, true}, {64, 64, 8, 2, false},  {64, 64, 8, 300, true}, {40, 37, 10, 9, true},
    {40, 37, 10, 300, true}, {32, 520, 8, 80, true}, {16, 33, 1, 40, true},  {48, 20, 16, 3, true},
    {32, 520, 4, 100, true}, {64, 64, 8, 800, false}, {40, 37, 10, 600, true}, {27, 130, 9, 256, false},
};

mf::MemoryLayer<float> make_layer(const Shape& s, std::uint64_t seed) {
  mf::MemoryLayerConfig c;
  c.d_in = s.d_in;
  c.d_out = s.d_out;
  c.tau = s.tau;
  c.bias = s.bias;
  c.table_init_std = 0.5;
  c.bias_init_std = 0.5;
  return mf::MemoryLayer<float>(c, seed);
}

/// The inputs of two backward calls on one layer: x2 and dy2 have `extra` rows more than x1 and dy1 (seeds seed to
/// seed + 3).
struct TwoCalls {
  mf::Matrix<float> x1, x2, dy1, dy2;
};

TwoCalls two_calls(const Shape& s, mf::Index extra, std::uint64_t seed) {
  return {float_matrix(s.n, s.d_in, seed), float_matrix(s.n + extra, s.d_in, seed + 1),
          float_matrix(s.n, s.d_out, seed + 2), float_matrix(s.n + extra, s.d_out, seed + 3)};
}

/// The hashes of x1 and x2 that `layer`'s forward on `isa` keeps for backward.
std::pair<mf::HashResult<float>, mf::HashResult<float>> hash_both(const mf::MemoryLayer<float>& layer,
                                                                  const mf::Matrix<float>& x1,
                                                                  const mf::Matrix<float>& x2, mf::Isa isa) {
  std::pair<mf::HashResult<float>, mf::HashResult<float>> h;
  mf::Matrix<float> y1(x1.rows(), layer.config().d_out), y2(x2.rows(), layer.config().d_out);
  layer.forward(y1, x1, h.first, isa);
  layer.forward(y2, x2, h.second, isa);
  return h;
}

/// Σ_k |s_k·T_k[code_k][o]| + |b_o| in double, the scale of every forward bound.
double magnitude(const mf::MemoryLayer<float>& layer, const mf::HashResult<float>& h, mf::Index n, mf::Index o) {
  double m = layer.config().bias ? std::abs(double(layer.bias()(o))) : 0.0;
  for (mf::Index k = 0; k < h.tables; ++k) m += std::abs(double(h.scores(n, k)) * layer.tables().row(k, h.code(n, k))[o]);
  return m;
}

TEST(LookupIsa, BuildReportsItsPath) {
  const std::string expected = MEMORYFORMER_TEST_ISA;
  if (expected == "unspecified") GTEST_SKIP() << "built outside the ISA matrix";
  EXPECT_EQ(std::string(mf::isa_name(mf::best_isa())), expected);
}

TEST(LookupIsa, ForwardEveryPathMatchesReferenceAndDoubleSums) {
  for (const Shape& s : shapes) {
    const auto layer = make_layer(s, 11);
    const mf::Matrix<float> x = float_matrix(s.n, s.d_in, 5);
    mf::HashResult<float> h;
    mf::Matrix<float> ref(s.n, s.d_out);
    layer.forward(ref, x, h, mf::Isa::Scalar);
    const double K = double(h.tables);
    // The reference itself against the formula in double.
    for (mf::Index n = 0; n < s.n; ++n)
      for (mf::Index o = 0; o < s.d_out; ++o) {
        double exact = s.bias ? double(layer.bias()(o)) : 0.0;
        for (mf::Index k = 0; k < h.tables; ++k) exact += double(h.scores(n, k)) * layer.tables().row(k, h.code(n, k))[o];
        ASSERT_NEAR(ref(n, o), exact, (K + 1) * u * magnitude(layer, h, n, o) + 1e-30) << name(s);
      }
    for (mf::Isa isa : simd_paths()) {
      mf::Matrix<float> y(s.n, s.d_out);
      layer.forward_hashed(y, h, isa);
      for (mf::Index n = 0; n < s.n; ++n)
        for (mf::Index o = 0; o < s.d_out; ++o)
          ASSERT_NEAR(y(n, o), ref(n, o), 2 * (K + 1) * u * magnitude(layer, h, n, o) + 1e-30)
              << mf::isa_name(isa) << " " << name(s) << " at (" << n << ", " << o << ")";
    }
  }
}

TEST(LookupIsa, ForwardFastPathsGiveIdenticalBitsWhateverTheLoopOrder) {
  // Decode (one token per call) and prefill (all tokens at once) compute the same FMA chain: the same bits. So do
  // AVX2 and AVX-512, and row-major and packed float32 storage.
  const std::vector<mf::Isa> paths = simd_paths();
  if (paths.empty()) GTEST_SKIP() << "no SIMD path in this build";
  for (const Shape& s : shapes) {
    if (s.n < 32) continue;
    const auto layer = make_layer(s, 21);
    const mf::Matrix<float> x = float_matrix(s.n, s.d_in, 6);
    const auto h = layer.hasher().hash(x);
    mf::Matrix<float> all(s.n, s.d_out);
    layer.forward_hashed(all, h, paths.front());
    for (mf::Isa isa : paths) {
      mf::Matrix<float> other(s.n, s.d_out);
      layer.forward_hashed(other, h, isa);
      ASSERT_TRUE(other == all) << mf::isa_name(isa) << " " << name(s);
      const mf::FrozenMemoryLayer frozen(layer, mf::StorageType::F32, mf::FrozenLayout::Both);
      frozen.forward_hashed(other, h, isa);
      ASSERT_TRUE(other == all) << "packed f32 " << mf::isa_name(isa) << " " << name(s);
      const mf::FrozenMemoryLayer rows_only(layer, mf::StorageType::F32, mf::FrozenLayout::Rows);
      rows_only.forward_hashed(other, h, isa);
      ASSERT_TRUE(other == all) << "row layout f32 " << mf::isa_name(isa) << " " << name(s);
      for (mf::Index n = 0; n < s.n; n += 7) {
        const mf::Matrix<float> xn = x.row(n);
        const auto hn = layer.hasher().hash(xn);
        mf::Matrix<float> yn(1, s.d_out), pn(1, s.d_out);
        layer.forward_hashed(yn, hn, isa);
        frozen.forward_hashed(pn, hn, isa);
        ASSERT_TRUE(yn.row(0) == all.row(n)) << "decode row " << n << " " << mf::isa_name(isa) << " " << name(s);
        ASSERT_TRUE(pn.row(0) == all.row(n)) << "packed decode row " << n << " " << mf::isa_name(isa) << " " << name(s);
      }
    }
  }
}

TEST(LookupIsa, PrefillGivesIdenticalBitsForAnyTableGroupSize) {
#if defined(MEMORYFORMER_HAVE_SIMD_KERNELS)
  // The prefill loop's table groups are sized from this machine's L2 (detail::panel_budget_bytes); partial sums
  // travel between groups as floats, so the FMA chain, and the bits, must not depend on that size. Budgets of one
  // table per group (8 groups), three (evened out to 3 groups of ≤ 3) and all tables (one group).
  const Shape s{64, 100, 8, 300, true};  // K = 8 tables of 256 rows; fp32 32-column chunks: 32 KB + 64 B per table
  const auto layer = make_layer(s, 31);
  const mf::Matrix<float> x = float_matrix(s.n, s.d_in, 7);
  const auto h = layer.hasher().hash(x);
  for (mf::Isa isa : simd_paths()) {
    mf::Matrix<float> one_group(s.n, s.d_out);
    mf::detail::dispatch_simd(isa, [&]<mf::Isa I>() {
      for (const mf::Index budget : {mf::Index(1) << 20, mf::Index(33) << 10, mf::Index(99) << 10}) {
        mf::Matrix<float> y(s.n, s.d_out);
        mf::detail::rowmajor_prefill<I>(y.data(), s.d_out, layer.tables().data(), s.tau, s.d_out, h.tables,
                                        h.codes.data(), h.scores.data(), layer.bias().data(), s.n, 32, budget);
        if (budget == (mf::Index(1) << 20)) one_group = y;
        ASSERT_TRUE(y == one_group) << mf::isa_name(isa) << " budget " << budget;
      }
    });
    mf::Matrix<float> fast(s.n, s.d_out);
    layer.forward_hashed(fast, h, isa);
    ASSERT_TRUE(fast == one_group) << mf::isa_name(isa);
  }
#else
  GTEST_SKIP() << "no SIMD kernels in this build";
#endif
}

TEST(LookupIsa, ForwardIntoStridedOutput) {
  // y may be a block of a wider matrix (outer stride ≠ d_out), and misaligned for streaming stores (prefill path).
  const Shape s{64, 64, 8, 800, true};
  const auto layer = make_layer(s, 3);
  const mf::Matrix<float> x = float_matrix(s.n, s.d_in, 8);
  const auto h = layer.hasher().hash(x);
  mf::Matrix<float> ref(s.n, s.d_out);
  layer.forward_hashed(ref, h, mf::Isa::Scalar);
  for (mf::Isa isa : simd_paths()) {
    for (mf::Index offset : {0, 1, 16}) {
      mf::Matrix<float> wide = mf::Matrix<float>::Constant(s.n, s.d_out + 40, 7.0f);
      layer.forward_hashed(wide.block(0, offset, s.n, s.d_out), h, isa);
      for (mf::Index n = 0; n < s.n; ++n)
        for (mf::Index o = 0; o < s.d_out + 40; ++o) {
          if (o < offset || o >= offset + s.d_out) {
            ASSERT_EQ(wide(n, o), 7.0f) << "wrote outside y at " << n << ", " << o;
          } else {
            ASSERT_NEAR(wide(n, o), ref(n, o - offset), 2 * 65 * u * magnitude(layer, h, n, o - offset))
                << mf::isa_name(isa) << " offset " << offset;
          }
        }
    }
  }
}

TEST(LookupIsa, SortedKernelsOnlyWhereTheirInt32PositionsFit) {
  // The table-order forward and the sorted backward index the N·K pairs and the K·2^τ + 1 row starts with int32;
  // beyond that the dispatch takes the loops that do not sort.
  using mf::detail::contributions_fit_int32;
  EXPECT_TRUE(contributions_fit_int32(2048, 64, 8));
  EXPECT_TRUE(contributions_fit_int32(0, 64, 8));
  EXPECT_TRUE(contributions_fit_int32(std::int64_t(1) << 25, 63, 8));    // 2^31 − 2^25 pairs
  EXPECT_FALSE(contributions_fit_int32(std::int64_t(1) << 25, 64, 8));   // 2^31 pairs
  EXPECT_TRUE(contributions_fit_int32(1, (std::int64_t(1) << 21) - 2, 10));
  EXPECT_FALSE(contributions_fit_int32(1, std::int64_t(1) << 21, 10));   // 2^31 row starts
  EXPECT_FALSE(contributions_fit_int32(1, 1, 31));
}

TEST(LookupIsa, PackedStorageEveryPathMatchesItsReference) {
  for (const Shape& s : shapes) {
    const auto layer = make_layer(s, 31);
    const mf::Matrix<float> x = float_matrix(s.n, s.d_in, 9);
    const auto h = layer.hasher().hash(x);
    mf::Matrix<float> f32(s.n, s.d_out);
    layer.forward_hashed(f32, h, mf::Isa::Scalar);
    const double K = double(h.tables);
    struct Variant {
      mf::FrozenLayout layout;
      mf::Index cv;
    };
    const Variant variants[] = {{mf::FrozenLayout::Panels, 0},  {mf::FrozenLayout::Panels, 32},
                                {mf::FrozenLayout::Panels, 64}, {mf::FrozenLayout::Rows, 0},
                                {mf::FrozenLayout::Both, 0}};
    for (mf::StorageType st : {mf::StorageType::F32, mf::StorageType::BF16, mf::StorageType::F16}) {
      for (const Variant& v : variants) {
        const mf::Index cv = v.cv;
        const mf::FrozenMemoryLayer frozen(layer, st, v.layout, cv);
        mf::Matrix<float> ref(s.n, s.d_out);
        frozen.forward_hashed(ref, h, mf::Isa::Scalar);
        const double q = st == mf::StorageType::F32 ? 0.0 : (st == mf::StorageType::BF16 ? 0x1.0p-8 : 0x1.0p-11);
        for (mf::Index n = 0; n < s.n; ++n)
          for (mf::Index o = 0; o < s.d_out; ++o) {
            const double m = magnitude(layer, h, n, o);
            ASSERT_NEAR(ref(n, o), f32(n, o), (q + 4 * (K + 1) * u) * m + 1e-30)
                << mf::storage_type_name(st) << " reference vs float32 tables, " << name(s);
          }
        for (mf::Isa isa : simd_paths()) {
          mf::Matrix<float> y(s.n, s.d_out);
          frozen.forward_hashed(y, h, isa);
          for (mf::Index n = 0; n < s.n; ++n)
            for (mf::Index o = 0; o < s.d_out; ++o)
              ASSERT_NEAR(y(n, o), ref(n, o), 2 * (K + 1) * u * (1 + q) * magnitude(layer, h, n, o) + 1e-30)
                  << mf::storage_type_name(st) << " layout " << int(v.layout) << " cv " << cv << " "
                  << mf::isa_name(isa) << " " << name(s)
                  << " at (" << n << ", " << o << ")";
        }
      }
    }
  }
}

TEST(LookupIsa, PackedValuesDecodeToTheRoundedFloats) {
  const Shape s{40, 37, 10, 1, true};
  const auto layer = make_layer(s, 41);
  for (mf::StorageType st : {mf::StorageType::F32, mf::StorageType::BF16, mf::StorageType::F16})
    for (mf::TableLayout layout : {mf::TableLayout::Panels, mf::TableLayout::Rows}) {
    const mf::PackedTables packed(layer.tables(), st, layout);
    ASSERT_EQ(packed.table_layout(), layout);
    for (mf::Index k = 0; k < 4; ++k)
      for (mf::Index r = 0; r < packed.rows_per_table(); r += 37)
        for (mf::Index c = 0; c < s.d_out; ++c) {
          const double v = layer.tables().row(k, r)[c];
          const double rel = st == mf::StorageType::F32 ? 0.0 : (st == mf::StorageType::BF16 ? 0x1.0p-8 : 0x1.0p-11);
          ASSERT_NEAR(packed.value(k, r, c), v, rel * std::abs(v) + (st == mf::StorageType::F16 ? 0x1.0p-25 : 0.0))
              << mf::storage_type_name(st);
        }
    const auto back = packed.unpack();
    EXPECT_EQ(back.row(3, 5)[36], packed.value(3, 5, 36));
  }
}

TEST(LookupIsa, Bf16HighHalfIsTheNearestFloatWithThoseLowBits) {
  // The kernels read a bf16 pair word whole as the float of its high column; the packer picks the high half whose
  // float (with the low column's bits below it) is nearest to the value: within half a bfloat16 step, 2^-8·|v|.
  mf::Rng rng(77);
  for (int i = 0; i < 200000; ++i) {
    const float magnitude = float(std::ldexp(1.0 + rng.uniform(), int(rng.uniform() * 200.0) - 100));
    const float v = rng.uniform() < 0.5 ? -magnitude : magnitude;
    const auto low = std::uint16_t(rng.uniform() * 65536.0);
    const std::uint16_t high = mf::detail::bf16_high_half(v, low);
    const auto word = [&](std::uint32_t h) { return std::bit_cast<float>((h << 16) | low); };
    const double error = std::abs(double(word(high)) - double(v));
    ASSERT_LE(error, 0x1.0p-8 * std::abs(double(v))) << v << " low " << low;
    for (const std::uint32_t other : {std::uint32_t(high) - 1u, std::uint32_t(high) + 1u}) {  // same-sign neighbours
      if ((other >> 15) == (std::uint32_t(high) >> 15) && (other & 0x7fffu) <= 0x7f7fu) {
        ASSERT_GE(std::abs(double(word(other)) - double(v)), error) << v << " low " << low;
      }
    }
  }
  for (const float v : {0.0f, -0.0f, 3.3895314e38f, -3.3895314e38f, 1e-40f}) {
    const float decoded = std::bit_cast<float>((std::uint32_t(mf::detail::bf16_high_half(v, 0xffff)) << 16) | 0xffffu);
    EXPECT_TRUE(std::isfinite(decoded)) << v;
    EXPECT_LE(std::abs(double(decoded) - double(v)), 0x1.0p-8 * std::abs(double(v)) + 0x1.0p-133) << v;
  }
}

TEST(LookupIsa, BackwardEveryPathMatchesReference) {
  for (const Shape& s : shapes) {
    const mf::Matrix<float> x = float_matrix(s.n, s.d_in, 12);
    const mf::Matrix<float> dy = float_matrix(s.n, s.d_out, 13);
    auto ref_layer = make_layer(s, 51);
    mf::HashResult<float> h;
    mf::Matrix<float> y(s.n, s.d_out), dx_ref(s.n, s.d_in);
    ref_layer.forward(y, x, h, mf::Isa::Scalar);
    // Two backward calls: the second accumulates into the first's gradients.
    mf::Matrix<float> ds_ref = mf::Matrix<float>::Constant(s.n, h.tables, 0.25f);
    ref_layer.backward_hashed(ds_ref, dy, h, mf::Isa::Scalar);
    ref_layer.backward_hashed(ds_ref, dy, h, mf::Isa::Scalar);
    for (mf::Isa isa : simd_paths()) {
      auto layer = make_layer(s, 51);
      mf::Matrix<float> ds = mf::Matrix<float>::Constant(s.n, h.tables, 0.25f);
      layer.backward_hashed(ds, dy, h, isa);
      layer.backward_hashed(ds, dy, h, isa);
      const std::string where = std::string(mf::isa_name(isa)) + " " + name(s);
      ASSERT_EQ(layer.touched_rows(), ref_layer.touched_rows()) << where;
      if (s.bias) {
        ASSERT_TRUE(layer.dbias() == ref_layer.dbias()) << where;  // same Eigen column sums
      }
      // dT: per touched row, m contributions summed twice; untouched rows stay exactly zero in both.
      const mf::Index R = mf::Index(1) << s.tau;
      std::map<mf::Index, std::pair<int, std::vector<double>>> rows;  // row → (count, Σ|s·dy| per column)
      for (mf::Index n = 0; n < s.n; ++n)
        for (mf::Index k = 0; k < h.tables; ++k) {
          auto& [count, mag] = rows[k * R + h.code(n, k)];
          mag.resize(size_t(s.d_out), 0.0);
          ++count;
          for (mf::Index o = 0; o < s.d_out; ++o) mag[size_t(o)] += 2 * std::abs(double(h.scores(n, k)) * dy(n, o));
        }
      const auto fast_dt = layer.dtables().as_matrix();
      const auto ref_dt = ref_layer.dtables().as_matrix();
      for (mf::Index row = 0; row < h.tables * R; ++row) {
        const auto it = rows.find(row);
        if (it == rows.end()) {
          ASSERT_TRUE(fast_dt.row(row).isZero(0) && ref_dt.row(row).isZero(0)) << where << " untouched row " << row;
          continue;
        }
        const int m = 2 * it->second.first;
        for (mf::Index o = 0; o < s.d_out; ++o)
          ASSERT_NEAR(fast_dt(row, o), ref_dt(row, o), 2 * (m + 2) * u * it->second.second[size_t(o)] + 1e-30)
              << where << " dT(row " << row << ", " << o << ")";
      }
      for (mf::Index n = 0; n < s.n; ++n)
        for (mf::Index k = 0; k < h.tables; ++k) {
          double mag = 0.25;
          for (mf::Index o = 0; o < s.d_out; ++o)
            mag += 2 * std::abs(double(dy(n, o)) * layer.tables().row(k, h.code(n, k))[o]);
          ASSERT_NEAR(ds(n, k), ds_ref(n, k), 2 * double(s.d_out + 2) * u * mag) << where << " dscores(" << n << ", " << k << ")";
        }
      // The whole backward: dx from the same dscores path.
      mf::Matrix<float> dx(s.n, s.d_in);
      auto layer2 = make_layer(s, 51);
      auto ref2 = make_layer(s, 51);
      layer2.backward(dx, x, dy, h, isa);
      ref2.backward(dx_ref, x, dy, h, mf::Isa::Scalar);
      for (mf::Index i = 0; i < dx.size(); ++i)
        ASSERT_NEAR(dx.data()[i], dx_ref.data()[i], 1e-4 * std::max(1.0f, std::abs(dx_ref.data()[i]))) << where << " dx " << i;
    }
  }
}

TEST(LookupIsa, BackwardStoresFreshRowsAndAddsToTouchedOnes) {
  // The sorted backward stores the gradient of a row untouched since zero_grad() and adds to the others: with
  // non-temporal stores where every row slice starts a 64-byte line (widths 64 and 128 here), with ordinary and
  // masked stores elsewhere (widths 37 and 520: partial slices; 520 also whole slices of rows that are not
  // line-aligned). With a first call on x1 and a second on x2, a row of both must hold exactly float(g1 + g2), g1
  // and g2 its gradients from each call alone (the same sums in the same order); a row of one call only, that
  // call's gradient; after zero_grad(), the second call alone again.
  const auto paths = simd_paths();
  if (paths.empty()) GTEST_SKIP() << "no SIMD path in this build";
  for (const Shape s : {Shape{64, 64, 8, 300, false}, Shape{48, 128, 6, 90, true}, Shape{40, 37, 10, 600, true},
                        Shape{32, 520, 8, 80, true}}) {
    const auto [x1, x2, dy1, dy2] = two_calls(s, 7, 21);
    for (mf::Isa isa : paths) {
      const std::string where = std::string(mf::isa_name(isa)) + " " + name(s);
      auto layer = make_layer(s, 91);
      const auto [h1, h2] = hash_both(layer, x1, x2, isa);
      mf::Matrix<float> ds1 = mf::Matrix<float>::Zero(x1.rows(), h1.tables);
      mf::Matrix<float> ds2 = mf::Matrix<float>::Zero(x2.rows(), h2.tables);
      layer.backward_hashed(ds1, dy1, h1, isa);
      const mf::Matrix<float> alone1 = layer.dtables().as_matrix();
      const std::vector<std::uint8_t> flags1 = layer.touched_rows();
      layer.zero_grad();
      ASSERT_TRUE(layer.dtables().as_matrix().isZero(0)) << where;
      layer.backward_hashed(ds2, dy2, h2, isa);
      const mf::Matrix<float> alone2 = layer.dtables().as_matrix();
      const std::vector<std::uint8_t> flags2 = layer.touched_rows();
      layer.zero_grad();
      layer.backward_hashed(ds1, dy1, h1, isa);
      layer.backward_hashed(ds2, dy2, h2, isa);
      const mf::Matrix<float> both = layer.dtables().as_matrix();
      mf::Index shared = 0, fresh_in_second = 0;
      for (mf::Index row = 0; row < both.rows(); ++row) {
        const bool in1 = flags1[size_t(row)] != 0, in2 = flags2[size_t(row)] != 0;
        shared += in1 && in2;
        fresh_in_second += in2 && !in1;
        ASSERT_EQ(layer.touched_rows()[size_t(row)], (in1 || in2) ? 1 : 0) << where << " flag of row " << row;
        for (mf::Index o = 0; o < s.d_out; ++o) {
          const float expected = in1 && in2 ? alone1(row, o) + alone2(row, o) : (in1 ? alone1(row, o) : alone2(row, o));
          ASSERT_EQ(std::bit_cast<std::uint32_t>(both(row, o)), std::bit_cast<std::uint32_t>(expected))
              << where << " dT(row " << row << ", " << o << ")";
        }
      }
      ASSERT_GT(shared, 0) << where;  // both kinds of row occur in the second call
      ASSERT_GT(fresh_in_second, 0) << where;
      layer.zero_grad();
      layer.backward_hashed(ds2, dy2, h2, isa);
      ASSERT_TRUE(layer.dtables().as_matrix() == alone2) << where << " after zero_grad";
    }
  }
}

TEST(LookupIsa, SortListsEveryUsedRowOnceInIncreasingOrder) {
  // The sort lists the used rows table by table (each table in its own stretch, closed up at the end): the list must
  // be exactly the rows with entries, in increasing order, and every row's entries its tokens in increasing order.
  // Fewer tokens than rows per table (stretches of N), more (stretches of 2^τ), tables with unused rows, and a token
  // count of zero; 1, 2 and 3 threads.
  struct SortShape {
    mf::Index n, tables;
    int tau;
  };
  for (const SortShape s : {SortShape{0, 3, 4}, SortShape{1, 1, 1}, SortShape{5, 40, 8}, SortShape{300, 33, 4},
                            SortShape{700, 17, 10}, SortShape{64, 20, 6}}) {
    const mf::Index R = mf::Index(1) << s.tau, total_rows = s.tables * R, entries = s.n * s.tables;
    std::vector<std::int32_t> codes(static_cast<size_t>(entries));
    std::vector<float> scores(static_cast<size_t>(entries));
    mf::Rng rng(91);
    // Codes bunched into a quarter of each table's rows (odd tables only), so tables also leave rows unused when
    // N > 2^τ.
    for (mf::Index i = 0; i < entries; ++i) {
      const mf::Index k = i % s.tables;
      const mf::Index range = k % 2 == 1 ? std::max<mf::Index>(R / 4, 1) : R;
      codes[size_t(i)] = std::int32_t(rng.uniform_index(std::uint64_t(range)));
      scores[size_t(i)] = float(i);
    }
    std::vector<std::int32_t> expected_used;
    std::vector<std::vector<std::int32_t>> tokens(static_cast<size_t>(total_rows));
    for (mf::Index n = 0; n < s.n; ++n)
      for (mf::Index k = 0; k < s.tables; ++k)
        tokens[size_t(k * R + codes[size_t(n * s.tables + k)])].push_back(std::int32_t(n));
    for (mf::Index r = 0; r < total_rows; ++r)
      if (!tokens[size_t(r)].empty()) expected_used.push_back(std::int32_t(r));
    mf::testing_support::ThreadSetting setting;
    for (int threads : {1, 2, 3}) {
      setting.set(threads);
      mf::detail::SortedContributionsBuffer sort;
      sort.sort(codes.data(), scores.data(), s.n, s.tables, s.tau);
      const auto& sc = sort.sorted;
      const std::string where = "N " + std::to_string(s.n) + " K " + std::to_string(s.tables) + " tau " +
                                std::to_string(s.tau) + ", " + std::to_string(threads) + " threads";
      ASSERT_EQ(sc.used_count, mf::Index(expected_used.size())) << where;
      EXPECT_TRUE(std::equal(expected_used.begin(), expected_used.end(), sc.used)) << where;
      for (mf::Index r = 0; r < total_rows; ++r) {
        const std::vector<std::int32_t> got(sc.token + sc.start[r], sc.token + sc.start[r + 1]);
        ASSERT_EQ(got, tokens[size_t(r)]) << where << " row " << r;
        for (std::int32_t e = sc.start[r]; e < sc.start[r + 1]; ++e)
          ASSERT_EQ(sc.score[e], float(sc.token[e] * s.tables + r / R)) << where << " row " << r;
      }
    }
  }
}

TEST(LookupIsa, BackwardListsTheRowsItWritesOnceInTheKernelsOrder) {
  // A backward lists each row it writes that no earlier backward since zero_grad() wrote, once: the sorting kernels
  // in increasing row order (from their sort, also a sort shared by several layers), the reference kernel in the
  // order the rows first appear among the (token, table) pairs. Two calls on overlapping codes, then zero_grad().
  std::vector<mf::Isa> paths = simd_paths();
  paths.push_back(mf::Isa::Scalar);
  for (const Shape s : {Shape{64, 64, 8, 300, false}, Shape{40, 37, 10, 600, true}, Shape{12, 19, 4, 70, false}}) {
    const auto [x1, x2, dy1, dy2] = two_calls(s, 5, 31);
    for (mf::Isa isa : paths) {
      const std::string where = std::string(mf::isa_name(isa)) + " " + name(s);
      auto layer = make_layer(s, 95);
      const auto [h1, h2] = hash_both(layer, x1, x2, isa);
      const bool sorted = mf::detail::lookup_backward_sorts<float>(isa, h1.rows, h1.tables, s.tau);
      const mf::Index R = mf::Index(1) << s.tau;
      std::vector<std::uint8_t> seen(size_t(h1.tables * R), 0);
      std::vector<mf::Index> expected;
      const auto expect_new = [&](const mf::HashResult<float>& h) {
        std::vector<mf::Index> fresh;
        for (mf::Index n = 0; n < h.rows; ++n)
          for (mf::Index k = 0; k < h.tables; ++k) {
            const mf::Index row = k * R + h.code(n, k);
            if (seen[size_t(row)] == 0) fresh.push_back(row);
            seen[size_t(row)] = 1;
          }
        if (sorted) std::sort(fresh.begin(), fresh.end());
        expected.insert(expected.end(), fresh.begin(), fresh.end());
      };
      mf::Matrix<float> ds1 = mf::Matrix<float>::Zero(x1.rows(), h1.tables);
      mf::Matrix<float> ds2 = mf::Matrix<float>::Zero(x2.rows(), h2.tables);
      layer.backward_hashed(ds1, dy1, h1, isa);
      expect_new(h1);
      ASSERT_EQ(layer.touched_list(), expected) << where << ", first call";
      const size_t after_first = expected.size();
      layer.backward_hashed(ds2, dy2, h2, isa);
      expect_new(h2);
      ASSERT_GT(expected.size(), after_first) << where << ": the second call must find new rows";
      ASSERT_EQ(layer.touched_list(), expected) << where << ", second call";
      for (size_t row = 0; row < seen.size(); ++row)
        ASSERT_EQ(layer.touched_rows()[row], seen[row]) << where << " flag of row " << row;
      layer.zero_grad();
      EXPECT_TRUE(layer.touched_list().empty()) << where;
      if (!sorted) continue;
      // The kernel over a shared sort lists what the one that sorts for itself lists.
      const mf::Index rows = h1.tables * R;
      std::vector<float> dt_own(size_t(rows * s.d_out), 0.0f), dt_shared(dt_own);
      std::vector<std::uint8_t> flags_own(size_t(rows), 0), flags_shared(flags_own);
      std::vector<mf::Index> listed_own, listed_shared;
      listed_own.reserve(size_t(rows));
      listed_shared.reserve(size_t(rows));
      mf::Matrix<float> ds_own = mf::Matrix<float>::Zero(s.n, h1.tables), ds_shared = ds_own;
      mf::detail::SortedContributionsBuffer sort;
      sort.sort(h1.codes.data(), h1.scores.data(), h1.rows, h1.tables, s.tau);
      mf::detail::lookup_backward(isa, ds_own.data(), ds_own.outerStride(), dy1.data(), dy1.outerStride(),
                                  layer.tables().data(), dt_own.data(), flags_own.data(), s.tau, s.d_out, h1.tables,
                                  h1.codes.data(), h1.scores.data(), h1.rows, nullptr, &listed_own);
      mf::detail::lookup_backward(isa, ds_shared.data(), ds_shared.outerStride(), dy1.data(), dy1.outerStride(),
                                  layer.tables().data(), dt_shared.data(), flags_shared.data(), s.tau, s.d_out,
                                  h1.tables, h1.codes.data(), h1.scores.data(), h1.rows, &sort.sorted, &listed_shared);
      EXPECT_EQ(listed_own, std::vector<mf::Index>(expected.begin(), expected.begin() + long(after_first))) << where;
      EXPECT_EQ(listed_shared, listed_own) << where;
      EXPECT_TRUE(flags_shared == flags_own) << where;
      // Listed rows are flagged fresh before the kernel writes them (so it stores rather than adds), flagged rows are
      // not listed again.
      std::vector<std::uint8_t> flags(size_t(rows), 0);
      flags[size_t(listed_own.front())] = 1;
      std::vector<mf::Index> listed;
      listed.reserve(size_t(rows));
      mf::detail::list_new_rows(listed, flags.data(), sort.sorted);
      EXPECT_EQ(listed, std::vector<mf::Index>(listed_own.begin() + 1, listed_own.end())) << where;
      for (const mf::Index row : listed) ASSERT_EQ(flags[size_t(row)], mf::detail::fresh_row) << where << " row " << row;
      EXPECT_EQ(flags[size_t(listed_own.front())], 1) << where;
    }
  }
}

TEST(LookupIsa, BackwardOverASharedSortGivesTheSameBits) {
  // Layers that read one hash (a block's Q, K and V) share one sort of its pairs: the kernel over that sort must
  // give the bits of the kernel that sorts for itself, also when the sort is read a second time.
  const auto paths = simd_paths();
  if (paths.empty()) GTEST_SKIP() << "no SIMD path in this build";
  for (const Shape& s : shapes) {
    const mf::Matrix<float> x = float_matrix(s.n, s.d_in, 31), dy = float_matrix(s.n, s.d_out, 32);
    for (mf::Isa isa : paths) {
      const std::string where = std::string(mf::isa_name(isa)) + " " + name(s);
      auto layer = make_layer(s, 71);
      mf::HashResult<float> h;
      mf::Matrix<float> y(s.n, s.d_out);
      layer.forward(y, x, h, isa);
      if (!mf::detail::lookup_backward_sorts<float>(isa, h.rows, h.tables, s.tau)) continue;
      const mf::Index rows = h.tables * (mf::Index(1) << s.tau), width = s.d_out;
      std::vector<float> dt_own(size_t(rows * width), 0.0f), dt_shared(dt_own);
      std::vector<std::uint8_t> flags_own(size_t(rows), 0), flags_shared(flags_own);
      mf::Matrix<float> ds_own = mf::Matrix<float>::Zero(s.n, h.tables), ds_shared = ds_own;
      mf::detail::SortedContributionsBuffer sort;
      sort.sort(h.codes.data(), h.scores.data(), h.rows, h.tables, s.tau);
      for (int call = 0; call < 2; ++call) {
        mf::detail::lookup_backward(isa, ds_own.data(), ds_own.outerStride(), dy.data(), dy.outerStride(),
                                    layer.tables().data(), dt_own.data(), flags_own.data(), s.tau, width, h.tables,
                                    h.codes.data(), h.scores.data(), h.rows);
        mf::detail::lookup_backward(isa, ds_shared.data(), ds_shared.outerStride(), dy.data(), dy.outerStride(),
                                    layer.tables().data(), dt_shared.data(), flags_shared.data(), s.tau, width,
                                    h.tables, h.codes.data(), h.scores.data(), h.rows, &sort.sorted);
        ASSERT_TRUE(dt_own == dt_shared) << where << " call " << call;
        ASSERT_TRUE(flags_own == flags_shared) << where << " call " << call;
        ASSERT_TRUE(ds_own == ds_shared) << where << " call " << call;
      }
    }
  }
}

TEST(LookupIsa, BackwardRowAndColumnSliceOrdersGiveTheSameBits) {
  // The sorted backward runs over column slices or, for tables with few tokens per row (ML2's), over whole rows:
  // both must give the same bits, over two calls (rows first stored while fresh, then added to), with table
  // gradients whose rows start 64-byte lines (non-temporal stores of fresh rows) and ones that do not, and with a
  // dy whose rows are longer than the width.
  const auto paths = simd_paths();
  if (paths.empty()) GTEST_SKIP() << "no SIMD path in this build";
  using mf::detail::GradientOrder;
  for (const Shape s : {Shape{40, 64, 10, 600, true}, Shape{64, 128, 8, 300, true}, Shape{64, 256, 8, 2000, true},
                        Shape{48, 64, 6, 7, true}, Shape{24, 192, 12, 1, true}}) {
    const mf::Matrix<float> x = float_matrix(s.n, s.d_in, 41), dy_wide = float_matrix(s.n, s.d_out + 5, 42);
    const auto dy = dy_wide.leftCols(s.d_out);
    for (mf::Isa isa : paths) {
      auto layer = make_layer(s, 61);
      mf::HashResult<float> h;
      mf::Matrix<float> y(s.n, s.d_out);
      layer.forward(y, x, h, isa);
      ASSERT_TRUE(mf::detail::lookup_backward_sorts<float>(isa, h.rows, h.tables, s.tau));
      const mf::Index rows = h.tables * (mf::Index(1) << s.tau), width = s.d_out;
      for (const mf::Index offset : {mf::Index(0), mf::Index(1)}) {  // in floats from a 64-byte boundary
        const std::string where = std::string(mf::isa_name(isa)) + " " + name(s) + " offset " + std::to_string(offset);
        std::vector<std::vector<float>> dt;
        std::vector<std::vector<std::uint8_t>> flags;
        std::vector<mf::Matrix<float>> ds;
        for (const GradientOrder order : {GradientOrder::column_slices, GradientOrder::rows}) {
          mf::detail::TableBlock block(size_t(rows * width + offset) * sizeof(float));
          float* dtables = reinterpret_cast<float*>(block.data()) + offset;
          std::vector<std::uint8_t> touched(size_t(rows), 0);
          mf::Matrix<float> dscores = mf::Matrix<float>::Constant(s.n, h.tables, 0.25f);
          for (int call = 0; call < 2; ++call) {
            for (mf::Index n = 0; n < s.n; ++n)  // as MemoryLayer does: rows not written yet are fresh
              for (mf::Index k = 0; k < h.tables; ++k) {
                auto& flag = touched[size_t(k * (mf::Index(1) << s.tau) + h.code(n, k))];
                if (flag == 0) flag = mf::detail::fresh_row;
              }
            mf::detail::lookup_backward(isa, dscores.data(), dscores.outerStride(), dy.data(), dy.outerStride(),
                                        layer.tables().data(), dtables, touched.data(), s.tau, width, h.tables,
                                        h.codes.data(), h.scores.data(), h.rows, nullptr, nullptr, order);
          }
          dt.emplace_back(dtables, dtables + rows * width);
          flags.push_back(touched);
          ds.push_back(dscores);
        }
        ASSERT_TRUE(dt[0] == dt[1]) << where;
        ASSERT_TRUE(flags[0] == flags[1]) << where;
        ASSERT_TRUE(ds[0] == ds[1]) << where;
        ASSERT_TRUE(std::any_of(dt[0].begin(), dt[0].end(), [](float v) { return v != 0.0f; })) << where;
      }
    }
  }
}

#if defined(MEMORYFORMER_HAVE_SIMD_KERNELS)
/// What a thread does when it takes over rows another thread began: the first `done` column slices of every used row
/// by the column-slice kernel (dy's slice packed), the rest by the row kernel from slice `done` on. dtables, dot and
/// the fresh rows' stores must have the same bits as the column-slice kernel over all slices.
template <mf::Isa I>
void expect_slices_finished_row_by_row_give_the_same_bits(const std::string& where) {
  namespace d = mf::detail;
  constexpr mf::Index slice = d::SliceTraits<I>::vectors * d::Lanes<I>::n;
  for (const Shape s : {Shape{64, 4 * slice, 8, 700, true}, Shape{40, 2 * slice, 10, 300, true}}) {
    auto layer = make_layer(s, 91);
    const mf::Matrix<float> x = float_matrix(s.n, s.d_in, 92), dy = float_matrix(s.n, s.d_out, 93);
    mf::HashResult<float> h;
    mf::Matrix<float> y(s.n, s.d_out);
    layer.forward(y, x, h);
    const mf::Index rows = h.tables * (mf::Index(1) << s.tau), width = s.d_out, slices = width / slice;
    d::SortedContributionsBuffer sorted;
    sorted.sort(h.codes.data(), h.scores.data(), h.rows, h.tables, s.tau);
    const mf::Index used = sorted.sorted.used_count;
    // dT starts with some rows written (added to) and the rest fresh (stored).
    std::vector<float> dt_start(size_t(rows * width), 0.0f);
    std::vector<std::uint8_t> touched_start(size_t(rows), d::fresh_row);
    for (mf::Index r = 0; r < rows; r += 3) {
      touched_start[size_t(r)] = 1;
      for (mf::Index c = 0; c < width; ++c) dt_start[size_t(r * width + c)] = 0.01f * float(c - r % 7);
    }
    std::vector<float> dyp(size_t(s.n * slice));
    d::TableBlock pending(size_t(d::gradient_rows_scratch_floats<I>(width)) * sizeof(float));  // 64-byte aligned
    const auto run = [&](mf::Index done, std::vector<float>& dt, std::vector<float>& dot) {
      d::TableBlock block(size_t(rows * width) * sizeof(float));  // 64-byte aligned: fresh rows streamed
      float* dtables = reinterpret_cast<float*>(block.data());
      std::copy(dt_start.begin(), dt_start.end(), dtables);
      std::vector<std::uint8_t> touched = touched_start;
      dot.assign(size_t(s.n * h.tables), 0.0f);
      d::SortedContributions sc = sorted.sorted;
      sc.dot = dot.data();
      for (mf::Index sl = 0; sl < done; ++sl) {
        for (mf::Index n = 0; n < s.n; ++n)
          std::copy(dy.row(n).data() + sl * slice, dy.row(n).data() + (sl + 1) * slice, dyp.data() + n * slice);
        // Two ranges, as two chunks of a thread's share: the first requests rows of the second ahead.
        d::gradient_slice<I>(dtables, layer.tables().data(), touched.data(), true, width, sl * slice, slice,
                             dyp.data(), sc, 0, used / 2, used);
        d::gradient_slice<I>(dtables, layer.tables().data(), touched.data(), true, width, sl * slice, slice,
                             dyp.data(), sc, used / 2, used, used);
      }
      if (done < slices)
        d::gradient_rows<I>(dtables, layer.tables().data(), touched.data(), true, width, dy.data(), dy.outerStride(),
                            sc, 0, used, reinterpret_cast<float*>(pending.data()), done);
      d::store_fence_if_streamed();
      dt.assign(dtables, dtables + rows * width);
    };
    std::vector<float> dt_slices, dot_slices;
    run(slices, dt_slices, dot_slices);
    ASSERT_TRUE(std::any_of(dot_slices.begin(), dot_slices.end(), [](float v) { return v != 0.0f; }));
    for (mf::Index done = 0; done < slices; ++done) {
      std::vector<float> dt, dot;
      run(done, dt, dot);
      EXPECT_TRUE(dt == dt_slices) << where << " " << name(s) << ", rows from slice " << done;
      EXPECT_TRUE(dot == dot_slices) << where << " " << name(s) << ", rows from slice " << done;
    }
  }
}
#endif

TEST(LookupIsa, BackwardSlicesFinishedRowByRowGiveTheSameBits) {
  const auto paths = simd_paths();
  if (paths.empty()) GTEST_SKIP() << "no SIMD path in this build";
#if defined(MEMORYFORMER_HAVE_SIMD_KERNELS)
  for (mf::Isa isa : paths) {
#if defined(MEMORYFORMER_HAVE_AVX512)
    if (isa == mf::Isa::Avx512) expect_slices_finished_row_by_row_give_the_same_bits<mf::Isa::Avx512>("avx512");
#endif
#if defined(MEMORYFORMER_HAVE_AVX2)
    if (isa == mf::Isa::Avx2) expect_slices_finished_row_by_row_give_the_same_bits<mf::Isa::Avx2>("avx2");
#endif
  }
#endif
}

#if defined(MEMORYFORMER_USE_OPENMP)
TEST(LookupIsa, BackwardThreadsTakingEachOthersRowsGiveTheSameBits) {
  // The threads run their own shares of the used rows, then take the rows of a slower thread's share that it has not
  // started (in the column-slice order, from the slice it reached): which thread does which rows changes from run to
  // run, most of all with more threads than cores, and must not change the bits. Whole column slices (width 256),
  // the column-slice order (τ = 8, 2,000 tokens) and the row order (τ = 10).
  const auto paths = simd_paths();
  if (paths.empty()) GTEST_SKIP() << "no SIMD path in this build";
  for (const Shape s : {Shape{64, 256, 8, 2000, true}, Shape{80, 256, 10, 1500, true}}) {
    const mf::Matrix<float> x = float_matrix(s.n, s.d_in, 94), dy = float_matrix(s.n, s.d_out, 95);
    for (mf::Isa isa : paths) {
      std::vector<mf::Matrix<float>> dts, dss;
      const int saved = omp_get_max_threads();
      for (int threads : {1, 2, 3, 4, 5, 2, 3, 4, 5}) {
        omp_set_num_threads(threads);
        auto layer = make_layer(s, 96);
        mf::HashResult<float> h;
        mf::Matrix<float> y(s.n, s.d_out);
        layer.forward(y, x, h, isa);
        mf::Matrix<float> ds = mf::Matrix<float>::Zero(s.n, h.tables);
        layer.backward_hashed(ds, dy, h, isa);  // fresh rows
        layer.backward_hashed(ds, dy, h, isa);  // rows added to
        dts.push_back(layer.dtables().as_matrix());
        dss.push_back(ds);
      }
      omp_set_num_threads(saved);
      for (size_t i = 1; i < dts.size(); ++i) {
        EXPECT_TRUE(dts[i] == dts[0]) << mf::isa_name(isa) << " " << name(s) << ", run " << i;
        EXPECT_TRUE(dss[i] == dss[0]) << mf::isa_name(isa) << " " << name(s) << ", run " << i;
      }
    }
  }
}
#endif

TEST(LookupIsa, BackwardRejectsNonFiniteGradient) {
  const Shape s{64, 64, 8, 40, true};
  for (mf::Isa isa : simd_paths()) {
    auto layer = make_layer(s, 61);
    const mf::Matrix<float> x = float_matrix(s.n, s.d_in, 14);
    mf::Matrix<float> dy = float_matrix(s.n, s.d_out, 15);
    mf::HashResult<float> h;
    mf::Matrix<float> y(s.n, s.d_out), dx(s.n, s.d_in);
    layer.forward(y, x, h, isa);
    dy(3, 5) = std::numeric_limits<float>::infinity();
    EXPECT_THROW(layer.backward(dx, x, dy, h, isa), mf::NonFiniteError);
    dy(3, 5) = std::numeric_limits<float>::quiet_NaN();
    EXPECT_THROW(layer.backward(dx, x, dy, h, isa), mf::NonFiniteError);
    // Finite values whose column sum overflows are not an error.
    dy.setZero();
    dy(0, 1) = 3e38f;
    dy(1, 1) = 3e38f;
    EXPECT_NO_THROW(layer.backward(dx, x, dy, h, isa));
  }
}

TEST(LookupIsa, FrozenLayerChecksItsInputs) {
  const Shape s{64, 64, 8, 4, true};
  const auto layer = make_layer(s, 71);
  const mf::FrozenMemoryLayer frozen(layer, mf::StorageType::BF16);
  mf::HashResult<float> cache;
  mf::Matrix<float> y(4, 64);
  EXPECT_THROW(frozen.forward(y, float_matrix(4, 63, 1), cache), mf::ShapeError);
  EXPECT_THROW(frozen.forward_hashed(y, mf::HashResult<float>{}), mf::StateError);
  mf::Matrix<float> wrong(3, 64);
  EXPECT_THROW(frozen.forward(wrong, float_matrix(4, 64, 1), cache), mf::ShapeError);
  if (!mf::isa_available(mf::Isa::Avx512)) {
    EXPECT_THROW(frozen.forward(y, float_matrix(4, 64, 1), cache, mf::Isa::Avx512), mf::ConfigError);
  }
  // float16 storage refuses values it cannot hold.
  auto big = make_layer(s, 72);
  big.tables().row(0, 0)[0] = 1e5f;
  EXPECT_THROW(mf::FrozenMemoryLayer(big, mf::StorageType::F16), mf::ConfigError);
  EXPECT_NO_THROW(mf::FrozenMemoryLayer(big, mf::StorageType::BF16));
  EXPECT_THROW(mf::PackedTables(layer.tables(), mf::StorageType::BF16, mf::TableLayout::Panels, 16), mf::ConfigError);
}

#if defined(MEMORYFORMER_USE_OPENMP)
TEST(LookupIsa, ThreadCountDoesNotChangeBits) {
  // 800 tokens: prefill path for forward (≥ 3·2^τ tokens), almost every table row used by the backward;
  // 400 tokens: table order (threads split the tokens), 520 columns: a partial last vector;
  // 5 tokens: decode path, at most 40 of the 2048 rows used, split between the threads;
  // d_in = 520: 65 tables, whose backward sort the threads take in 9 groups of 8 tables.
  for (const Shape s : {Shape{64, 520, 8, 800, true}, Shape{64, 520, 8, 400, true}, Shape{64, 520, 8, 5, true},
                        Shape{520, 64, 8, 800, true}}) {
    const mf::Matrix<float> x = float_matrix(s.n, s.d_in, 16);
    const mf::Matrix<float> dy = float_matrix(s.n, s.d_out, 17);
    std::vector<mf::Matrix<float>> ys, dts, dss, packed_ys;
    std::vector<mf::Vector<float>> dbs;  // dbias: column sums split by column blocks over the threads
    const int saved = omp_get_max_threads();
    for (int threads : {1, 2, 3}) {
      omp_set_num_threads(threads);
      auto layer = make_layer(s, 81);
      mf::HashResult<float> h;
      mf::Matrix<float> y(s.n, s.d_out), dx(s.n, s.d_in);
      layer.forward(y, x, h);
      mf::Matrix<float> ds = mf::Matrix<float>::Zero(s.n, h.tables);
      layer.backward_hashed(ds, dy, h);
      ys.push_back(y);
      dss.push_back(ds);
      dts.push_back(layer.dtables().as_matrix());
      dbs.push_back(layer.dbias());
      // Packed panels, float32 then bfloat16 (the threads claim the column blocks one at a time: 17 at d_out = 520).
      for (const auto storage : {mf::StorageType::F32, mf::StorageType::BF16}) {
        mf::FrozenMemoryLayer(layer, storage).forward_hashed(y, h);
        packed_ys.push_back(y);
      }
    }
    omp_set_num_threads(saved);
    for (size_t i = 1; i < ys.size(); ++i) {
      EXPECT_TRUE(ys[i] == ys[0]) << "forward, thread setting " << i;
      EXPECT_TRUE(dss[i] == dss[0]) << "dscores, thread setting " << i;
      EXPECT_TRUE(dts[i] == dts[0]) << "dtables, thread setting " << i;
      EXPECT_TRUE(dbs[i] == dbs[0]) << "dbias, thread setting " << i;
      EXPECT_TRUE(packed_ys[2 * i] == packed_ys[0]) << "float32 panels, thread setting " << i;
      EXPECT_TRUE(packed_ys[2 * i + 1] == packed_ys[1]) << "bfloat16 panels, thread setting " << i;
    }
  }
}
#endif

}  // namespace
