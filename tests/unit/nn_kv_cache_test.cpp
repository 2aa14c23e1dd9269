// SPDX-License-Identifier: MIT
// Tests of nn/kv_cache.hpp: layout of appended rows, length bookkeeping, overflow and shape errors.
#include <memoryformer/nn/kv_cache.hpp>

#include <gtest/gtest.h>

#include <stdexcept>
#include <string>

#include "../support/test_helpers.hpp"

namespace mf = memoryformer;
using namespace memoryformer::testing_support;

namespace {


// Row value encodes (sequence, position, column) so the layout can be read back.
mf::Matrix<double> tokens(mf::Index batch, mf::Index t, mf::Index d, mf::Index first_pos, double tag) {
  mf::Matrix<double> m(batch * t, d);
  for (mf::Index b = 0; b < batch; ++b)
    for (mf::Index i = 0; i < t; ++i)
      for (mf::Index c = 0; c < d; ++c) m(b * t + i, c) = tag + 100.0 * double(b) + double(first_pos + i) + 0.01 * double(c);
  return m;
}

}  // namespace

TEST(NnKVCache, AppendKeepsBatchMajorLayout) {
  mf::KVCache<double> kv(2, 5, 3);
  EXPECT_EQ(kv.batch(), 2);
  EXPECT_EQ(kv.max_seq(), 5);
  EXPECT_EQ(kv.d(), 3);
  EXPECT_EQ(kv.length(), 0);
  kv.append(tokens(2, 2, 3, 0, 0.0), tokens(2, 2, 3, 0, 1000.0));
  kv.append(tokens(2, 1, 3, 2, 0.0), tokens(2, 1, 3, 2, 1000.0));
  EXPECT_EQ(kv.length(), 3);
  for (mf::Index b = 0; b < 2; ++b) {
    ASSERT_EQ(kv.keys(b).rows(), 3);
    for (mf::Index p = 0; p < 3; ++p)
      for (mf::Index c = 0; c < 3; ++c) {
        EXPECT_DOUBLE_EQ(kv.keys(b)(p, c), 100.0 * double(b) + double(p) + 0.01 * double(c));
        EXPECT_DOUBLE_EQ(kv.values(b)(p, c), 1000.0 + 100.0 * double(b) + double(p) + 0.01 * double(c));
      }
  }
}

TEST(NnKVCache, TruncateAndClear) {
  mf::KVCache<float> kv(1, 4, 2);
  mf::Matrix<float> x = mf::Matrix<float>::Ones(3, 2);
  kv.append(x, x);
  kv.truncate(1);
  EXPECT_EQ(kv.length(), 1);
  EXPECT_THROW(kv.truncate(2), std::out_of_range);
  EXPECT_THROW(kv.truncate(-1), std::out_of_range);
  kv.append(x, x);
  EXPECT_EQ(kv.length(), 4);
  kv.clear();
  EXPECT_EQ(kv.length(), 0);
  EXPECT_EQ(kv.keys(0).rows(), 0);
  EXPECT_THROW(kv.keys(1), std::out_of_range);
}

TEST(NnKVCache, OverflowAndShapeErrors) {
  mf::KVCache<double> kv(2, 3, 4);
  const auto two_each = tokens(2, 2, 4, 0, 0.0);
  kv.append(two_each, two_each);
  expect_throw_with([&] { kv.append(two_each, two_each); }, "KVCache::append: appending 2 token(s) per sequence to 2 cached would make 4 > max_seq = 3");
  EXPECT_THROW(kv.append(two_each, two_each), std::length_error);
  EXPECT_EQ(kv.length(), 2);
  mf::Matrix<double> odd(3, 4), wide(2, 5), v_bad(4, 4);
  expect_throw_with([&] { kv.append(odd, odd); }, "KVCache::append: k_new is (3, 4), expected (batch·t, d) = (2·t, 4)");
  EXPECT_THROW(kv.append(odd, odd), mf::ShapeError);
  EXPECT_THROW(kv.append(wide, wide), mf::ShapeError);
  mf::Matrix<double> k2(2, 4);
  expect_throw_with([&] { kv.append(k2, v_bad); }, "v_new is (4, 4), expected (2, 4)");
  EXPECT_THROW(mf::KVCache<double>(0, 3, 4), mf::ConfigError);
  EXPECT_THROW(mf::KVCache<double>(1, 0, 4), mf::ConfigError);
  expect_throw_with([] { mf::KVCache<double>(1, 2, -4); }, "d = -4");
}
