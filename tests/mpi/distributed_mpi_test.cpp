// SPDX-License-Identifier: MIT
// The distributed cases of tests/support/distributed_cases.hpp on MPI processes: ctest runs this program under
// `mpirun -np 2` (label mpi). Each TEST runs on every rank with the world communicator.
#include <gtest/gtest.h>

#include <filesystem>
#include <string>

#include <memoryformer/distributed/mpi_communicator.hpp>

#include "mpi_world.hpp"
#include "support/distributed_cases.hpp"

namespace {

namespace cases = memoryformer_test::distributed;
using memoryformer_test::world;

TEST(Mpi, RunsOnSeveralRanks) { EXPECT_GE(world().size(), 2) << "run this program under mpirun -np 2 or more"; }
TEST(Mpi, TableParallelMemoryLayerMatchesWholeLayer) { cases::memory_layer_matches(world()); }
TEST(Mpi, TableParallelMemoryBlockMatchesWholeBlock) { cases::memory_block_matches(world()); }
TEST(Mpi, TableParallelModelMatchesWholeModel) { cases::model_matches(world()); }
TEST(Mpi, SparseRowExchangeEqualsDenseSum) { cases::sparse_exchange_equals_dense(world()); }
TEST(Mpi, DenseBucketsAndReplicaCheck) { cases::dense_buckets_and_replica_check(world()); }
TEST(Mpi, DataParallelTrainingMatchesOneRank) { cases::training_matches_one_rank(world(), false, 1e-5); }
TEST(Mpi, TableParallelTrainingMatchesOneRank) { cases::training_matches_one_rank(world(), true, 1e-5); }
TEST(Mpi, CheckpointsResume) {
  // One directory for all ranks (they share this machine's file system), named by rank 0.
  const std::string name = "mf_mpi_" + std::to_string(memoryformer::all_gather_value<long>(world(), long(::getpid()))[0]);
  const auto dir = std::filesystem::temp_directory_path() / name;
  if (world().rank() == 0) std::filesystem::create_directories(dir);
  world().barrier();
  cases::checkpoints_resume(world(), dir);
  world().barrier();
  if (world().rank() == 0) std::filesystem::remove_all(dir);
}

}  // namespace
