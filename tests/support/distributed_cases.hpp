// SPDX-License-Identifier: MIT
// Test support: the distributed test cases, written once against Communicator so that the same checks run on ranks
// that are threads (tests/unit/distributed_test.cpp, every build) and on MPI processes (tests/mpi/, label mpi). Each
// case runs on every rank with that rank's communicator and records failures with GoogleTest's EXPECT macros.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <memoryformer/distributed/collectives.hpp>
#include <memoryformer/distributed/communicator.hpp>
#include <memoryformer/distributed/data_parallel.hpp>
#include <memoryformer/distributed/table_sharding.hpp>
#include <memoryformer/memory_block.hpp>
#include <memoryformer/memory_layer.hpp>
#include <memoryformer/model.hpp>
#include <memoryformer/random.hpp>
#include <memoryformer/train/trainer.hpp>

namespace memoryformer_test::distributed {

namespace mf = memoryformer;
using mf::Index;

/// Rows of rank r in the cases below: unequal on purpose (5, 7, 9, …).
inline Index rows_of(int rank) { return 5 + 2 * Index(rank); }
inline Index first_row_of(int rank) {
  Index first = 0;
  for (int q = 0; q < rank; ++q) first += rows_of(q);
  return first;
}

/// The same pseudo-random matrix on every rank.
inline mf::Matrix<float> global_matrix(Index rows, Index cols, std::uint64_t seed) {
  mf::Matrix<float> m(rows, cols);
  mf::Rng rng = mf::Rng::stream(seed, 0);
  rng.fill_normal(std::span<float>(m.data(), std::size_t(m.size())), 0.0, 1.0);
  return m;
}

/// max |a − b| / max(1, max |b|).
inline double relative_difference(std::span<const float> a, std::span<const float> b) {
  double diff = 0.0, scale = 1.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, double(std::abs(a[i] - b[i])));
    scale = std::max(scale, double(std::abs(b[i])));
  }
  return diff / scale;
}

/**
 * Compares a sharded object's parameter views with the whole object's: a sharded view against its rows of the whole
 * one (value exactly, gradient within `tolerance`), a replicated view's value exactly and its gradient summed over the
 * ranks within `tolerance`.
 */
inline void expect_parameters_match(mf::Communicator& comm, const std::vector<mf::ParameterView<float>>& whole,
                                    const std::vector<mf::ParameterView<float>>& sharded, double tolerance) {
  ASSERT_EQ(whole.size(), sharded.size());
  for (std::size_t i = 0; i < whole.size(); ++i) {
    const auto& w = whole[i];
    const auto& s = sharded[i];
    ASSERT_EQ(w.name, s.name);
    if (s.sharded) {
      const Index per_table = s.shape[1] * s.shape[2];
      const mf::TableRange own = mf::owned_tables(w.shape[0], comm.rank(), comm.size());
      ASSERT_EQ(Index(s.value.size()), own.size() * per_table) << s.name;
      const auto offset = std::size_t(own.begin * per_table);
      EXPECT_TRUE(std::equal(s.value.begin(), s.value.end(), w.value.begin() + std::ptrdiff_t(offset))) << s.name;
      EXPECT_LE(relative_difference(s.grad, w.grad.subspan(offset, s.grad.size())), tolerance) << s.name;
    } else {
      EXPECT_TRUE(std::equal(s.value.begin(), s.value.end(), w.value.begin())) << s.name;
      std::vector<float> sum(s.grad.begin(), s.grad.end());
      mf::all_reduce_sum(comm, std::span<float>(sum));
      EXPECT_LE(relative_difference(sum, w.grad), tolerance) << s.name;
    }
  }
}

/**
 * A table-parallel `part` equals the `whole` object (same config and seed) in forward and backward, each rank on its
 * own rows of one global input: outputs and input gradients within `tolerance`, parameters as
 * expect_parameters_match. Layer is MemoryLayer or MemoryBlock; Cache its forward cache.
 */
template <class Layer, class Cache>
void expect_sharded_matches_whole(mf::Communicator& comm, Layer& whole, Layer& part, Index d_in, Index d_out,
                                  std::uint64_t seed, float tolerance) {
  const Index total = first_row_of(comm.size()), n = rows_of(comm.rank()), first = first_row_of(comm.rank());
  const mf::Matrix<float> x = global_matrix(total, d_in, seed), dy = global_matrix(total, d_out, seed + 1);
  mf::Matrix<float> y(total, d_out), dx(total, d_in), y_part(n, d_out), dx_part(n, d_in);
  Cache c, c_part;
  whole.forward(y, x, c);
  part.forward(y_part, x.middleRows(first, n), c_part);
  EXPECT_LE((y_part - y.middleRows(first, n)).cwiseAbs().maxCoeff(), tolerance);
  whole.backward(dx, x, dy, c);
  part.backward(dx_part, x.middleRows(first, n), dy.middleRows(first, n), c_part);
  EXPECT_LE((dx_part - dx.middleRows(first, n)).cwiseAbs().maxCoeff(), tolerance);
  expect_parameters_match(comm, whole.parameters(), part.parameters(), double(tolerance));
}

/// A table-parallel Memory Layer equals the whole layer in forward and backward (each rank its own rows).
inline void memory_layer_matches(mf::Communicator& comm) {
  const mf::MemoryLayerConfig config{.d_in = 32, .d_out = 24, .tau = 4};
  mf::MemoryLayer<float> whole(config, 11);
  mf::MemoryLayer<float> part(config, 11, mf::TableSharding{&comm});
  expect_sharded_matches_whole<mf::MemoryLayer<float>, mf::HashResult<float>>(comm, whole, part, 32, 24, 1, 1e-5f);
  EXPECT_EQ(part.owned_tables().size(), mf::owned_tables(8, comm.rank(), comm.size()).size());
}

/// A table-parallel Memory Block equals the whole block in forward and backward.
inline void memory_block_matches(mf::Communicator& comm) {
  const mf::MemoryBlockConfig config{.d = 32, .tau = 4, .expand_bits = 2, .gelu = true};
  mf::MemoryBlock<float> whole(config, 5);
  mf::MemoryBlock<float> part(config, 5, mf::TableSharding{&comm});
  expect_sharded_matches_whole<mf::MemoryBlock<float>, mf::MemoryBlockCache<float>>(comm, whole, part, 32, 32, 3, 1e-4f);
}

/// A small byte-level MemoryFormer LM whose every Memory Layer has 8 tables (so 1, 2 or 3 ranks can share them).
inline mf::MemoryFormerLM<float>::Config small_lm() {
  mf::MemoryFormerLM<float>::Config c;
  c.vocab = 256;
  c.layers = 2;
  c.block.d = 32;
  c.block.heads = 2;
  c.block.tau = 4;
  c.block.expand_bits = 2;
  return c;
}

/// A table-parallel model equals the whole model: the mean loss over all ranks' sequences, and every gradient.
inline void model_matches(mf::Communicator& comm) {
  mf::MemoryFormerLM<float> whole(small_lm(), 21);
  mf::MemoryFormerLM<float> part(small_lm(), 21, mf::TableSharding{&comm});
  const Index ranks = comm.size(), share = 2, seq = 12, batch = share * ranks;
  std::vector<std::int32_t> tokens(std::size_t(batch * seq)), targets(tokens.size());
  mf::Rng rng = mf::Rng::stream(9, 0);
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    tokens[i] = std::int32_t(rng.next_u64() % 256);
    targets[i] = std::int32_t(rng.next_u64() % 256);
  }
  mf::MemoryFormerLM<float>::Cache c, c_part;
  const float loss = whole.forward_loss(tokens, targets, batch, seq, c);
  whole.backward(c);
  const auto mine = std::size_t(comm.rank() * share * seq), count = std::size_t(share * seq);
  const float part_loss = part.forward_loss(std::span<const std::int32_t>(tokens).subspan(mine, count),
                                            std::span<const std::int32_t>(targets).subspan(mine, count), share, seq,
                                            c_part);
  part.backward(c_part, 1.0f / float(ranks));
  EXPECT_NEAR(mf::all_reduce_sum(comm, double(part_loss)) / double(ranks), double(loss), 1e-5);
  expect_parameters_match(comm, whole.parameters(), part.parameters(), 1e-4);
}

/// DataParallel's packed exchange of touched rows and its whole-parameter exchange both equal a dense sum of the same
/// gradients, bit for bit, and leave the sorted union of the touched rows flagged and listed.
inline void sparse_exchange_equals_dense(mf::Communicator& comm) {
  const Index rows = 64, width = 5;
  std::vector<float> value(std::size_t(rows * width), 0.0f), reference;
  std::vector<Index> union_rows;
  for (const double fraction : {1.0, 0.0}) {
    std::vector<float> grad(value.size(), 0.0f);
    std::vector<std::uint8_t> flags(std::size_t(rows), 0);
    std::vector<Index> list;
    mf::Rng rng = mf::Rng::stream(100 + std::uint64_t(comm.rank()), 0);
    for (int i = 0; i < 9; ++i) {  // rank-specific rows, some shared between ranks
      const Index r = Index(rng.next_u64() % std::uint64_t(rows));
      if (flags[std::size_t(r)] == 0) {
        flags[std::size_t(r)] = 1;
        list.push_back(r);
      }
      for (Index j = 0; j < width; ++j) grad[std::size_t(r * width + j)] += float(rng.normal(0.0, 1.0));
    }
    if (fraction == 1.0) {
      reference = grad;
      mf::all_reduce_sum(comm, std::span<float>(reference));
      const std::vector<Index> all = mf::all_gather_list<Index>(comm, list);
      union_rows.assign(all.begin(), all.end());
      std::sort(union_rows.begin(), union_rows.end());
      union_rows.erase(std::unique(union_rows.begin(), union_rows.end()), union_rows.end());
    }
    mf::ParameterView<float> view{"t", {1, rows, width}, value, grad, mf::ParameterKind::Table, width, &flags, &list};
    mf::DataParallelOptions options;
    options.dense_row_fraction = fraction;
    mf::DataParallel<float> dp(comm, {view}, options);
    dp.sum_gradients();
    EXPECT_EQ(grad, reference) << "dense_row_fraction " << fraction;
    if (comm.size() == 1) std::sort(list.begin(), list.end());  // one rank: nothing exchanged, the list kept as is
    EXPECT_EQ(list, union_rows);
    for (Index r = 0; r < rows; ++r)
      EXPECT_EQ(flags[std::size_t(r)] != 0, std::binary_search(union_rows.begin(), union_rows.end(), r)) << r;
    if (comm.size() > 1) {
      EXPECT_EQ(dp.last_exchange().packed_sparse, fraction == 1.0 ? 1 : 0);
      EXPECT_EQ(dp.last_exchange().whole_sparse, fraction == 1.0 ? 0 : 1);
    }
  }
}

/// Dense gradients summed in buckets (several flushes, and a parameter larger than a bucket summed alone in place)
/// equal all_reduce_sum of each gradient, bit for bit; replicas that differ are reported on every rank.
inline void dense_buckets_and_replica_check(mf::Communicator& comm) {
  std::vector<std::vector<float>> values, grads, reference;
  std::vector<mf::ParameterView<float>> views;
  mf::Rng rng = mf::Rng::stream(200 + std::uint64_t(comm.rank()), 0);
  for (const std::size_t size : {std::size_t(10), std::size_t(30), std::size_t(7), std::size_t(9)}) {
    values.emplace_back(size, 0.5f);
    grads.emplace_back(size);
    rng.fill_normal(std::span<float>(grads.back()), 0.0, 1.0);
  }
  for (std::size_t i = 0; i < grads.size(); ++i) {
    reference.push_back(grads[i]);
    mf::all_reduce_sum(comm, std::span<float>(reference.back()));
    views.push_back({"p" + std::to_string(i), {mf::Index(values[i].size())}, values[i], grads[i], mf::ParameterKind::Dense});
  }
  mf::DataParallelOptions options;
  options.bucket_bytes = 16 * sizeof(float);  // 10 | 30 alone | 7 + 9
  mf::DataParallel<float> dp(comm, views, options);
  dp.sum_gradients();
  for (std::size_t i = 0; i < grads.size(); ++i) EXPECT_EQ(grads[i], reference[i]) << "parameter " << i;
  if (comm.size() > 1) {
    EXPECT_EQ(dp.last_exchange().dense_values, 56);
  }
  EXPECT_NO_THROW(dp.check_replicas("before the change"));
  if (comm.rank() == comm.size() - 1) values[2][3] = 0.25f;
  if (comm.size() > 1) {
    EXPECT_THROW(dp.check_replicas("after the change"), mf::DistributedError);
  } else {
    EXPECT_NO_THROW(dp.check_replicas("after the change"));
  }
}

/// The training text of the cases below: varied enough that a model learns in a few steps.
inline const mf::TextDataset& training_text() {
  static const mf::TextDataset data = [] {
    std::string text;
    mf::Rng rng = mf::Rng::stream(3, 0);
    const char* words[] = {"the ", "valley ", "river ", "runs ", "north ", "and ", "a ", "mill ", "stands ", "by ",
                           "its ", "bank. ", "Rain ", "fell ", "all ", "night; "};
    while (text.size() < 24000) text += words[rng.next_u64() % 16];
    return mf::TextDataset(text, 0.1);
  }();
  return data;
}

inline mf::TrainerOptions training_options(Index steps) {
  mf::TrainerOptions o;
  o.steps = steps;
  o.batch = 6;  // divisible by 1, 2 and 3 ranks
  o.seq = 16;
  o.accumulate = 2;
  o.lr = 3e-3;
  o.eval_every = 0;
  o.eval_windows = 6;
  o.replica_check_every = 5;
  return o;
}

/// Per-step losses of `steps` steps of the one-rank run (no communicator).
inline std::vector<double> one_rank_losses(Index steps, std::uint64_t seed) {
  mf::MemoryFormerLM<float> model(small_lm(), seed);
  mf::Trainer<mf::MemoryFormerLM<float>> trainer(model, training_text(), training_options(steps));
  std::vector<double> losses;
  for (Index s = 0; s < steps; ++s) losses.push_back(trainer.step().loss);
  return losses;
}

/**
 * R ranks × batch/R sequences give the losses of one rank × batch sequences within `tolerance` (relative) over 20
 * steps, data- or table-parallel; the replicated parameters end bit-identical on every rank.
 */
inline void training_matches_one_rank(mf::Communicator& comm, bool table_parallel, double tolerance) {
  const Index steps = 20;
  const std::vector<double> reference = one_rank_losses(steps, 5);
  mf::MemoryFormerLM<float> model(small_lm(), 5, table_parallel ? mf::TableSharding{&comm} : mf::TableSharding{});
  mf::Trainer<mf::MemoryFormerLM<float>> trainer(model, training_text(), training_options(steps), comm);
  EXPECT_EQ(trainer.table_parallel(), table_parallel);
  double worst = 0.0;
  for (Index s = 0; s < steps; ++s) {
    const double loss = trainer.step().loss;
    worst = std::max(worst, std::abs(loss - reference[std::size_t(s)]) / reference[std::size_t(s)]);
  }
  EXPECT_LE(worst, tolerance) << (table_parallel ? "table" : "data") << "-parallel on " << comm.size() << " ranks";
  EXPECT_LT(reference.back(), reference.front());  // it learned: the comparison is not between two constants
  // (b) the replicas are identical, and the check that training runs says so too.
  const std::vector<std::uint64_t> prints =
      mf::all_gather_value<std::uint64_t>(comm, trainer.data_parallel().replica_fingerprint());
  for (std::uint64_t f : prints) EXPECT_EQ(f, prints[0]);
  // Reproducible for this rank count: a second run gives the same bits.
  mf::MemoryFormerLM<float> again(small_lm(), 5, table_parallel ? mf::TableSharding{&comm} : mf::TableSharding{});
  mf::Trainer<mf::MemoryFormerLM<float>> second(again, training_text(), training_options(steps), comm);
  for (Index s = 0; s < steps; ++s) second.step();
  EXPECT_EQ(second.data_parallel().replica_fingerprint(), trainer.data_parallel().replica_fingerprint());
  const auto a = model.parameters(), b = again.parameters();
  for (std::size_t i = 0; i < a.size(); ++i)
    EXPECT_TRUE(std::equal(a[i].value.begin(), a[i].value.end(), b[i].value.begin())) << a[i].name;
  EXPECT_NO_THROW(trainer.data_parallel().check_replicas("at the end of the test"));
  // Evaluation splits the windows over the ranks and still scores all of them.
  const mf::EvalInfo eval = trainer.evaluate();
  EXPECT_EQ(eval.tokens, 6 * 16);
  EXPECT_TRUE(std::isfinite(eval.loss));
}

/// Checkpoints: a data-parallel save resumes on one rank to the same parameters; a table-parallel save resumes on
/// the same ranks (and is refused by a whole model).
inline void checkpoints_resume(mf::Communicator& comm, const std::filesystem::path& dir) {
  const Index steps = 4;
  for (const bool table_parallel : {false, true}) {
    const std::filesystem::path path = dir / (table_parallel ? "tp.ckpt" : "dp.ckpt");
    const mf::TableSharding sharding = table_parallel ? mf::TableSharding{&comm} : mf::TableSharding{};
    mf::MemoryFormerLM<float> model(small_lm(), 8, sharding);
    mf::Trainer<mf::MemoryFormerLM<float>> trainer(model, training_text(), training_options(steps), comm);
    for (Index s = 0; s < steps; ++s) trainer.step();
    trainer.save_checkpoint(path);
    mf::MemoryFormerLM<float> again(small_lm(), 9, sharding);
    if (!table_parallel) {
      // Another rank count: one rank alone (each rank on its own here).
      mf::Trainer<mf::MemoryFormerLM<float>> single(again, training_text(), training_options(steps));
      EXPECT_EQ(single.resume(path), steps);
    } else {
      mf::Trainer<mf::MemoryFormerLM<float>> same(again, training_text(), training_options(steps), comm);
      EXPECT_EQ(same.resume(path), steps);
      mf::MemoryFormerLM<float> whole(small_lm(), 9);
      mf::Trainer<mf::MemoryFormerLM<float>> single(whole, training_text(), training_options(steps));
      EXPECT_THROW(single.resume(path), mf::FormatError);
    }
    const auto a = model.parameters(), b = again.parameters();
    for (std::size_t i = 0; i < a.size(); ++i)
      EXPECT_TRUE(std::equal(a[i].value.begin(), a[i].value.end(), b[i].value.begin())) << a[i].name;
    comm.barrier();  // nobody starts the next save while another rank still reads
  }
}

}  // namespace memoryformer_test::distributed
