// SPDX-License-Identifier: MIT
// Tests of nn/kv_cache.hpp: layout of appended rows, length bookkeeping, overflow and shape errors.
#include <memoryformer/nn/kv_cache.hpp>
#include <memoryformer/detail/half.hpp>

#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
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
  expect_throw_with([] { mf::KVCache<float>(1, 2, 4, static_cast<mf::StorageType>(7)); },
                    "storage = 7 is not a StorageType");
  EXPECT_THROW(mf::KVCache<double>(1, 2, 4, static_cast<mf::StorageType>(-1)), mf::ConfigError);
}

TEST(NnKVCache, Bf16StorageRoundsOnAppendAndKeepsTheLayout) {
  mf::KVCache<float> kv(2, 4, 3, mf::StorageType::BF16);
  const mf::Matrix<float> k = tokens(2, 2, 3, 0, 0.0).cast<float>(), v = tokens(2, 2, 3, 0, 1000.0).cast<float>();
  kv.append(k, v);
  EXPECT_EQ(kv.length(), 2);
  EXPECT_EQ(kv.bytes_per_token(), 2 * 3 * sizeof(std::uint16_t));
  for (mf::Index b = 0; b < 2; ++b)
    for (mf::Index p = 0; p < 2; ++p)
      for (mf::Index c = 0; c < 3; ++c) {
        EXPECT_EQ(kv.keys_bf16(b)[p * 3 + c], mf::detail::float_to_bf16(k(b * 2 + p, c)));
        EXPECT_EQ(kv.values_bf16(b)[p * 3 + c], mf::detail::float_to_bf16(v(b * 2 + p, c)));
      }
  // 1000.01 is not a bfloat16: the stored value is the nearest one, 1000.
  EXPECT_EQ(mf::detail::bf16_to_float(kv.values_bf16(0)[1]), 1000.0f);
  expect_throw_with([&] { (void)kv.keys(0); }, "KVCache::keys: the cache stores bf16");
  EXPECT_THROW((void)kv.values(0), mf::StateError);
  EXPECT_THROW((void)kv.keys_bf16(2), std::out_of_range);
  mf::KVCache<float> f32(1, 2, 3);
  expect_throw_with([&] { (void)f32.keys_bf16(0); }, "KVCache::keys_bf16: the cache stores fp32, not bf16");
  expect_throw_with([] { mf::KVCache<double>(1, 2, 3, mf::StorageType::BF16); }, "storage bf16 needs KVCache<float>");
  EXPECT_THROW(mf::KVCache<float>(1, 2, 3, mf::StorageType::F16), mf::ConfigError);
  EXPECT_THROW(mf::KVCache<float>(2, std::numeric_limits<mf::Index>::max() / 2, 3), mf::ConfigError);
}
