// SPDX-License-Identifier: MIT
// MemoryLayer<float>'s packed copy of its tables: kept only on request; forward over the copy gives the bits of the
// per-call packing path and of FrozenMemoryLayer (F32); incremental re-packing after table updates matches a fresh
// layer bit for bit; writable access releases the copy so that unreported writes can never be read from a stale
// copy.
#include <algorithm>
#include <cmath>
#include <limits>
#include <thread>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include <memoryformer/frozen_memory_layer.hpp>
#include <memoryformer/memory_layer.hpp>
#include <memoryformer/optim/adamw.hpp>
#include <memoryformer/optim/sgd.hpp>

#include "../support/test_helpers.hpp"

#if defined(MEMORYFORMER_USE_OPENMP)
#include <omp.h>
#endif

namespace mf = memoryformer;
using namespace memoryformer::testing_support;

namespace {

// d_out = 40 is not a multiple of the 32-column chunks, so the padded last column block is exercised.
mf::MemoryLayerConfig packed_layer_config() {
  mf::MemoryLayerConfig c;
  c.d_in = 32;
  c.d_out = 40;
  c.tau = 4;  // K = 8 tables of 16 rows; prefill over the copy from 32 tokens, per-call packing from 48
  c.table_init_std = 0.5;
  c.bias_init_std = 0.5;
  return c;
}

/// True when this build and CPU run the fast kernels, the only case in which a packed copy is kept.
bool fast_kernels() { return mf::detail::use_fast_kernels<float>(mf::best_isa()); }


/// forward_hashed on `layer` with an explicit ISA (default: best).
mf::Matrix<float> lookup(const mf::MemoryLayer<float>& layer, const mf::HashResult<float>& h,
                         mf::Isa isa = mf::best_isa()) {
  mf::Matrix<float> y(h.rows, layer.d_out());
  layer.forward_hashed(y, h, isa);
  return y;
}

/// The same layer without a packed copy: forward packs per call (the path before the copy existed).
mf::MemoryLayer<float> without_copy(const mf::MemoryLayer<float>& layer) {
  mf::MemoryLayer<float> copy = layer;
  (void)copy.tables();  // writable access releases the copy
  return copy;
}

/// One forward and backward of `layer` on random x [n, d_in] and dy [n, d_out]: its gradients accumulate.
void backward_on_random_batch(mf::MemoryLayer<float>& layer, mf::Index n, unsigned x_seed, unsigned dy_seed) {
  const mf::Matrix<float> x = random_matrix<float>(n, layer.d_in(), x_seed);
  const mf::Matrix<float> dy = random_matrix<float>(n, layer.d_out(), dy_seed);
  mf::HashResult<float> h;
  mf::Matrix<float> y = layer.forward(x, h), dx(n, layer.d_in());
  layer.backward(dx, x, dy, h);
}

/// A layer whose copy has been requested (tables_changed): current wherever a copy can be kept.
mf::MemoryLayer<float> packed_layer(std::uint64_t seed) {
  mf::MemoryLayer<float> layer(packed_layer_config(), seed);
  layer.tables_changed();
  EXPECT_EQ(layer.packed_tables_current(), fast_kernels());
  return layer;
}

TEST(MemoryLayerPacked, NewLayerKeepsNoCopyUntilAskedThenOneOfTheStatedSize) {
  mf::MemoryLayer<float> layer(packed_layer_config(), 3);
  EXPECT_FALSE(layer.packed_tables_current());
  EXPECT_EQ(layer.packed_table_bytes(), 0u);
  layer.tables_changed();
  if (!fast_kernels()) {
    EXPECT_FALSE(layer.packed_tables_current());
    EXPECT_EQ(layer.packed_table_bytes(), 0u);
    return;
  }
  EXPECT_TRUE(layer.packed_tables_current());
  // ⌈d_out/32⌉ · K · (2^τ·128 + 64) bytes.
  EXPECT_EQ(layer.packed_table_bytes(), size_t(2 * 8 * (16 * 128 + 64)));
  // The size of PackedTables' F32 panels (FrozenMemoryLayer's); their values are compared through forward below.
  const mf::PackedTables reference(std::as_const(layer).tables(), mf::StorageType::F32);
  EXPECT_EQ(reference.bytes(), layer.packed_table_bytes());
}

TEST(MemoryLayerPacked, DoubleLayersKeepNoCopy) {
  mf::MemoryLayer<double> layer(packed_layer_config(), 3);
  EXPECT_FALSE(layer.packed_tables_current());
  layer.tables_changed();
  const std::vector<mf::Index> rows = {0, 5};
  layer.table_rows_changed(rows);
  layer.touched_table_rows_changed();
  EXPECT_FALSE(layer.packed_tables_current());
  EXPECT_EQ(layer.packed_table_bytes(), 0u);
}

// The copy only moves time: every token count, both ISAs, equal bits with and without it and with FrozenMemoryLayer.
TEST(MemoryLayerPacked, ForwardBitsEqualThePerCallPackingPathAndFrozenF32) {
  const mf::MemoryLayer<float> layer = packed_layer(7);
  const mf::MemoryLayer<float> plain = without_copy(layer);
  const mf::FrozenMemoryLayer frozen(layer, mf::StorageType::F32);
  ASSERT_FALSE(plain.packed_tables_current());
  for (mf::Index n : {1, 5, 31, 32, 40, 47, 48, 64, 131}) {
    const mf::Matrix<float> x = random_matrix<float>(n, 32, 100 + unsigned(n));
    mf::HashResult<float> h;
    const mf::Matrix<float> y = layer.forward(x, h);
    EXPECT_TRUE(same_bits(y, plain.forward(x, h))) << "N = " << n;
    EXPECT_TRUE(same_bits(y, frozen.forward(x, h))) << "N = " << n;
    for (mf::Isa isa : {mf::Isa::Avx512, mf::Isa::Avx2}) {
      if (!mf::isa_available(isa)) continue;
      EXPECT_TRUE(same_bits(lookup(layer, h, isa), lookup(plain, h, isa))) << "N = " << n;
      EXPECT_TRUE(same_bits(lookup(layer, h, isa), y)) << "N = " << n;
    }
    // The reference kernel ignores the copy.
    EXPECT_TRUE(same_bits(lookup(layer, h, mf::Isa::Scalar), lookup(plain, h, mf::Isa::Scalar))) << "N = " << n;
  }
}

// Writable access without a report: the copy is released, so forward reads the new values.
TEST(MemoryLayerPacked, WritesThroughTheMutableAccessorAreNeverReadFromAStaleCopy) {
  mf::MemoryLayer<float> layer = packed_layer(11);
  const mf::Matrix<float> x = random_matrix<float>(64, 32, 5);
  mf::HashResult<float> h;
  const mf::Matrix<float> before = layer.forward(x, h);

  layer.tables().row(0, h.code(0, 0))[3] += 1.0f;  // token 0 reads this row
  EXPECT_FALSE(layer.packed_tables_current());
  EXPECT_EQ(layer.packed_table_bytes(), 0u);
  const mf::Matrix<float> after = layer.forward(x, h);
  EXPECT_NE(after(0, 3), before(0, 3));
  const mf::FrozenMemoryLayer frozen(layer, mf::StorageType::F32);
  EXPECT_TRUE(same_bits(after, frozen.forward(x, h)));

  // A reference kept from the accessor keeps writing into the tables the row-major path reads.
  mf::BucketTable<float>& tables = layer.tables();
  tables.row(1, h.code(0, 1))[0] -= 2.0f;
  const mf::FrozenMemoryLayer frozen2(layer, mf::StorageType::F32);
  EXPECT_TRUE(same_bits(layer.forward(x, h), frozen2.forward(x, h)));

  // Reporting the change makes the copy current again, with the new values.
  layer.tables_changed();
  EXPECT_EQ(layer.packed_tables_current(), fast_kernels());
  EXPECT_TRUE(same_bits(layer.forward(x, h), frozen2.forward(x, h)));
}

TEST(MemoryLayerPacked, ParameterViewsReleaseTheCopy) {
  mf::MemoryLayer<float> layer = packed_layer(13);
  const mf::Matrix<float> x = random_matrix<float>(64, 32, 6);
  mf::HashResult<float> h;
  (void)layer.forward(x, h);
  auto views = layer.parameters();
  EXPECT_FALSE(layer.packed_tables_current());
  std::fill(views[0].value.begin(), views[0].value.end(), 0.25f);
  const mf::Matrix<float> y = layer.forward(x, h);
  const mf::FrozenMemoryLayer frozen(layer, mf::StorageType::F32);
  EXPECT_TRUE(same_bits(y, frozen.forward(x, h)));
}

// A report on a released copy re-packs every row, whatever rows it names.
TEST(MemoryLayerPacked, PartialReportOnAReleasedCopyRepacksEverything) {
  mf::MemoryLayer<float> layer = packed_layer(17);
  const mf::Matrix<float> x = random_matrix<float>(64, 32, 7);
  mf::HashResult<float> h;
  (void)layer.forward(x, h);
  for (float& v : layer.tables().values()) v *= 0.5f;  // every row changes
  const std::vector<mf::Index> one_row = {3};
  layer.table_rows_changed(one_row);
  EXPECT_EQ(layer.packed_tables_current(), fast_kernels());
  const mf::FrozenMemoryLayer frozen(layer, mf::StorageType::F32);
  EXPECT_TRUE(same_bits(layer.forward(x, h), frozen.forward(x, h)));

  for (float& v : layer.tables().values()) v += 0.125f;
  layer.touched_table_rows_changed();  // no row touched: still a full re-pack of the released copy
  const mf::FrozenMemoryLayer frozen2(layer, mf::StorageType::F32);
  EXPECT_TRUE(same_bits(layer.forward(x, h), frozen2.forward(x, h)));
}

TEST(MemoryLayerPacked, RowIndicesOutsideTheTablesThrowBeforeAnythingChanges) {
  mf::MemoryLayer<float> layer = packed_layer(19);
  const bool current = layer.packed_tables_current();
  for (mf::Index bad : {mf::Index(-1), mf::Index(8 * 16), std::numeric_limits<mf::Index>::max()}) {
    const std::vector<mf::Index> rows = {0, bad};
    EXPECT_THROW(layer.table_rows_changed(rows), mf::ShapeError) << bad;
    EXPECT_EQ(layer.packed_tables_current(), current);
  }
}

// The training loop of the contract: views kept by the "optimiser", one full report, then per step either the
// touched rows (row-sparse update) or an explicit row list or everything (dense update). After every step the layer's
// forward equals, bit for bit, that of a new layer built with the same tables.
TEST(MemoryLayerPacked, IncrementalRepackAfterUpdatesMatchesAFreshLayer) {
  const mf::MemoryLayerConfig config = packed_layer_config();
  mf::MemoryLayer<float> layer(config, 23);
  auto views = layer.parameters();  // held for the whole loop, like an optimiser's
  layer.tables_changed();           // the promise: every later write is reported
  ASSERT_EQ(layer.packed_tables_current(), fast_kernels());
  const std::span<float> theta = views[0].value;
  const std::span<float> grad = views[0].grad;
  const mf::Index row_size = views[0].row_size;

  for (int step = 0; step < 6; ++step) {
    // Few tokens per backward, so that only some rows are touched and the incremental path matters.
    backward_on_random_batch(layer, step % 2 == 0 ? 6 : 64, 200 + unsigned(step), 300 + unsigned(step));

    const auto& touched = layer.touched_rows();
    std::vector<mf::Index> touched_list;
    for (size_t r = 0; r < touched.size(); ++r)
      if (touched[r] != 0) touched_list.push_back(mf::Index(r));
    if (step % 2 == 0) {
      ASSERT_LT(touched_list.size(), touched.size()) << "the step must leave some rows untouched";
    }

    if (step % 3 == 0) {  // row-sparse SGD: only touched rows move
      for (mf::Index r : touched_list)
        for (mf::Index i = r * row_size; i < (r + 1) * row_size; ++i) theta[size_t(i)] -= 0.1f * grad[size_t(i)];
      layer.touched_table_rows_changed();
    } else if (step % 3 == 1) {  // the same rows, named in a list (one twice)
      for (mf::Index r : touched_list)
        for (mf::Index i = r * row_size; i < (r + 1) * row_size; ++i) theta[size_t(i)] -= 0.1f * grad[size_t(i)];
      touched_list.push_back(touched_list.front());
      layer.table_rows_changed(touched_list);
    } else {  // dense decay: every row moves
      for (size_t i = 0; i < theta.size(); ++i) theta[i] = theta[i] * 0.99f - 0.1f * grad[i];
      layer.tables_changed();
    }
    layer.zero_grad();
    ASSERT_EQ(layer.packed_tables_current(), fast_kernels());

    mf::MemoryLayer<float> fresh(config, 999);  // other tables, then the updated ones copied in and reported
    std::copy(theta.begin(), theta.end(), fresh.tables().values().begin());
    fresh.bias() = layer.bias();
    fresh.tables_changed();
    for (mf::Index n : {mf::Index(8), mf::Index(40), mf::Index(96)}) {
      const mf::Matrix<float> probe = random_matrix<float>(n, 32, 400 + unsigned(step * 10 + int(n)));
      mf::HashResult<float> hp;
      const mf::Matrix<float> got = layer.forward(probe, hp);
      EXPECT_TRUE(same_bits(got, fresh.forward(probe, hp))) << "step " << step << ", N = " << n;
      EXPECT_TRUE(same_bits(got, without_copy(layer).forward(probe, hp))) << "step " << step << ", N = " << n;
    }
  }
}

/// Forward bits of `layer` over its copy against the per-call packing of its tables, for prefill sizes.
void expect_copy_current(const mf::MemoryLayer<float>& layer, unsigned seed, const std::string& where) {
  for (mf::Index n : {mf::Index(40), mf::Index(96)}) {
    const mf::Matrix<float> probe = random_matrix<float>(n, 32, seed + unsigned(n));
    mf::HashResult<float> h;
    const mf::Matrix<float> got = layer.forward(probe, h);
    EXPECT_TRUE(same_bits(got, without_copy(layer).forward(probe, h))) << where << ", N = " << n;
  }
}

TEST(MemoryLayerPacked, OptimisersKeepTheCopyCurrentThroughTheViewsAlone) {
  // The library's optimisers report every range they write (ParameterView::values_written), so after one
  // tables_changed() nothing else is reported: row-sparse and dense AdamW, fused and not, and SGD.
  for (int optimiser = 0; optimiser < 4; ++optimiser) {
    mf::MemoryLayer<float> layer(packed_layer_config(), 31);
    auto views = layer.parameters();
    mf::AdamWOptions options;
    options.sparse_update = optimiser == 0 ? mf::SparseUpdate::RowSparse : mf::SparseUpdate::Dense;
    mf::AdamW<float> adamw(views, options);
    mf::SGD<float> sgd(views, mf::SGDOptions{0.01});
    layer.tables_changed();
    for (int step = 0; step < 4; ++step) {
      backward_on_random_batch(layer, step % 2 == 0 ? 6 : 64, 500 + unsigned(step), 600 + unsigned(step));
      if (optimiser <= 1) {
        adamw.step_fused(0.05, 1.0);
      } else if (optimiser == 2) {
        adamw.step(0.05);
      } else {
        sgd.step(0.5);
      }
      layer.zero_grad();
      ASSERT_EQ(layer.packed_tables_current(), fast_kernels());
      expect_copy_current(layer, 700 + unsigned(step), "optimiser " + std::to_string(optimiser) + ", step " +
                                                           std::to_string(step));
    }
  }
}

TEST(MemoryLayerPacked, KeepTablesPackedRepacksOnlyAReleasedCopy) {
  mf::MemoryLayer<float> layer(packed_layer_config(), 43);
  auto views = layer.parameters();
  layer.keep_tables_packed();  // no copy yet: packs one, as tables_changed()
  EXPECT_EQ(layer.packed_tables_current(), fast_kernels());
  (void)layer.parameters();  // releases it
  EXPECT_FALSE(layer.packed_tables_current());
  for (float& t : views[0].value) t *= 1.5f;
  layer.keep_tables_packed();
  ASSERT_EQ(layer.packed_tables_current(), fast_kernels());
  expect_copy_current(layer, 850, "re-packed after release");
  if (fast_kernels()) {  // a current copy is left as it is: an unreported write stays unseen (the promise)
    for (float& t : views[0].value) t = -t;
    layer.keep_tables_packed();
    const mf::Matrix<float> probe = random_matrix<float>(96, 32, 860);
    mf::HashResult<float> h;
    EXPECT_FALSE(same_bits(layer.forward(probe, h), without_copy(layer).forward(probe, h)));
  }
}

TEST(MemoryLayerPacked, ReportedRangesCutInsideRowsAndColumnBlocksReachTheCopy) {
  // d_out = 40: a full 32-column block and a partial one; ranges start and end inside rows and blocks.
  mf::MemoryLayer<float> layer(packed_layer_config(), 37);
  auto views = layer.parameters();
  layer.tables_changed();
  const std::span<float> theta = views[0].value;
  ASSERT_NE(views[0].values_written, nullptr);
  const std::vector<std::pair<std::size_t, std::size_t>> ranges = {
      {0, 1}, {5, 37}, {39, 81}, {100, 100}, {117, 2000}, {2000, 2040}, {2047, theta.size()}};
  float value = 0.25f;
  for (const auto& [b, e] : ranges) {
    for (std::size_t i = b; i < e; ++i) theta[i] = (value += 0.125f);
    views[0].values_written(views[0].values_owner, b, e);
    mf::fence_values_written();
    expect_copy_current(layer, 800 + unsigned(b), "range [" + std::to_string(b) + ", " + std::to_string(e) + ")");
  }
  // A write that is not reported leaves the copy stale: the comparison above would catch a missed range.
  if (fast_kernels()) {
    for (float& t : theta) t = -t;
    const mf::Matrix<float> probe = random_matrix<float>(96, 32, 900);
    mf::HashResult<float> h;
    EXPECT_FALSE(same_bits(layer.forward(probe, h), without_copy(layer).forward(probe, h)));
  }
}

// An F32 copy is exact for any value: non-finite table values are packed, not rejected (PackedTables rejects them).
TEST(MemoryLayerPacked, NonFiniteTableValuesArePackedAsTheyAre) {
  mf::MemoryLayer<float> layer(packed_layer_config(), 29);
  const mf::Matrix<float> x = random_matrix<float>(64, 32, 8);
  mf::HashResult<float> h;
  (void)layer.forward(x, h);
  layer.tables().row(2, h.code(0, 2))[1] = std::numeric_limits<float>::quiet_NaN();
  layer.tables().row(3, h.code(1, 3))[2] = std::numeric_limits<float>::infinity();
  EXPECT_NO_THROW(layer.tables_changed());
  const mf::Matrix<float> y = layer.forward(x, h);
  EXPECT_TRUE(std::isnan(y(0, 1)));
  EXPECT_FALSE(std::isfinite(y(1, 2)));
  EXPECT_TRUE(same_bits(y, without_copy(layer).forward(x, h)));
}

// Copies carry their own copy: a change reported to one does not leak into the other.
TEST(MemoryLayerPacked, CopiesOfALayerStayIndependent) {
  mf::MemoryLayer<float> a = packed_layer(31);
  mf::MemoryLayer<float> b = a;
  EXPECT_EQ(b.packed_tables_current(), fast_kernels());
  const mf::Matrix<float> x = random_matrix<float>(64, 32, 9);
  mf::HashResult<float> h;
  const mf::Matrix<float> ya = a.forward(x, h);
  for (float& v : b.tables().values()) v = -v;
  b.tables_changed();
  EXPECT_TRUE(same_bits(a.forward(x, h), ya));
  EXPECT_TRUE(same_bits(b.forward(x, h), without_copy(b).forward(x, h)));
  EXPECT_FALSE(same_bits(b.forward(x, h), ya));
}

TEST(MemoryLayerPacked, ConstForwardOverTheCopyIsSafeFromSeveralThreads) {
  const mf::MemoryLayer<float> layer = packed_layer(37);
  const mf::Matrix<float> x1 = random_matrix<float>(64, 32, 1), x2 = random_matrix<float>(100, 32, 2);
  mf::HashResult<float> c1, c2;
  const mf::Matrix<float> serial1 = layer.forward(x1, c1), serial2 = layer.forward(x2, c2);
  mf::Matrix<float> par1, par2;
  std::thread t1([&] {
    mf::HashResult<float> c;
    for (int i = 0; i < 20; ++i) par1 = layer.forward(x1, c);
  });
  std::thread t2([&] {
    mf::HashResult<float> c;
    for (int i = 0; i < 20; ++i) par2 = layer.forward(x2, c);
  });
  t1.join();
  t2.join();
  EXPECT_TRUE(same_bits(par1, serial1));
  EXPECT_TRUE(same_bits(par2, serial2));
}

#if defined(MEMORYFORMER_USE_OPENMP)
// Packing splits the tables over threads and the prefill loop splits column blocks: neither may change a bit.
TEST(MemoryLayerPacked, ResultsAreBitwiseIdenticalForAnyThreadCount) {
  const mf::Matrix<float> x = random_matrix<float>(200, 32, 3), dy = random_matrix<float>(200, 40, 4);
  const int threads_before = omp_get_max_threads();
  auto run = [&](int threads) {
    omp_set_num_threads(threads);
    mf::MemoryLayer<float> layer(packed_layer_config(), 41);
    auto views = layer.parameters();
    layer.tables_changed();
    mf::HashResult<float> cache;
    mf::Matrix<float> y(200, 40), dx(200, 32);
    layer.forward(y, x, cache);
    layer.backward(dx, x, dy, cache);
    for (size_t i = 0; i < views[0].value.size(); ++i) views[0].value[i] -= 0.5f * views[0].grad[i];
    layer.touched_table_rows_changed();
    layer.forward(y, x, cache);
    return y;
  };
  const mf::Matrix<float> one = run(1), two = run(2);
  omp_set_num_threads(threads_before);
  EXPECT_TRUE(same_bits(one, two));
}

TEST(MemoryLayerPacked, DenseAdamWPiecesCuttingRowsKeepTheCopyCurrentOnAnyThreadCount) {
  // 49,152 table values: two pieces of the optimiser, the first ending inside a row; d_out = 48 has a whole
  // 16-column block after the 32-column one. Every thread count gives a current copy and the same values.
  mf::MemoryLayerConfig config = packed_layer_config();
  config.d_in = 96;
  config.tau = 6;
  config.d_out = 48;
  const int threads_before = omp_get_max_threads();
  std::vector<std::vector<float>> values;
  for (int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    mf::MemoryLayer<float> layer(config, 47);
    auto views = layer.parameters();
    ASSERT_GT(views[0].value.size(), std::size_t(1) << 15);
    mf::AdamW<float> adamw(views);  // SparseUpdate::Dense: element pieces
    layer.tables_changed();
    for (int step = 0; step < 3; ++step) {
      backward_on_random_batch(layer, 80, 870 + unsigned(step), 880 + unsigned(step));
      adamw.step_fused(0.05, 1.0);
      for (mf::Index n : {mf::Index(64), mf::Index(128)}) {
        const mf::Matrix<float> probe = random_matrix<float>(n, 96, 890 + unsigned(step));
        mf::HashResult<float> hp;
        EXPECT_TRUE(same_bits(layer.forward(probe, hp), without_copy(layer).forward(probe, hp)))
            << threads << " threads, step " << step << ", N = " << n;
      }
    }
    values.emplace_back(views[0].value.begin(), views[0].value.end());
  }
  omp_set_num_threads(threads_before);
  EXPECT_TRUE(values[0] == values[1] && values[0] == values[2]);
}
#endif

}  // namespace
