// SPDX-License-Identifier: MIT
// Data and table parallelism (design §11) on ranks that are threads of this process: the cases of
// tests/support/distributed_cases.hpp on 1, 2 and 3 ranks (tests/mpi/ runs the same cases on MPI processes), plus the
// checks that need no second rank.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>

#include <unistd.h>

#include <memoryformer/distributed/self_communicator.hpp>
#include <memoryformer/frozen_memory_layer.hpp>

#include "support/distributed_cases.hpp"
#include "support/thread_communicator.hpp"

namespace {

namespace mf = memoryformer;
namespace cases = memoryformer_test::distributed;
using memoryformer_test::run_ranks;

class ThreadRanks : public ::testing::TestWithParam<int> {};

TEST_P(ThreadRanks, CollectivesSumInRankOrderAndGatherLists) {
  run_ranks(GetParam(), [](mf::Communicator& comm) {
    std::vector<double> v(11);
    for (std::size_t i = 0; i < v.size(); ++i) v[i] = double(comm.rank() + 1) * double(i);
    mf::all_reduce_sum(comm, std::span<double>(v), 4);  // pieces of 4: the piece loop runs too
    const double ranks_sum = double(comm.size() * (comm.size() + 1) / 2);
    for (std::size_t i = 0; i < v.size(); ++i) EXPECT_EQ(v[i], ranks_sum * double(i));
    std::vector<int> mine(std::size_t(comm.rank()), comm.rank());  // rank r sends r copies of r
    std::vector<std::size_t> counts;
    const std::vector<int> all = mf::all_gather_list<int>(comm, mine, &counts);
    std::vector<int> expected;
    for (int q = 0; q < comm.size(); ++q) expected.insert(expected.end(), std::size_t(q), q);
    EXPECT_EQ(all, expected);
    EXPECT_EQ(counts.size(), std::size_t(comm.size()));
  });
}

TEST_P(ThreadRanks, TableParallelMemoryLayerMatchesWholeLayer) { run_ranks(GetParam(), cases::memory_layer_matches); }
TEST_P(ThreadRanks, TableParallelMemoryBlockMatchesWholeBlock) { run_ranks(GetParam(), cases::memory_block_matches); }
TEST_P(ThreadRanks, TableParallelModelMatchesWholeModel) { run_ranks(GetParam(), cases::model_matches); }
TEST_P(ThreadRanks, SparseRowExchangeEqualsDenseSum) { run_ranks(GetParam(), cases::sparse_exchange_equals_dense); }
TEST_P(ThreadRanks, DenseBucketsAndReplicaCheck) { run_ranks(GetParam(), cases::dense_buckets_and_replica_check); }
TEST_P(ThreadRanks, DataParallelTrainingMatchesOneRank) {
  run_ranks(GetParam(), [](mf::Communicator& comm) { cases::training_matches_one_rank(comm, false, 1e-5); });
}
TEST_P(ThreadRanks, TableParallelTrainingMatchesOneRank) {
  run_ranks(GetParam(), [](mf::Communicator& comm) { cases::training_matches_one_rank(comm, true, 1e-5); });
}
TEST_P(ThreadRanks, CheckpointsResume) {
  const auto dir = std::filesystem::temp_directory_path() /
                   ("mf_distributed_" + std::to_string(GetParam()) + "_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  run_ranks(GetParam(), [&](mf::Communicator& comm) { cases::checkpoints_resume(comm, dir); });
  std::filesystem::remove_all(dir);
}

INSTANTIATE_TEST_SUITE_P(Ranks, ThreadRanks, ::testing::Values(1, 2, 3),
                         [](const auto& info) { return std::to_string(info.param) + "ranks"; });

TEST(TableSharding, OwnedRangesTileTheTablesAndRefuseMoreRanksThanTables) {
  for (int ranks = 1; ranks <= 5; ++ranks) {
    mf::Index next = 0;
    for (int r = 0; r < ranks; ++r) {
      const mf::TableRange t = mf::owned_tables(13, r, ranks);
      EXPECT_EQ(t.begin, next);
      EXPECT_GE(t.size(), 13 / ranks);
      EXPECT_LE(t.size(), 13 / ranks + 1);
      next = t.end;
    }
    EXPECT_EQ(next, 13);
  }
  EXPECT_THROW(mf::owned_tables(2, 0, 3), mf::ConfigError);
  EXPECT_THROW(mf::owned_tables(8, 3, 3), mf::ConfigError);
  // A layer with fewer tables than ranks says which.
  EXPECT_THROW(run_ranks(3,
                         [](mf::Communicator& comm) {
                           mf::MemoryLayer<float>({.d_in = 8, .d_out = 4, .tau = 4}, 1, mf::TableSharding{&comm});
                         }),
               mf::ConfigError);
}

TEST(TableSharding, ShardedLayersCannotBeFrozenOrBuiltIntoDenseModels) {
  mf::SelfCommunicator comm;
  const mf::MemoryLayer<float> layer({.d_in = 8, .d_out = 4, .tau = 4}, 1, mf::TableSharding{&comm});
  EXPECT_TRUE(layer.sharded());
  EXPECT_THROW(mf::FrozenMemoryLayer(layer, mf::StorageType::F32), mf::ConfigError);
  mf::TransformerLM<float>::Config c;
  c.block.d = 8;
  c.block.heads = 2;
  EXPECT_THROW(mf::TransformerLM<float>(c, 1, mf::TableSharding{&comm}), mf::ConfigError);
}

TEST(TableSharding, ClippingNeedsTheShardedNormAcrossRanks) {
  mf::SelfCommunicator comm;
  mf::MemoryLayer<float> layer({.d_in = 8, .d_out = 4, .tau = 4}, 1, mf::TableSharding{&comm});
  mf::AdamW<float> opt(layer.parameters());
  EXPECT_THROW(opt.step_fused(1e-3, 1.0), mf::ConfigError);
  EXPECT_NO_THROW(opt.step_fused(1e-3, 0.0));  // no clipping: no norm to agree on
  opt.set_sharded_norm_sum([](double x) { return x; });
  EXPECT_NO_THROW(opt.step_fused(1e-3, 1.0));
}

TEST(TableSharding, CheckpointsRefuseAnotherRankCountAndADamagedShard) {
  const auto dir = std::filesystem::temp_directory_path() / ("mf_tp_ckpt_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const auto path = dir / "run.ckpt";
  run_ranks(2, [&](mf::Communicator& comm) {
    mf::MemoryFormerLM<float> model(cases::small_lm(), 3, mf::TableSharding{&comm});
    mf::Trainer<mf::MemoryFormerLM<float>> trainer(model, cases::training_text(), cases::training_options(2), comm);
    trainer.step();
    trainer.save_checkpoint(path);
  });
  EXPECT_TRUE(std::filesystem::exists(dir / "run.ckpt.shard-1-of-2"));
  const auto resume_on = [&](int ranks) {
    run_ranks(ranks, [&](mf::Communicator& comm) {
      mf::MemoryFormerLM<float> model(cases::small_lm(), 3, mf::TableSharding{&comm});
      mf::Trainer<mf::MemoryFormerLM<float>> t(model, cases::training_text(), cases::training_options(2), comm);
      t.resume(path);
    });
  };
  EXPECT_NO_THROW(resume_on(2));
  // Three ranks cannot take a two-rank save; every rank reports it.
  EXPECT_THROW(resume_on(3), mf::FormatError);
  // A shard that is not the one the manifest lists is refused (on every rank, none left waiting).
  {
    // The last byte inverted: a constant written there could equal the byte it replaces.
    std::fstream f(dir / "run.ckpt.shard-1-of-2", std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(-1, std::ios::end);
    const char last = char(f.get());
    f.seekp(-1, std::ios::end);
    f.put(char(~last));
  }
  EXPECT_THROW(resume_on(2), mf::FormatError);
  std::filesystem::remove_all(dir);
}

TEST(DataParallel, OptionsAndBatchSplitAreChecked) {
  mf::DataParallelOptions o;
  o.dense_row_fraction = 1.5;
  EXPECT_THROW(o.validate(), mf::ConfigError);
  EXPECT_THROW(run_ranks(4,
                         [](mf::Communicator& comm) {
                           mf::MemoryFormerLM<float> model(cases::small_lm(), 1);
                           mf::Trainer<mf::MemoryFormerLM<float>> t(model, cases::training_text(),
                                                                    cases::training_options(2), comm);  // batch 6
                         }),
               mf::ConfigError);
}

}  // namespace
